//! Which pools an assignment may use (reference §3.2) and the order in which a node looks for a
//! free block in a pool.

use std::collections::BTreeMap;
use std::net::IpAddr;

use gingham_api::Selector;
use gingham_api::network::IPPoolSpec;
use ipnet::IpNet;

use crate::IpamError;

/// What the addresses are for (matched against a pool's allowedUses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Workload,
    Tunnel,
}

impl Use {
    fn as_str(self) -> &'static str {
        match self {
            Use::Workload => "Workload",
            Use::Tunnel => "Tunnel",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub cidr: IpNet,
    pub block_size: u8,
    pub spec: IPPoolSpec,
}

impl Pool {
    pub fn from_spec(name: &str, spec: IPPoolSpec) -> Option<Pool> {
        let cidr: IpNet = spec.cidr.parse().ok()?;
        let block_size = spec.block_size.unwrap_or(if cidr.addr().is_ipv4() { 26 } else { 122 });
        Some(Pool { name: name.to_string(), cidr, block_size, spec })
    }

    pub fn disabled(&self) -> bool {
        self.spec.disabled == Some(true)
    }

    pub fn v4(&self) -> bool {
        self.cidr.addr().is_ipv4()
    }

    /// Whether the pool's nodeSelector selects a node with these labels. A stored selector that
    /// does not parse (another writer may have put anything there) selects nothing.
    pub fn selects_node(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec.node_selector.as_deref().is_none_or(|s| parse_pool_selector(s).is_some_and(|s| s.matches(labels)))
    }

    /// Whether which nodes the pool serves depends on their labels (a nodeSelector other than
    /// `all()`).
    pub fn selects_by_node_labels(&self) -> bool {
        self.spec.node_selector.as_deref().is_some_and(|s| s.trim() != "all()")
    }

    fn allows(&self, use_: Use) -> bool {
        self.spec.allowed_uses.as_ref().is_none_or(|u| u.is_empty() || u.iter().any(|x| x == use_.as_str()))
    }

    /// The block of this pool that holds `ip`.
    pub fn block_of(&self, ip: IpAddr) -> Option<IpNet> {
        self.cidr.contains(&ip).then(|| IpNet::new(ip, self.block_size).ok().map(|n| n.trunc())).flatten()
    }

    pub fn block_count(&self) -> u128 {
        1u128 << self.block_size.saturating_sub(self.cidr.prefix_len()).min(100)
    }

    /// The i-th block of the pool.
    pub fn block_at(&self, i: u128) -> Option<IpNet> {
        let shift = u32::from(self.cidr.max_prefix_len().saturating_sub(self.block_size));
        let addr = match self.cidr.network() {
            IpAddr::V4(a) => IpAddr::V4(u32::try_from(u128::from(u32::from(a)) + (i << shift)).ok()?.into()),
            IpAddr::V6(a) => IpAddr::V6(u128::from(a).checked_add(i.checked_shl(shift)?)?.into()),
        };
        IpNet::new(addr, self.block_size).ok()
    }

    /// Every block of the pool, starting at a place chosen by the node's name (so nodes spread
    /// over the pool instead of all contending for its first block), wrapping around.
    pub fn blocks_for(&self, node: &str) -> impl Iterator<Item = IpNet> + '_ {
        let n = self.block_count();
        let start = u128::from(fnv32(node.as_bytes())) % n;
        (0..n).filter_map(move |i| self.block_at((start + i) % n))
    }
}

fn parse_pool_selector(s: &str) -> Option<Selector> {
    Selector::parse_bounded(s, gingham_api::selector::MAX_POOL_SELECTOR_LEN).ok()
}

/// FNV-1 32-bit, as Calico seeds its block search with it.
pub fn fnv32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h = h.wrapping_mul(0x0100_0193);
        h ^= u32::from(*b);
    }
    h
}

