//! The agent's core, one task that owns the picture and acts on it:
//!
//! ```text
//! datastore ─(sync.rs: list once, then watch)─▶ cache ─▶ calc ─▶ managers ─▶ kernel
//! ```
//!
//! Each datastore change is decoded once into the cache, fed to the incremental calculation,
//! and the resulting difference goes to the managers, which touch only what changed. Kernel
//! events (a route or device changed behind our back) go straight to the manager that owns the
//! object; a periodic resync re-applies everything from memory. Nothing here lists the
//! datastore after the first sync, and nothing touches the kernel before it: an agent that
//! restarts adopts what it finds.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gingham_api::Kind;
use gingham_dataplane::calc::{
    BlockInfo, DesiredRoute, Diff, NodeInfo, PoolInfo, RouteCalc, Via, parse_mac, pod_mtu, vxlan_mac,
};
use gingham_dataplane::nat::NatManager;
use gingham_dataplane::routes::{BGP_PROTO, CALC_PROTO, Dev, RouteManager, Source, Target};
use gingham_dataplane::vxlan::{VXLAN_DEVICE, Vtep, VxlanManager};
use gingham_dataplane::workloads::{WORKLOAD_PROTO, Workload, WorkloadManager};
use gingham_kernel::{KernelEvent, Netlink};
use ipnet::IpNet;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{Notify, watch};

use crate::cache::{Cache, Change};
use crate::metrics::Metrics;
use crate::sync::Shared;

/// Full re-application of the desired state from memory (drift the kernel did not report).
pub const RESYNC: Duration = Duration::from_secs(5);
/// How often the policy table is checked for changes made by others (one netlink query when
/// nobody touched nftables): a table changed by hand is back within a second.
pub const POLICY_DRIFT_CHECK: Duration = Duration::from_millis(300);

/// One of this node's endpoints, as the orphan sweep and GC need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub namespace: String,
    pub name: String,
    pub interface: Option<String>,
    pub container_id: Option<String>,
    pub network: Option<String>,
    pub gone_since: Option<String>,
    pub revision: i64,
    pub ips: Vec<IpNet>,
}

pub type Locals = Arc<Vec<LocalEndpoint>>;

/// Local workload interfaces whose policy is in the kernel, with the addresses it was built
/// for (CNI ADD returns once its interface is here with its new addresses).
pub type Programmed = Arc<std::collections::BTreeMap<String, Vec<IpNet>>>;

/// The managers that route: present unless the agent runs `--endpoints-only`.
pub struct Network {
    pub routes: RouteManager,
    pub vxlan: VxlanManager,
    pub nat: NatManager,
    pub policy: gingham_dataplane::policy::PolicyManager,
    pub nl: Netlink,
    pub underlay_mtu: u32,
    /// tunl0's index as link events last told it (None: not known, ask the kernel). Kept so
    /// that a pass over the managers — one per pod change — costs no netlink query for it.
    tunl0: Option<Option<u32>>,
}

impl Network {
    pub fn new(
        nl: Netlink,
        nft: gingham_kernel::nft::Nft,
        underlay: String,
        underlay_index: u32,
        node_ip: Ipv4Addr,
        underlay_mtu: u32,
    ) -> Network {
        let mut routes = RouteManager::new(
            nl.clone(),
            &[Source { protocol: BGP_PROTO, priority: 5 }, Source { protocol: CALC_PROTO, priority: 10 }],
        );
        routes.set_device(Dev::Underlay, Some(underlay_index));
        Network {
            vxlan: VxlanManager::new(nl.clone(), underlay, node_ip),
            nat: NatManager::new(nft.clone()),
            policy: gingham_dataplane::policy::PolicyManager::new(nft, Default::default()),
            routes,
            nl,
            underlay_mtu,
            tunl0: None,
        }
    }

    /// Tell the route manager where the VXLAN device and tunl0 are. tunl0 is asked once, then
    /// followed by link events (a later event, queued behind this answer, overrides it).
    async fn tunnel_devices(&mut self) {
        self.routes.set_device(Dev::Vxlan, self.vxlan.index());
        let tunl = match self.tunl0 {
            Some(known) => known,
            None => match self.nl.link(TUNL0).await {
                Ok(l) => {
                    let index = l.map(|l| l.index);
                    self.tunl0 = Some(index);
                    index
                }
                Err(_) => None,
            },
        };
        self.routes.set_device(Dev::Ipip, tunl);
    }
}

