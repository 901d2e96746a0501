//! The policy manager: the engine's plans as nftables in table `inet gingham`, built like
//! Felix's chains but reached through verdict maps. Base chains on forward and input send
//! workload traffic (`cali*`, the interface prefix) through per-endpoint chains —
//! `fw-<iface>` (from the workload: its egress policy) and `tw-<iface>` (to it: ingress) — found
//! by interface name in the maps `from-wl` / `to-wl`; an interface missing from a map is
//! dropped, so a new workload has no network until its policy is in place. A workload's chain
//! holds what is its own (marks cleared, anti-spoofing) and a `goto` to the chain of its policy
//! list (`si-`/`so-` + a digest), shared by every workload with the same list, which jumps, tier
//! by tier, to one chain per policy and direction (`pi-…`/`po-…`, shared by every endpoint
//! using the policy) and then to its profiles' chains (`pri-…`/`pro-…`). Allow and Pass
//! travel back as mark bits, as in Felix. Rule selectors are named sets (interval sets of
//! addresses, `s4-`/`s6-` + the selector's unique ID; named ports `n4-`/`n6-`) shared by every
//! rule with the same selector.
//!
//! Conntrack comes first (established/related accepted, invalid dropped on workload
//! interfaces); traffic from the host to its own workloads (output hook) is not policed.
//! Changes are one transaction each: a label change is a set-element change, a policy change
//! rewrites that policy's chains; the table is only replaced whole (atomically) when first
//! built or found changed by hand.

use std::collections::{BTreeMap, BTreeSet};

use gingham_api::network::FelixConfigurationSpec;
use gingham_kernel::nft::*;
use gingham_policy::engine::{Dirty, EndpointPlan, Engine, TierPlan};
use gingham_policy::index::{Member, SetSpec};
use gingham_policy::rules::{Action, Entity, Port, Rule as PRule};
use ipnet::IpNet;

use crate::DataplaneError;

pub const TABLE: &str = "gingham";
pub const FROM_WL: &str = "from-wl";
pub const TO_WL: &str = "to-wl";
/// Host endpoints by interface: traffic arriving at the host on it, and leaving it.
pub const FROM_HEP: &str = "from-hep";
/// The cluster's node addresses: their VXLAN and IP-in-IP traffic passes host endpoints'
/// policy, as Felix allows it, so a host endpoint on the underlay never cuts the pod network.
pub const CLUSTER_HOSTS: &str = "cluster-hosts4";
pub const TO_HEP: &str = "to-hep";
/// A host endpoint on every interface (`interfaceName: "*"`).
const ALL_INTERFACES: &str = "*";
/// Felix's mark bits (within its default mask 0xffff0000).
pub const MARK_ACCEPT: u32 = 0x1_0000;
pub const MARK_PASS: u32 = 0x2_0000;
const MARKS: u32 = MARK_ACCEPT | MARK_PASS;
/// ICMPv6 a workload may always send its host (MLD, router solicitation, neighbour discovery).
const ICMPV6_TO_HOST: [u8; 6] = [130, 131, 132, 133, 135, 136];

pub fn table() -> Table {
    Table::new(Family::Inet, TABLE)
}

/// Felix's DefaultEndpointToHostAction: what happens to traffic from a workload to its own
/// host once the workload's egress policy allowed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointToHost {
    Drop,
    /// Leave it to the host's other rules.
    Return,
    /// Calico's manifests' setting, and ours: kubelet, DNS on the node and the agent's own
    /// socket must be reachable from pods.
    #[default]
    Accept,
}

/// A port the host always allows (Felix's failsafe ports): inbound, traffic to it; outbound,
/// traffic from it to that port. `net` restricts the other side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failsafe {
    pub protocol: u8,
    pub port: u16,
    pub net: Option<IpNet>,
}

fn failsafe(list: &[(u8, u16)]) -> Vec<Failsafe> {
    list.iter().map(|&(protocol, port)| Failsafe { protocol, port, net: None }).collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub interface_prefix: String,
    pub endpoint_to_host: EndpointToHost,
    pub failsafe_inbound: Vec<Failsafe>,
    pub failsafe_outbound: Vec<Failsafe>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        // Calico's defaults: SSH, DHCP, BGP, etcd, Typha, the API server, and Calico's 6666/6667.
        let common = [(6, 179), (6, 2379), (6, 2380), (6, 5473), (6, 6443), (6, 6666), (6, 6667)];
        PolicyConfig {
            interface_prefix: "cali".into(),
            endpoint_to_host: EndpointToHost::Accept,
            failsafe_inbound: failsafe(&[[(6, 22), (17, 68)].as_slice(), &common].concat()),
            failsafe_outbound: failsafe(&[[(17, 53), (17, 67)].as_slice(), &common].concat()),
        }
    }
}

