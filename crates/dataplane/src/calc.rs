//! From the cluster's state to this node's desired dataplane (reference §3.5, §5.4): a
//! blackhole per own block, a route per remote block (native, VXLAN or IPIP, CrossSubnet aware),
//! /32 routes for borrowed addresses, VXLAN peers, and the NAT-outgoing sets.
//!
//! Pure and incremental: [`RouteCalc`] is fed one Node, pool or block at a time and answers with
//! the [`Diff`] that change causes — a block claimed elsewhere touches one route, not the
//! cluster. Indexes from node to its blocks and borrowed addresses keep each update's work
//! proportional to what depends on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

pub use gingham_api::enums::EncapMode;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's address with its prefix (`10.99.0.11/24`): the prefix decides CrossSubnet.
    pub ipv4: Option<IpNet>,
    pub vxlan_addr: Option<Ipv4Addr>,
    pub vxlan_mac: Option<[u8; 6]>,
    pub ipip_addr: Option<Ipv4Addr>,
    /// Its Kubernetes podCIDRs, routed like its blocks (host-local IPAM, Calico's
    /// USE_POD_CIDR); empty otherwise.
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub cidr: IpNet,
    pub ipip: EncapMode,
    pub vxlan: EncapMode,
    pub nat_outgoing: bool,
    pub disabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    pub cidr: IpNet,
    /// The node the block belongs to (confirmed affinity), if any.
    pub node: Option<String>,
    /// Addresses in this block allocated to another node than the owner: (address, borrower).
    pub borrowed: Vec<(IpAddr, String)>,
}

/// Which device a route leaves through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    Underlay,
    Vxlan,
    Ipip,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DesiredRoute {
    Blackhole(IpNet),
    Remote { dst: IpNet, gateway: IpAddr, via: Via },
}

impl DesiredRoute {
    pub fn dst(&self) -> IpNet {
        match self {
            DesiredRoute::Blackhole(d) | DesiredRoute::Remote { dst: d, .. } => *d,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VxlanPeer {
    pub vtep: Ipv4Addr,
    pub mac: [u8; 6],
    pub node_ip: IpAddr,
}

/// Sources to masquerade (natOutgoing pools) and destinations never masqueraded (every pool).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatSets {
    pub masquerade_from: Vec<IpNet>,
    pub all_pools: Vec<IpNet>,
    /// Local workload addresses policy needs connection state for (exempt from `notrack`;
    /// set by the policy side, not by this calculation).
    pub policed: Vec<IpNet>,
}

/// What one update changes in the desired dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Per destination: the route it should have now, or None to remove it.
    pub routes: Vec<(IpNet, Option<DesiredRoute>)>,
    /// Per node: its VXLAN peer entry now, or None to remove it.
    pub peers: Vec<(String, Option<VxlanPeer>)>,
    /// The NAT sets, when they changed.
    pub nat: Option<NatSets>,
    /// Whether this node needs the VXLAN device / IPIP tunnel, when that changed.
    pub encap: Option<(bool, bool)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.peers.is_empty() && self.nat.is_none() && self.encap.is_none()
    }
    /// Fold a later diff into this one (the later value of each key wins).
    pub fn merge(&mut self, later: Diff) {
        let mut routes: BTreeMap<IpNet, Option<DesiredRoute>> = std::mem::take(&mut self.routes).into_iter().collect();
        routes.extend(later.routes);
        self.routes = routes.into_iter().collect();
        let mut peers: BTreeMap<String, Option<VxlanPeer>> = std::mem::take(&mut self.peers).into_iter().collect();
        peers.extend(later.peers);
        self.peers = peers.into_iter().collect();
        if later.nat.is_some() {
            self.nat = later.nat;
        }
        if later.encap.is_some() {
            self.encap = later.encap;
        }
    }
}

fn same_subnet(a: Option<IpNet>, b: Option<IpNet>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.contains(&b.addr()) || b.contains(&a.addr()),
        _ => false,
    }
}

