//! BGP as Calico configures it, calculated from the cache (pure): whether this node speaks
//! BGP and as whom, who it peers with (node-to-node mesh, global and node-specific BGPPeers,
//! peer selectors with their reverse peering, route-reflector clients) and what it exports
//! (its affine blocks, addresses it borrowed, service ranges; nothing from VXLAN pools or
//! pools with disableBGPExport). Reference: Calico's BIRD templates (reference §6.3, §6.4).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_api::network::{BGPConfigurationSpec, NodeBGPSpec, Password, parse_peer_ip};
use gingham_api::selector::Selector;
use gingham_bgp::fsm;
use gingham_bgp::packet::Attrs;
use gingham_bgp::rib::{FibChange, NextHopMode};
use gingham_bgp::tasks::{self, Command, PeerConfig, SocketHooks, Speaker, SpeakerConfig};
use gingham_prefixmap::PrefixMap;
use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::cache::Cache;

/// Calico's default AS.
pub const DEFAULT_AS: u32 = 64512;
pub const BGP_PORT: u16 = 179;

/// How this node speaks BGP: None when it cannot (no IPv4 address to take its router ID from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub speaker: Option<SpeakerConfig>,
    pub peers: Vec<PeerConfig>,
    pub exports: BTreeMap<IpNet, Attrs>,
    /// Kernel routes to peers through a given gateway (BGPPeer reachableBy: Calico renders
    /// `route <peer>/32 via <gateway>`, so the session never depends on routes it carries).
    pub statics: BTreeMap<IpNet, IpAddr>,
}

/// The BGPFilters a peer names, in order, as the speaker applies them (a name with no
/// BGPFilter behind it adds nothing, as in Calico's rendering).
fn filters(cache: &Cache, names: &[String]) -> gingham_bgp::filter::Filters {
    use gingham_bgp::filter::{Filters, Match, Rule};
    let rules = |list: &Option<Vec<gingham_api::network::BGPFilterRule>>, v6: bool| -> Vec<Rule> {
        let max = if v6 { 128 } else { 32 };
        list.iter()
            .flatten()
            .filter_map(|r| {
                let net = r.cidr.as_deref().and_then(|c| c.parse::<IpNet>().ok());
                let len = |v: Option<i64>, d: u8| v.and_then(|v| u8::try_from(v).ok()).unwrap_or(d).min(max);
                let (min, top) = match (&net, &r.prefix_length) {
                    (Some(n), Some(p)) => (len(p.min, n.prefix_len()), len(p.max, max)),
                    (Some(n), None) => (n.prefix_len(), max),
                    _ => (0, max),
                };
                let prefix = net.and_then(|net| match r.match_operator.as_deref() {
                    Some("Equal") => Some(Match::Equal(net)),
                    Some("NotEqual") => Some(Match::NotEqual(net)),
                    Some("In") => Some(Match::In { net, min, max: top }),
                    Some("NotIn") => Some(Match::NotIn { net, min, max: top }),
                    _ => None,
                });
                // A rule the stored data does not make clear (another writer's bad CIDR or
                // action) matches nothing rather than everything.
                let understood = (r.cidr.is_none() && r.match_operator.is_none()) || prefix.is_some();
                let accept = match r.action.as_str() {
                    "Accept" => true,
                    "Reject" => false,
                    _ => return None,
                };
                understood.then(|| Rule {
                    accept,
                    v6,
                    prefix,
                    remote_only: r.source.as_deref() == Some("RemotePeers"),
                    interface: r.interface.clone(),
                })
            })
            .collect()
    };
    let mut out = Filters::default();
    for f in names.iter().filter_map(|n| cache.bgp_filters.get(n)) {
        out.import.extend(rules(&f.import_v4, false));
        out.import.extend(rules(&f.import_v6, true));
        out.export.extend(rules(&f.export_v4, false));
        out.export.extend(rules(&f.export_v6, true));
    }
    out
}

/// A node's BGP identity as its Node resource gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bgp {
    name: String,
    v4: Option<(Ipv4Addr, u8)>,
    v6: Option<Ipv6Addr>,
    asn: Option<u32>,
    cluster_id: Option<Ipv4Addr>,
}