impl PolicyConfig {
    /// The configuration FelixConfiguration `default` and this node's `node.<name>` give (the
    /// node's fields win); an error names the field.
    pub fn from_felix(
        default: Option<&FelixConfigurationSpec>,
        node: Option<&FelixConfigurationSpec>,
    ) -> Result<PolicyConfig, String> {
        let mut c = PolicyConfig::default();
        let pick = |f: fn(&FelixConfigurationSpec) -> Option<String>| node.and_then(f).or_else(|| default.and_then(f));
        if let Some(p) = pick(|s| s.interface_prefix.clone()) {
            // Felix takes a comma-separated list; the first prefix is the workloads'.
            let first = p.split(',').next().unwrap_or_default().trim().to_string();
            if first.is_empty() || !first.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                return Err(format!("spec.interfacePrefix: {p:?} is not an interface name prefix"));
            }
            c.interface_prefix = first;
        }
        if let Some(a) = pick(|s| s.default_endpoint_to_host_action.clone()) {
            c.endpoint_to_host = match a.as_str() {
                "Drop" => EndpointToHost::Drop,
                "Return" => EndpointToHost::Return,
                "Accept" => EndpointToHost::Accept,
                _ => return Err(format!("spec.defaultEndpointToHostAction: {a:?} is not Drop, Return or Accept")),
            };
        }
        for (field, get, out) in [
            (
                "failsafeInboundHostPorts",
                (|s: &FelixConfigurationSpec| s.failsafe_inbound_host_ports.clone()) as fn(&_) -> _,
                &mut c.failsafe_inbound,
            ),
            ("failsafeOutboundHostPorts", |s| s.failsafe_outbound_host_ports.clone(), &mut c.failsafe_outbound),
        ] {
            let Some(list) = node.and_then(get).or_else(|| default.and_then(get)) else { continue };
            out.clear();
            for (i, p) in list.iter().enumerate() {
                let path = format!("spec.{field}[{i}]");
                let protocol = match p.protocol.to_ascii_lowercase().as_str() {
                    "tcp" => 6,
                    "udp" => 17,
                    "sctp" => 132,
                    other => return Err(format!("{path}.protocol: {other:?} is not tcp, udp or sctp")),
                };
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{path}.port: {} is not a port", p.port))?;
                let net = match p.net.as_deref().filter(|n| !n.is_empty()) {
                    Some(n) => Some(n.parse::<IpNet>().map_err(|_| format!("{path}.net: {n:?} is not a CIDR"))?),
                    None => None,
                };
                out.push(Failsafe { protocol, port, net });
            }
        }
        Ok(c)
    }
}

/// A digest of a table listing without its counters' values (traffic changes those).
fn listing_digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        w.hash(&mut h);
        if w == "packets" || w == "bytes" {
            words.next();
        }
    }
    h.finish()
}

/// A name safe for nftables, readable, and unique (a hash when anything had to change).
fn safe(prefix: &str, name: &str) -> String {
    let clean: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' }).take(200).collect();
    if clean == name {
        format!("{prefix}{clean}")
    } else {
        let h = gingham_api::Selector::Eq("n".into(), name.into()).unique_id();
        format!("{prefix}{clean}-{}", &h[2..10])
    }
}

pub fn policy_chain(key: &str, ingress: bool) -> String {
    safe(if ingress { "pi-" } else { "po-" }, key)
}

pub fn profile_chain(name: &str, ingress: bool) -> String {
    safe(if ingress { "pri-" } else { "pro-" }, name)
}

pub fn endpoint_chain(iface: &str, ingress: bool) -> String {
    safe(if ingress { "tw-" } else { "fw-" }, iface)
}

/// A host endpoint's chains: from it into the host (its ingress), from the host out through it.
pub fn host_endpoint_chain(iface: &str, ingress: bool) -> String {
    safe(if ingress { "fh-" } else { "th-" }, iface)
}

/// The map and chain of an endpoint's direction.
fn endpoint_map_chain(iface: &str, host: bool, ingress: bool) -> (&'static str, String) {
    match (host, ingress) {
        (false, true) => (TO_WL, endpoint_chain(iface, true)),
        (false, false) => (FROM_WL, endpoint_chain(iface, false)),
        (true, true) => (FROM_HEP, host_endpoint_chain(iface, true)),
        (true, false) => (TO_HEP, host_endpoint_chain(iface, false)),
    }
}

/// nft set names of a set ID, per family.
pub fn set_name(id: &str, v6: bool) -> String {
    let (kind, rest) = id.split_once(':').unwrap_or(("s", id));
    format!("{kind}{}-{rest}", if v6 { 6 } else { 4 })
}