/// The route towards `peer` for addresses of `pool`, or None if the peer lacks what it needs
/// (no address yet, no VTEP yet).
fn route_to(dst: IpNet, me: Option<&NodeInfo>, peer: &NodeInfo, pool: Option<&PoolInfo>) -> Option<DesiredRoute> {
    let cross = !same_subnet(me.and_then(|m| m.ipv4), peer.ipv4);
    let (vxlan, ipip) = pool.map_or((false, false), |p| (p.vxlan.applies(cross), p.ipip.applies(cross)));
    if vxlan {
        return Some(DesiredRoute::Remote { dst, gateway: IpAddr::V4(peer.vxlan_addr?), via: Via::Vxlan });
    }
    let gateway = peer.ipv4?.addr();
    Some(DesiredRoute::Remote { dst, gateway, via: if ipip { Via::Ipip } else { Via::Underlay } })
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// This node's desired routes, VXLAN peers and NAT sets, kept up to date one update at a time.
#[derive(Clone, Debug, Default)]
pub struct RouteCalc {
    me: String,
    nodes: HashMap<String, NodeInfo>,
    pools: BTreeMap<String, PoolInfo>,
    blocks: HashMap<IpNet, BlockInfo>,
    /// Owner → its blocks; borrower → the /32 destinations it borrowed; /32 → (block, borrower).
    owned: HashMap<String, BTreeSet<IpNet>>,
    borrowed_by: HashMap<String, BTreeSet<IpNet>>,
    borrowed: HashMap<IpNet, (IpNet, String)>,
    /// podCIDR → its node.
    pod_cidrs: HashMap<IpNet, String>,
    routes: HashMap<IpNet, DesiredRoute>,
    peers: BTreeMap<String, VxlanPeer>,
    nat: NatSets,
    encap: (bool, bool),
}

impl RouteCalc {
    pub fn new(me: &str) -> RouteCalc {
        RouteCalc { me: me.into(), ..Default::default() }
    }

    pub fn routes(&self) -> impl Iterator<Item = &DesiredRoute> {
        self.routes.values()
    }
    pub fn peers(&self) -> impl Iterator<Item = &VxlanPeer> {
        self.peers.values()
    }
    pub fn nat(&self) -> &NatSets {
        &self.nat
    }
    /// (VXLAN device needed, IPIP tunnel needed).
    pub fn encap(&self) -> (bool, bool) {
        self.encap
    }
    /// The pool holding `net`.
    pub fn pool_of(&self, net: &IpNet) -> Option<&PoolInfo> {
        self.pools.values().find(|p| p.cidr.contains(net))
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Everything as one diff (for a first programming pass or a full resync).
    pub fn full(&self) -> Diff {
        let mut routes: Vec<(IpNet, Option<DesiredRoute>)> =
            self.routes.iter().map(|(d, r)| (*d, Some(r.clone()))).collect();
        routes.sort();
        Diff {
            routes,
            peers: self.peers.iter().map(|(n, p)| (n.clone(), Some(p.clone()))).collect(),
            nat: Some(self.nat.clone()),
            encap: Some(self.encap),
        }
    }

    pub fn set_node(&mut self, name: &str, info: Option<NodeInfo>) -> Diff {
        if self.nodes.get(name) == info.as_ref() {
            return Diff::default();
        }
        let old_cidrs = self.nodes.get(name).map(|n| n.pod_cidrs.clone()).unwrap_or_default();
        let new_cidrs = info.as_ref().map(|n| n.pod_cidrs.clone()).unwrap_or_default();
        for c in &old_cidrs {
            if self.pod_cidrs.get(c).is_some_and(|n| n == name) {
                self.pod_cidrs.remove(c);
            }
        }
        for c in &new_cidrs {
            self.pod_cidrs.insert(*c, name.to_string());
        }
        match info {
            Some(i) => self.nodes.insert(name.to_string(), i),
            None => self.nodes.remove(name),
        };
        let mut d = Diff::default();
        // This node's own address decides CrossSubnet for every route.
        let mut dsts: Vec<IpNet> = if name == self.me {
            self.blocks.keys().chain(self.borrowed.keys()).chain(self.pod_cidrs.keys()).copied().collect()
        } else {
            self.owned.get(name).into_iter().chain(self.borrowed_by.get(name)).flatten().copied().collect()
        };
        dsts.extend(old_cidrs.iter().chain(&new_cidrs));
        self.refresh(&dsts, &mut d);
        self.refresh_peer(name, &mut d);
        d
    }

    pub fn set_pool(&mut self, name: &str, info: Option<PoolInfo>) -> Diff {
        let old = self.pools.get(name).cloned();
        if old == info {
            return Diff::default();
        }
        let cidrs: Vec<IpNet> = old.iter().chain(info.iter()).map(|p| p.cidr).collect();
        match info {
            Some(p) => self.pools.insert(name.to_string(), p),
            None => self.pools.remove(name),
        };
        let mut d = Diff::default();
        // Pools change rarely: their blocks are found by a scan.
        let dsts: Vec<IpNet> = self
            .blocks
            .keys()
            .chain(self.borrowed.keys())
            .chain(self.pod_cidrs.keys())
            .filter(|b| cidrs.iter().any(|c| c.contains(*b)))
            .copied()
            .collect();
        self.refresh(&dsts, &mut d);
        let nat = NatSets {
            masquerade_from: self.pools.values().filter(|p| p.nat_outgoing).map(|p| p.cidr).collect(),
            all_pools: self.pools.values().map(|p| p.cidr).collect(),
            policed: Vec::new(),
        };
        if nat != self.nat {
            self.nat = nat.clone();
            d.nat = Some(nat);
        }
        let encap = (
            self.pools.values().any(|p| p.vxlan.enabled() && p.cidr.addr().is_ipv4()),
            self.pools.values().any(|p| p.ipip.enabled()),
        );
        if encap != self.encap {
            self.encap = encap;
            d.encap = Some(encap);
            let names: Vec<String> = self.nodes.keys().chain(self.peers.keys()).cloned().collect();
            for n in names {
                self.refresh_peer(&n, &mut d);
            }
        }
        d
    }

    pub fn set_block(&mut self, cidr: IpNet, info: Option<BlockInfo>) -> Diff {
        let old = self.blocks.get(&cidr).cloned();
        if old == info {
            return Diff::default();
        }
        let mut dsts = vec![cidr];
        if let Some(o) = &old {
            if let Some(n) = &o.node {
                if let Some(set) = self.owned.get_mut(n) {
                    set.remove(&cidr);
                }
            }
            for (ip, b) in &o.borrowed {
                let dst = host_net(*ip);
                if let Some(set) = self.borrowed_by.get_mut(b) {
                    set.remove(&dst);
                }
                self.borrowed.remove(&dst);
                dsts.push(dst);
            }
            self.blocks.remove(&cidr);
        }
        if let Some(i) = info {
            if let Some(n) = &i.node {
                self.owned.entry(n.clone()).or_default().insert(cidr);
            }
            for (ip, b) in &i.borrowed {
                let dst = host_net(*ip);
                self.borrowed_by.entry(b.clone()).or_default().insert(dst);
                self.borrowed.insert(dst, (cidr, b.clone()));
                dsts.push(dst);
            }
            self.blocks.insert(cidr, i);
        }
        let mut d = Diff::default();
        self.refresh(&dsts, &mut d);
        d
    }

    /// What `dst` should route to, from the current state.
    fn desired(&self, dst: &IpNet) -> Option<DesiredRoute> {
        let me = self.nodes.get(&self.me);
        if let Some(b) = self.blocks.get(dst) {
            return match b.node.as_deref() {
                Some(owner) if owner == self.me => {
                    (dst.prefix_len() < dst.max_prefix_len()).then_some(DesiredRoute::Blackhole(*dst))
                }
                Some(owner) => route_to(*dst, me, self.nodes.get(owner)?, self.pool_of(dst)),
                None => None,
            };
        }
        // Addresses borrowed from a block by a third node go straight to the borrower; those
        // borrowed by this node have their own /32 device routes from the CNI.
        let Some((block, borrower)) = self.borrowed.get(dst) else {
            let owner = self.pod_cidrs.get(dst)?;
            return match owner == &self.me {
                true => Some(DesiredRoute::Blackhole(*dst)),
                false => route_to(*dst, me, self.nodes.get(owner)?, self.pool_of(dst)),
            };
        };
        if *borrower == self.me {
            return None;
        }
        route_to(*dst, me, self.nodes.get(borrower)?, self.pool_of(block))
    }

    fn refresh(&mut self, dsts: &[IpNet], d: &mut Diff) {
        for dst in dsts {
            let want = self.desired(dst);
            if self.routes.get(dst) == want.as_ref() {
                continue;
            }
            match &want {
                Some(r) => self.routes.insert(*dst, r.clone()),
                None => self.routes.remove(dst),
            };
            d.routes.push((*dst, want));
        }
    }

    fn refresh_peer(&mut self, name: &str, d: &mut Diff) {
        let want = (self.encap.0 && name != self.me)
            .then(|| {
                let n = self.nodes.get(name)?;
                Some(VxlanPeer { vtep: n.vxlan_addr?, mac: n.vxlan_mac?, node_ip: n.ipv4?.addr() })
            })
            .flatten();
        if self.peers.get(name) == want.as_ref() {
            return;
        }
        match &want {
            Some(p) => self.peers.insert(name.to_string(), p.clone()),
            None => self.peers.remove(name),
        };
        d.peers.push((name.to_string(), want));
    }
}

/// Calico's VXLAN MAC for a node: 0x66 then the first five bytes of SHA-1(node name).
pub fn vxlan_mac(node: &str) -> [u8; 6] {
    use sha1::{Digest, Sha1};
    let h = Sha1::digest(node.as_bytes());
    [0x66, h[0], h[1], h[2], h[3], h[4]]
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    v.try_into().ok()
}

/// Overheads subtracted from the underlay MTU (reference §5.5).
pub fn pod_mtu(underlay: u32, vxlan: bool, ipip: bool) -> u32 {
    if vxlan {
        underlay.saturating_sub(50)
    } else if ipip {
        underlay.saturating_sub(20)
    } else {
        underlay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, vtep: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ipv4: Some(ip.parse().unwrap()),
            vxlan_addr: vtep.map(|v| v.parse().unwrap()),
            vxlan_mac: Some(vxlan_mac(name)),
            ipip_addr: None,
            pod_cidrs: Vec::new(),
        }
    }

    fn pool(vxlan: EncapMode, ipip: EncapMode) -> PoolInfo {
        PoolInfo {
            name: "p".into(),
            cidr: "172.20.0.0/16".parse().unwrap(),
            ipip,
            vxlan,
            nat_outgoing: true,
            disabled: false,
        }
    }

    fn block(c: &str, n: &str) -> BlockInfo {
        BlockInfo { cidr: c.parse().unwrap(), node: Some(n.into()), borrowed: vec![] }
    }

    fn nodes() -> Vec<NodeInfo> {
        vec![
            node("n1", "10.99.0.11/24", Some("172.20.1.0")),
            node("n2", "10.99.0.12/24", Some("172.20.2.0")),
            node("n3", "10.99.1.13/24", Some("172.20.3.0")),
        ]
    }

    fn remote(dst: &str, gw: &str, via: Via) -> DesiredRoute {
        DesiredRoute::Remote { dst: dst.parse().unwrap(), gateway: gw.parse().unwrap(), via }
    }

    /// A calculation fed everything from scratch.
    fn compute(me: &str, nodes: &[NodeInfo], pools: &[PoolInfo], blocks: &[BlockInfo]) -> RouteCalc {
        let mut c = RouteCalc::new(me);
        for p in pools {
            c.set_pool(&p.name, Some(p.clone()));
        }
        for n in nodes {
            c.set_node(&n.name, Some(n.clone()));
        }
        for b in blocks {
            c.set_block(b.cidr, Some(b.clone()));
        }
        c
    }

    fn sorted_routes(c: &RouteCalc) -> Vec<DesiredRoute> {
        let mut r: Vec<DesiredRoute> = c.routes().cloned().collect();
        r.sort();
        r
    }

    #[test]
    fn pod_cidrs_route_like_blocks_and_follow_their_node() {
        let mut ns = nodes();
        ns[0].pod_cidrs = vec!["172.20.100.0/24".parse().unwrap()];
        ns[1].pod_cidrs = vec!["172.20.101.0/24".parse().unwrap()];
        let mut c = compute("n1", &ns, &[pool(EncapMode::Never, EncapMode::Never)], &[]);
        assert_eq!(
            sorted_routes(&c),
            vec![
                DesiredRoute::Blackhole("172.20.100.0/24".parse().unwrap()),
                remote("172.20.101.0/24", "10.99.0.12", Via::Underlay)
            ]
        );
        // The pool turns VXLAN on: n2's podCIDR goes through its VTEP.
        let d = c.set_pool("p", Some(pool(EncapMode::Always, EncapMode::Never)));
        assert_eq!(
            d.routes,
            vec![("172.20.101.0/24".parse().unwrap(), Some(remote("172.20.101.0/24", "172.20.2.0", Via::Vxlan)))]
        );
        // n2 loses its podCIDR (a new one is assigned): the old route goes, the new one comes.
        let mut n2 = ns[1].clone();
        n2.pod_cidrs = vec!["172.20.102.0/24".parse().unwrap()];
        let d = c.set_node("n2", Some(n2));
        assert_eq!(d.routes.len(), 2, "{d:?}");
        assert!(d.routes.contains(&("172.20.101.0/24".parse().unwrap(), None)));
        // A deleted node takes its podCIDR route with it.
        let d = c.set_node("n2", None);
        assert_eq!(d.routes, vec![("172.20.102.0/24".parse().unwrap(), None)]);
        // Without podCIDRs in the nodes (calico-ipam), none are routed.
        let plain = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Never)], &[]);
        assert_eq!(sorted_routes(&plain), vec![]);
    }

    #[test]
    fn native_vxlan_ipip_and_cross_subnet() {
        let blocks = vec![block("172.20.1.0/26", "n1"), block("172.20.2.0/26", "n2"), block("172.20.3.0/26", "n3")];
        let c = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Never)], &blocks);
        assert_eq!(
            sorted_routes(&c),
            vec![
                DesiredRoute::Blackhole("172.20.1.0/26".parse().unwrap()),
                remote("172.20.2.0/26", "10.99.0.12", Via::Underlay),
                remote("172.20.3.0/26", "10.99.1.13", Via::Underlay),
            ]
        );
        assert!(!c.encap().0 && c.peers().count() == 0);
        let c = compute("n1", &nodes(), &[pool(EncapMode::Always, EncapMode::Never)], &blocks);
        assert!(sorted_routes(&c).contains(&remote("172.20.2.0/26", "172.20.2.0", Via::Vxlan)));
        let peers: Vec<&VxlanPeer> = c.peers().collect();
        assert_eq!(peers.len(), 2);
        assert_eq!(
            *peers[0],
            VxlanPeer {
                vtep: "172.20.2.0".parse().unwrap(),
                mac: vxlan_mac("n2"),
                node_ip: "10.99.0.12".parse().unwrap()
            }
        );
        // CrossSubnet: same subnet native, other subnet encapsulated.
        let c = compute("n1", &nodes(), &[pool(EncapMode::CrossSubnet, EncapMode::Never)], &blocks);
        assert!(sorted_routes(&c).contains(&remote("172.20.2.0/26", "10.99.0.12", Via::Underlay)));
        assert!(sorted_routes(&c).contains(&remote("172.20.3.0/26", "172.20.3.0", Via::Vxlan)));
        // IPIP (computed here; this kernel has no ipip module to program it).
        let c = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Always)], &blocks);
        assert!(c.encap().1 && sorted_routes(&c).contains(&remote("172.20.2.0/26", "10.99.0.12", Via::Ipip)));
        let c = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::CrossSubnet)], &blocks);
        assert!(sorted_routes(&c).contains(&remote("172.20.2.0/26", "10.99.0.12", Via::Underlay)));
        assert!(sorted_routes(&c).contains(&remote("172.20.3.0/26", "10.99.1.13", Via::Ipip)));
    }

    #[test]
    fn borrowed_addresses_nat_and_missing_data() {
        let mut b2 = block("172.20.2.0/26", "n2");
        b2.borrowed = vec![("172.20.2.9".parse().unwrap(), "n3".into()), ("172.20.2.10".parse().unwrap(), "n1".into())];
        let c = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Never)], &[b2]);
        assert!(sorted_routes(&c).contains(&remote("172.20.2.9/32", "10.99.1.13", Via::Underlay)));
        assert!(
            !c.routes().any(|r| r.dst().to_string() == "172.20.2.10/32"),
            "own borrowed addresses have CNI device routes"
        );
        assert_eq!(c.nat().masquerade_from, vec!["172.20.0.0/16".parse::<IpNet>().unwrap()]);
        // A peer without a VTEP yet gets no VXLAN route (it appears once the VTEP does).
        let mut ns = nodes();
        ns[1].vxlan_addr = None;
        let mut c = compute("n1", &ns, &[pool(EncapMode::Always, EncapMode::Never)], &[block("172.20.2.0/26", "n2")]);
        assert_eq!(c.routes().count(), 0);
        let d = c.set_node("n2", Some(nodes()[1].clone()));
        assert_eq!(
            d.routes,
            vec![("172.20.2.0/26".parse().unwrap(), Some(remote("172.20.2.0/26", "172.20.2.0", Via::Vxlan)))]
        );
        assert_eq!(d.peers.len(), 1);
        assert_eq!(pod_mtu(1500, true, false), 1450);
        assert_eq!(pod_mtu(1500, false, true), 1480);
        assert_eq!(parse_mac(&format_mac(&vxlan_mac("node1"))), Some(vxlan_mac("node1")));
        assert_eq!(format_mac(&vxlan_mac("node1")), "66:f9:37:c3:7e:94", "Calico's example");
    }

    /// One update touches what depends on it, and nothing else.
    #[test]
    fn updates_touch_only_what_depends_on_them() {
        let mut c =
            compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Never)], &[block("172.20.2.0/26", "n2")]);
        // A block claimed by another node: one route.
        let d = c.set_block("172.20.3.0/26".parse().unwrap(), Some(block("172.20.3.0/26", "n3")));
        assert_eq!(
            d.routes,
            vec![("172.20.3.0/26".parse().unwrap(), Some(remote("172.20.3.0/26", "10.99.1.13", Via::Underlay)))]
        );
        assert!(d.peers.is_empty() && d.nat.is_none());
        // The same block again: nothing.
        assert!(c.set_block("172.20.3.0/26".parse().unwrap(), Some(block("172.20.3.0/26", "n3"))).is_empty());
        // A node without blocks changes: nothing.
        assert!(c.set_node("n9", Some(node("n9", "10.99.0.19/24", None))).is_empty());
        // n3 moves: only its block's route.
        let d = c.set_node("n3", Some(node("n3", "10.99.0.13/24", None)));
        assert_eq!(
            d.routes,
            vec![("172.20.3.0/26".parse().unwrap(), Some(remote("172.20.3.0/26", "10.99.0.13", Via::Underlay)))]
        );
        // n3 goes away: its route goes.
        let d = c.set_node("n3", None);
        assert_eq!(d.routes, vec![("172.20.3.0/26".parse().unwrap(), None)]);
    }

    /// Whatever order updates come in, the incremental state equals a calculation from scratch.
    #[test]
    fn incremental_equals_from_scratch() {
        use proptest::prelude::*;
        let names = ["n1", "n2", "n3", "n4"];
        let node_s = (0..4usize, proptest::option::of((0..3u8, proptest::bool::ANY)));
        let block_s = (0..6u8, proptest::option::of(0..4usize), proptest::collection::vec((0..4u8, 0..4usize), 0..3));
        let pool_s = (0..3u8, 0..3u8, proptest::bool::ANY, proptest::bool::ANY);
        #[derive(Debug, Clone)]
        enum U {
            Node(usize, Option<(u8, bool)>),
            Block(u8, Option<usize>, Vec<(u8, usize)>),
            Pool(u8, u8, bool, bool),
        }
        let u = prop_oneof![
            node_s.prop_map(|(n, v)| U::Node(n, v)),
            block_s.prop_map(|(b, o, br)| U::Block(b, o, br)),
            pool_s.prop_map(|(v, i, nat, present)| U::Pool(v, i, nat, present)),
        ];
        let mode = |m: u8| [EncapMode::Never, EncapMode::Always, EncapMode::CrossSubnet][m as usize % 3];
        proptest!(ProptestConfig::with_cases(300), |(ups in proptest::collection::vec(u, 1..40))| {
            let mut inc = RouteCalc::new("n1");
            let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
            let mut blocks: BTreeMap<IpNet, BlockInfo> = BTreeMap::new();
            let mut pools: BTreeMap<String, PoolInfo> = BTreeMap::new();
            let mut applied = Diff::default();
            for up in ups {
                let d = match up {
                    U::Node(i, v) => {
                        let n = v.map(|(subnet, vtep)| NodeInfo {
                            name: names[i].into(),
                            ipv4: Some(format!("10.99.{subnet}.{}/24", 10 + i).parse().unwrap()),
                            vxlan_addr: vtep.then(|| format!("172.20.{}.0", 100 + i).parse().unwrap()),
                            vxlan_mac: Some(vxlan_mac(names[i])),
                            ipip_addr: None,
                            pod_cidrs: Vec::new(),
                        });
                        match &n { Some(n) => nodes.insert(names[i].into(), n.clone()), None => nodes.remove(names[i]) };
                        inc.set_node(names[i], n)
                    }
                    U::Block(b, owner, br) => {
                        let cidr: IpNet = format!("172.20.{b}.0/26").parse().unwrap();
                        let info = owner.map(|o| BlockInfo {
                            cidr,
                            node: Some(names[o].into()),
                            borrowed: br.iter().map(|(ip, who)| (format!("172.20.{b}.{}", 10 + ip).parse().unwrap(), names[*who].to_string())).collect::<BTreeMap<IpAddr, String>>().into_iter().collect(),
                        });
                        match &info { Some(i) => blocks.insert(cidr, i.clone()), None => blocks.remove(&cidr) };
                        inc.set_block(cidr, info)
                    }
                    U::Pool(v, i, nat, present) => {
                        let p = present.then(|| PoolInfo { name: "p".into(), cidr: "172.20.0.0/16".parse().unwrap(), ipip: mode(i), vxlan: mode(v), nat_outgoing: nat, disabled: false });
                        match &p { Some(p) => pools.insert("p".into(), p.clone()), None => pools.remove("p") };
                        inc.set_pool("p", p)
                    }
                };
                applied.merge(d);
            }
            let nodes: Vec<NodeInfo> = nodes.into_values().collect();
            let pools: Vec<PoolInfo> = pools.into_values().collect();
            let blocks: Vec<BlockInfo> = blocks.into_values().collect();
            let scratch = compute("n1", &nodes, &pools, &blocks);
            prop_assert_eq!(sorted_routes(&inc), sorted_routes(&scratch));
            prop_assert_eq!(inc.peers().cloned().collect::<Vec<_>>(), scratch.peers().cloned().collect::<Vec<_>>());
            prop_assert_eq!(inc.nat(), scratch.nat());
            // The diffs, applied in order, lead to the same routes.
            let from_diffs: BTreeSet<DesiredRoute> = applied.routes.into_iter().filter_map(|(_, r)| r).collect();
            prop_assert_eq!(from_diffs.into_iter().collect::<Vec<_>>(), sorted_routes(&inc));
        });
    }
}
