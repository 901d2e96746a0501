//! Thin typed wrappers over what gingham asks of the kernel: links, addresses and routes over
//! rtnetlink, network namespaces, and sysctls. Nothing else in gingham talks to the kernel.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

mod batch;
pub mod memory;
pub mod netns;
pub mod nft;
mod nft_expr;
mod nft_wire;
pub mod sysctl;
pub mod tcp;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("network namespace {path}: {message}")]
    Netns { path: String, message: String },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("sysctl {path}: {message}")]
    Sysctl { path: String, message: String },
    #[error("nftables: {0}")]
    Nft(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

fn nl(e: rtnetlink::Error) -> KernelError {
    KernelError::Netlink(e.to_string())
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == errno)
}

/// A link as gingham needs to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    pub kind: Option<String>,
}

/// A neighbour or FDB entry as the kernel reported it.
#[derive(Clone, Debug)]
pub struct Neighbour {
    pub ip: Option<IpAddr>,
    pub mac: Option<[u8; 6]>,
    entry: netlink_packet_route::neighbour::NeighbourMessage,
}

/// A route gingham programs: destination, optional gateway and device, scope and protocol.
/// `also_via`: more gateways of equal cost over the same device (ECMP; the kernel gets one
/// multipath route: `nexthop via gateway … nexthop via also_via[0] …`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub also_via: Vec<IpAddr>,
    pub oif: Option<u32>,
    pub scope_link: bool,
    pub onlink: bool,
    pub blackhole: bool,
    pub protocol: u8,
}

impl Route {
    /// `dst dev <oif> scope link`.
    pub fn device(dst: IpNet, oif: u32, protocol: u8) -> Route {
        Route {
            dst,
            gateway: None,
            also_via: Vec::new(),
            oif: Some(oif),
            scope_link: true,
            onlink: false,
            blackhole: false,
            protocol,
        }
    }
    /// `dst via gw dev <oif>`.
    pub fn via(dst: IpNet, gateway: IpAddr, oif: u32, protocol: u8) -> Route {
        Route {
            dst,
            gateway: Some(gateway),
            also_via: Vec::new(),
            oif: Some(oif),
            scope_link: false,
            onlink: false,
            blackhole: false,
            protocol,
        }
    }
}

/// A netlink handle bound to one network namespace (the socket stays in the namespace it was
/// opened in, whatever thread uses it later).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// A raw socket in the same namespace for route changes in bulk (None if it could not be
    /// made: then they go one request at a time).
    batch: Option<Arc<std::sync::Mutex<batch::RouteBatcher>>>,
}

/// Open a network namespace file (`/var/run/netns/x`, `/proc/<pid>/ns/net`).
pub fn open_netns(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| KernelError::Netns { path: path.display().to_string(), message: e.to_string() })
}

/// Whether `ns` is the network namespace this process runs in (a pod must never be given the
/// node's own namespace).
pub fn is_own_netns(ns: &File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let id = |m: std::fs::Metadata| (m.dev(), m.ino());
    let err =
        |e: std::io::Error| KernelError::Netns { path: "/proc/thread-self/ns/net".into(), message: e.to_string() };
    let theirs = ns.metadata().map_err(err)?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net").map_err(err)?;
    Ok(id(theirs) == id(ours))
}

/// Run `f` on a fresh OS thread that has entered the namespace at `path`. The calling thread
/// (maybe a tokio worker) never changes namespace.
pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    in_netns_file(&open_netns(path)?, f)
}

/// Run `f` on a fresh OS thread that has entered the namespace `ns` (an open namespace file,
/// e.g. one a CNI plugin passed over the agent's socket).
pub fn in_netns_file<T: Send + 'static>(ns: &File, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let netns_err = |m: String| KernelError::Netns { path: format!("fd {}", ns.as_raw_fd()), message: m };
    let ns = ns.try_clone().map_err(|e| netns_err(e.to_string()))?;
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| KernelError::Netns {
            path: format!("fd {}", ns.as_raw_fd()),
            message: if e == nix::errno::Errno::EINVAL { "not a network namespace".to_string() } else { e.to_string() },
        })?;
        Ok(f())
    })
    .join()
    .map_err(|_| netns_err("worker thread panicked".into()))?
}