fn set_elements(spec: &SetSpec, members: Vec<&Member>, v6: bool) -> BTreeSet<Element> {
    if spec.named.is_some() {
        return members
            .into_iter()
            .filter_map(|m| match m {
                Member::Port(a, p, n) if a.is_ipv6() == v6 => Some(Element::ProtoPort(*a, *p, *n)),
                _ => None,
            })
            .collect();
    }
    let nets: Vec<IpNet> = members
        .into_iter()
        .filter_map(|m| match m {
            Member::Net(n) if n.addr().is_ipv6() == v6 => Some(n.trunc()),
            _ => None,
        })
        .collect();
    // Interval elements may not overlap.
    IpNet::aggregate(&nets).into_iter().map(Element::Net).collect()
}

fn set_type(spec: &SetSpec, v6: bool) -> Set {
    let named = spec.named.is_some();
    let kind = match (named, v6) {
        (false, false) => SetType::Ipv4Addr,
        (false, true) => SetType::Ipv6Addr,
        (true, false) => SetType::Ipv4ProtoPort,
        (true, true) => SetType::Ipv6ProtoPort,
    };
    Set { name: String::new(), kind, interval: !named }
}

fn family_nets(nets: &[IpNet], v6: bool) -> Vec<IpNet> {
    IpNet::aggregate(&nets.iter().filter(|n| n.addr().is_ipv6() == v6).copied().collect::<Vec<_>>())
}

/// One side's alternatives: each is the matches of one way to satisfy the side's `ports` (the
/// numeric ranges together, each named port alone), with everything else of the side.
fn entity_matches(e: &Entity, addr: Addr, v6: bool, proto: Option<u8>) -> Option<Vec<Vec<Match>>> {
    let mut base = Vec::new();
    if !e.nets.is_empty() {
        let nets = family_nets(&e.nets, v6);
        if nets.is_empty() {
            return None; // No net of this family: the rule cannot match it.
        }
        base.push(Match::AddrIn { addr, v6, nets, negate: false });
    }
    let not = family_nets(&e.not_nets, v6);
    if !not.is_empty() {
        base.push(Match::AddrIn { addr, v6, nets: not, negate: true });
    }
    let sel_set = |s: &gingham_api::Selector| set_name(&SetSpec { selector: Some(s.clone()), named: None }.id(), v6);
    if let Some(s) = &e.selector {
        base.push(Match::AddrInSet { addr, v6, set: sel_set(s), negate: false });
    }
    if let Some(s) = &e.not_selector {
        base.push(Match::AddrInSet { addr, v6, set: sel_set(s), negate: true });
    }
    let named_set = |n: &str| {
        let spec = SetSpec { selector: e.selector.clone(), named: Some((proto.unwrap_or(0), n.to_string())) };
        set_name(&spec.id(), v6)
    };
    let ranges = |ports: &[Port]| -> Vec<(u16, u16)> {
        ports.iter().filter_map(|p| if let Port::Range(a, b) = p { Some((*a, *b)) } else { None }).collect()
    };
    let not_ranges = ranges(&e.not_ports);
    if !not_ranges.is_empty() {
        base.push(Match::Ports { addr, ranges: not_ranges, negate: true });
    }
    for p in &e.not_ports {
        if let Port::Named(n) = p {
            base.push(Match::AddrProtoPortInSet { addr, v6, set: named_set(n), negate: true });
        }
    }
    if e.ports.is_empty() {
        return Some(vec![base]);
    }
    let mut alts = Vec::new();
    let r = ranges(&e.ports);
    if !r.is_empty() {
        let mut m = base.clone();
        m.push(Match::Ports { addr, ranges: r, negate: false });
        alts.push(m);
    }
    for p in &e.ports {
        if let Port::Named(n) = p {
            let mut m = base.clone();
            m.push(Match::AddrProtoPortInSet { addr, v6, set: named_set(n), negate: false });
            alts.push(m);
        }
    }
    Some(alts)
}

/// A policy rule as nft rules: per family it applies to, per port alternative.
pub fn render_rule(r: &PRule) -> Vec<Rule> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if r.ip_version.is_some_and(|v| (v == 6) != v6)
            || matches!((r.protocol, v6), (Some(1), true) | (Some(58), false))
        {
            continue;
        }
        let mut head = vec![Match::NfProto { v6 }];
        if let Some(p) = r.protocol {
            head.push(Match::L4Proto { proto: p, negate: false });
        }
        if let Some(p) = r.not_protocol {
            head.push(Match::L4Proto { proto: p, negate: true });
        }
        for (icmp, negate) in [(&r.icmp, false), (&r.not_icmp, true)] {
            if let Some(i) = icmp {
                head.push(Match::Icmp { v6, kind: i.kind, code: i.code, negate });
            }
        }
        let (Some(src), Some(dst)) = (
            entity_matches(&r.source, Addr::Source, v6, r.protocol),
            entity_matches(&r.destination, Addr::Destination, v6, r.protocol),
        ) else {
            continue;
        };
        let verdict = match r.action {
            Action::Allow => vec![Statement::MarkSet(MARK_ACCEPT), Statement::Return],
            Action::Pass => vec![Statement::MarkSet(MARK_PASS), Statement::Return],
            Action::Deny => vec![Statement::Drop],
            Action::Log => vec![Statement::Log("calico-packet: ".into())],
        };
        for s in &src {
            for d in &dst {
                let mut m = head.clone();
                m.extend(s.iter().cloned());
                m.extend(d.iter().cloned());
                let mut st = vec![Statement::Counter];
                st.extend(verdict.iter().cloned());
                out.push(Rule::new(m, st));
            }
        }
    }
    out
}

