//! The cluster controllers — calico-kube-controllers for gingham's own datastores — run by
//! `gingham controllers run`, one active instance at a time (see `lease`):
//! - node: a Node gone from the datastore takes its traces with it: its workload endpoints,
//!   its pods' and tunnel addresses, and its blocks (empty ones deleted, the rest left without
//!   an owner until they empty, so an address another node borrowed stays its pod's);
//! - IPAM garbage collection: a handle none of whose addresses anything uses (no endpoint,
//!   pod, container or node) is released once it has looked so for the leak grace period
//!   (Calico's leakGracePeriod, 15 min), re-checked right before; a dry run only counts;
//! - empty-block reclaim: a block seen empty at two passes a grace period apart is released,
//!   but every node keeps one.

pub mod lease;
pub mod snapshot;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use gingham_api::Kind;
use gingham_ipam::{IpamClient, IpamError};
use ipnet::IpNet;

pub use snapshot::Snapshot;

#[derive(Clone, Debug)]
pub struct Settings {
    /// How long an allocation must look leaked before it is released; None: no GC.
    pub leak_grace: Option<Duration>,
    /// How long a block must stay empty before it is reclaimed.
    pub block_grace: Duration,
    /// Between passes (a Node deletion wakes one at once).
    pub period: Duration,
    /// Count what would be released, release nothing (GC and reclaim).
    pub dry_run: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            leak_grace: Some(Duration::from_secs(15 * 60)),
            block_grace: Duration::from_secs(15 * 60),
            period: Duration::from_secs(60),
            dry_run: false,
        }
    }
}

impl Settings {
    /// The KubeControllersConfiguration `default`'s node controller fields over these.
    pub fn with_config(
        mut self,
        spec: &gingham_api::network::KubeControllersConfigurationSpec,
    ) -> Result<Self, String> {
        let Some(n) = spec.controllers.as_ref().and_then(|c| c.node.as_ref()) else { return Ok(self) };
        if let Some(v) = &n.leak_grace_period {
            let d = gingham_api::validate::parse_duration(v)
                .ok_or_else(|| format!("spec.controllers.node.leakGracePeriod: {v:?} is not a duration"))?;
            self.leak_grace = (!d.is_zero()).then_some(d);
        }
        if let Some(v) = &n.reconciler_period {
            self.period = gingham_api::validate::parse_duration(v)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("spec.controllers.node.reconcilerPeriod: {v:?} is not a duration"))?;
        }
        Ok(self)
    }
}

/// What one pass did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Nodes whose traces were removed.
    pub nodes_cleaned: Vec<String>,
    /// Handles that look leaked now (waiting for their grace period, or released).
    pub leak_candidates: usize,
    pub released_handles: Vec<(String, Vec<IpAddr>)>,
    pub reclaimed_blocks: Vec<IpNet>,
    /// Blocks of deleted pools released (deleted, or left without an owner until empty).
    pub pool_blocks_released: Vec<IpNet>,
}

/// What is left of a node after `cleanup_node`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCleanup {
    pub endpoints: usize,
    pub handles: Vec<String>,
    pub blocks_deleted: Vec<IpNet>,
    /// Blocks that still hold other nodes' addresses: without an owner until they empty.
    pub blocks_kept: Vec<IpNet>,
}