fn asn_of(v: &Option<gingham_api::object::IntOrString>) -> Option<u32> {
    v.as_ref().and_then(|a| a.to_string().trim_matches('"').parse::<u32>().ok().or_else(|| dotted_asn(&a.to_string())))
}

/// `1.10` → 65546 (the asdot notation Calico accepts).
fn dotted_asn(s: &str) -> Option<u32> {
    let (hi, lo) = s.trim_matches('"').split_once('.')?;
    Some(hi.parse::<u16>().ok()? as u32 * 65536 + lo.parse::<u16>().ok()? as u32)
}

fn node_bgp(name: &str, spec: Option<&NodeBGPSpec>) -> Bgp {
    let spec = spec.cloned().unwrap_or_default();
    let v4 = spec.ipv4_address.as_deref().and_then(|a| match a.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => Some((n.addr(), n.prefix_len())),
        _ => a.parse::<Ipv4Addr>().ok().map(|a| (a, 32)),
    });
    let v6 = spec.ipv6_address.as_deref().and_then(|a| match a.parse::<IpNet>() {
        Ok(IpNet::V6(n)) => Some(n.addr()),
        _ => a.parse::<Ipv6Addr>().ok(),
    });
    Bgp {
        name: name.into(),
        v4,
        v6,
        asn: asn_of(&spec.as_number),
        cluster_id: spec.route_reflector_cluster_id.as_deref().and_then(|c| c.parse().ok()),
    }
}

/// BIRD's protocol name: `Mesh_10_0_0_2`, `Global_fd00__1_port_1790`.
pub fn protocol_name(kind: &str, ip: IpAddr, port: Option<u16>) -> String {
    let mut n = format!("{kind}_{}", ip.to_string().replace(['.', ':'], "_"));
    if let Some(p) = port.filter(|p| *p != BGP_PORT) {
        n.push_str(&format!("_port_{p}"));
    }
    n
}