fn rules_chain(ops: &mut Vec<Op>, name: &str, rules: &[PRule]) {
    let t = table();
    ops.push(Op::AddChain(t.clone(), name.into(), None));
    ops.push(Op::FlushChain(t.clone(), name.into()));
    for r in rules {
        ops.extend(render_rule(r).into_iter().map(|r| Op::AddRule(t.clone(), name.into(), r)));
    }
}

fn mark(bits: u32, set: bool) -> Match {
    Match::Mark { bits, set }
}

/// An endpoint's own rules for one direction, before its policy: marks cleared, and for a
/// workload's egress, anti-spoofing.
fn endpoint_head(plan: &EndpointPlan, ingress: bool) -> Vec<Rule> {
    let mut out = vec![Rule::new(vec![], vec![Statement::MarkClear(MARKS)])];
    if !ingress && !plan.is_host_endpoint() {
        // Anti-spoofing: a workload sends only from its own addresses.
        for v6 in [false, true] {
            let own = family_nets(&plan.ips, v6);
            let m = if own.is_empty() {
                vec![Match::NfProto { v6 }]
            } else {
                vec![Match::NfProto { v6 }, Match::AddrIn { addr: Addr::Source, v6, nets: own, negate: true }]
            };
            out.push(Rule::new(m, vec![Statement::Counter, Statement::Drop]));
        }
    }
    out
}

/// An endpoint's policy for one direction: tiers, then profiles, then drop. The same for
/// every endpoint with the same policies and profiles, so workloads share it (see
/// `SharedChains`).
fn endpoint_body(plan: &EndpointPlan, ingress: bool) -> Vec<Rule> {
    let mut out = Vec::new();
    let tiers: &[TierPlan] = if ingress { &plan.ingress } else { &plan.egress };
    // Each jump is guarded by the marks (an Allow or a Pass skips the tier's later policies),
    // rather than followed by a test-and-return: one rule per policy, not two. The kernel
    // re-validates the whole table's jumps at every commit that adds one, so the table's size
    // is what a one-endpoint change costs.
    for (i, t) in tiers.iter().enumerate() {
        if i > 0 {
            out.push(Rule::new(vec![], vec![Statement::MarkClear(MARK_PASS)]));
        }
        for p in &t.policies {
            out.push(Rule::new(vec![mark(MARKS, false)], vec![Statement::Jump(policy_chain(p, ingress))]));
        }
        out.push(Rule::new(vec![mark(MARK_ACCEPT, true)], vec![Statement::Return]));
        if !t.pass_at_end {
            out.push(Rule::new(vec![mark(MARK_PASS, false)], vec![Statement::Counter, Statement::Drop]));
        }
    }
    for p in &plan.profiles {
        out.push(Rule::new(vec![mark(MARK_ACCEPT, false)], vec![Statement::Jump(profile_chain(p, ingress))]));
    }
    out.push(Rule::new(vec![mark(MARK_ACCEPT, true)], vec![Statement::Return]));
    out.push(Rule::new(vec![], vec![Statement::Counter, Statement::Drop]));
    out
}

/// Policy chains shared by workloads with the same policies (replicas of one deployment):
/// `si-`/`so-` + a digest of the rules. A workload's own chain is its head and a `goto` here,
/// so a cluster of many replicas programs each policy list once, and a label change that
/// lands an endpoint on an existing list rewrites one rule. A shared chain never changes
/// (its name is its content); it goes when its last workload does.
#[derive(Default)]
struct SharedChains {
    /// Chain name → its rules and how many endpoint directions use it.
    chains: BTreeMap<String, (Vec<Rule>, usize)>,
    /// (interface, ingress) → the shared chain it uses.
    used: BTreeMap<(String, bool), String>,
}