const TUNL0: &str = "tunl0";

pub struct Model {
    node: String,
    shared: Arc<Shared>,
    calc: RouteCalc,
    net: Option<Network>,
    workloads: WorkloadManager,
    metrics: Arc<Metrics>,
    locals: watch::Sender<Locals>,
    /// Wakes the task that keeps this node's tunnel addresses and VXLAN MAC right.
    tunnels: Arc<Notify>,
    /// Wakes the orphan sweep (a workload interface went away).
    sweep: Arc<Notify>,
    in_sync: bool,
    /// This node's endpoints by key hash (to find one again once it is deleted).
    local_keys: std::collections::HashMap<crate::cache::EndpointKey, String>,
    /// Something in the managers waits to be applied.
    dirty: bool,
    troubled: bool,
    /// BGP, when this node speaks it (`--bgp`, Calico's `calico_backend: bird`).
    bgp: Option<crate::bgp::Runner>,
    /// Routes BGP learned or lost since the heap was last trimmed (a full table arrives in a
    /// burst and leaves the allocator's free space behind).
    trimmer: gingham_kernel::memory::HeapTrimmer,
    learned_changes: usize,
    /// Network policy: the engine (fed every local endpoint, and every other one once any
    /// policy-kind resource exists) and what is programmed, for CNI ADD to wait on.
    policy: gingham_policy::Engine,
    policy_remote: bool,
    /// Policy resources that did not compile (enforced closed), by key, with the error.
    policy_errors: std::collections::BTreeMap<String, String>,
    programmed: watch::Sender<Programmed>,
    /// The digest of the policy resources the engine holds, published once programmed.
    policy_digest: u64,
}

fn pool_info(p: &gingham_ipam::pools::Pool) -> PoolInfo {
    PoolInfo {
        name: p.name.clone(),
        cidr: p.cidr,
        ipip: p.spec.ipip(),
        vxlan: p.spec.vxlan(),
        nat_outgoing: p.spec.nat_outgoing(),
        disabled: p.disabled(),
    }
}

fn node_info(name: &str, rec: &crate::cache::NodeRec, use_pod_cidr: bool) -> NodeInfo {
    let spec = &rec.spec;
    let bgp = spec.bgp.clone().unwrap_or_default();
    NodeInfo {
        name: name.to_string(),
        ipv4: bgp.ipv4_address.as_deref().and_then(|a| a.parse().ok()),
        vxlan_addr: spec.ipv4_vxlan_tunnel_addr.as_deref().and_then(|a| a.parse().ok()),
        vxlan_mac: spec.vxlan_tunnel_mac_addr.as_deref().and_then(parse_mac).or_else(|| Some(vxlan_mac(name))),
        ipip_addr: bgp.ipv4_ipip_tunnel_addr.as_deref().and_then(|a| a.parse().ok()),
        pod_cidrs: if use_pod_cidr { rec.pod_cidrs.clone() } else { Vec::new() },
    }
}

fn target(r: DesiredRoute) -> Target {
    match r {
        DesiredRoute::Blackhole(_) => Target::Blackhole,
        DesiredRoute::Remote { gateway, via, .. } => Target::Via {
            gateway,
            also: Vec::new(),
            dev: match via {
                Via::Underlay => Dev::Underlay,
                Via::Vxlan => Dev::Vxlan,
                Via::Ipip => Dev::Ipip,
            },
            onlink: via != Via::Underlay,
        },
    }
}

/// How many learned routes change between heap trims.
pub const TRIM_AFTER_ROUTES: usize = 20_000;