/// The pools an assignment may draw from, in name order.
pub fn select(
    pools: &[Pool],
    v4: bool,
    requested: &[String],
    node: &str,
    node_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    use_: Use,
) -> Result<Vec<Pool>, IpamError> {
    let family: Vec<&Pool> = pools.iter().filter(|p| p.v4() == v4).collect();
    if !requested.is_empty() {
        // Named pools are used exactly; selectors are ignored.
        let mut out = Vec::new();
        for r in requested {
            let found = family
                .iter()
                .find(|p| p.name == *r || p.cidr.to_string() == *r || r.parse::<IpNet>().is_ok_and(|c| c == p.cidr));
            match found {
                Some(p) if !p.disabled() => out.push((*p).clone()),
                _ => return Err(IpamError::PoolNotFound { pool: r.clone() }),
            }
        }
        return Ok(out);
    }
    let mut out: Vec<Pool> = family
        .into_iter()
        .filter(|p| !p.disabled() && p.spec.assignment_mode.as_deref() != Some("Manual") && p.allows(use_))
        .filter(|p| p.selects_node(node_labels))
        .filter(|p| match (p.spec.namespace_selector.as_deref(), namespace_labels) {
            (Some(sel), Some(labels)) if !sel.trim().is_empty() => {
                parse_pool_selector(sel).is_some_and(|s| s.matches(labels))
            }
            _ => true,
        })
        .cloned()
        .collect();
    if out.is_empty() {
        return Err(IpamError::NoPools { node: node.to_string(), family: if v4 { "IPv4" } else { "IPv6" } });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, cidr: &str, bs: u8) -> Pool {
        Pool::from_spec(
            name,
            IPPoolSpec {
                cidr: cidr.into(),
                block_size: Some(bs),
                node_selector: Some("all()".into()),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn block_walk_covers_the_pool_once() {
        let p = pool("p", "10.0.0.0/24", 26);
        let blocks: Vec<IpNet> = p.blocks_for("node-1").collect();
        assert_eq!(blocks.len(), 4);
        let mut sorted = blocks.clone();
        sorted.sort();
        assert_eq!(
            sorted.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.0.0.0/26", "10.0.0.64/26", "10.0.0.128/26", "10.0.0.192/26"]
        );
        assert_eq!(p.block_of("10.0.0.130".parse().unwrap()), Some("10.0.0.128/26".parse().unwrap()));
        let v6 = pool("v6", "fd00::/120", 122);
        assert_eq!(v6.blocks_for("n").count(), 4);
        // Different nodes start in different places.
        let starts: std::collections::BTreeSet<IpNet> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .filter_map(|n| pool("q", "10.0.0.0/16", 26).blocks_for(n).next())
            .collect();
        assert!(starts.len() > 3);
    }

    #[test]
    fn selection() {
        let mut rack = pool("rack-a", "10.1.0.0/16", 26);
        rack.spec.node_selector = Some("rack == 'a'".into());
        let mut off = pool("off", "10.2.0.0/16", 26);
        off.spec.disabled = Some(true);
        let mut tunnel_only = pool("tun", "10.3.0.0/16", 26);
        tunnel_only.spec.allowed_uses = Some(vec!["Tunnel".into()]);
        let pools = vec![pool("default", "10.0.0.0/16", 26), rack, off, tunnel_only, pool("v6", "fd00::/64", 122)];
        let labels: BTreeMap<String, String> = [("rack".to_string(), "a".to_string())].into();
        let names = |v: Vec<Pool>| v.into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(names(select(&pools, true, &[], "n", &labels, None, Use::Workload).unwrap()), ["default", "rack-a"]);
        assert_eq!(names(select(&pools, true, &[], "n", &BTreeMap::new(), None, Use::Workload).unwrap()), ["default"]);
        assert_eq!(
            names(select(&pools, true, &[], "n", &BTreeMap::new(), None, Use::Tunnel).unwrap()),
            ["default", "tun"]
        );
        assert_eq!(
            names(select(&pools, true, &["10.1.0.0/16".into()], "n", &BTreeMap::new(), None, Use::Workload).unwrap()),
            ["rack-a"]
        );
        assert!(matches!(
            select(&pools, true, &["off".into()], "n", &labels, None, Use::Workload),
            Err(IpamError::PoolNotFound { .. })
        ));
        assert!(matches!(
            select(&pools[1..2], true, &[], "n", &BTreeMap::new(), None, Use::Workload),
            Err(IpamError::NoPools { .. })
        ));
        assert_eq!(names(select(&pools, false, &[], "n", &labels, None, Use::Workload).unwrap()), ["v6"]);
    }
}
