//! What `gingham ipam show` and `gingham ipam check` report: usage per pool and block, and every
//! inconsistency between blocks, handles, affinities, nodes and endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use gingham_api::Kind;
use gingham_api::network::NodeSpec;
use gingham_api::policy::WorkloadEndpointSpec;
use ipnet::IpNet;

use crate::block::AllocationBlock;
use crate::model::{
    AffinityState, BlockAffinity, IpamHandle, all_affinities_prefix, block_key, handles_prefix, parse_affinity_key,
};
use crate::{IpamClient, IpamError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockUsage {
    pub cidr: IpNet,
    pub total: u128,
    pub in_use: u128,
    pub affinity: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub cidr: IpNet,
    pub total: u128,
    pub in_use: u128,
    pub blocks: Vec<BlockUsage>,
}

async fn every_block(client: &IpamClient) -> Result<Vec<AllocationBlock>, IpamError> {
    let mut blocks: Vec<AllocationBlock> = client.all_blocks(true).await?.into_iter().map(|(b, _)| b).collect();
    blocks.extend(client.all_blocks(false).await?.into_iter().map(|(b, _)| b));
    Ok(blocks)
}

/// Addresses in use per pool (and per block of each pool).
pub async fn usage(client: &IpamClient) -> Result<Vec<PoolUsage>, IpamError> {
    let mut pools = client.pools().await?;
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let blocks = every_block(client).await?;
    Ok(pools
        .iter()
        .map(|p| {
            let mut mine: Vec<BlockUsage> = blocks
                .iter()
                .filter(|b| p.cidr.contains(&b.cidr))
                .map(|b| BlockUsage {
                    cidr: b.cidr,
                    total: b.size() as u128,
                    in_use: b.in_use() as u128,
                    affinity: b.affinity.clone(),
                })
                .collect();
            mine.sort_by_key(|b| b.cidr);
            let total = 1u128 << (p.cidr.max_prefix_len() - p.cidr.prefix_len()).min(127);
            PoolUsage {
                name: p.name.clone(),
                cidr: p.cidr,
                total,
                in_use: mine.iter().map(|b| b.in_use).sum(),
                blocks: mine,
            }
        })
        .collect())
}

/// The outcome of a check: what was looked at, and each problem in words a person can act on.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub progress: Vec<String>,
    pub problems: Vec<String>,
    /// Addresses allocated that nothing uses, as `ipam release --from-report` takes them.
    pub leaked: Vec<Leak>,
}

/// One leaked address: enough to release exactly that allocation later, and nothing reused.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Leak {
    pub ip: IpAddr,
    pub block: IpNet,
    pub handle: String,
    /// The allocation's sequence number: a later allocation of the address has another.
    pub sequence_number: Option<u64>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Compare IPAM's records with each other and with the nodes and endpoints that use them.