impl Model {
    pub fn new(
        node: &str,
        net: Option<Network>,
        workloads: WorkloadManager,
        metrics: Arc<Metrics>,
        tunnels: Arc<Notify>,
        sweep: Arc<Notify>,
        use_pod_cidr: bool,
    ) -> (Model, watch::Receiver<Locals>, Arc<Shared>) {
        let (locals, rx) = watch::channel(Arc::new(Vec::new()));
        let (programmed, _) = watch::channel(Arc::default());
        let mut cache = Cache::new(node);
        cache.use_pod_cidr = use_pod_cidr;
        let shared = Shared::new(cache);
        let m = Model {
            node: node.into(),
            shared: shared.clone(),
            calc: RouteCalc::new(node),
            net,
            workloads,
            metrics,
            locals,
            tunnels,
            sweep,
            in_sync: false,
            local_keys: Default::default(),
            dirty: false,
            troubled: false,
            bgp: None,
            trimmer: gingham_kernel::memory::HeapTrimmer::new(TRIM_AFTER_ROUTES),
            learned_changes: 0,
            policy: gingham_policy::Engine::for_node(node),
            policy_remote: false,
            policy_errors: Default::default(),
            programmed,
            policy_digest: gingham_policy::load::digest([]),
        };
        (m, rx, shared)
    }

