//! The managers that make the kernel match a [`Desired`]: routes (only those carrying gingham's
//! protocol number are ever touched), the VXLAN device with its neighbours and FDB entries, and
//! the NAT-outgoing table (an nftables table named `gingham`, replaced atomically).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use gingham_kernel::{KernelError, Netlink, Route};
use ipnet::IpNet;
use tokio::io::AsyncWriteExt;

use crate::calc::{Desired, DesiredRoute, Via};

/// Route protocol of every route gingham programs (Felix's number, so the kernel state reads as
/// Calico's).
pub const ROUTE_PROTO: u8 = 80;
pub const VXLAN_DEVICE: &str = "vxlan.calico";
pub const VXLAN_VNI: u32 = 4096;
pub const VXLAN_PORT: u16 = 4789;
pub const NFT_TABLE: &str = "gingham";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("nftables: {0}")]
    Nft(String),
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub routes_added: usize,
    pub routes_removed: usize,
    pub routes_programmed: usize,
    /// Routes that could not be programmed here (IPIP without the kernel's ipip module).
    pub skipped: Vec<String>,
}

pub struct Dataplane {
    pub netlink: Netlink,
    /// The underlay interface and this node's address on it.
    pub underlay: String,
    pub node_ip: Ipv4Addr,
    /// Last NAT ruleset written (rewritten only when it changes).
    nat_applied: tokio::sync::Mutex<Option<String>>,
}

/// A route's identity for comparing desired with actual.
type RouteKey = (IpNet, Option<IpAddr>, Option<u32>, bool);

fn key(r: &Route) -> RouteKey {
    (r.dst, r.gateway, if r.blackhole { None } else { r.oif }, r.blackhole)
}

impl Dataplane {
    pub fn new(netlink: Netlink, underlay: String, node_ip: Ipv4Addr) -> Self {
        Dataplane { netlink, underlay, node_ip, nat_applied: Default::default() }
    }

    /// Make the kernel match `d`. `vtep` is this node's VXLAN address and MAC when it has them.
    pub async fn apply(
        &self,
        d: &Desired,
        vtep: Option<(Ipv4Addr, [u8; 6])>,
        pod_mtu: u32,
    ) -> Result<Applied, ApplyError> {
        let mut out = Applied::default();
        let underlay = self
            .netlink
            .link(&self.underlay)
            .await?
            .ok_or_else(|| KernelError::Netlink(format!("underlay interface {} not found", self.underlay)))?;
        let vxlan_index = match (d.vxlan, vtep) {
            (true, Some((addr, mac))) => Some(self.apply_vxlan(d, addr, mac, underlay.index, pod_mtu).await?),
            _ => {
                self.netlink.delete_link(VXLAN_DEVICE).await?;
                None
            }
        };
        let ipip_index = if d.ipip { self.netlink.link("tunl0").await?.map(|l| l.index) } else { None };
        let mut want: Vec<Route> = Vec::new();
        for r in &d.routes {
            match r {
                DesiredRoute::Blackhole(dst) => want.push(Route {
                    dst: *dst,
                    gateway: None,
                    oif: None,
                    scope_link: false,
                    onlink: false,
                    blackhole: true,
                    protocol: ROUTE_PROTO,
                }),
                DesiredRoute::Remote { dst, gateway, via } => {
                    let (oif, onlink) = match via {
                        Via::Underlay => (Some(underlay.index), false),
                        Via::Vxlan => (vxlan_index, true),
                        Via::Ipip => (ipip_index, true),
                    };
                    match oif {
                        Some(oif) => want.push(Route {
                            dst: *dst,
                            gateway: Some(*gateway),
                            oif: Some(oif),
                            scope_link: false,
                            onlink,
                            blackhole: false,
                            protocol: ROUTE_PROTO,
                        }),
                        None => out.skipped.push(format!("{dst} via {gateway}: no {via:?} device on this node")),
                    }
                }
            }
        }
        let mut have: Vec<Route> = self.netlink.routes(true).await?;
        have.extend(self.netlink.routes(false).await?);
        let have: Vec<Route> = have.into_iter().filter(|r| r.protocol == ROUTE_PROTO).collect();
        let want_keys: BTreeSet<RouteKey> = want.iter().map(key).collect();
        let have_keys: BTreeSet<RouteKey> = have.iter().map(key).collect();
        for r in have.iter().filter(|r| !want_keys.contains(&key(r))) {
            if self.netlink.delete_route(r).await? {
                out.routes_removed += 1;
            }
        }
        for r in want.iter().filter(|r| !have_keys.contains(&key(r))) {
            self.netlink.replace_route(r).await?;
            out.routes_added += 1;
        }
        out.routes_programmed = want.len();
        self.apply_nat(d).await?;
        Ok(out)
    }

