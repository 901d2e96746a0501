//! From the cluster's state to this node's desired dataplane (reference §3.5, §5.4): a
//! blackhole per own block, a route per remote block (native, VXLAN or IPIP, CrossSubnet aware),
//! /32 routes for borrowed addresses, VXLAN neighbours, and the NAT-outgoing sets. Pure logic.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

pub use gingham_api::enums::EncapMode;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's address with its prefix (`10.99.0.11/24`): the prefix decides CrossSubnet.
    pub ipv4: Option<IpNet>,
    pub vxlan_addr: Option<Ipv4Addr>,
    pub vxlan_mac: Option<[u8; 6]>,
    pub ipip_addr: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolInfo {
    pub cidr: IpNet,
    pub ipip: EncapMode,
    pub vxlan: EncapMode,
    pub nat_outgoing: bool,
    pub disabled: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BlockInfo {
    pub cidr: IpNet,
    /// The node the block belongs to (confirmed affinity), if any.
    pub node: Option<String>,
    /// Addresses in this block allocated to another node than the owner: (address, borrower).
    pub borrowed: Vec<(IpAddr, String)>,
}

/// Which device a route leaves through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    Underlay,
    Vxlan,
    Ipip,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VxlanPeer {
    pub vtep: Ipv4Addr,
    pub mac: [u8; 6],
    pub node_ip: IpAddr,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub routes: Vec<DesiredRoute>,
    pub vxlan_peers: Vec<VxlanPeer>,
    /// Sources to masquerade (pools with natOutgoing).
    pub masquerade_from: Vec<IpNet>,
    /// Destinations never masqueraded (every pool).
    pub all_pools: Vec<IpNet>,
    /// Whether this node needs the VXLAN device / IPIP tunnel at all.
    pub vxlan: bool,
    pub ipip: bool,
}

fn same_subnet(a: Option<IpNet>, b: Option<IpNet>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.contains(&b.addr()) || b.contains(&a.addr()),
        _ => false,
    }
}

/// The route towards `peer` for addresses of `pool`, or None if the peer lacks what it needs
/// (no address yet, no VTEP yet).
fn route_to(dst: IpNet, me: &NodeInfo, peer: &NodeInfo, pool: Option<&PoolInfo>) -> Option<DesiredRoute> {
    let cross = !same_subnet(me.ipv4, peer.ipv4);
    let (vxlan, ipip) = pool.map_or((false, false), |p| (p.vxlan.applies(cross), p.ipip.applies(cross)));
    if vxlan {
        return Some(DesiredRoute::Remote { dst, gateway: IpAddr::V4(peer.vxlan_addr?), via: Via::Vxlan });
    }
    let gateway = peer.ipv4?.addr();
    if ipip {
        return Some(DesiredRoute::Remote { dst, gateway, via: Via::Ipip });
    }
    Some(DesiredRoute::Remote { dst, gateway, via: Via::Underlay })
}