    pub async fn run(mut self, mut kernel: Option<UnboundedReceiver<KernelEvent>>) {
        let mut backstop = tokio::time::interval(RESYNC);
        backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drift = tokio::time::interval(POLICY_DRIFT_CHECK);
        drift.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        loop {
            let kernel_event = async {
                match kernel.as_mut() {
                    Some(k) => k.recv().await,
                    None => std::future::pending().await,
                }
            };
            let learned = async {
                match self.bgp.as_mut() {
                    Some(b) => b.next_fib().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                f = learned => self.learned(f),
                _ = shared.wake.notified() => {}
                ev = kernel_event => match ev {
                    Some(ev) => {
                        self.kernel_event(ev);
                        // A pod's veth brings a burst of link and route events: one pass
                        // over the managers for all that are already queued.
                        while let Some(ev) = kernel.as_mut().and_then(|k| k.try_recv().ok()) {
                            self.kernel_event(ev);
                        }
                    }
                    None => kernel = None,
                },
                _ = backstop.tick() => {
                    if self.in_sync {
                        self.resync().await;
                    }
                }
                _ = drift.tick() => {
                    if self.in_sync {
                        self.policy_drift().await;
                    }
                }
            }
            if kernel.is_none() {
                // No link events to follow tunl0 by: ask each time.
                if let Some(net) = self.net.as_mut() {
                    net.tunl0 = None;
                }
            }
            self.process().await;
            self.trimmer.changed(std::mem::take(&mut self.learned_changes));
        }
    }

    /// What CNI ADD waits on (None when this agent programs no policy: `--endpoints-only`).
    pub fn programmed(&self) -> Option<watch::Receiver<Programmed>> {
        self.net.as_ref().map(|_| self.programmed.subscribe())
    }

    /// One endpoint into the policy engine (others' only once policy exists at all); whether
    /// the engine took it.
    fn feed_endpoint(&mut self, cache: &Cache, h: crate::cache::EndpointKey) -> bool {
        use gingham_policy::index::{ItemData, NamedPort};
        let key = format!("wep/{:016x}{:016x}", h[0], h[1]);
        match cache.endpoints.get(&h) {
            Some(e) if e.local.is_some() || self.policy_remote => {
                let data = ItemData {
                    labels: cache
                        .labels(e)
                        .iter()
                        .map(|(k, v)| (cache.name(*k).into(), cache.name(*v).into()))
                        .collect(),
                    profiles: cache.profiles(e).iter().map(|p| cache.name(*p).into()).collect(),
                    nets: e.ips.to_vec(),
                    ports: cache
                        .ports(e)
                        .iter()
                        .map(|(n, proto, port)| NamedPort {
                            name: cache.name(*n).into(),
                            protocol: *proto,
                            port: *port,
                        })
                        .collect(),
                };
                let local_interface = e.local.as_ref().and_then(|l| l.interface.clone());
                self.policy.set_item(&key, Some(gingham_policy::Item { data, local_interface }));
                true
            }
            Some(_) => false,
            None if self.policy.index().item(&key).is_some() => {
                self.policy.set_item(&key, None);
                true
            }
            None => false,
        }
    }

    fn policy_object(&mut self, cache: &Cache, key: &str) {
        let parts = crate::cache::policy_key_parts(key);
        if let Some((Kind::FelixConfiguration, _, name)) = parts {
            if name == "default" || name.strip_prefix("node.") == Some(self.node.as_str()) {
                self.felix_config(cache);
            }
            return;
        }
        if !self.policy_remote {
            // The first policy-kind resource: from now on every endpoint is selectable.
            self.policy_remote = true;
            let all: Vec<crate::cache::EndpointKey> = cache.endpoints.keys().copied().collect();
            for h in all {
                self.feed_endpoint(cache, h);
            }
        }
        match cache.policy_objects.get(key).map(|(_, o)| o) {
            Some(o) => match gingham_policy::load::put(&mut self.policy, o) {
                Ok(()) => {
                    self.policy_errors.remove(key);
                }
                Err(e) => {
                    self.metrics.record_error(format!("policy: {e} (enforced closed until fixed)"));
                    self.policy_errors.insert(key.into(), e);
                }
            },
            None => {
                self.policy_errors.remove(key);
                if let Some((kind, ns, name)) = parts {
                    gingham_policy::load::remove(&mut self.policy, kind, ns, name);
                }
            }
        }
        self.metrics.policy_errors.store(self.policy_errors.len() as u64, Ordering::Relaxed);
    }

    /// FelixConfiguration `default` and `node.<this node>`: failsafe ports, endpoint-to-host
    /// action, interface prefix. A bad one keeps what is programmed, and says so.
    fn felix_config(&mut self, cache: &Cache) {
        let Some(net) = self.net.as_mut() else { return };
        let spec = |name: &str| -> Result<Option<gingham_api::network::FelixConfigurationSpec>, String> {
            let key = format!("{}{name}", Kind::FelixConfiguration.prefix(None));
            match cache.policy_objects.get(&key) {
                Some((_, o)) => o.spec_as().map(Some).map_err(|e| format!("FelixConfiguration {name}: {e}")),
                None => Ok(None),
            }
        };
        let mine = format!("node.{}", self.node);
        let config = spec("default").and_then(|d| {
            let n = spec(&mine)?;
            gingham_dataplane::policy::PolicyConfig::from_felix(d.as_ref(), n.as_ref())
                .map_err(|e| format!("FelixConfiguration default/{mine}: {e}"))
        });
        match config {
            Ok(c) => {
                self.policy_errors.remove("felixconfiguration");
                net.policy.set_config(c);
            }
            Err(e) => {
                self.metrics.record_error(format!("policy: {e} (keeping the previous configuration)"));
                self.policy_errors.insert("felixconfiguration".into(), e);
            }
        }
        self.metrics.policy_errors.store(self.policy_errors.len() as u64, Ordering::Relaxed);
    }

    /// Program what the policy engine changed; publish what is in place.
    async fn apply_policy(&mut self, errors: &mut Vec<String>) {
        let Some(net) = self.net.as_mut() else { return };
        let dirty = self.policy.take_dirty();
        if !net.policy.has_pending() && dirty == Default::default() {
            self.metrics.policy_digest.store(self.policy_digest, Ordering::Relaxed);
            return;
        }
        match net.policy.apply(&self.policy, &dirty).await {
            Ok(()) => self.metrics.policy_digest.store(self.policy_digest, Ordering::Relaxed),
            Err(e) => errors.push(format!("policy: {e}")),
        }
        let mut programmed = std::collections::BTreeMap::new();
        let mut policed = Vec::new();
        for iface in net.policy.programmed() {
            if let Some(plan) = self.policy.plan(iface) {
                programmed.insert(iface.clone(), plan.ips.clone());
                // Host endpoints' addresses are the host's: the pod fast path never sees them.
                if !plan.is_host_endpoint() && (!plan.ingress.is_empty() || !plan.egress.is_empty()) {
                    policed.extend(plan.ips.iter().copied());
                }
            }
        }
        // Policed pods' traffic must be tracked before they are said to be in place (their
        // rules accept replies by connection state).
        net.nat.set_policed(policed);
        if let Err(e) = net.nat.apply().await {
            errors.push(format!("NAT: {e}"));
        }
        self.programmed.send_replace(Arc::new(programmed));
    }

    /// Speak BGP (before `run`).
    pub fn with_bgp(&mut self, runner: crate::bgp::Runner) {
        self.bgp = Some(runner);
    }

    /// A route BGP learned or lost: to the route manager, through the underlay, or tunl0
    /// for IPIP pools (CrossSubnet: only towards other subnets).
    fn learned(&mut self, batch: Vec<gingham_bgp::rib::FibChange>) {
        self.learned_changes += batch.len();
        for f in batch {
            self.learned_one(f);
        }
    }

    fn learned_one(&mut self, f: gingham_bgp::rib::FibChange) {
        // A peer's own address routed through its reachableBy gateway stays so.
        if self.bgp.as_ref().is_some_and(|b| b.is_static(&f.prefix)) {
            return;
        }
        let Some(net) = self.net.as_mut() else { return };
        let target = f.next_hops.first().map(|gw| {
            let me = self.calc.node(&self.node).and_then(|n| n.ipv4);
            let cross = !me.is_some_and(|m| m.contains(gw));
            let pool = self.calc.pool_of(&f.prefix);
            let ipip = gw.is_ipv4() && pool.is_some_and(|p| p.ipip.applies(cross));
            // Equal paths through several next hops: one ECMP route.
            let also = f.next_hops[1..].to_vec();
            Target::Via { gateway: *gw, also, dev: if ipip { Dev::Ipip } else { Dev::Underlay }, onlink: ipip }
        });
        net.routes.set(BGP_PROTO, f.prefix, target);
        self.dirty = true;
    }

    fn kernel_event(&mut self, ev: KernelEvent) {
        match ev {
            KernelEvent::Route { deleted, route } => {
                if let Some(net) = self.net.as_mut() {
                    if deleted && net.routes.owns(route.protocol) {
                        net.routes.forget(route.dst);
                        self.dirty = true;
                    } else if !deleted && net.routes.observed(&route) {
                        self.dirty = true;
                    }
                }
                if deleted && route.protocol == WORKLOAD_PROTO {
                    self.workloads.touched(Some(&route.dst), None);
                    self.dirty = true;
                }
            }
            KernelEvent::Link { deleted, name, index } => {
                if name == TUNL0 {
                    if let Some(net) = self.net.as_mut() {
                        net.tunl0 = Some((!deleted).then_some(index));
                        self.dirty = true;
                    }
                } else if name == VXLAN_DEVICE {
                    if let Some(net) = self.net.as_mut() {
                        net.vxlan.device_changed();
                        self.dirty = true;
                    }
                } else if self.workloads.knows_iface(&name) {
                    if deleted {
                        self.sweep.notify_one();
                    } else {
                        self.workloads.touched(None, Some(&name));
                        self.dirty = true;
                    }
                }
            }
            KernelEvent::Overrun => {
                if let Some(net) = self.net.as_mut() {
                    net.vxlan.device_changed();
                    net.tunl0 = None;
                }
                self.dirty = true;
                self.metrics.kernel_overruns.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Feed the changes the followers left through the calculation into the managers (all of
    /// it under the picture's lock, none of it waiting), then program.
    async fn process(&mut self) {
        let started = Instant::now();
        let shared = self.shared.clone();
        let ready_now;
        let had_changes;
        {
            let mut p = shared.lock();
            self.metrics.cache_decode_errors.store(p.cache.decode_errors, Ordering::Relaxed);
            self.metrics.datastore_lists.store(p.lists, Ordering::Relaxed);
            self.metrics.datastore_errors.store(p.troubles, Ordering::Relaxed);
            match &p.trouble {
                Some(e) => {
                    if !self.troubled {
                        self.metrics.record_error(format!("datastore: {e}; keeping the dataplane as it is"));
                    }
                    self.troubled = true;
                    self.metrics.ready.store(false, Ordering::Relaxed);
                }
                None if self.troubled => {
                    self.troubled = false;
                    self.metrics.ready.store(self.in_sync, Ordering::Relaxed);
                }
                None => {}
            }
            let changes = std::mem::take(&mut p.changes);
            had_changes = !changes.is_empty();
            ready_now = !self.in_sync && crate::cache::FOLLOWED.iter().all(|f| p.synced.contains(f));
            let push = self.in_sync;
            let mut locals_changed = false;
            let mut vtep_changed = false;
            for c in changes {
                let diff = match c {
                    Change::Pool(n) => {
                        if let Some(b) = self.bgp.as_mut() {
                            b.dirty = true;
                        }
                        self.tunnels.notify_one();
                        self.calc.set_pool(&n, p.cache.pools.get(&n).map(pool_info))
                    }
                    Change::Node(n) => {
                        if let Some(b) = self.bgp.as_mut() {
                            b.dirty = true;
                        }
                        if n == self.node {
                            self.tunnels.notify_one();
                            vtep_changed = true;
                        }
                        let info = p.cache.nodes.get(&n).map(|r| node_info(&n, r, p.cache.use_pod_cidr));
                        if let Some(net) = self.net.as_mut() {
                            let addr = info.as_ref().and_then(|i| i.ipv4).and_then(|a| match a.addr() {
                                IpAddr::V4(v) => Some(v),
                                IpAddr::V6(_) => None,
                            });
                            net.policy.set_host(&n, addr);
                        }
                        self.calc.set_node(&n, info)
                    }
                    Change::Block(cidr) => {
                        if let Some(b) = self.bgp.as_mut() {
                            b.block_changed(&p.cache, cidr, &self.node);
                        }
                        let info = p.cache.blocks.get(&cidr).map(|b| BlockInfo {
                            cidr,
                            node: b.node.as_deref().map(str::to_string),
                            borrowed: b.borrowed.iter().map(|(ip, n)| (*ip, n.to_string())).collect(),
                        });
                        self.calc.set_block(cidr, info)
                    }
                    Change::BgpConfig(_) | Change::BgpPeer(_) | Change::BgpFilter(_) => {
                        if let Some(b) = self.bgp.as_mut() {
                            b.dirty = true;
                        }
                        continue;
                    }
                    Change::ClusterInfo => {
                        let held = p.cache.datastore_ready == Some(false);
                        self.metrics.datastore_held.store(held, Ordering::Relaxed);
                        continue;
                    }
                    Change::PolicyObject(key) => {
                        self.policy_object(&p.cache, &key);
                        self.policy_digest = gingham_policy::load::digest(
                            p.cache.policy_objects.iter().map(|(k, (r, _))| (k.as_str(), *r)),
                        );
                        self.dirty = true;
                        continue;
                    }
                    Change::Endpoint(h) => {
                        // Another node's pod costs nothing here unless policy may select it.
                        if self.feed_endpoint(&p.cache, h) {
                            self.dirty |= self.net.is_some();
                        }
                        let local = p.cache.endpoints.get(&h).and_then(|e| Some((e, e.local.as_ref()?)));
                        let key = match local {
                            Some((_, l)) => Some(l.key.clone()),
                            None => self.local_keys.get(&h).cloned(),
                        };
                        // Another node's endpoint: nothing here depends on it (yet).
                        let Some(key) = key else { continue };
                        let w = local
                            .and_then(|(e, l)| Some(Workload { iface: l.interface.clone()?, ips: e.ips.to_vec() }));
                        match local {
                            Some(_) => self.local_keys.insert(h, key.clone()),
                            None => self.local_keys.remove(&h),
                        };
                        self.workloads.set(&key, w);
                        locals_changed = true;
                        self.dirty = true;
                        continue;
                    }
                };
                vtep_changed |= diff.encap.is_some();
                if push {
                    self.push(diff);
                }
            }
            if ready_now {
                // The first whole picture: hand the managers everything, then adopt the kernel.
                let full = self.calc.full();
                self.push(full);
                vtep_changed = true;
                locals_changed = true;
            }
            if vtep_changed {
                self.update_vtep();
            }
            if locals_changed {
                self.publish_locals(&p.cache);
            }
            if let Some(b) = self.bgp.as_mut().filter(|b| b.dirty && (self.in_sync || ready_now)) {
                b.replan(&p.cache, &self.node);
            }
        }
        if let Some(b) = self.bgp.as_mut() {
            b.apply().await;
            let forgotten = b.take_forgotten();
            let statics = b.take_static_changes();
            let errors = std::mem::take(&mut b.errors);
            let synced = b.kernel_synced();
            if let Ok(mut slot) = self.metrics.bgp.lock() {
                *slot = b.commands();
            }
            if let Some(net) = self.net.as_mut() {
                for dst in forgotten.into_iter().filter(|d| !statics.iter().any(|(s, _)| s == d)) {
                    net.routes.set(BGP_PROTO, dst, None);
                    self.dirty = true;
                }
                // Routes to peers through their reachableBy gateway, as BGP's own.
                for (dst, gw) in statics {
                    let target =
                        gw.map(|g| Target::Via { gateway: g, also: Vec::new(), dev: Dev::Underlay, onlink: false });
                    net.routes.set(BGP_PROTO, dst, target);
                    self.dirty = true;
                }
                if synced {
                    net.routes.mark_synced(BGP_PROTO);
                }
            }
            self.report(errors);
        }
        if ready_now {
            if let Some(net) = self.net.as_mut() {
                net.routes.mark_synced(CALC_PROTO);
            }
            self.in_sync = true;
            self.resync().await;
            self.metrics.ready.store(!self.troubled, Ordering::Relaxed);
        } else if self.in_sync && (had_changes || self.dirty) {
            self.apply().await;
        } else {
            return;
        }
        self.metrics.observe(started.elapsed());
        self.metrics.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Hand one difference to the managers.
    fn push(&mut self, diff: Diff) {
        self.dirty = true;
        let Some(net) = self.net.as_mut() else { return };
        let bgp = self.bgp.is_some();
        for (dst, r) in diff.routes {
            // With BGP, remote blocks outside VXLAN pools are BGP's to route (VXLAN pools stay
            // the calculation's, their same-subnet routes of CrossSubnet too).
            let bgp_owned = bgp && !self.calc.pool_of(&dst).is_some_and(|p| p.vxlan.enabled());
            let r =
                r.filter(|r| !(bgp_owned && matches!(r, DesiredRoute::Remote { via: Via::Underlay | Via::Ipip, .. })));
            net.routes.set(CALC_PROTO, dst, r.map(target));
        }
        for (n, p) in diff.peers {
            net.vxlan.set_peer(&n, p);
        }
        if let Some(sets) = diff.nat {
            net.nat.set(sets);
        }
    }

    fn update_vtep(&mut self) {
        let (vxlan, ipip) = self.calc.encap();
        let me = self.calc.node(&self.node).cloned();
        let Some(net) = self.net.as_mut() else { return };
        let vtep = match (vxlan, me.as_ref().and_then(|m| Some((m.vxlan_addr?, m.vxlan_mac?)))) {
            (true, Some((addr, mac))) => Some(Vtep { addr, mac, mtu: pod_mtu(net.underlay_mtu, true, false) }),
            _ => None,
        };
        net.vxlan.set_vtep(vtep);
        self.metrics.pod_mtu.store(pod_mtu(net.underlay_mtu, vxlan, ipip), Ordering::Relaxed);
    }

    fn publish_locals(&self, cache: &Cache) {
        let mut v: Vec<LocalEndpoint> = cache
            .local_endpoints()
            .filter_map(|e| {
                let l = e.local.as_ref()?;
                let (ns, name) = l.key.split_once('/')?;
                Some(LocalEndpoint {
                    namespace: ns.into(),
                    name: name.into(),
                    interface: l.interface.clone(),
                    container_id: l.container_id.clone(),
                    network: l.network.clone(),
                    gone_since: l.gone_since.clone(),
                    revision: l.revision,
                    ips: e.ips.to_vec(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.metrics.endpoints.store(v.len() as u64, Ordering::Relaxed);
        self.locals.send_replace(Arc::new(v));
    }

    async fn apply(&mut self) {
        self.dirty = false;
        let mut errors = Vec::new();
        // Policy first: a CNI ADD waits for it, and it needs nothing the others program (its
        // rules name interfaces, which may come later).
        self.apply_policy(&mut errors).await;
        if let Some(net) = self.net.as_mut() {
            if let Err(e) = net.vxlan.apply().await {
                errors.push(format!("VXLAN: {e}"));
            }
            net.tunnel_devices().await;
            match net.routes.apply().await {
                Ok(_) => {}
                Err(e) => errors.push(format!("routes: {e}")),
            }
            if let Err(e) = net.nat.apply().await {
                errors.push(format!("NAT: {e}"));
            }
            self.metrics.routes_programmed.store(net.routes.len() as u64, Ordering::Relaxed);
        }
        if let Err(e) = self.workloads.apply().await {
            errors.push(format!("workloads: {e}"));
        }
        self.report(errors);
    }

    /// Re-apply the whole desired state from memory, comparing with what the kernel holds.
    async fn resync(&mut self) {
        let mut errors = Vec::new();
        if let Some(net) = self.net.as_mut() {
            if let Err(e) = net.vxlan.resync().await {
                errors.push(format!("VXLAN: {e}"));
            }
            // The backstop asks the kernel, whatever the events said.
            net.tunl0 = None;
            net.tunnel_devices().await;
            if let Err(e) = net.routes.resync().await {
                errors.push(format!("routes: {e}"));
            }
            if let Err(e) = net.nat.resync().await {
                errors.push(format!("NAT: {e}"));
            }
            self.metrics.routes_programmed.store(net.routes.len() as u64, Ordering::Relaxed);
        }
        if let Err(e) = self.workloads.resync().await {
            errors.push(format!("workloads: {e}"));
        }
        self.apply_policy(&mut errors).await;
        self.report(errors);
    }

    /// The policy table changed by someone else (by hand, another tool): put ours back whole,
    /// in one transaction.
    async fn policy_drift(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        let mut errors = Vec::new();
        match net.policy.check_drift().await {
            Ok(false) => return,
            Ok(true) => {
                self.metrics.policy_repairs.fetch_add(1, Ordering::Relaxed);
                eprintln!("gingham node agent: the policy table was changed by someone else; restoring it");
            }
            Err(e) => errors.push(format!("policy: {e}")),
        }
        self.apply_policy(&mut errors).await;
        self.report(errors);
    }

    fn report(&mut self, errors: Vec<String>) {
        if errors.is_empty() {
            return;
        }
        self.dirty = true;
        self.metrics.sync_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.record_error(errors.join("; "));
    }
}

/// Keep this node's tunnel addresses (IPAM) and VXLAN MAC on its Node right: woken when pools
/// or this Node change, never polling.
pub async fn maintain_tunnels(ipam: gingham_ipam::IpamClient, node: String, wake: Arc<Notify>, metrics: Arc<Metrics>) {
    use gingham_api::Kind;
    use gingham_api::network::NodeSpec;
    use gingham_ipam::tunnel::TunnelKind;
    loop {
        wake.notified().await;
        // Let a burst of changes land first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut result = ipam.ensure_tunnel_address(&node, TunnelKind::Vxlan).await.map_err(|e| e.to_string());
        if let Ok(Some(IpAddr::V4(_))) = result {
            let mac = gingham_dataplane::calc::format_mac(&vxlan_mac(&node));
            result = ipam
                .resources()
                .modify(Kind::Node, None, &node, false, |_, spec: &mut NodeSpec| {
                    if spec.vxlan_tunnel_mac_addr.as_deref() == Some(mac.as_str()) {
                        return false;
                    }
                    spec.vxlan_tunnel_mac_addr = Some(mac.clone());
                    true
                })
                .await
                .map(|_| None)
                .map_err(|e| format!("recording the VXLAN MAC: {e}"));
        }
        // IPIP pools get their tunnel address too (tunl0 itself needs the kernel's ipip module).
        let result = result.and(ipam.ensure_tunnel_address(&node, TunnelKind::Ipip).await.map_err(|e| e.to_string()));
        if let Err(e) = result {
            metrics.record_error(format!("tunnel addresses: {e}"));
            tokio::time::sleep(Duration::from_secs(2)).await;
            wake.notify_one();
        }
    }
}