impl Netlink {
    /// A handle in this process's own namespace. Needs a tokio runtime.
    pub fn current() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| KernelError::Netlink(e.to_string()))?;
        tokio::spawn(conn);
        let batch = batch::RouteBatcher::new().ok().map(|b| Arc::new(std::sync::Mutex::new(b)));
        Ok(Netlink { handle, batch })
    }

    /// A handle whose socket lives in the namespace at `path`.
    pub fn in_namespace(path: &Path) -> Result<Netlink> {
        Self::in_namespace_file(&open_netns(path)?)
    }

    /// A handle whose socket lives in the namespace `ns` (an open namespace file).
    pub fn in_namespace_file(ns: &File) -> Result<Netlink> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, batch) = in_netns_file(ns, move || {
            let _g = rt.enter();
            rtnetlink::new_connection().map(|(c, h, _)| (c, h, batch::RouteBatcher::new().ok()))
        })?
        .map_err(|e| KernelError::Netlink(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Netlink { handle, batch: batch.map(|b| Arc::new(std::sync::Mutex::new(b))) })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(to_link(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc_enodev()) => Ok(None),
            Err(e) => Err(nl(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await.map_err(nl)?;
        Ok(msgs.iter().map(to_link).collect())
    }

    /// Create a veth pair: `host` here, `peer` created directly inside the namespace `peer_ns`
    /// (never moved: a move takes the RTNL lock again). `host_mac` for the host end.
    pub async fn add_veth(
        &self,
        host: &str,
        peer: &str,
        peer_ns: &File,
        mtu: u32,
        host_mac: Option<[u8; 6]>,
    ) -> Result<()> {
        self.add_veth_with_macs(host, peer, peer_ns, mtu, host_mac, None).await
    }

    /// [`Self::add_veth`], with the peer's MAC chosen by the caller too (None: the kernel's).
    pub async fn add_veth_with_macs(
        &self,
        host: &str,
        peer: &str,
        peer_ns: &File,
        mtu: u32,
        host_mac: Option<[u8; 6]>,
        peer_mac: Option<[u8; 6]>,
    ) -> Result<()> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_string()).mtu(mtu);
        if let Some(mac) = peer_mac {
            peer_msg = peer_msg.address(mac.to_vec());
        }
        let peer_msg = peer_msg.setns_by_fd(peer_ns.as_raw_fd()).build();
        let mut b = LinkMessageBuilder::<rtnetlink::LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
        if let Some(mac) = host_mac {
            b = b.address(mac.to_vec());
        }
        match self.handle.link().add(b.build()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, 17) => Err(KernelError::Exists(host.to_string())),
            Err(e) => Err(nl(e)),
        }
    }

    /// Delete a link by name (one request: the kernel looks the name up); false if it did not
    /// exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let mut req = self.handle.link().del(0);
        req.message_mut().attributes.push(LinkAttribute::IfName(name.to_string()));
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc_enodev()) => Ok(false),
            Err(e) => Err(nl(e)),
        }
    }

    /// Rename a link; false if there is none of that name.
    pub async fn rename_link(&self, name: &str, new: &str) -> Result<bool> {
        let Some(l) = self.link(name).await? else { return Ok(false) };
        match self.handle.link().set(LinkUnspec::new_with_index(l.index).name(new.to_string()).build()).execute().await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc_enodev()) => Ok(false),
            Err(e) => Err(nl(e)),
        }
    }

    /// Delete a link on a thread of its own with its own netlink socket. The kernel runs a
    /// request inside the sender's sendmsg, and unregistering a device waits for an RCU grace
    /// period (~20 ms): on a shared runtime that stalls a worker; here deletions overlap.
    pub async fn delete_link_detached(name: &str) -> Result<bool> {
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| KernelError::Netlink(e.to_string()))?;
            rt.block_on(async { Netlink::current()?.delete_link(&name).await })
        })
        .await
        .map_err(|e| KernelError::Netlink(e.to_string()))?
    }

    /// Create the VXLAN device (or bring an existing one to the given MAC and MTU); returns its
    /// index. Learning is off: gingham programs every neighbour and FDB entry itself.
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: std::net::Ipv4Addr,
        underlay: u32,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<u32> {
        if let Some(l) = self.link(name).await? {
            if l.kind.as_deref() == Some("vxlan") {
                if l.mac != Some(mac) || l.mtu != mtu || !l.up {
                    let m = LinkUnspec::new_with_index(l.index).address(mac.to_vec()).mtu(mtu).up().build();
                    self.handle.link().set(m).execute().await.map_err(nl)?;
                }
                return Ok(l.index);
            }
            self.delete_link(name).await?;
        }
        let m = rtnetlink::LinkVxlan::new(name, vni)
            .port(port)
            .local(local)
            .dev(underlay)
            .learning(false)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        self.handle.link().add(m).execute().await.map_err(nl)?;
        self.link(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| KernelError::Netlink(format!("{name} vanished after creation")))
    }

    /// A permanent neighbour (ARP/NDP) entry.
    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl)
    }

    /// A permanent FDB entry on a VXLAN device: frames for `mac` go to VTEP `dst`.
    pub async fn replace_fdb(&self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(dst)
            .flags(netlink_packet_route::neighbour::NeighbourFlags::Own)
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl)
    }

    /// Neighbour (ARP/NDP) entries, or with `bridge` the FDB entries, of one device.
    pub async fn neighbours(&self, index: u32, bridge: bool) -> Result<Vec<Neighbour>> {
        use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let mut req = self.handle.neighbours().get();
        if bridge {
            req = req.set_address_family(netlink_packet_route::AddressFamily::Bridge);
        }
        let msgs: Vec<_> = req.execute().try_collect().await.map_err(nl)?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .map(|m| {
                let mut n = Neighbour { ip: None, mac: None, entry: m };
                for a in &n.entry.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => n.ip = Some(IpAddr::V4(*v)),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => n.ip = Some(IpAddr::V6(*v)),
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => n.mac = l.as_slice().try_into().ok(),
                        _ => {}
                    }
                }
                n
            })
            .collect())
    }

    /// Remove a neighbour or FDB entry read with [`Netlink::neighbours`]; absent is fine.
    pub async fn delete_neighbour(&self, n: &Neighbour) -> Result<()> {
        match self.handle.neighbours().del(n.entry.clone()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, 2) => Ok(()),
            Err(e) => Err(nl(e)),
        }
    }

    /// Create a bridge (absent before); returns its index.
    pub async fn add_bridge(&self, name: &str) -> Result<u32> {
        let m = LinkMessageBuilder::<rtnetlink::LinkBridge>::new(name).build();
        match self.handle.link().add(m).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, 17) => return Err(KernelError::Exists(name.to_string())),
            Err(e) => return Err(nl(e)),
        }
        self.link(name).await?.map(|l| l.index).ok_or_else(|| KernelError::Netlink(format!("{name} vanished")))
    }

    /// Enslave a link to a bridge.
    pub async fn set_master(&self, index: u32, master: u32) -> Result<()> {
        self.handle.link().set(LinkUnspec::new_with_index(index).controller(master).build()).execute().await.map_err(nl)
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(nl)
    }

    /// Add an address (idempotent).
    pub async fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
        self.handle.address().add(index, addr.addr(), addr.prefix_len()).replace().execute().await.map_err(nl)
    }

    /// Remove an address from a link (absent is fine).
    pub async fn delete_address(&self, index: u32, addr: IpNet) -> Result<()> {
        let msgs: Vec<_> =
            self.handle.address().get().set_link_index_filter(index).execute().try_collect().await.map_err(nl)?;
        for m in msgs {
            let matches = m.header.prefix_len == addr.prefix_len()
                && m.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == addr.addr()));
            if matches {
                self.handle.address().del(m).execute().await.map_err(nl)?;
            }
        }
        Ok(())
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs: Vec<_> =
            self.handle.address().get().set_link_index_filter(index).execute().try_collect().await.map_err(nl)?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    fn route_message(r: &Route) -> Result<RouteMessage> {
        fn bad(e: impl std::fmt::Display) -> KernelError {
            KernelError::Netlink(e.to_string())
        }
        let mut b =
            RouteMessageBuilder::<IpAddr>::new().destination_prefix(r.dst.addr(), r.dst.prefix_len()).map_err(bad)?;
        if let (Some(gw), false) = (r.gateway, r.also_via.is_empty()) {
            use netlink_packet_route::route::{RouteNextHop, RouteNextHopFlags};
            let hop = |g: IpAddr| {
                let mut h = RouteNextHop::default();
                h.flags = if r.onlink { RouteNextHopFlags::Onlink } else { RouteNextHopFlags::empty() };
                h.interface_index = r.oif.unwrap_or(0);
                h.attributes = vec![match (g, r.dst.addr().is_ipv4()) {
                    (IpAddr::V4(a), true) => {
                        RouteAttribute::Gateway(netlink_packet_route::route::RouteAddress::Inet(a))
                    }
                    (IpAddr::V6(a), false) => {
                        RouteAttribute::Gateway(netlink_packet_route::route::RouteAddress::Inet6(a))
                    }
                    (IpAddr::V4(a), false) => RouteAttribute::Via(netlink_packet_route::route::RouteVia::Inet(a)),
                    (IpAddr::V6(a), true) => RouteAttribute::Via(netlink_packet_route::route::RouteVia::Inet6(a)),
                }];
                h
            };
            let hops = std::iter::once(gw).chain(r.also_via.iter().copied()).map(hop).collect();
            b = b.multipath(hops);
            if r.scope_link {
                b = b.scope(RouteScope::Link);
            }
            if r.blackhole {
                b = b.kind(RouteType::BlackHole);
            }
            return Ok(b.protocol(RouteProtocol::from(r.protocol)).build());
        }
        if let Some(gw) = r.gateway {
            b = b.gateway(gw).map_err(bad)?;
        }
        if let Some(oif) = r.oif {
            b = b.output_interface(oif);
        }
        if r.scope_link {
            b = b.scope(RouteScope::Link);
        }
        if r.onlink {
            b = b.onlink();
        }
        if r.blackhole {
            b = b.kind(RouteType::BlackHole);
        }
        Ok(b.protocol(RouteProtocol::from(r.protocol)).build())
    }

    /// Add or replace a route in the main table.
    pub async fn replace_route(&self, r: &Route) -> Result<()> {
        self.handle.route().add(Self::route_message(r)?).replace().execute().await.map_err(nl)
    }

    /// Delete a route; false if it was not there.
    pub async fn delete_route(&self, r: &Route) -> Result<bool> {
        match self.handle.route().del(Self::route_message(r)?).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, 3) => Ok(false), // ESRCH
            Err(e) => Err(nl(e)),
        }
    }

    /// Many route changes, pipelined on the one socket (up to `ROUTES_IN_FLIGHT` requests
    /// before the first answer is awaited, as BIRD streams its kernel table): each result in
    /// the order given, true for a deletion that found its route.
    pub async fn change_routes(&self, ops: &[RouteOp<'_>]) -> Vec<Result<bool>> {
        if let Some(b) = &self.batch {
            return Self::change_routes_batched(b.clone(), ops).await;
        }
        use futures::StreamExt;
        let mut out = Vec::with_capacity(ops.len());
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut next = ops.iter();
        loop {
            while in_flight.len() < ROUTES_IN_FLIGHT {
                match next.next() {
                    Some(op) => in_flight.push_back(self.route_op(*op)),
                    None => break,
                }
            }
            match in_flight.next().await {
                Some(r) => out.push(r),
                None => return out,
            }
        }
    }

    /// The same through the raw socket, in datagrams of many messages, on a blocking thread
    /// (a datagram's messages are built just before it is sent: a full table never sits in
    /// memory as messages).
    async fn change_routes_batched(
        b: Arc<std::sync::Mutex<batch::RouteBatcher>>,
        ops: &[RouteOp<'_>],
    ) -> Vec<Result<bool>> {
        let mut out = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(batch::CHUNK) {
            let mut slots: Vec<Option<Result<bool>>> = Vec::with_capacity(chunk.len());
            let mut msgs = Vec::with_capacity(chunk.len());
            for op in chunk {
                let (replace, r) = match op {
                    RouteOp::Replace(r) => (true, r),
                    RouteOp::Delete(r) => (false, r),
                };
                match Self::route_message(r) {
                    Ok(m) => {
                        msgs.push((replace, m));
                        slots.push(None);
                    }
                    Err(e) => slots.push(Some(Err(e))),
                }
            }
            let b = b.clone();
            let answers = tokio::task::spawn_blocking(move || b.lock().unwrap_or_else(|e| e.into_inner()).apply(&msgs))
                .await
                .unwrap_or_else(|e| vec![Err(format!("the route batch did not finish: {e}"))]);
            let mut answers = answers.into_iter();
            out.extend(slots.into_iter().map(|slot| {
                match slot {
                    Some(r) => r,
                    None => answers
                        .next()
                        .unwrap_or_else(|| Err("the route batch did not finish".into()))
                        .map_err(KernelError::Netlink),
                }
            }));
        }
        out
    }

    async fn route_op(&self, op: RouteOp<'_>) -> Result<bool> {
        match op {
            RouteOp::Replace(r) => self.replace_route(r).await.map(|()| true),
            RouteOp::Delete(r) => self.delete_route(r).await,
        }
    }

    /// Routes of the main table for one family.
    /// The main-table route the kernel matches for the address `ip` (`ip route get ip
    /// fibmatch`): one lookup, not a dump of every route. None when nothing matches or the
    /// match is a reject route, which the kernel answers with an error of its kind instead.
    pub async fn route_for(&self, ip: IpAddr) -> Result<Option<Route>> {
        let mut msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
            .map_err(|e| KernelError::Netlink(e.to_string()))?
            .build();
        msg.header.flags |= netlink_packet_route::route::RouteFlags::FibMatch;
        let mut s = self.handle.route().get(msg).execute();
        match s.try_next().await {
            Ok(Some(m)) if m.header.table == 254 => Ok(to_route(&m)),
            Ok(_) => Ok(None),
            // ENETUNREACH: no route; EINVAL: blackhole; EHOSTUNREACH: unreachable; EACCES: prohibit.
            Err(e) if [101, 22, 113, 13].into_iter().any(|n| is_errno(&e, n)) => Ok(None),
            Err(e) => Err(nl(e)),
        }
    }

    pub async fn routes(&self, v4: bool) -> Result<Vec<Route>> {
        let probe = if v4 {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        };
        let msgs: Vec<RouteMessage> = self.handle.route().get(probe).execute().try_collect().await.map_err(nl)?;
        Ok(msgs.iter().filter(|m| m.header.table == 254).filter_map(to_route).collect())
    }
}

/// How many route requests `change_routes` keeps in flight.
pub const ROUTES_IN_FLIGHT: usize = 64;

/// One change for `change_routes`.
#[derive(Clone, Copy, Debug)]
pub enum RouteOp<'a> {
    Replace(&'a Route),
    Delete(&'a Route),
}

/// A change the kernel announced (`ip monitor route link`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Route {
        deleted: bool,
        route: Route,
    },
    Link {
        deleted: bool,
        name: String,
        index: u32,
    },
    /// The kernel dropped events (socket buffer overflow): re-read everything.
    Overrun,
}

