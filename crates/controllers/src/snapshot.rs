//! What the controllers decide from: the nodes, the workload endpoints and every allocation,
//! read in one pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use gingham_api::Kind;
use gingham_api::policy::WorkloadEndpointSpec;
use gingham_ipam::IpamClient;
use gingham_ipam::IpamError;
use gingham_ipam::model::NO_ENDPOINT_ATTR;
use ipnet::IpNet;

/// One allocated address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub block: IpNet,
    pub handle: String,
    /// The `node`, `namespace` and `pod` attributes the allocator recorded.
    pub node: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// Held for another CNI plugin, or imported: no endpoint will ever record it.
    pub no_endpoint: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub nodes: BTreeSet<String>,
    /// Addresses endpoints hold, and endpoint keys by node.
    pub endpoint_ips: BTreeSet<IpAddr>,
    /// (namespace, pod) of every endpoint, with its node.
    pub pods: BTreeSet<(String, String, String)>,
    pub container_ids: BTreeSet<String>,
    pub endpoints_by_node: BTreeMap<String, Vec<(String, String)>>,
    pub allocations: Vec<Allocation>,
    /// Blocks: cidr → (owner, addresses in use).
    pub blocks: BTreeMap<IpNet, (Option<String>, usize)>,
}

pub const TUNNEL_HANDLES: [&str; 3] = ["ipip-tunnel-addr-", "vxlan-tunnel-addr-", "vxlan-v6-tunnel-addr-"];

/// The node a tunnel-address handle belongs to.
pub fn tunnel_node(handle: &str) -> Option<&str> {
    TUNNEL_HANDLES.iter().find_map(|p| handle.strip_prefix(p))
}

impl Snapshot {
    pub async fn read(ipam: &IpamClient) -> Result<Snapshot, IpamError> {
        let res = ipam.resources();
        let mut s = Snapshot {
            nodes: res.list(Kind::Node, None).await?.into_iter().map(|o| o.metadata.name).collect(),
            ..Default::default()
        };
        for w in res.list(Kind::WorkloadEndpoint, None).await? {
            let spec: WorkloadEndpointSpec = w.spec_as().unwrap_or_default();
            let ns = w.metadata.namespace.clone().unwrap_or_default();
            let node = spec.node.clone().unwrap_or_default();
            for n in spec.ip_networks.iter().flatten() {
                if let Ok(net) = n.parse::<IpNet>() {
                    s.endpoint_ips.insert(net.addr());
                }
            }
            if let Some(pod) = spec.pod.clone() {
                s.pods.insert((ns.clone(), pod, node.clone()));
            }
            if let Some(c) = spec.container_id.clone().filter(|c| !c.is_empty()) {
                s.container_ids.insert(c);
            }
            s.endpoints_by_node.entry(node).or_default().push((ns, w.metadata.name.clone()));
        }
        for v4 in [true, false] {
            for (b, _) in ipam.all_blocks(v4).await? {
                let owner = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")).map(str::to_string);
                s.blocks.insert(b.cidr, (owner, b.in_use()));
                for ord in 0..b.size() as u32 {
                    let Some(attr) = b.attribute(ord) else { continue };
                    let sec = attr.secondary.clone().unwrap_or_default();
                    s.allocations.push(Allocation {
                        ip: b.ip(ord),
                        block: b.cidr,
                        handle: attr.handle_id.clone().unwrap_or_default(),
                        node: sec.get("node").cloned(),
                        namespace: sec.get("namespace").cloned(),
                        pod: sec.get("pod").cloned(),
                        no_endpoint: sec.get(NO_ENDPOINT_ATTR.0).map(String::as_str) == Some(NO_ENDPOINT_ATTR.1),
                    });
                }
            }
        }
        Ok(s)
    }

    /// Whether something still uses this allocation: an endpoint holds the address, or an
    /// endpoint of its pod or container exists, or (a tunnel address) its node exists.
    pub fn in_use(&self, a: &Allocation) -> bool {
        if let Some(node) = tunnel_node(&a.handle) {
            return self.nodes.contains(node);
        }
        // Nothing to judge it by: only its node's deletion releases it.
        if a.no_endpoint {
            return true;
        }
        if self.endpoint_ips.contains(&a.ip) {
            return true;
        }
        // The handle is `<network>.<containerID>`.
        if a.handle.rsplit_once('.').is_some_and(|(_, cid)| self.container_ids.contains(cid)) {
            return true;
        }
        match (&a.namespace, &a.pod, &a.node) {
            (Some(ns), Some(pod), Some(node)) => self.pods.contains(&(ns.clone(), pod.clone(), node.clone())),
            _ => false,
        }
    }

    /// Handles none of whose addresses is in use (all or none per handle), with their addresses.
    pub fn unused_handles(&self) -> BTreeMap<String, Vec<IpAddr>> {
        let mut by_handle: BTreeMap<String, (bool, Vec<IpAddr>)> = BTreeMap::new();
        for a in &self.allocations {
            let e = by_handle.entry(a.handle.clone()).or_default();
            e.0 |= self.in_use(a);
            e.1.push(a.ip);
        }
        by_handle.into_iter().filter(|(h, (used, _))| !used && !h.is_empty()).map(|(h, (_, ips))| (h, ips)).collect()
    }
}