pub fn compute(me: &str, nodes: &[NodeInfo], pools: &[PoolInfo], blocks: &[BlockInfo]) -> Desired {
    let by_name: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let me_info = by_name.get(me).copied().cloned().unwrap_or(NodeInfo { name: me.into(), ..Default::default() });
    let pool_of = |c: &IpNet| pools.iter().find(|p| p.cidr.contains(c));
    let mut d = Desired::default();
    for b in blocks {
        let pool = pool_of(&b.cidr);
        match b.node.as_deref() {
            Some(owner) if owner == me => {
                if b.cidr.prefix_len() < b.cidr.max_prefix_len() {
                    d.routes.push(DesiredRoute::Blackhole(b.cidr));
                }
            }
            Some(owner) => {
                if let Some(peer) = by_name.get(owner) {
                    d.routes.extend(route_to(b.cidr, &me_info, peer, pool));
                }
            }
            None => {}
        }
        // Addresses borrowed from this block by a third node go straight to the borrower; those
        // borrowed by this node have their own /32 device routes from the CNI.
        for (ip, borrower) in &b.borrowed {
            if borrower == me {
                continue;
            }
            if let Some(peer) = by_name.get(borrower.as_str()) {
                let dst = IpNet::new(*ip, if ip.is_ipv4() { 32 } else { 128 }).unwrap_or(b.cidr);
                d.routes.extend(route_to(dst, &me_info, peer, pool));
            }
        }
    }
    d.vxlan = pools.iter().any(|p| p.vxlan != EncapMode::Never && p.cidr.addr().is_ipv4());
    d.ipip = pools.iter().any(|p| p.ipip != EncapMode::Never);
    if d.vxlan {
        for n in nodes.iter().filter(|n| n.name != me) {
            if let (Some(vtep), Some(mac), Some(ip)) = (n.vxlan_addr, n.vxlan_mac, n.ipv4) {
                d.vxlan_peers.push(VxlanPeer { vtep, mac, node_ip: ip.addr() });
            }
        }
    }
    d.masquerade_from = pools.iter().filter(|p| p.nat_outgoing && !p.disabled).map(|p| p.cidr).collect();
    d.all_pools = pools.iter().map(|p| p.cidr).collect();
    d.routes.sort();
    d.routes.dedup();
    d.vxlan_peers.sort();
    d
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
        }
    }

    fn pool(vxlan: EncapMode, ipip: EncapMode) -> PoolInfo {
        PoolInfo { cidr: "172.20.0.0/16".parse().unwrap(), ipip, vxlan, nat_outgoing: true, disabled: false }
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

    #[test]
    fn native_vxlan_ipip_and_cross_subnet() {
        let blocks = vec![block("172.20.1.0/26", "n1"), block("172.20.2.0/26", "n2"), block("172.20.3.0/26", "n3")];
        let d = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Never)], &blocks);
        assert_eq!(
            d.routes,
            vec![
                DesiredRoute::Blackhole("172.20.1.0/26".parse().unwrap()),
                remote("172.20.2.0/26", "10.99.0.12", Via::Underlay),
                remote("172.20.3.0/26", "10.99.1.13", Via::Underlay),
            ]
        );
        assert!(!d.vxlan && d.vxlan_peers.is_empty());
        let d = compute("n1", &nodes(), &[pool(EncapMode::Always, EncapMode::Never)], &blocks);
        assert!(d.routes.contains(&remote("172.20.2.0/26", "172.20.2.0", Via::Vxlan)));
        assert_eq!(d.vxlan_peers.len(), 2);
        assert_eq!(
            d.vxlan_peers[0],
            VxlanPeer {
                vtep: "172.20.2.0".parse().unwrap(),
                mac: vxlan_mac("n2"),
                node_ip: "10.99.0.12".parse().unwrap()
            }
        );
        // CrossSubnet: same subnet native, other subnet encapsulated.
        let d = compute("n1", &nodes(), &[pool(EncapMode::CrossSubnet, EncapMode::Never)], &blocks);
        assert!(d.routes.contains(&remote("172.20.2.0/26", "10.99.0.12", Via::Underlay)));
        assert!(d.routes.contains(&remote("172.20.3.0/26", "172.20.3.0", Via::Vxlan)));
        // IPIP (computed here; this kernel has no ipip module to program it).
        let d = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Always)], &blocks);
        assert!(d.ipip && d.routes.contains(&remote("172.20.2.0/26", "10.99.0.12", Via::Ipip)));
        let d = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::CrossSubnet)], &blocks);
        assert!(d.routes.contains(&remote("172.20.2.0/26", "10.99.0.12", Via::Underlay)));
        assert!(d.routes.contains(&remote("172.20.3.0/26", "10.99.1.13", Via::Ipip)));
    }

    #[test]
    fn borrowed_addresses_nat_and_missing_data() {
        let mut b2 = block("172.20.2.0/26", "n2");
        b2.borrowed = vec![("172.20.2.9".parse().unwrap(), "n3".into()), ("172.20.2.10".parse().unwrap(), "n1".into())];
        let d = compute("n1", &nodes(), &[pool(EncapMode::Never, EncapMode::Never)], &[b2]);
        assert!(d.routes.contains(&remote("172.20.2.9/32", "10.99.1.13", Via::Underlay)));
        assert!(
            !d.routes.iter().any(|r| r.dst().to_string() == "172.20.2.10/32"),
            "own borrowed addresses have CNI device routes"
        );
        assert_eq!(d.masquerade_from, vec!["172.20.0.0/16".parse::<IpNet>().unwrap()]);
        // A peer without a VTEP yet gets no VXLAN route (it appears once the VTEP does).
        let mut ns = nodes();
        ns[1].vxlan_addr = None;
        let d = compute("n1", &ns, &[pool(EncapMode::Always, EncapMode::Never)], &[block("172.20.2.0/26", "n2")]);
        assert!(d.routes.is_empty());
        assert_eq!(pod_mtu(1500, true, false), 1450);
        assert_eq!(pod_mtu(1500, false, true), 1480);
        assert_eq!(parse_mac(&format_mac(&vxlan_mac("node1"))), Some(vxlan_mac("node1")));
        assert_eq!(format_mac(&vxlan_mac("node1")), "66:f9:37:c3:7e:94", "Calico's example");
    }
}