/// `120s`, `2m`, `1h30m` → a duration (Kubernetes' metav1.Duration spelling).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0.001
            }
            ('h', _) => 3600.0,
            ('m', _) => 60.0,
            ('s', _) => 1.0,
            _ => return None,
        };
        total += num.parse::<f64>().ok()? * unit;
        num.clear();
    }
    if !num.is_empty() {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// A BGPPeer password: `secretKeyRef {name, key}` read from `<secrets>/<name>/<key>` (until
/// the Kubernetes datastore exists; trailing newline trimmed).
pub fn password(p: &Option<Password>, secrets: Option<&Path>) -> Option<String> {
    let r = p.as_ref()?.secret_key_ref.as_ref()?;
    let dir = secrets?;
    let ok = |s: &str| !s.is_empty() && !s.contains('/') && s != "..";
    if !ok(&r.name) || !ok(&r.key) {
        return None;
    }
    let v = std::fs::read_to_string(dir.join(&r.name).join(&r.key)).ok()?;
    Some(v.trim_end_matches(['\n', '\r']).to_string())
}

fn selects(sel: &Option<String>, labels: &BTreeMap<String, String>) -> bool {
    sel.as_deref().is_some_and(|s| Selector::parse(s).is_ok_and(|s| s.matches(labels)))
}

/// Everything BGP needs, from the cache. `secrets`: where BGPPeer passwords are read.
pub fn plan(cache: &Cache, me: &str, secrets: Option<&Path>) -> Plan {
    let empty = Plan { speaker: None, peers: vec![], exports: BTreeMap::new(), statics: BTreeMap::new() };
    let Some(rec) = cache.nodes.get(me) else { return empty };
    let mine = node_bgp(me, rec.spec.bgp.as_ref());
    let Some((my_v4, _)) = mine.v4 else { return empty };
    let global = cache.bgp_configs.get("default").cloned().unwrap_or_default();
    let local_cfg = cache.bgp_configs.get(&format!("node.{me}")).cloned().unwrap_or_default();
    let global_as = asn_of(&global.as_number).unwrap_or(DEFAULT_AS);
    let my_as = mine.asn.unwrap_or(global_as);
    let port = local_cfg.listen_port.or(global.listen_port).and_then(|p| u16::try_from(p).ok()).unwrap_or(BGP_PORT);
    let speaker = SpeakerConfig {
        asn: my_as,
        router_id: my_v4,
        cluster_id: mine.cluster_id,
        listen: Some(std::net::SocketAddr::new(
            if local_cfg.bind_mode.as_deref().or(global.bind_mode.as_deref()) == Some("NodeIP") {
                IpAddr::V4(my_v4)
            } else {
                // Dual stack (IPv4 peers arrive as mapped addresses); IPv4 only where the
                // kernel has no IPv6 (see tasks::start).
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            port,
        )),
        max_queued: tasks::MAX_QUEUED,
    };
    let nodes: BTreeMap<&str, (Bgp, &BTreeMap<String, String>)> =
        cache.nodes.iter().map(|(n, r)| (n.as_str(), (node_bgp(n, r.spec.bgp.as_ref()), &r.labels))).collect();
    let mut peers: BTreeMap<IpAddr, PeerConfig> = BTreeMap::new();
    let mut statics: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
    let base = |name: String, address: IpAddr, port: u16, remote_as: u32| {
        let mut f = fsm::Config::new(my_as, remote_as, my_v4);
        // Calico renders `connect retry time 5` and BIRD's restart time of 120 s.
        f.connect_retry = Duration::from_secs(5);
        // The agent keeps its kernel routes across restarts and session resets (the route
        // manager adopts them), so every OPEN says forwarding state was kept: a peer that
        // still holds our routes as stale keeps them until our End-of-RIB.
        f.restarting = true;
        PeerConfig {
            port,
            source: Some(match address {
                IpAddr::V4(_) => IpAddr::V4(my_v4),
                IpAddr::V6(_) => mine.v6.map(IpAddr::V6).unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            }),
            next_hop_v4: Some(my_v4),
            next_hop_v6: mine.v6,
            ..PeerConfig::new(name, address, f)
        }
    };
    // A route reflector treats iBGP peers outside its cluster as clients.
    let client = |remote_as: u32, their_cluster: Option<Ipv4Addr>| {
        mine.cluster_id.is_some() && remote_as == my_as && their_cluster != mine.cluster_id
    };
    // Peering with another Calico node: only one side connects (the smaller address waits).
    let with_node = |kind: &str, other: &Bgp, port: u16| -> Vec<PeerConfig> {
        let remote_as = other.asn.unwrap_or(global_as);
        let mut out = Vec::new();
        let pairs: [(Option<IpAddr>, Option<IpAddr>); 2] = [
            (Some(IpAddr::V4(my_v4)), other.v4.map(|(a, _)| IpAddr::V4(a))),
            (mine.v6.map(IpAddr::V6), other.v6.map(IpAddr::V6)),
        ];
        for (ours, theirs) in pairs {
            let (Some(ours), Some(theirs)) = (ours, theirs) else { continue };
            let mut p = base(protocol_name(kind, theirs, None), theirs, port, remote_as);
            p.fsm.passive = theirs.to_string() > ours.to_string();
            p.rr_client = client(remote_as, other.cluster_id);
            out.push(p);
        }
        out
    };
    // The node-to-node mesh (route reflectors neither run nor join it).
    if global.node_to_node_mesh_enabled.unwrap_or(true) && mine.cluster_id.is_none() {
        let pw = password(&global.node_mesh_password, secrets);
        let restart = global.node_mesh_max_restart_time.as_deref().and_then(parse_duration);
        for (name, (other, _)) in &nodes {
            if *name == me || other.cluster_id.is_some() {
                continue;
            }
            for mut p in with_node("Mesh", other, port) {
                p.password = pw.clone();
                if let Some(r) = restart {
                    p.fsm.graceful_restart = Some(r.as_secs().min(4095) as u16);
                }
                peers.insert(p.address, p);
            }
        }
    }
    // BGPPeers: explicit addresses first by name, node-specific ones win over global ones.
    for (_, spec) in &cache.bgp_peers {
        let global_peer =
            spec.node.as_deref().unwrap_or("").is_empty() && spec.node_selector.as_deref().unwrap_or("").is_empty();
        let applies = |name: &str, labels: &BTreeMap<String, String>| {
            global_peer || spec.node.as_deref() == Some(name) || selects(&spec.node_selector, labels)
        };
        let kind = if global_peer { "Global" } else { "Node" };
        let mut found: Vec<PeerConfig> = Vec::new();
        if applies(me, &rec.labels) {
            if let Some((ip, port)) = spec.peer_ip.as_deref().and_then(|p| parse_peer_ip(p).ok()) {
                let remote_as = asn_of(&spec.as_number).unwrap_or(global_as);
                let mut p = base(protocol_name(kind, ip, port), ip, port.unwrap_or(BGP_PORT), remote_as);
                let their_cluster = nodes
                    .values()
                    .find(|(b, _)| b.v4.map(|v| IpAddr::V4(v.0)) == Some(ip))
                    .and_then(|(b, _)| b.cluster_id);
                p.rr_client = client(remote_as, their_cluster);
                found.push(p);
            } else if spec.peer_selector.is_some() {
                for (name, (other, labels)) in &nodes {
                    if *name != me && selects(&spec.peer_selector, labels) {
                        found.extend(with_node("Node", other, port));
                    }
                }
            }
        }
        // Reverse peering: the selected peers peer back with the nodes that select them.
        if spec.peer_selector.is_some()
            && spec.reverse_peering.as_deref() != Some("Manual")
            && selects(&spec.peer_selector, &rec.labels)
        {
            for (name, (other, labels)) in &nodes {
                if *name != me && applies(name, labels) {
                    found.extend(with_node("Node", other, port));
                }
            }
        }
        for mut p in found {
            if let Some(gw) = spec.reachable_by.as_deref().and_then(|g| g.parse::<IpAddr>().ok()) {
                statics.insert(IpNet::from(p.address), gw);
            }
            p.fsm.local_as = asn_of(&spec.local_as_number).unwrap_or(my_as);
            p.next_hop = match spec.next_hop_mode.as_deref() {
                Some("Self") => NextHopMode::SelfAddress,
                Some("Keep") => NextHopMode::Keep,
                _ if spec.keep_original_next_hop == Some(true) => NextHopMode::Keep,
                _ => NextHopMode::Auto,
            };
            p.allow_own_as = spec.num_allowed_local_as_numbers.unwrap_or(0).clamp(0, 10) as usize;
            p.filters = Arc::new(filters(cache, spec.filters.as_deref().unwrap_or_default()));
            // Calico renders `ttl security on; multihop <ttlSecurity>`; 0 is off.
            p.ttl_security = spec.ttl_security.filter(|t| (1..=255).contains(t)).map(|t| t as u8);
            p.password = password(&spec.password, secrets);
            if spec.source_address.as_deref() == Some("None") {
                p.source = None;
            }
            if let Some(r) = spec.max_restart_time.as_deref().and_then(parse_duration) {
                p.fsm.graceful_restart = Some(r.as_secs().min(4095) as u16);
            }
            if let Some(k) = spec.keepalive_time.as_deref().and_then(parse_duration) {
                p.fsm.hold_time = (k.as_secs() * 3).clamp(3, u16::MAX as u64) as u16;
            }
            let replace = peers
                .get(&p.address)
                .is_none_or(|old| old.name.starts_with("Mesh") || (old.name.starts_with("Global") && kind == "Node"));
            if replace {
                peers.insert(p.address, p);
            }
        }
    }
    Plan { speaker: Some(speaker), peers: peers.into_values().collect(), exports: exports(cache, me, &global), statics }
}

/// What this node advertises, with communities from prefixAdvertisements.
fn exports(cache: &Cache, me: &str, global: &BGPConfigurationSpec) -> BTreeMap<IpNet, Attrs> {
    let exported = |net: &IpNet| {
        cache
            .pools
            .values()
            .find(|p| p.cidr.contains(net))
            .is_some_and(|p| !p.spec.vxlan().enabled() && p.spec.disable_bgp_export != Some(true))
    };
    let mut out = BTreeMap::new();
    if cache.use_pod_cidr {
        for c in cache.nodes.get(me).map(|n| n.pod_cidrs.as_slice()).unwrap_or_default() {
            if exported(c) {
                out.insert(*c, Attrs::default());
            }
        }
    }
    for b in cache.blocks.values() {
        if b.node.as_deref() == Some(me) {
            if exported(&b.cidr) {
                out.insert(b.cidr, Attrs::default());
            }
        } else {
            for (ip, borrower) in &b.borrowed {
                let host = IpNet::from(*ip);
                if &**borrower == me && exported(&host) {
                    out.insert(host, Attrs::default());
                }
            }
        }
    }
    for list in [&global.service_cluster_ips, &global.service_external_ips, &global.service_load_balancer_ips] {
        for c in list.iter().flatten() {
            if let Ok(net) = c.cidr.parse::<IpNet>() {
                out.insert(net.trunc(), Attrs::default());
            }
        }
    }
    // Communities: named ones resolve through spec.communities; aa:nn standard, aa:nn:mm large.
    let named: BTreeMap<&str, &str> =
        global.communities.iter().flatten().filter_map(|c| Some((c.name.as_deref()?, c.value.as_deref()?))).collect();
    for adv in global.prefix_advertisements.iter().flatten() {
        let Some(cidr) = adv.cidr.as_deref().and_then(|c| c.parse::<IpNet>().ok()) else { continue };
        for (net, attrs) in out.iter_mut() {
            if !cidr.contains(net) {
                continue;
            }
            for c in adv.communities.iter().flatten() {
                let v = named.get(c.as_str()).copied().unwrap_or(c);
                let parts: Vec<u32> = v.split(':').filter_map(|p| p.parse().ok()).collect();
                match parts[..] {
                    [a, n] if a <= 0xffff && n <= 0xffff => attrs.communities.push(a << 16 | n),
                    [a, b, c] => attrs.large_communities.push([a, b, c]),
                    _ => {}
                }
            }
        }
    }
    out
}

/// The speaker inside the agent: replanned when what BGP depends on changes, fed the
/// differences, its learned routes passed on to the route manager.
pub struct Runner {
    pub dirty: bool,
    /// A new plan (or a failed start) waits to be applied; nothing to do otherwise, so the
    /// model's every wake costs nothing here.
    pending: bool,
    secrets: Option<PathBuf>,
    keys: Option<SocketHooks>,
    plan: Plan,
    applied: Plan,
    speaker: Option<Speaker>,
    commands: Option<mpsc::UnboundedSender<Command>>,
    fib: Option<mpsc::Receiver<Vec<FibChange>>>,
    learned: PrefixMap<()>,
    /// Learned routes of a speaker that was replaced: the route manager drops them.
    forgotten: Vec<IpNet>,
    static_changes: Vec<(IpNet, Option<IpAddr>)>,
    started: Option<Instant>,
    pub errors: Vec<String>,
}

/// How long after the speaker starts its routes left in the kernel by a previous agent are
/// kept unconfirmed (graceful restart: peers send theirs again within this).
/// How many forwarding batches (one per UPDATE) the model takes before programming them.
const FIB_BATCHES: usize = 64;

pub const KERNEL_ROUTES_GRACE: Duration = Duration::from_secs(120);

impl Runner {
    pub fn new(secrets: Option<PathBuf>, keys: Option<SocketHooks>) -> Runner {
        let empty = Plan { speaker: None, peers: vec![], exports: BTreeMap::new(), statics: BTreeMap::new() };
        Runner {
            dirty: true,
            pending: true,
            secrets,
            keys,
            plan: empty.clone(),
            applied: empty,
            speaker: None,
            commands: None,
            fib: None,
            learned: PrefixMap::new(),
            forgotten: Vec::new(),
            static_changes: Vec::new(),
            started: None,
            errors: Vec::new(),
        }
    }

    /// A block matters when it is (or was) ours, or lends us an address.
    pub fn block_changed(&mut self, cache: &Cache, cidr: IpNet, me: &str) {
        let now = cache
            .blocks
            .get(&cidr)
            .is_some_and(|b| b.node.as_deref() == Some(me) || b.borrowed.iter().any(|(_, n)| &**n == me));
        let before = self.plan.exports.keys().any(|e| cidr.contains(e) || e.contains(&cidr.network()));
        if now || before {
            self.dirty = true;
        }
    }

    pub fn replan(&mut self, cache: &Cache, me: &str) {
        self.plan = plan(cache, me, self.secrets.as_deref());
        self.dirty = false;
        self.pending = true;
    }

    /// Where status queries go (None: no speaker).
    pub fn commands(&self) -> Option<mpsc::UnboundedSender<Command>> {
        self.commands.clone()
    }

    /// Routes of a replaced speaker, to be removed.
    pub fn take_forgotten(&mut self) -> Vec<IpNet> {
        std::mem::take(&mut self.forgotten)
    }

    /// Whether routes of ours that the speaker has not confirmed may now go from the kernel.
    pub fn kernel_synced(&self) -> bool {
        self.started.is_some_and(|t| t.elapsed() >= KERNEL_ROUTES_GRACE)
            || (self.started.is_some() && self.plan.peers.is_empty())
    }

    /// The next routes learned or lost: what has arrived, up to `FIB_BATCHES` batches.
    pub async fn next_fib(&mut self) -> Vec<FibChange> {
        loop {
            if let Some(rx) = self.fib.as_mut() {
                if let Some(first) = rx.recv().await {
                    let mut all = first;
                    for _ in 1..FIB_BATCHES {
                        match rx.try_recv() {
                            Ok(more) => all.extend(more),
                            Err(_) => break,
                        }
                    }
                    for f in &all {
                        if f.next_hops.is_empty() {
                            self.learned.remove(&f.prefix);
                        } else {
                            self.learned.insert(f.prefix, ());
                        }
                    }
                    return all;
                }
                self.fib = None;
            }
            std::future::pending::<()>().await;
        }
    }

    /// Kernel routes to peers (reachableBy) to add (with their gateway) or remove.
    pub fn take_static_changes(&mut self) -> Vec<(IpNet, Option<IpAddr>)> {
        std::mem::take(&mut self.static_changes)
    }

    /// Whether `dst` is a route to a peer that BGP must not replace.
    pub fn is_static(&self, dst: &IpNet) -> bool {
        self.applied.statics.contains_key(dst)
    }

    /// Bring the speaker to the plan: (re)start it if its identity changed, then peers and
    /// exports by difference.
    pub async fn apply(&mut self) {
        if !self.pending {
            return;
        }
        self.pending = false;
        for (dst, gw) in &self.plan.statics {
            if self.applied.statics.get(dst) != Some(gw) {
                self.static_changes.push((*dst, Some(*gw)));
            }
        }
        for dst in self.applied.statics.keys() {
            if !self.plan.statics.contains_key(dst) {
                self.static_changes.push((*dst, None));
            }
        }
        self.applied.statics = self.plan.statics.clone();
        if self.plan.speaker != self.applied.speaker || (self.plan.speaker.is_some() && self.speaker.is_none()) {
            self.speaker = None;
            self.commands = None;
            self.fib = None;
            self.forgotten.extend(std::mem::take(&mut self.learned).keys());
            let statics = std::mem::take(&mut self.applied.statics);
            self.applied = Plan { speaker: None, peers: vec![], exports: BTreeMap::new(), statics };
            if let Some(cfg) = self.plan.speaker.clone() {
                match tasks::start(cfg.clone(), self.keys.clone()).await {
                    Ok(mut s) => {
                        self.fib = Some(std::mem::replace(&mut s.fib, mpsc::channel(1).1));
                        self.commands = Some(s.commands.clone());
                        self.speaker = Some(s);
                        self.started.get_or_insert_with(Instant::now);
                        self.applied.speaker = Some(cfg);
                    }
                    Err(e) => {
                        self.errors.push(format!("BGP: cannot listen on {:?}: {e}", cfg.listen));
                        // Try again at the next wake (the resync backstop brings one).
                        self.pending = true;
                        return;
                    }
                }
            }
        }
        let Some(cmd) = self.commands.clone() else { return };
        if self.plan.peers != self.applied.peers {
            let _ = cmd.send(Command::SetPeers(self.plan.peers.clone()));
            self.applied.peers = self.plan.peers.clone();
        }
        for (net, attrs) in &self.plan.exports {
            if self.applied.exports.get(net) != Some(attrs) {
                let _ = cmd.send(Command::Originate(*net, attrs.clone()));
            }
        }
        for net in self.applied.exports.keys() {
            if !self.plan.exports.contains_key(net) {
                let _ = cmd.send(Command::Withdraw(*net));
            }
        }
        self.applied.exports = self.plan.exports.clone();
    }
}

#[cfg(test)]
mod tests;
