//! Calico's IPAM keys and the small records stored under them.
//!
//! ```text
//! /calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26      AllocationBlock
//! /calico/ipam/v2/host/<node>/ipv4/block/10.65.0.0-26     BlockAffinity
//! /calico/ipam/v2/handle/<handle>                         IpamHandle
//! ```

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const IPAM_PREFIX: &str = "/calico/ipam/v2/";

fn family(cidr: &IpNet) -> &'static str {
    if cidr.addr().is_ipv4() { "ipv4" } else { "ipv6" }
}

/// `10.65.0.0/26` → `10.65.0.0-26`.
pub fn cidr_segment(cidr: &IpNet) -> String {
    cidr.to_string().replace('/', "-")
}

/// `10.65.0.0-26` → `10.65.0.0/26`.
pub fn parse_segment(seg: &str) -> Option<IpNet> {
    let (addr, len) = seg.rsplit_once('-')?;
    format!("{addr}/{len}").parse().ok()
}

pub fn block_key(cidr: &IpNet) -> String {
    format!("{IPAM_PREFIX}assignment/{}/block/{}", family(cidr), cidr_segment(cidr))
}

pub fn blocks_prefix(v4: bool) -> String {
    format!("{IPAM_PREFIX}assignment/{}/block/", if v4 { "ipv4" } else { "ipv6" })
}

pub fn affinity_key(node: &str, cidr: &IpNet) -> String {
    format!("{IPAM_PREFIX}host/{node}/{}/block/{}", family(cidr), cidr_segment(cidr))
}

pub fn node_affinities_prefix(node: &str, v4: bool) -> String {
    format!("{IPAM_PREFIX}host/{node}/{}/block/", if v4 { "ipv4" } else { "ipv6" })
}

pub fn all_affinities_prefix() -> String {
    format!("{IPAM_PREFIX}host/")
}

/// (node, block) of an affinity key.
pub fn parse_affinity_key(key: &str) -> Option<(String, IpNet)> {
    let rest = key.strip_prefix(&all_affinities_prefix())?;
    let (node, rest) = rest.split_once('/')?;
    let seg = rest.rsplit('/').next()?;
    Some((node.to_string(), parse_segment(seg)?))
}

pub fn handle_key(handle: &str) -> String {
    format!("{IPAM_PREFIX}handle/{handle}")
}

pub fn handles_prefix() -> String {
    format!("{IPAM_PREFIX}handle/")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    Pending,
    Confirmed,
    PendingDeletion,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockAffinity {
    pub state: AffinityState,
    #[serde(default)]
    pub deleted: bool,
}

impl BlockAffinity {
    pub fn confirmed() -> Self {
        BlockAffinity { state: AffinityState::Confirmed, deleted: false }
    }

    /// A claim in progress (Calico's KDD protocol): not yet the node's.
    pub fn pending() -> Self {
        BlockAffinity { state: AffinityState::Pending, deleted: false }
    }

    /// An empty value (old format) means confirmed.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.is_empty() { Some(Self::confirmed()) } else { serde_json::from_slice(value).ok() }
    }
}

/// `{"block": {"10.65.0.0/26": 2}, "deleted": false}`: how many addresses a handle holds per block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamHandle {
    #[serde(default)]
    pub block: BTreeMap<String, usize>,
    #[serde(default)]
    pub deleted: bool,
}

impl IpamHandle {
    pub fn add(&mut self, cidr: &IpNet, n: usize) {
        *self.block.entry(cidr.to_string()).or_default() += n;
    }

    pub fn remove(&mut self, cidr: &IpNet, n: usize) {
        let k = cidr.to_string();
        if let Some(c) = self.block.get_mut(&k) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.block.remove(&k);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.block.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_calico() {
        let c: IpNet = "172.30.139.64/26".parse().unwrap();
        assert_eq!(block_key(&c), "/calico/ipam/v2/assignment/ipv4/block/172.30.139.64-26");
        assert_eq!(affinity_key("node-1", &c), "/calico/ipam/v2/host/node-1/ipv4/block/172.30.139.64-26");
        assert_eq!(handle_key("ipip-tunnel-addr-node-1"), "/calico/ipam/v2/handle/ipip-tunnel-addr-node-1");
        assert_eq!(parse_affinity_key(&affinity_key("node-1", &c)), Some(("node-1".into(), c)));
        let v6: IpNet = "fd00::40/122".parse().unwrap();
        assert_eq!(block_key(&v6), "/calico/ipam/v2/assignment/ipv6/block/fd00::40-122");
        assert_eq!(parse_segment("fd00::40-122"), Some(v6));
        assert_eq!(
            serde_json::to_string(&BlockAffinity::confirmed()).unwrap(),
            r#"{"state":"confirmed","deleted":false}"#
        );
        assert_eq!(BlockAffinity::parse(b""), Some(BlockAffinity::confirmed()));
        let mut h = IpamHandle::default();
        h.add(&c, 2);
        assert_eq!(serde_json::to_string(&h).unwrap(), r#"{"block":{"172.30.139.64/26":2},"deleted":false}"#);
        h.remove(&c, 2);
        assert!(h.is_empty());
    }
}

/// Set on a WorkloadEndpoint by its node's agent when the endpoint's host interface disappeared
/// without a CNI DEL: the time it was first seen gone (RFC 3339). The agent releases the
/// endpoint after its grace period; until then `ipam check` reports it.
/// The allocation attribute (key, value) of addresses no workload endpoint will ever record
/// (gingham-ipam under another plugin, addresses imported from host-local): the leak GC and
/// `ipam check` cannot judge them by endpoints, and leave them be.
pub const NO_ENDPOINT_ATTR: (&str, &str) = ("endpoint", "none");

pub const INTERFACE_GONE_ANNOTATION: &str = "gingham.dev/interface-gone-since";
