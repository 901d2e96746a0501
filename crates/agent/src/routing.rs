//! The routing side of the agent: reads nodes, pools and blocks from the datastore, keeps this
//! node's tunnel address and VXLAN MAC on its Node, computes the desired dataplane and applies
//! it — on start, on every datastore change, and every half second (which also repairs routes
//! deleted by hand).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gingham_api::Kind;
use gingham_api::network::NodeSpec;
use gingham_dataplane::apply::Dataplane;
use gingham_dataplane::calc::{
    BlockInfo, EncapMode, NodeInfo, PoolInfo, compute, format_mac, parse_mac, pod_mtu, vxlan_mac,
};
use gingham_ipam::IpamClient;
use gingham_ipam::tunnel::TunnelKind;
use gingham_kernel::Netlink;
use gingham_store::{Datastore, ResourceStore};
use ipnet::IpNet;

/// Full resync period; kernel events and datastore changes trigger syncs in between.
pub const RESYNC: Duration = Duration::from_secs(2);

/// Counters the health endpoint reports.
#[derive(Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub datastore_errors: AtomicU64,
    pub routes_programmed: AtomicU64,
    pub endpoints: AtomicU64,
    /// Sync latency histogram: counts per bucket (upper bounds in ms below), and the sum in µs.
    pub sync_buckets: [AtomicU64; 8],
    pub sync_sum_us: AtomicU64,
    pub pod_mtu: AtomicU32,
    /// Endpoints whose interface is gone, waiting for their grace period; and those released.
    pub orphans_pending: AtomicU64,
    pub orphans_released: AtomicU64,
    pub last_error: std::sync::Mutex<String>,
}

pub const BUCKETS_MS: [f64; 8] = [1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, f64::INFINITY];

impl Metrics {
    /// Keep the latest error for /readiness and say it on stderr once (not on every retry).
    pub fn record_error(&self, e: String) {
        if let Ok(mut l) = self.last_error.lock() {
            if *l != e {
                eprintln!("gingham node agent: {e}");
                *l = e;
            }
        }
    }

    fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let i = BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(BUCKETS_MS.len() - 1);
        self.sync_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sync_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

pub struct Routing {
    pub node: String,
    pub store: Arc<dyn Datastore>,
    pub ipam: IpamClient,
    pub dataplane: Dataplane,
    pub underlay_mtu: u32,
    pub metrics: Arc<Metrics>,
}

fn node_info(name: &str, spec: &NodeSpec) -> NodeInfo {
    let bgp = spec.bgp.clone().unwrap_or_default();
    NodeInfo {
        name: name.to_string(),
        ipv4: bgp.ipv4_address.as_deref().and_then(|a| a.parse().ok()),
        vxlan_addr: spec.ipv4_vxlan_tunnel_addr.as_deref().and_then(|a| a.parse().ok()),
        vxlan_mac: spec.vxlan_tunnel_mac_addr.as_deref().and_then(parse_mac).or_else(|| Some(vxlan_mac(name))),
        ipip_addr: bgp.ipv4_ipip_tunnel_addr.as_deref().and_then(|a| a.parse().ok()),
    }
}

impl Routing {
    /// One full pass: datastore → desired → kernel.
    pub async fn sync(&self) -> Result<(), String> {
        let started = Instant::now();
        let res = ResourceStore::new(self.store.clone());
        let pools = self.ipam.pools().await.map_err(|e| e.to_string())?;
        let pool_infos: Vec<PoolInfo> = pools
            .iter()
            .map(|p| PoolInfo {
                cidr: p.cidr,
                ipip: p.spec.ipip(),
                vxlan: p.spec.vxlan(),
                nat_outgoing: p.spec.nat_outgoing == Some(true),
                disabled: p.disabled(),
            })
            .collect();
        let wants_vxlan =
            pool_infos.iter().any(|p| p.vxlan != EncapMode::Never && !p.disabled && p.cidr.addr().is_ipv4());
        // This node's VXLAN address (from IPAM) and MAC, kept on its Node resource.
        let vtep = self.ipam.ensure_tunnel_address(&self.node, TunnelKind::Vxlan).await.map_err(|e| e.to_string())?;
        // IPIP pools get their tunnel address too (tunl0 itself needs the kernel's ipip module).
        self.ipam.ensure_tunnel_address(&self.node, TunnelKind::Ipip).await.map_err(|e| e.to_string())?;
        let mac = vxlan_mac(&self.node);
        if vtep.is_some() {
            self.ensure_node_mac(&res, &format_mac(&mac)).await?;
        }
        let nodes: Vec<NodeInfo> = res
            .list(Kind::Node, None)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|o| node_info(o.name(), &o.spec_as().unwrap_or_default()))
            .collect();
        let mut blocks = Vec::new();
        for (b, _) in self.ipam.all_blocks(true).await.map_err(|e| e.to_string())? {
            let owner = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")).map(str::to_string);
            let borrowed = (0..b.size() as u32)
                .filter_map(|o| {
                    let node = b.attribute(o)?.secondary.as_ref()?.get("node")?.clone();
                    (Some(&node) != owner.as_ref()).then(|| (b.ip(o), node))
                })
                .collect();
            blocks.push(BlockInfo { cidr: b.cidr, node: owner, borrowed });
        }
        let desired = compute(&self.node, &nodes, &pool_infos, &blocks);
        let mtu = pod_mtu(self.underlay_mtu, wants_vxlan, desired.ipip);
        self.metrics.pod_mtu.store(mtu, Ordering::Relaxed);
        let vtep4 = match vtep {
            Some(IpAddr::V4(a)) => Some((a, mac)),
            _ => None,
        };
        let applied = self.dataplane.apply(&desired, vtep4, mtu).await.map_err(|e| e.to_string())?;
        self.metrics.routes_programmed.store(applied.routes_programmed as u64, Ordering::Relaxed);
        let local = res.list(Kind::WorkloadEndpoint, None).await.map_err(|e| e.to_string())?;
        self.metrics.endpoints.store(
            local.iter().filter(|w| w.spec["node"].as_str() == Some(self.node.as_str())).count() as u64,
            Ordering::Relaxed,
        );
        self.metrics.observe(started.elapsed());
        Ok(())
    }