/// Remove a (deleted) node's traces: its endpoints, the addresses its pods and tunnels hold,
/// its block affinities. Idempotent; safe while the Node still exists only if it is going.
pub async fn cleanup_node(ipam: &IpamClient, node: &str) -> Result<NodeCleanup, IpamError> {
    let mut out = NodeCleanup::default();
    let snap = Snapshot::read(ipam).await?;
    let res = ipam.resources();
    for (ns, name) in snap.endpoints_by_node.get(node).into_iter().flatten() {
        match res.delete(Kind::WorkloadEndpoint, Some(ns), name, None).await {
            Ok(_) => out.endpoints += 1,
            Err(gingham_store::resources::ResourceError::Store(gingham_store::StoreError::NotFound { .. })) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Its pods' and tunnels' handles: by the node attribute, or the tunnel handle's name.
    let mut handles: Vec<String> = snap
        .allocations
        .iter()
        .filter(|a| a.node.as_deref() == Some(node) || snapshot::tunnel_node(&a.handle) == Some(node))
        .map(|a| a.handle.clone())
        .filter(|h| !h.is_empty())
        .collect();
    handles.sort();
    handles.dedup();
    for h in &handles {
        ipam.release_by_handle(h).await?;
    }
    out.handles = handles;
    for (cidr, (owner, _)) in &snap.blocks {
        if owner.as_deref() == Some(node) {
            match ipam.unaffine_block(*cidr).await? {
                Some(true) => out.blocks_deleted.push(*cidr),
                Some(false) => out.blocks_kept.push(*cidr),
                None => {}
            }
        }
    }
    // Affinity records without their block.
    ipam.release_affinities_of(node).await?;
    Ok(out)
}

/// The controllers' memory between passes.
#[derive(Default)]
pub struct Controllers {
    /// Handles that looked leaked, since when.
    leaked_since: BTreeMap<String, Instant>,
    /// Blocks seen empty, since when.
    empty_since: BTreeMap<IpNet, Instant>,
}

impl Controllers {
    /// One pass of every controller.
    pub async fn pass(&mut self, ipam: &IpamClient, s: &Settings) -> Result<PassReport, IpamError> {
        let mut report = PassReport::default();
        // IPAMConfiguration written by anyone: mirrored where Calico's IPAM reads it.
        if !s.dry_run {
            ipam.mirror_config().await?;
        }
        let snap = Snapshot::read(ipam).await?;

        // Node controller: owners and allocators that no longer exist.
        let mut gone: Vec<String> = snap
            .blocks
            .values()
            .filter_map(|(o, _)| o.clone())
            .chain(snap.endpoints_by_node.keys().cloned())
            .chain(snap.allocations.iter().filter_map(|a| snapshot::tunnel_node(&a.handle).map(str::to_string)))
            .filter(|n| !n.is_empty() && !snap.nodes.contains(n))
            .collect();
        gone.extend(ipam.affinity_nodes().await?.into_iter().filter(|n| !snap.nodes.contains(n)));
        gone.sort();
        gone.dedup();
        for n in &gone {
            // Read apart from the rest: a node that registered since the listing is not gone.
            if ipam.resources().get(Kind::Node, None, n).await?.is_some() {
                continue;
            }
            if !s.dry_run {
                cleanup_node(ipam, n).await?;
            }
            report.nodes_cleaned.push(n.clone());
        }
        let snap = if gone.is_empty() || s.dry_run { snap } else { Snapshot::read(ipam).await? };

        // Pools deleted by any writer: their blocks lose their owners (ReleasePoolAffinities).
        if !s.dry_run {
            for (cidr, _) in ipam.release_blocks_outside_pools().await? {
                report.pool_blocks_released.push(cidr);
            }
        }

        // IPAM GC.
        let now = Instant::now();
        let unused = snap.unused_handles();
        self.leaked_since.retain(|h, _| unused.contains_key(h));
        report.leak_candidates = unused.len();
        if let Some(grace) = s.leak_grace {
            let mut due = Vec::new();
            for h in unused.keys() {
                let since = *self.leaked_since.entry(h.clone()).or_insert(now);
                if now.duration_since(since) >= grace {
                    due.push(h.clone());
                }
            }
            if !due.is_empty() {
                // Re-check right before releasing: an endpoint written meanwhile saves it.
                let fresh = Snapshot::read(ipam).await?.unused_handles();
                for h in due.into_iter().filter(|h| fresh.contains_key(h)) {
                    let ips = if s.dry_run { fresh[&h].clone() } else { ipam.release_by_handle(&h).await? };
                    if !s.dry_run {
                        self.leaked_since.remove(&h);
                    }
                    report.released_handles.push((h, ips));
                }
            }
        }

        // Empty-block reclaim: each node keeps one block.
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for (owner, _) in snap.blocks.values() {
            if let Some(o) = owner {
                *per_node.entry(o.as_str()).or_default() += 1;
            }
        }
        let empty: Vec<(IpNet, &str)> =
            snap.blocks.iter().filter_map(|(c, (o, used))| Some((*c, o.as_deref()?)).filter(|_| *used == 0)).collect();
        self.empty_since.retain(|c, _| empty.iter().any(|(e, _)| e == c));
        for (cidr, owner) in empty {
            let since = *self.empty_since.entry(cidr).or_insert(now);
            let left = per_node.get(owner).copied().unwrap_or_default();
            if now.duration_since(since) < s.block_grace || left <= 1 {
                continue;
            }
            if s.dry_run {
                report.reclaimed_blocks.push(cidr);
                continue;
            }
            // Only if still empty (release_affinity checks, in its transaction).
            if ipam.release_affinity(owner, cidr).await? {
                per_node.insert(owner, left - 1);
                self.empty_since.remove(&cidr);
                report.reclaimed_blocks.push(cidr);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gingham_api::network::{ControllersConfig, KubeControllersConfigurationSpec, NodeControllerConfig};

    fn spec(leak: Option<&str>, period: Option<&str>) -> KubeControllersConfigurationSpec {
        KubeControllersConfigurationSpec {
            controllers: Some(ControllersConfig {
                node: Some(NodeControllerConfig {
                    leak_grace_period: leak.map(str::to_string),
                    reconciler_period: period.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn kube_controllers_configuration_sets_the_grace_period_and_period() {
        let s = Settings::default().with_config(&spec(Some("5m"), Some("30s"))).unwrap();
        assert_eq!((s.leak_grace, s.period), (Some(Duration::from_secs(300)), Duration::from_secs(30)));
        assert_eq!(Settings::default().with_config(&spec(Some("0"), None)).unwrap().leak_grace, None, "0: no GC");
        let d = Settings::default().with_config(&KubeControllersConfigurationSpec::default()).unwrap();
        assert_eq!(d.leak_grace, Some(Duration::from_secs(900)), "Calico's 15 min");
        let e = Settings::default().with_config(&spec(Some("soon"), None)).unwrap_err();
        assert!(e.contains("spec.controllers.node.leakGracePeriod"), "{e}");
    }
}