/// The route and link changes in this namespace, as they happen: reconcilers repair what was
/// changed behind their back at once. The kernel drops events when the socket buffer
/// overflows (reported as `Overrun`), so callers keep a periodic resync as well.
pub fn route_and_link_events() -> Result<tokio::sync::mpsc::UnboundedReceiver<KernelEvent>> {
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage as M;
    use rtnetlink::MulticastGroup;
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])
    .map_err(|e| KernelError::Netlink(e.to_string()))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = futures::StreamExt::next(&mut messages).await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(M::NewRoute(m)) if m.header.table == 254 => {
                    to_route(&m).map(|r| KernelEvent::Route { deleted: false, route: r })
                }
                NetlinkPayload::InnerMessage(M::DelRoute(m)) if m.header.table == 254 => {
                    to_route(&m).map(|r| KernelEvent::Route { deleted: true, route: r })
                }
                NetlinkPayload::InnerMessage(M::NewLink(m)) => {
                    let l = to_link(&m);
                    Some(KernelEvent::Link { deleted: false, name: l.name, index: l.index })
                }
                NetlinkPayload::InnerMessage(M::DelLink(m)) => {
                    let l = to_link(&m);
                    Some(KernelEvent::Link { deleted: true, name: l.name, index: l.index })
                }
                NetlinkPayload::Overrun(_) => Some(KernelEvent::Overrun),
                _ => None,
            };
            if let Some(ev) = ev {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

fn libc_enodev() -> i32 {
    19
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(mac) if mac.len() == 6 => l.mac = mac.as_slice().try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn to_route(m: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut also_via = Vec::new();
    let mut onlink = m.header.flags.contains(netlink_packet_route::route::RouteFlags::Onlink);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr(d),
            RouteAttribute::Gateway(g) => gateway = addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            // ECMP: the first hop as gateway and device, the others' gateways after it.
            RouteAttribute::MultiPath(hops) => {
                for h in hops {
                    let gw = h.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => addr(g),
                        RouteAttribute::Via(v) => match v {
                            netlink_packet_route::route::RouteVia::Inet(a) => Some(IpAddr::V4(*a)),
                            netlink_packet_route::route::RouteVia::Inet6(a) => Some(IpAddr::V6(*a)),
                            _ => None,
                        },
                        _ => None,
                    });
                    if gateway.is_none() {
                        gateway = gw;
                        oif = Some(h.interface_index);
                        onlink |= h.flags.contains(netlink_packet_route::route::RouteNextHopFlags::Onlink);
                    } else if let Some(g) = gw {
                        also_via.push(g);
                    }
                }
            }
            _ => {}
        }
    }
    let v4 = m.header.address_family == netlink_packet_route::AddressFamily::Inet;
    let dst = dst.unwrap_or(if v4 { IpAddr::V4(0.into()) } else { IpAddr::V6(0.into()) });
    Some(Route {
        dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
        gateway,
        also_via,
        oif,
        scope_link: m.header.scope == RouteScope::Link,
        onlink,
        blackhole: m.header.kind == RouteType::BlackHole,
        protocol: u8::from(m.header.protocol),
    })
}