impl SharedChains {
    /// The shared chain for these rules, and whether it must be created.
    fn name(&self, rules: &[Rule], ingress: bool) -> (String, bool) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rules.hash(&mut h);
        let digest = h.finish();
        // A digest collision gets the next free suffix, never another list's chain (ends by
        // the time the suffixes outnumber the chains).
        let mut n = 0usize;
        loop {
            let suffix = if n == 0 { String::new() } else { format!("-{n}") };
            let name = format!("{}{digest:016x}{suffix}", if ingress { "si-" } else { "so-" });
            match self.chains.get(&name) {
                Some((r, _)) if r.as_slice() == rules => return (name, false),
                Some(_) => n += 1,
                None => return (name, true),
            }
        }
    }

    /// `iface` now uses `name` (None: no shared chain); the chain that became unused, if any.
    fn set(&mut self, iface: &str, ingress: bool, use_: Option<(String, Vec<Rule>)>) -> Option<String> {
        let key = (iface.to_string(), ingress);
        let new_name = use_.as_ref().map(|(n, _)| n.clone());
        let old = match &new_name {
            Some(n) => self.used.insert(key, n.clone()),
            None => self.used.remove(&key),
        };
        if old == new_name {
            return None;
        }
        if let Some((name, rules)) = use_ {
            self.chains.entry(name).or_insert((rules, 0)).1 += 1;
        }
        let old = old?;
        let entry = self.chains.get_mut(&old)?;
        entry.1 -= 1;
        if entry.1 == 0 {
            self.chains.remove(&old);
            return Some(old);
        }
        None
    }
}

pub struct PolicyManager {
    nft: Nft,
    config: PolicyConfig,
    built: bool,
    /// Whether the base chains send every host interface to an all-interfaces host endpoint.
    all_interfaces: bool,
    sets: BTreeMap<String, BTreeSet<Element>>,
    chains: BTreeSet<String>,
    /// Programmed endpoints by interface: whether each is a host endpoint.
    endpoints: BTreeMap<String, bool>,
    shared: SharedChains,
    /// Interfaces whose policy is programmed, for CNI ADD to wait on.
    programmed: BTreeSet<String>,
    /// A digest of the table as listed (counters aside) once our last change was in; None
    /// until the next drift check takes it.
    snapshot: Option<u64>,
    /// The cluster's node addresses (by node), and those in the kernel's set.
    hosts: BTreeMap<String, std::net::Ipv4Addr>,
    hosts_programmed: BTreeSet<std::net::Ipv4Addr>,
    hosts_dirty: bool,
}

impl PolicyManager {
    pub fn new(nft: Nft, config: PolicyConfig) -> PolicyManager {
        PolicyManager {
            nft,
            config,
            built: false,
            all_interfaces: false,
            sets: BTreeMap::new(),
            chains: BTreeSet::new(),
            endpoints: BTreeMap::new(),
            shared: SharedChains::default(),
            programmed: BTreeSet::new(),
            snapshot: None,
            hosts: BTreeMap::new(),
            hosts_programmed: BTreeSet::new(),
            hosts_dirty: false,
        }
    }

    pub fn is_programmed(&self, iface: &str) -> bool {
        self.programmed.contains(iface)
    }

    pub fn programmed(&self) -> &BTreeSet<String> {
        &self.programmed
    }

    /// A node's address (None: gone), for the cluster-hosts set.
    pub fn set_host(&mut self, node: &str, addr: Option<std::net::Ipv4Addr>) {
        let before = match addr {
            Some(a) => self.hosts.insert(node.into(), a),
            None => self.hosts.remove(node),
        };
        self.hosts_dirty |= before != addr;
    }

    /// Whether something waits for the next apply besides what the engine reports.
    pub fn has_pending(&self) -> bool {
        !self.built || self.hosts_dirty
    }