pub async fn check(client: &IpamClient) -> Result<CheckReport, IpamError> {
    let mut r = CheckReport::default();
    let res = client.resources();
    r.progress.push("Checking IPAM for inconsistencies...".into());
    r.progress.push("Loading all IPAM blocks...".into());
    // Unreadable blocks are reported, and the rest is still checked.
    let mut blocks = Vec::new();
    for v4 in [true, false] {
        for kv in client.datastore().list(&crate::model::blocks_prefix(v4)).await?.items {
            match AllocationBlock::decode(&kv.value) {
                Ok(b) => blocks.push(b),
                Err(e) => r.problems.push(format!(
                    "block {} is not readable: {e}; delete it only once no pod uses its addresses",
                    kv.key
                )),
            }
        }
    }
    r.progress.push(format!("Found {} IPAM blocks.", blocks.len()));
    let pools = client.pools().await?;
    r.progress.push(format!("Found {} active IP pools.", pools.iter().filter(|p| !p.disabled()).count()));
    let node_objects = res.list(Kind::Node, None).await?;
    let nodes: BTreeMap<String, NodeSpec> =
        node_objects.iter().map(|o| (o.metadata.name.clone(), o.spec_as().unwrap_or_default())).collect();
    // Kubernetes' podCIDRs: addresses there are host-local's (`usePodCidr`), not gingham's IPAM's.
    let pod_cidrs: BTreeMap<&str, Vec<IpNet>> = node_objects
        .iter()
        .map(|o| {
            let list = o.status.as_ref().and_then(|s| s.get("podCIDRs")).and_then(|v| v.as_array());
            let cidrs = list.into_iter().flatten().filter_map(|c| c.as_str()?.parse().ok()).collect();
            (o.metadata.name.as_str(), cidrs)
        })
        .collect();
    let mut host_local: BTreeSet<IpAddr> = BTreeSet::new();
    let weps = res.list(Kind::WorkloadEndpoint, None).await?;

    // Who uses which address.
    let mut users: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let mut tunnel_ips = 0;
    for (name, spec) in &nodes {
        let bgp = spec.bgp.clone().unwrap_or_default();
        for a in [bgp.ipv4_ipip_tunnel_addr, spec.ipv4_vxlan_tunnel_addr.clone(), spec.ipv6_vxlan_tunnel_addr.clone()]
            .into_iter()
            .flatten()
        {
            if let Ok(ip) = a.parse() {
                users.entry(ip).or_default().push(format!("node {name} (tunnel)"));
                tunnel_ips += 1;
            }
        }
    }
    r.progress.push(format!("Found {tunnel_ips} node tunnel IPs."));
    let mut workload_ips = 0;
    for w in &weps {
        let spec: WorkloadEndpointSpec = w.spec_as().unwrap_or_default();
        if let Some(since) = w.metadata.annotations.get(crate::model::INTERFACE_GONE_ANNOTATION) {
            r.problems.push(format!(
                "endpoint {}/{} on node {}: its interface {} has been gone since {since} (no CNI DEL came); its node's agent releases it after its grace period",
                w.namespace().unwrap_or_default(),
                w.name(),
                spec.node.as_deref().unwrap_or("?"),
                spec.interface_name.as_deref().unwrap_or("?"),
            ));
        }
        let node_cidrs = spec.node.as_deref().and_then(|n| pod_cidrs.get(n)).map(Vec::as_slice).unwrap_or_default();
        for n in spec.ip_networks.iter().flatten() {
            if let Ok(net) = n.parse::<IpNet>() {
                if node_cidrs.iter().any(|c| c.contains(&net.addr())) {
                    host_local.insert(net.addr());
                }
                users.entry(net.addr()).or_default().push(format!(
                    "endpoint {}/{}",
                    w.namespace().unwrap_or_default(),
                    w.name()
                ));
                workload_ips += 1;
            }
        }
    }
    r.progress.push(format!("Found {workload_ips} workload IPs."));
    r.progress.push(format!("Workloads and nodes are using {} IPs.", users.len()));
    for (ip, who) in &users {
        if who.len() > 1 {
            r.problems.push(format!("{ip} is used by more than one endpoint: {}", who.join(", ")));
        }
    }

    // Blocks: internal consistency, pool membership, owners, and who holds each address.
    let mut held: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut allocated: BTreeSet<IpAddr> = BTreeSet::new();
    r.progress.push("Scanning for IPs that are allocated but not actually in use...".into());
    let mut leaked = 0;
    let mut ipam_only = 0;
    for b in &blocks {
        r.progress.push(format!(" IPAM block {} affinity={}:", b.cidr, b.affinity.as_deref().unwrap_or("<none>")));
        if let Err(e) = b.check() {
            r.problems.push(format!("block {} is inconsistent: {e} (key {})", b.cidr, block_key(&b.cidr)));
        }
        if !pools.iter().any(|p| p.cidr.contains(&b.cidr)) {
            r.problems.push(format!("block {} is not inside any IPPool (was its pool deleted?)", b.cidr));
        }
        if let Some(node) = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")) {
            if !nodes.contains_key(node) {
                r.problems.push(format!(
                    "block {} belongs to node {node}, which no longer exists: release its addresses, then its affinity",
                    b.cidr
                ));
            }
        }
        for ord in 0..b.size() as u32 {
            let Some(attr) = b.attribute(ord) else {
                continue;
            };
            let ip = b.ip(ord);
            allocated.insert(ip);
            let handle = attr.handle_id.clone().unwrap_or_default();
            *held.entry(handle.clone()).or_default().entry(b.cidr.to_string()).or_default() += 1;
            let sec = attr.secondary.clone().unwrap_or_default();
            let no_endpoint =
                sec.get(crate::model::NO_ENDPOINT_ATTR.0).map(String::as_str) == Some(crate::model::NO_ENDPOINT_ATTR.1);
            if no_endpoint {
                ipam_only += 1;
            } else if !users.contains_key(&ip) {
                leaked += 1;
                r.leaked.push(Leak {
                    ip,
                    block: b.cidr,
                    handle: handle.clone(),
                    sequence_number: b.sequence_number_for_allocation.get(&ord.to_string()).copied(),
                    attributes: sec.clone(),
                });
                let owner = match (sec.get("namespace"), sec.get("pod")) {
                    (Some(ns), Some(pod)) => format!(", pod {ns}/{pod}"),
                    _ => sec.get("node").map(|n| format!(", node {n}")).unwrap_or_default(),
                };
                r.problems.push(format!("{ip} is allocated (handle {handle}{owner}) but no endpoint or node uses it: gingham ipam release --ip={ip}"));
            }
        }
    }
    r.progress.push(format!("Found {leaked} IPs that are allocated in IPAM but not actually in use."));
    if ipam_only > 0 {
        r.progress.push(format!(
            "({ipam_only} IPs are held for another CNI plugin or imported from host-local: no endpoint records them)"
        ));
    }
    r.progress.push("Scanning for IPs that are in use by a workload or node but not allocated in IPAM...".into());
    let mut unallocated = 0;
    if !host_local.is_empty() {
        r.progress
            .push(format!("({} workload IPs lie in their node's podCIDR: host-local's, not IPAM's)", host_local.len()));
    }
    for (ip, who) in &users {
        if !allocated.contains(ip) && !host_local.contains(ip) {
            unallocated += 1;
            r.problems.push(format!("{ip} is used by {} but not allocated in IPAM", who.join(", ")));
        }
    }
    r.progress.push(format!("Found {unallocated} in-use IPs that are not in active IP pools or not allocated."));

    // Handles against what the blocks say.
    let handles = client.datastore().list(&handles_prefix()).await?;
    let mut recorded: BTreeMap<String, IpamHandle> = BTreeMap::new();
    for kv in &handles.items {
        let id = kv.key.trim_start_matches(&handles_prefix()).to_string();
        match serde_json::from_slice::<IpamHandle>(&kv.value) {
            Ok(h) => {
                recorded.insert(id, h);
            }
            Err(e) => r.problems.push(format!("handle {id} is not readable: {e}")),
        }
    }
    for (id, h) in &recorded {
        match held.get(id) {
            None => r.problems.push(format!("handle {id} holds no addresses: its record is left over")),
            Some(actual) if *actual != h.block => {
                r.problems.push(format!("handle {id} records {:?} but the blocks hold {:?}", h.block, actual))
            }
            _ => {}
        }
    }
    for id in held.keys().filter(|id| !recorded.contains_key(*id)) {
        r.problems.push(format!("addresses are allocated to handle {id}, which has no handle record"));
    }

    // Affinities: their node must exist and their block must agree.
    let affinities = client.datastore().list(&all_affinities_prefix()).await?;
    for kv in &affinities.items {
        let Some((node, cidr)) = parse_affinity_key(&kv.key) else {
            r.problems.push(format!("unrecognised affinity key {}", kv.key));
            continue;
        };
        if !nodes.contains_key(&node) {
            r.problems.push(format!("node {node} no longer exists but still has an affinity for block {cidr}"));
        }
        let state = BlockAffinity::parse(&kv.value).map(|a| a.state);
        match blocks.iter().find(|b| b.cidr == cidr) {
            None => r.problems.push(format!("node {node}'s affinity for block {cidr} has no block")),
            Some(b) if state == Some(AffinityState::Confirmed) && !b.is_affine_to(&node) => r.problems.push(format!(
                "node {node} has an affinity for block {cidr}, but the block belongs to {}",
                b.affinity.as_deref().unwrap_or("nobody")
            )),
            _ => {}
        }
    }
    Ok(r)
}