    async fn ensure_node_mac(&self, res: &ResourceStore, mac: &str) -> Result<(), String> {
        res.modify(Kind::Node, None, &self.node, false, |_, spec: &mut NodeSpec| {
            if spec.vxlan_tunnel_mac_addr.as_deref() == Some(mac) {
                return false;
            }
            spec.vxlan_tunnel_mac_addr = Some(mac.to_string());
            true
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("recording the VXLAN MAC on the Node: {e}"))
    }

    /// Sync forever: after every datastore change, every route/link change in the kernel (a
    /// route deleted by hand comes straight back), and every RESYNC.
    pub async fn run(self: Arc<Self>) {
        let mut watch = None;
        let mut kernel = gingham_kernel::route_and_link_events().ok();
        loop {
            match self.sync().await {
                Ok(()) => {
                    self.metrics.syncs.fetch_add(1, Ordering::Relaxed);
                    self.metrics.ready.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    self.metrics.sync_errors.fetch_add(1, Ordering::Relaxed);
                    self.metrics.record_error(e);
                }
            }
            if watch.is_none() {
                match self.store.watch("/calico/", 0).await {
                    Ok(w) => watch = Some(w),
                    Err(_) => {
                        self.metrics.datastore_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Our own changes also raise kernel events: drop those already queued.
            if let Some(k) = kernel.as_mut() {
                while k.try_recv().is_ok() {}
            }
            let datastore = async {
                match watch.as_mut() {
                    Some(w) => w.next().await.map(|r| r.is_ok()),
                    None => std::future::pending().await,
                }
            };
            let kernel_event = async {
                match kernel.as_mut() {
                    Some(k) => k.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                change = datastore => {
                    if change != Some(true) {
                        self.metrics.datastore_errors.fetch_add(1, Ordering::Relaxed);
                        watch = None;
                    }
                }
                _ = kernel_event => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
            // Let a burst of changes land, then drain what queued up meanwhile.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Some(w) = watch.as_mut() {
                while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(1), w.next()).await {}
            }
        }
    }
}

/// How to find this node's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Autodetect {
    /// A fixed address with prefix.
    Given(IpNet),
    /// The first global IPv4 address on an interface that is not gingham's or a container's.
    FirstFound,
    /// The first IPv4 address on an interface whose name matches (Calico's `interface=REGEX`).
    Interface(String),
}

/// Find the node address and the interface it is on.
pub async fn detect_address(nl: &Netlink, how: &Autodetect) -> Result<(String, IpNet), String> {
    let pattern = match how {
        // Anchored, as Calico matches the whole interface name.
        Autodetect::Interface(p) => Some(
            regex_lite::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| format!("interface={p}: not a valid regular expression: {e}"))?,
        ),
        _ => None,
    };
    let links = nl.links().await.map_err(|e| e.to_string())?;
    let skip = ["lo", "docker", "cali", "vxlan", "tunl", "virbr", "kube-ipvs", "cni", "veth", "br-"];
    for l in &links {
        let eligible = match how {
            Autodetect::FirstFound => !skip.iter().any(|p| l.name.starts_with(p)),
            Autodetect::Interface(_) => pattern.as_ref().is_some_and(|r| r.is_match(&l.name)),
            Autodetect::Given(_) => true,
        };
        if !eligible {
            continue;
        }
        for a in nl.addresses(l.index).await.map_err(|e| e.to_string())? {
            let IpAddr::V4(v4) = a.addr() else { continue };
            match how {
                Autodetect::Given(want) if want.addr() == a.addr() => return Ok((l.name.clone(), *want)),
                Autodetect::Given(_) => {}
                _ if !v4.is_loopback() && !v4.is_link_local() => return Ok((l.name.clone(), a)),
                _ => {}
            }
        }
    }
    Err(match how {
        Autodetect::Given(a) => format!("no interface has the address {a}"),
        Autodetect::FirstFound => "no interface has a usable IPv4 address (first-found)".into(),
        Autodetect::Interface(p) => format!("no interface matching {p:?} has an IPv4 address"),
    })
}

pub fn ipv4(n: &IpNet) -> Option<Ipv4Addr> {
    match n.addr() {
        IpAddr::V4(a) => Some(a),
        _ => None,
    }
}