    /// Config changes (FelixConfiguration) rebuild the base chains at the next apply.
    pub fn set_config(&mut self, config: PolicyConfig) {
        if config != self.config {
            self.config = config;
            self.built = false;
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    fn failsafe_rules(list: &[Failsafe], inbound: bool) -> Vec<Rule> {
        let peer = if inbound { Addr::Source } else { Addr::Destination };
        list.iter()
            .map(|f| {
                let mut m = vec![
                    Match::L4Proto { proto: f.protocol, negate: false },
                    Match::Ports { addr: Addr::Destination, ranges: vec![(f.port, f.port)], negate: false },
                ];
                if let Some(n) = f.net {
                    m.push(Match::AddrIn { addr: peer, v6: n.addr().is_ipv6(), nets: vec![n.trunc()], negate: false });
                }
                Rule::new(m, vec![Statement::Counter, Statement::Accept])
            })
            .collect()
    }

    /// The host endpoint part of the input (`inbound`) or output chain: loopback and conntrack
    /// first, then failsafe ports, then the interface's host endpoint chain (or the
    /// all-interfaces one). Interfaces without a host endpoint are left alone.
    fn host_rules(&self, inbound: bool) -> Vec<Rule> {
        let (lo, map) =
            if inbound { (Match::Iifname("lo".into()), FROM_HEP) } else { (Match::Oifname("lo".into()), TO_HEP) };
        let mut rules = vec![
            Rule::new(vec![lo], vec![Statement::Accept]),
            Rule::new(vec![Match::CtEstablished], vec![Statement::Accept]),
        ];
        let peer = if inbound { Addr::Source } else { Addr::Destination };
        let hosts = Match::AddrInSet { addr: peer, v6: false, set: CLUSTER_HOSTS.into(), negate: false };
        rules.push(Rule::new(vec![hosts.clone(), Match::UdpDport(4789)], vec![Statement::Accept]));
        rules.push(Rule::new(vec![hosts, Match::L4Proto { proto: 4, negate: false }], vec![Statement::Accept]));
        let list = if inbound { &self.config.failsafe_inbound } else { &self.config.failsafe_outbound };
        rules.extend(Self::failsafe_rules(list, inbound));
        rules.push(Rule::new(vec![], vec![Statement::IfnameVmap { input: inbound, map: map.into() }]));
        rules.push(Rule::new(vec![mark(MARK_ACCEPT, true)], vec![Statement::Accept]));
        if self.all_interfaces {
            rules.push(Rule::new(vec![], vec![Statement::Jump(host_endpoint_chain(ALL_INTERFACES, inbound))]));
            rules.push(Rule::new(vec![mark(MARK_ACCEPT, true)], vec![Statement::Accept]));
        }
        rules
    }

    fn base(&self) -> Vec<Op> {
        let t = table();
        let px = &self.config.interface_prefix;
        let (i, o) = (Match::IifnamePrefix(px.clone()), Match::OifnamePrefix(px.clone()));
        let base = |hook| {
            Some(BaseChain { kind: ChainType::Filter, hook, priority: PRIORITY_FILTER, accept_by_default: true })
        };
        let mut ops = vec![Op::AddTable(t.clone())];
        for m in [FROM_WL, TO_WL, FROM_HEP, TO_HEP] {
            ops.push(Op::AddIfnameVmap(t.clone(), m.into()));
        }
        ops.push(Op::AddSet(t.clone(), Set { name: CLUSTER_HOSTS.into(), kind: SetType::Ipv4Addr, interval: true }));
        if self.all_interfaces {
            // Made here because the base chains jump to them; filled as endpoints.
            for ingress in [true, false] {
                ops.push(Op::AddChain(t.clone(), host_endpoint_chain(ALL_INTERFACES, ingress), None));
            }
        }
        let forward = vec![
            Rule::new(vec![Match::CtEstablished], vec![Statement::Accept]),
            Rule::new(vec![i.clone(), Match::CtInvalid], vec![Statement::Counter, Statement::Drop]),
            Rule::new(vec![o.clone(), Match::CtInvalid], vec![Statement::Counter, Statement::Drop]),
            Rule::new(vec![], vec![Statement::MarkClear(MARKS)]),
            Rule::new(vec![], vec![Statement::IfnameVmap { input: true, map: FROM_WL.into() }]),
            // A workload interface without policy yet (not in the map): nothing gets out.
            Rule::new(vec![i.clone(), mark(MARK_ACCEPT, false)], vec![Statement::Counter, Statement::Drop]),
            Rule::new(vec![], vec![Statement::MarkClear(MARKS)]),
            Rule::new(vec![], vec![Statement::IfnameVmap { input: false, map: TO_WL.into() }]),
            Rule::new(vec![o.clone(), mark(MARK_ACCEPT, false)], vec![Statement::Counter, Statement::Drop]),
        ];
        let mut input = vec![
            Rule::new(vec![i.clone(), Match::CtEstablished], vec![Statement::Accept]),
            Rule::new(vec![i.clone(), Match::CtInvalid], vec![Statement::Counter, Statement::Drop]),
            Rule::new(vec![i.clone(), Match::Icmpv6Types(ICMPV6_TO_HOST.to_vec())], vec![Statement::Accept]),
            Rule::new(vec![i.clone()], vec![Statement::MarkClear(MARKS)]),
            Rule::new(vec![i.clone()], vec![Statement::IfnameVmap { input: true, map: FROM_WL.into() }]),
            Rule::new(vec![i.clone(), mark(MARK_ACCEPT, false)], vec![Statement::Counter, Statement::Drop]),
        ];
        // Workload traffic ends here either way: host endpoint policy is not for it.
        input.push(match self.config.endpoint_to_host {
            EndpointToHost::Accept => Rule::new(vec![i], vec![Statement::Accept]),
            EndpointToHost::Drop => Rule::new(vec![i], vec![Statement::Counter, Statement::Drop]),
            EndpointToHost::Return => Rule::new(vec![i], vec![Statement::Return]),
        });
        input.extend(self.host_rules(true));
        // The host's own traffic to its workloads is not policed (kubelet probes need it).
        let mut output = vec![Rule::new(vec![o], vec![Statement::Accept])];
        output.extend(self.host_rules(false));
        for (name, hook, rules) in
            [("forward", Hook::Forward, forward), ("input", Hook::Input, input), ("output", Hook::Output, output)]
        {
            ops.push(Op::AddChain(t.clone(), name.into(), base(hook)));
            ops.push(Op::FlushChain(t.clone(), name.into()));
            ops.extend(rules.into_iter().map(|r| Op::AddRule(t.clone(), name.into(), r)));
        }
        ops
    }

    /// Bring the kernel to the engine's picture for what `dirty` names (everything, the first
    /// time or after a failure), in one transaction.
    pub async fn apply(&mut self, engine: &Engine, dirty: &Dirty) -> Result<(), DataplaneError> {
        let all_interfaces = engine.plan(ALL_INTERFACES).is_some_and(EndpointPlan::is_host_endpoint);
        let full = !self.built || all_interfaces != self.all_interfaces;
        let mut dirty = dirty.clone();
        let mut ops = Vec::new();
        if full {
            self.all_interfaces = all_interfaces;
            ops.push(Op::DeleteTable(table()));
            ops.extend(self.base());
            self.sets.clear();
            self.chains.clear();
            self.endpoints.clear();
            self.shared = SharedChains::default();
            dirty.sets.extend(engine.index().set_ids().cloned());
            dirty.policies.extend(engine.policies().map(|(k, _)| k.clone()));
            dirty.profiles.extend(engine.plans().flat_map(|(_, p)| p.profiles.clone()));
            dirty.endpoints.extend(engine.plans().map(|(i, _)| i.clone()));
        }
        let t = table();
        let mut later = Vec::new();
        if full {
            self.hosts_programmed.clear();
        }
        // The node addresses only when one changed (or the table is new): not per pod.
        let hosts: Option<BTreeSet<std::net::Ipv4Addr>> =
            (full || self.hosts_dirty).then(|| self.hosts.values().copied().collect());
        if let Some(hosts) = &hosts {
            let host = |a: &std::net::Ipv4Addr| Element::Net(IpNet::from(std::net::IpAddr::V4(*a)));
            let gone: Vec<Element> = self.hosts_programmed.difference(hosts).map(host).collect();
            let new: Vec<Element> = hosts.difference(&self.hosts_programmed).map(host).collect();
            if !gone.is_empty() {
                ops.push(Op::DeleteElements(t.clone(), CLUSTER_HOSTS.into(), gone));
            }
            if !new.is_empty() {
                ops.push(Op::AddElements(t.clone(), CLUSTER_HOSTS.into(), new));
            }
        }
        // Sets first (rules refer to them), deletions last.
        for id in &dirty.sets {
            let spec = engine.index().set_spec(id).cloned();
            for v6 in [false, true] {
                let name = set_name(id, v6);
                let want = spec.as_ref().map(|s| {
                    let members: Vec<&Member> = engine.index().members(id).into_iter().flatten().collect();
                    (s, set_elements(s, members, v6))
                });
                match (want, self.sets.get(&name)) {
                    (Some((_, want)), Some(have)) => {
                        let gone: Vec<Element> = have.difference(&want).cloned().collect();
                        let new: Vec<Element> = want.difference(have).cloned().collect();
                        ops.push(Op::DeleteElements(t.clone(), name.clone(), gone));
                        ops.push(Op::AddElements(t.clone(), name.clone(), new));
                        self.sets.insert(name, want);
                    }
                    (Some((s, want)), None) => {
                        ops.push(Op::AddSet(t.clone(), Set { name: name.clone(), ..set_type(s, v6) }));
                        ops.push(Op::AddElements(t.clone(), name.clone(), want.iter().cloned().collect()));
                        self.sets.insert(name, want);
                    }
                    (None, Some(_)) => {
                        later.push(Op::DeleteSet(t.clone(), name.clone()));
                        self.sets.remove(&name);
                    }
                    (None, None) => {}
                }
            }
        }
        let mut chain = |ops: &mut Vec<Op>, later: &mut Vec<Op>, name: String, rules: Option<&[PRule]>| match rules {
            Some(r) => {
                rules_chain(ops, &name, r);
                self.chains.insert(name);
            }
            None if self.chains.remove(&name) => {
                ops.push(Op::FlushChain(t.clone(), name.clone()));
                later.push(Op::DeleteChain(t.clone(), name));
            }
            None => {}
        };
        for key in &dirty.policies {
            let p = engine.policy(key).filter(|_| engine.is_active(key));
            for ingress in [true, false] {
                let rules = p.and_then(|p| if ingress { p.ingress.as_deref() } else { p.egress.as_deref() });
                chain(&mut ops, &mut later, policy_chain(key, ingress), rules);
            }
        }
        for name in &dirty.profiles {
            let prof = engine.profile_active(name).then(|| engine.profile(name));
            for ingress in [true, false] {
                let rules = prof.as_ref().map(|p| if ingress { p.ingress.as_slice() } else { p.egress.as_slice() });
                chain(&mut ops, &mut later, profile_chain(name, ingress), rules);
            }
        }
        let mut endpoint_later = Vec::new();
        // Shared chains that lost their last endpoint (unless another took them up since).
        let mut unused = BTreeSet::new();
        for iface in &dirty.endpoints {
            let plan = engine.plan(iface);
            let was = self.endpoints.get(iface).copied();
            let host = plan.map_or(was.unwrap_or(false), EndpointPlan::is_host_endpoint);
            if was.is_some_and(|h| h != host) {
                // Workload became host endpoint or back (an interface renamed): a new endpoint.
                return self.rebuild(engine).await;
            }
            for ingress in [true, false] {
                let (map, name) = endpoint_map_chain(iface, host, ingress);
                // The all-interfaces host endpoint is reached from the base chains, not a map.
                let elem =
                    (iface != ALL_INTERFACES || !host).then(|| vec![Element::IfJump(iface.clone(), name.clone())]);
                match plan {
                    Some(plan) => {
                        let mut rules = endpoint_head(plan, ingress);
                        let body = endpoint_body(plan, ingress);
                        let shared = if host {
                            rules.extend(body);
                            None
                        } else {
                            let (shared, new) = self.shared.name(&body, ingress);
                            if new {
                                // Flushed too: it may be one this batch found unused a moment ago.
                                ops.push(Op::AddChain(t.clone(), shared.clone(), None));
                                ops.push(Op::FlushChain(t.clone(), shared.clone()));
                                ops.extend(body.iter().map(|r| Op::AddRule(t.clone(), shared.clone(), r.clone())));
                            }
                            rules.push(Rule::new(vec![], vec![Statement::Goto(shared.clone())]));
                            Some((shared, body))
                        };
                        ops.push(Op::AddChain(t.clone(), name.clone(), None));
                        ops.push(Op::FlushChain(t.clone(), name.clone()));
                        ops.extend(rules.into_iter().map(|r| Op::AddRule(t.clone(), name.clone(), r)));
                        if let (None, Some(elem)) = (was, elem) {
                            ops.push(Op::AddElements(t.clone(), map.into(), elem));
                        }
                        unused.extend(self.shared.set(iface, ingress, shared));
                    }
                    None if was.is_some() => {
                        if let Some(elem) = elem {
                            ops.push(Op::DeleteElements(t.clone(), map.into(), elem));
                        }
                        ops.push(Op::FlushChain(t.clone(), name.clone()));
                        endpoint_later.push(Op::DeleteChain(t.clone(), name));
                        unused.extend(self.shared.set(iface, ingress, None));
                    }
                    None => {}
                }
            }
            match plan {
                Some(_) => self.endpoints.insert(iface.clone(), host),
                None => self.endpoints.remove(iface),
            };
        }
        for name in unused.into_iter().filter(|n| !self.shared.chains.contains_key(n)) {
            endpoint_later.push(Op::FlushChain(t.clone(), name.clone()));
            endpoint_later.push(Op::DeleteChain(t.clone(), name));
        }
        ops.extend(endpoint_later);
        ops.extend(later);
        let changed = !ops.is_empty();
        if let Err(e) = self.nft.apply_owned(ops).await {
            self.built = false;
            self.programmed.clear();
            return Err(e.into());
        }
        self.built = true;
        if let Some(hosts) = hosts {
            self.hosts_programmed = hosts;
            self.hosts_dirty = false;
        }
        if changed {
            self.snapshot = None;
        }
        self.programmed = self.endpoints.keys().cloned().collect();
        Ok(())
    }

    /// Whether our table was changed behind our back (then it is rebuilt at the next apply).
    /// Cheap when nobody else touched nftables: one generation query. After someone did, the
    /// table is listed and compared with what it was after our last change; a change of ours
    /// not yet listed when someone else's lands counts as drift (a rebuild too many, never
    /// one too few).
    pub async fn check_drift(&mut self) -> Result<bool, DataplaneError> {
        if !self.built {
            return Ok(false);
        }
        // Unable to tell (no generation): compare the listing every time.
        let others = self.nft.changed_by_others().await.unwrap_or(true);
        if !others && self.snapshot.is_some() {
            return Ok(false);
        }
        let now = self.nft.list_table(&table()).await?.map(|t| listing_digest(&t));
        let drifted = match (now, self.snapshot) {
            (None, _) => true,
            (Some(n), Some(s)) => others && n != s,
            (Some(_), None) => others,
        };
        if drifted {
            self.invalidate();
        } else {
            self.snapshot = now;
        }
        Ok(drifted)
    }

    async fn rebuild(&mut self, engine: &Engine) -> Result<(), DataplaneError> {
        self.built = false;
        Box::pin(self.apply(engine, &Dirty::default())).await
    }

    /// Rebuild from scratch at the next apply (the table was changed by hand, or is unknown).
    pub fn invalidate(&mut self) {
        self.built = false;
        self.snapshot = None;
    }

    pub fn is_built(&self) -> bool {
        self.built
    }

    pub async fn remove(&mut self) -> Result<(), DataplaneError> {
        self.nft.apply(&[Op::DeleteTable(table())]).await?;
        self.built = false;
        self.programmed.clear();
        Ok(())
    }

    pub fn nft(&self) -> &Nft {
        &self.nft
    }
}