    async fn apply_vxlan(
        &self,
        d: &Desired,
        addr: Ipv4Addr,
        mac: [u8; 6],
        underlay: u32,
        mtu: u32,
    ) -> Result<u32, ApplyError> {
        let nl = &self.netlink;
        let index = nl.ensure_vxlan(VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, self.node_ip, underlay, mac, mtu).await?;
        let vtep = IpNet::new(IpAddr::V4(addr), 32).map_err(|e| KernelError::Netlink(e.to_string()))?;
        let addrs = nl.addresses(index).await?;
        for stale in addrs.iter().filter(|a| a.addr().is_ipv4() && **a != vtep) {
            nl.delete_address(index, *stale).await?;
        }
        if !addrs.contains(&vtep) {
            nl.add_address(index, vtep).await?;
        }
        let peers: BTreeSet<(IpAddr, [u8; 6])> = d.vxlan_peers.iter().map(|p| (IpAddr::V4(p.vtep), p.mac)).collect();
        let fdb: BTreeSet<([u8; 6], IpAddr)> = d.vxlan_peers.iter().map(|p| (p.mac, p.node_ip)).collect();
        // Remove what is stale; write only what is missing (each pass, most are already right).
        let mut have_neigh = BTreeSet::new();
        for (ip, m, msg) in nl.neighbours(index, false).await? {
            if let (Some(ip), Some(m)) = (ip, m) {
                if peers.contains(&(ip, m)) {
                    have_neigh.insert((ip, m));
                } else if ip.is_ipv4() {
                    nl.delete_neighbour(msg).await?;
                }
            }
        }
        let mut have_fdb = BTreeSet::new();
        for (dst, m, msg) in nl.neighbours(index, true).await? {
            if let (Some(dst), Some(m)) = (dst, m) {
                if fdb.contains(&(m, dst)) {
                    have_fdb.insert((m, dst));
                } else {
                    nl.delete_neighbour(msg).await?;
                }
            }
        }
        for p in &d.vxlan_peers {
            if !have_neigh.contains(&(IpAddr::V4(p.vtep), p.mac)) {
                nl.replace_neighbour(index, IpAddr::V4(p.vtep), p.mac).await?;
            }
            if !have_fdb.contains(&(p.mac, p.node_ip)) {
                nl.replace_fdb(index, p.mac, p.node_ip).await?;
            }
        }
        Ok(index)
    }

    /// Masquerade traffic from natOutgoing pools to anything outside every pool.
    async fn apply_nat(&self, d: &Desired) -> Result<(), ApplyError> {
        let v4 =
            |nets: &[IpNet]| nets.iter().filter(|n| n.addr().is_ipv4()).map(ToString::to_string).collect::<Vec<_>>();
        let (masq, pools) = (v4(&d.masquerade_from), v4(&d.all_pools));
        let script = if masq.is_empty() {
            String::new()
        } else {
            let set = |name: &str, elems: &[String]| {
                let elements =
                    if elems.is_empty() { String::new() } else { format!(" elements = {{ {} }};", elems.join(", ")) };
                format!("  set {name} {{ type ipv4_addr; flags interval;{elements} }}\n")
            };
            // Only this table's nat hook turns connection tracking on in the node; traffic that
            // is never translated — pod to pod, and VXLAN's outer UDP — skips it (measured: +14%
            // pod-to-pod over VXLAN). Stateful policy, when it exists, decides what it needs.
            let untracked = format!(
                "    type filter hook {{hook}} priority raw; policy accept;\n    ip saddr @all-pools ip daddr @all-pools notrack\n    udp dport {VXLAN_PORT} notrack\n"
            );
            format!(
                "table ip {NFT_TABLE} {{\n{}{}  chain nat-outgoing {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr @masquerade-from ip daddr != @all-pools masquerade fully-random\n  }}\n  chain untracked-prerouting {{\n{}  }}\n  chain untracked-output {{\n{}  }}\n}}\n",
                set("masquerade-from", &masq),
                set("all-pools", &pools),
                untracked.replace("{hook}", "prerouting"),
                untracked.replace("{hook}", "output")
            )
        };
        let mut last = self.nat_applied.lock().await;
        if last.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        // Create-then-delete makes the delete safe when the table is absent; the whole file is
        // one transaction, so the rules are never half-written.
        let full = format!("add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n{script}");
        run_nft(&full).await?;
        *last = Some(script);
        Ok(())
    }

    /// Remove the NAT table (agent shutdown with cleanup, or tests).
    pub async fn remove_nat(&self) -> Result<(), ApplyError> {
        run_nft(&format!("add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")).await
    }
}

async fn run_nft(script: &str) -> Result<(), ApplyError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| ApplyError::Nft(format!("cannot run nft (is the nftables package installed?): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await.map_err(|e| ApplyError::Nft(e.to_string()))?;
    }
    let out = child.wait_with_output().await.map_err(|e| ApplyError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(ApplyError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}
