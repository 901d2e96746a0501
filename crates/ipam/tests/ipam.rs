//! IPAM on both backends (the embedded store and a real etcd): Calico's allocation rules, its
//! key layout, errors, tunnel addresses, `check`, and several processes allocating at once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gingham_ipam::block::AllocationBlock;
use gingham_ipam::model::IpamHandle;
use gingham_ipam::tunnel::TunnelKind;
use gingham_ipam::{AutoAssign, IpamClient, IpamError, ReleaseGuard};
use gingham_store::embedded::EmbeddedStore;
use gingham_store::testing::{Backend, CountingStore, EtcdServer, apply_yaml, open_backend};
use gingham_store::{Datastore, ResourceStore};

async fn open(kind: &str) -> (Arc<dyn Datastore>, Backend) {
    open_backend(kind).await
}

async fn apply(ds: &Arc<dyn Datastore>, yaml: &str) {
    apply_yaml(ds, yaml).await
}

fn pool(name: &str, cidr: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\nspec:\n  cidr: {cidr}\n{extra}\n"
    )
}

fn req(node: &str, handle: &str, n: usize) -> AutoAssign {
    AutoAssign {
        num_v4: n,
        handle: handle.into(),
        node: node.into(),
        attrs: [
            ("node".to_string(), node.to_string()),
            ("pod".to_string(), handle.to_string()),
            ("namespace".to_string(), "default".to_string()),
        ]
        .into(),
        ..Default::default()
    }
}

async fn keys(ds: &Arc<dyn Datastore>) -> Vec<String> {
    ds.list("/calico/ipam/v2/").await.unwrap().items.into_iter().map(|kv| kv.key).collect()
}

async fn block(ds: &Arc<dyn Datastore>, key: &str) -> AllocationBlock {
    serde_json::from_slice(&ds.get(key).await.unwrap().unwrap().value).unwrap()
}

async fn assign_claims_and_layout(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("default-ipv4-ippool", "172.30.0.0/16", "  blockSize: 26")).await;
    let ipam = IpamClient::new(ds.clone());
    let got = ipam.auto_assign(&req("node-1", "k8s-pod-network.abc", 3)).await.unwrap();
    assert_eq!(got.v4.len(), 3);
    assert!(got.v4.iter().all(|n| n.prefix_len() == 26), "addresses carry the block's prefix: {:?}", got.v4);
    let blk = got.v4[0].trunc();
    let seg = blk.to_string().replace('/', "-");
    assert_eq!(
        keys(&ds).await,
        [
            format!("/calico/ipam/v2/assignment/ipv4/block/{seg}"),
            "/calico/ipam/v2/handle/k8s-pod-network.abc".to_string(),
            format!("/calico/ipam/v2/host/node-1/ipv4/block/{seg}"),
        ]
    );
    let b = block(&ds, &format!("/calico/ipam/v2/assignment/ipv4/block/{seg}")).await;
    assert_eq!(b.affinity.as_deref(), Some("host:node-1"));
    assert_eq!((b.in_use(), b.unallocated[0]), (3, 3), "ordinals handed out from the front of the free list");
    assert_eq!(b.attributes[0].secondary.as_ref().unwrap()["pod"], "k8s-pod-network.abc");
    let h: IpamHandle =
        serde_json::from_slice(&ds.get("/calico/ipam/v2/handle/k8s-pod-network.abc").await.unwrap().unwrap().value)
            .unwrap();
    assert_eq!(h.block, BTreeMap::from([(blk.to_string(), 3)]));
    let aff: serde_json::Value = serde_json::from_slice(
        &ds.get(&format!("/calico/ipam/v2/host/node-1/ipv4/block/{seg}")).await.unwrap().unwrap().value,
    )
    .unwrap();
    assert_eq!(aff["state"], "confirmed");

    // Filling the block makes the node claim a second one; a new client (another process) sees the same.
    let more = ipam.auto_assign(&req("node-1", "h2", 61)).await.unwrap();
    assert!(more.v4.iter().all(|n| n.trunc() == blk));
    let next = IpamClient::new(ds.clone()).auto_assign(&req("node-1", "h3", 2)).await.unwrap();
    assert!(next.v4.iter().all(|n| n.trunc() != blk));
    assert_eq!(ipam.affine_blocks("node-1", true).await.unwrap().len(), 2);
    // Another node starts elsewhere in the pool.
    let other = ipam.auto_assign(&req("node-2", "h4", 1)).await.unwrap();
    assert!(!ipam.affine_blocks("node-1", true).await.unwrap().contains(&other.v4[0].trunc()));

    // Release by handle frees exactly that handle's addresses and deletes its record.
    let freed = ipam.release_by_handle("h2").await.unwrap();
    assert_eq!(freed.len(), 61);
    assert!(ds.get("/calico/ipam/v2/handle/h2").await.unwrap().is_none());
    assert!(ipam.release_by_handle("h2").await.unwrap().is_empty(), "releasing twice is a no-op");
    assert_eq!(block(&ds, &format!("/calico/ipam/v2/assignment/ipv4/block/{seg}")).await.in_use(), 3);
    // The next allocation from this block reuses the longest-free address first: the fourth
    // ordinal (the first freed) comes back only after the never-used tail.
    let again = ipam.auto_assign(&req("node-1", "h5", 1)).await.unwrap();
    assert_eq!(again.v4[0].trunc(), blk);
}

async fn steady_state_is_one_write(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("p", "10.10.0.0/16", "")).await;
    let counting = Arc::new(CountingStore::new(ds.clone()));
    let ipam = IpamClient::new(counting.clone());
    ipam.auto_assign(&req("n1", "warm", 1)).await.unwrap(); // claims the block
    let (before, reads) = (counting.writes(), counting.reads());
    for i in 0..40 {
        ipam.auto_assign(&req("n1", &format!("pod-{i}"), 1)).await.unwrap();
    }
    assert_eq!(counting.writes() - before, 40, "one datastore write per allocation from an owned block");
    assert_eq!(counting.reads() - reads, 0, "and no read: the write's guards stand for the configuration");
    let before = counting.writes();
    ipam.release_by_handle("pod-3").await.unwrap();
    assert_eq!(counting.writes() - before, 1, "one write per release");
}

async fn borrowing_strict_affinity_and_limits(ds: Arc<dyn Datastore>) {
    // One /26 pool: a single block.
    apply(&ds, &pool("tiny", "10.20.0.0/26", "  blockSize: 26")).await;
    let ipam = IpamClient::new(ds.clone());
    ipam.auto_assign(&req("n1", "a", 10)).await.unwrap();
    // n2 finds no free block: it borrows from n1's block without taking its affinity.
    let b = ipam.auto_assign(&req("n2", "b", 5)).await.unwrap();
    assert!(b.v4.iter().all(|n| n.to_string().starts_with("10.20.0.")));
    assert!(ipam.affine_blocks("n2", true).await.unwrap().is_empty());
    // Exhausted: all or nothing, and the error names node and pool.
    match ipam.auto_assign(&req("n2", "c", 60)).await {
        Err(IpamError::Exhausted { node, got, wanted, pools, .. }) => {
            assert_eq!((node.as_str(), got, wanted), ("n2", 49, 60));
            assert_eq!(pools, ["tiny (10.20.0.0/26)"]);
        }
        other => panic!("{other:?}"),
    }
    let blk = block(&ds, "/calico/ipam/v2/assignment/ipv4/block/10.20.0.0-26").await;
    assert_eq!(blk.in_use(), 15, "the failed request left nothing behind");
    assert!(ds.get("/calico/ipam/v2/handle/c").await.unwrap().is_none());
    // With strictAffinity no borrowing; with maxBlocksPerHost the limit is named.
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true, maxBlocksPerHost: 1}\n").await;
    assert!(matches!(ipam.auto_assign(&req("n2", "d", 1)).await, Err(IpamError::Exhausted { .. })));
    ipam.auto_assign(&req("n1", "e", 49)).await.unwrap();
    apply(&ds, &pool("second", "10.21.0.0/24", "")).await;
    let err = ipam.auto_assign(&req("n1", "f", 1)).await.unwrap_err();
    assert!(matches!(err, IpamError::BlockLimit { limit: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("node n1 already holds 1 IPv4 blocks (maxBlocksPerHost)"), "{err}");
}

async fn explicit_addresses_and_guards(ds: Arc<dyn Datastore>) {
    apply(&ds, &(pool("p", "10.30.0.0/24", "") + &pool("disabled-pool", "10.31.0.0/24", "  disabled: true"))).await;
    let ipam = IpamClient::new(ds.clone());
    let ip: IpAddr = "10.30.0.77".parse().unwrap();
    let attrs = BTreeMap::new();
    assert_eq!(ipam.assign_ip(ip, "x", &attrs, "n1", false).await.unwrap().to_string(), "10.30.0.77/26");
    assert!(
        matches!(ipam.assign_ip(ip, "y", &attrs, "n1", false).await, Err(IpamError::AlreadyAllocated { handle, .. }) if handle == "x")
    );
    assert!(matches!(
        ipam.assign_ip("10.31.0.5".parse().unwrap(), "y", &attrs, "n1", false).await,
        Err(IpamError::NotInPool { .. })
    ));
    assert!(matches!(
        ipam.assign_ip("192.0.2.1".parse().unwrap(), "y", &attrs, "n1", false).await,
        Err(IpamError::NotInPool { .. })
    ));
    assert_eq!(ipam.holder(ip).await.unwrap().unwrap().0, "x");
    // Guards: a release naming the wrong handle or sequence number releases nothing.
    let wrong = ReleaseGuard { handle: Some("someone-else".into()), sequence_number: None };
    assert!(matches!(ipam.release_ips(&[ip], &wrong).await, Err(IpamError::HandleMismatch { .. })));
    let stale = ReleaseGuard { handle: None, sequence_number: Some(1) };
    assert!(matches!(ipam.release_ips(&[ip], &stale).await, Err(IpamError::SequenceMismatch { .. })));
    assert!(ipam.holder(ip).await.unwrap().is_some());
    let ok = ReleaseGuard { handle: Some("x".into()), sequence_number: None };
    assert_eq!(
        ipam.release_ips(&[ip, "10.30.0.78".parse().unwrap()], &ok).await.unwrap(),
        vec![(ip, true), ("10.30.0.78".parse().unwrap(), false)]
    );
    assert!(ds.get("/calico/ipam/v2/handle/x").await.unwrap().is_none());
    // Named pools: unknown or disabled ones are refused by name.
    let mut r = req("n1", "z", 1);
    r.pools_v4 = vec!["disabled-pool".into()];
    assert_eq!(
        ipam.auto_assign(&r).await.unwrap_err().to_string(),
        "the given pool (disabled-pool) does not exist, or is not enabled"
    );
    r.pools_v4 = vec!["10.30.0.0/24".into()];
    assert!(ipam.auto_assign(&r).await.unwrap().v4[0].to_string().starts_with("10.30.0."));
}

async fn selectors_and_reclaim(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("rack-a", "10.40.0.0/26", "  nodeSelector: rack == 'a'")).await;
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: a1, labels: {rack: a}}\nspec: {}\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: b1, labels: {rack: b}}\nspec: {}\n").await;
    let mut ipam = IpamClient::new(ds.clone());
    let err = ipam.auto_assign(&req("b1", "h", 1)).await.unwrap_err();
    assert!(err.to_string().starts_with("no configured pools for node b1 (IPv4)"), "{err}");
    ipam.auto_assign(&req("a1", "h", 1)).await.unwrap();
    ipam.release_by_handle("h").await.unwrap();
    // a2 also matches; the only block is a1's and empty: after the grace period a2 takes it over.
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: a2, labels: {rack: a}}\nspec: {}\n")
        .await;
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true}\n").await;
    assert!(ipam.auto_assign(&req("a2", "h2", 1)).await.is_err(), "within the grace period the block stays a1's");
    ipam.reclaim_after = Duration::ZERO;
    ipam.auto_assign(&req("a2", "h2", 1)).await.unwrap();
    assert_eq!(ipam.affine_blocks("a2", true).await.unwrap().len(), 1);
    assert!(ipam.affine_blocks("a1", true).await.unwrap().is_empty(), "a1's affinity is gone");
    // Namespace selectors.
    apply(&ds, &pool("team", "10.41.0.0/24", "  namespaceSelector: team == 'x'")).await;
    let mut r = req("a1", "ns", 1);
    r.namespace_labels = Some([("team".to_string(), "x".to_string())].into());
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: false}\n").await;
    let got = ipam.auto_assign(&r).await.unwrap();
    assert!(got.v4[0].to_string().starts_with("10.4"), "{got:?}");
}

async fn tunnel_addresses(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("default-ipv4-ippool", "172.20.0.0/16", "  ipipMode: Always")).await;
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-1}\nspec:\n  bgp: {ipv4Address: 10.99.0.11/24}\n").await;
    let ipam = IpamClient::new(ds.clone());
    let rs = ResourceStore::new(ds.clone());
    let ip = ipam.ensure_tunnel_address("node-1", TunnelKind::Ipip).await.unwrap().unwrap();
    let node = rs.get(gingham_api::Kind::Node, None, "node-1").await.unwrap().unwrap();
    assert_eq!(node.spec["bgp"]["ipv4IPIPTunnelAddr"], ip.to_string());
    assert_eq!(node.spec["bgp"]["ipv4Address"], "10.99.0.11/24");
    assert!(ds.get("/calico/ipam/v2/handle/ipip-tunnel-addr-node-1").await.unwrap().is_some());
    let (handle, attrs) = ipam.holder(ip).await.unwrap().unwrap();
    assert_eq!(
        (handle.as_str(), attrs["type"].as_str(), attrs["node"].as_str()),
        ("ipip-tunnel-addr-node-1", "ipipTunnelAddress", "node-1")
    );
    // Idempotent: kept while valid.
    assert_eq!(ipam.ensure_tunnel_address("node-1", TunnelKind::Ipip).await.unwrap(), Some(ip));
    // No VXLAN pool: no VXLAN address.
    assert_eq!(ipam.ensure_tunnel_address("node-1", TunnelKind::Vxlan).await.unwrap(), None);
    // Switching the pool to VXLAN: the IPIP address is released, a VXLAN one appears.
    apply(&ds, &pool("default-ipv4-ippool", "172.20.0.0/16", "  ipipMode: Never\n  vxlanMode: Always")).await;
    assert_eq!(ipam.ensure_tunnel_address("node-1", TunnelKind::Ipip).await.unwrap(), None);
    let node = rs.get(gingham_api::Kind::Node, None, "node-1").await.unwrap().unwrap();
    assert!(node.spec["bgp"].get("ipv4IPIPTunnelAddr").is_none());
    assert!(ds.get("/calico/ipam/v2/handle/ipip-tunnel-addr-node-1").await.unwrap().is_none());
    let v = ipam.ensure_tunnel_address("node-1", TunnelKind::Vxlan).await.unwrap().unwrap();
    assert_eq!(
        rs.get(gingham_api::Kind::Node, None, "node-1").await.unwrap().unwrap().spec["ipv4VXLANTunnelAddr"],
        v.to_string()
    );
    assert!(matches!(ipam.ensure_tunnel_address("ghost", TunnelKind::Vxlan).await, Err(IpamError::NodeNotFound(_))));
}

async fn check_finds_problems(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("p", "10.50.0.0/24", "")).await;
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1}\nspec: {}\n").await;
    let ipam = IpamClient::new(ds.clone());
    let used = ipam.auto_assign(&req("n1", "used", 1)).await.unwrap().v4[0].addr();
    apply(&ds, &format!("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: n1-k8s-pod-eth0, namespace: default}}\nspec: {{node: n1, ipNetworks: ['{used}/32']}}\n")).await;
    let report = gingham_ipam::check::check(&ipam).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // A leak, an endpoint without an allocation, and a node that disappeared.
    let leaked = ipam.auto_assign(&req("n1", "leaked", 1)).await.unwrap().v4[0].addr();
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: n1-k8s-other-eth0, namespace: default}\nspec: {node: n1, ipNetworks: ['10.50.0.250/32']}\n").await;
    ipam.auto_assign(&req("gone", "g", 1)).await.unwrap();
    let report = gingham_ipam::check::check(&ipam).await.unwrap();
    let text = report.problems.join("\n");
    assert!(
        text.contains(&format!(
            "{leaked} is allocated (handle leaked, pod default/leaked) but no endpoint or node uses it"
        )),
        "{text}"
    );
    assert!(
        text.contains("10.50.0.250 is used by endpoint default/n1-k8s-other-eth0 but not allocated in IPAM"),
        "{text}"
    );
    assert!(text.contains("node gone no longer exists but still has an affinity"), "{text}");
    assert!(text.contains("belongs to node gone, which no longer exists"), "{text}");
    assert!(report.progress.iter().any(|l| l == "Found 2 workload IPs."));
    // A malformed block is reported (not a panic, not an abort), and allocation refuses it by key.
    let key = "/calico/ipam/v2/assignment/ipv4/block/10.50.0.192-26";
    ds.create(
        key,
        br#"{"cidr":"10.50.0.192/26","affinity":"host:n1","allocations":[],"unallocated":[70],"attributes":[]}"#,
    )
    .await
    .unwrap();
    let report = gingham_ipam::check::check(&ipam).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&format!("block {key} is not readable: 10.50.0.192/26 has 0 allocation slots"))),
        "{:?}",
        report.problems
    );
    assert!(matches!(ipam.all_blocks(true).await, Err(IpamError::Corrupt { .. })));
}

async fn dual_stack_and_no_auto_blocks(ds: Arc<dyn Datastore>) {
    apply(&ds, &(pool("v4", "10.80.0.0/24", "") + &pool("v6", "fd00:80::/120", ""))).await;
    let ipam = IpamClient::new(ds.clone());
    let mut r = req("n1", "dual", 2);
    r.num_v6 = 2;
    let got = ipam.auto_assign(&r).await.unwrap();
    assert_eq!((got.v4.len(), got.v6.len()), (2, 2));
    assert!(got.v6.iter().all(|n| n.prefix_len() == 122 && n.to_string().starts_with("fd00:80::")), "{got:?}");
    assert_eq!(ipam.affine_blocks("n1", false).await.unwrap().len(), 1);
    let h: IpamHandle =
        serde_json::from_slice(&ds.get("/calico/ipam/v2/handle/dual").await.unwrap().unwrap().value).unwrap();
    assert_eq!(h.block.values().sum::<usize>(), 4);
    // v6 cannot be satisfied: the v4 addresses taken for the same request are given back.
    let mut big = req("n1", "too-many", 1);
    big.num_v6 = 300;
    assert!(matches!(ipam.auto_assign(&big).await, Err(IpamError::Exhausted { family: "IPv6", .. })));
    assert!(ds.get("/calico/ipam/v2/handle/too-many").await.unwrap().is_none());
    assert_eq!(ipam.release_by_handle("dual").await.unwrap().len(), 4);
    // autoAllocateBlocks off: a node without blocks may only borrow.
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {autoAllocateBlocks: false}\n").await;
    let got = ipam.auto_assign(&req("n2", "borrower", 1)).await.unwrap();
    assert!(ipam.affine_blocks("n2", true).await.unwrap().is_empty());
    assert!(ipam.affine_blocks("n1", true).await.unwrap().contains(&got.v4[0].trunc()));
}

/// A deleted pool's blocks (Calico's ReleasePoolAffinities): the empty one goes with its
/// affinity, the used one loses its affinity and goes with its last address; a stray affinity
/// record outside every pool goes too; pools still there are untouched; running it again
/// changes nothing; and a new pool over the same range claims fresh blocks of its own size.
async fn deleted_pools_release_their_blocks(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("old", "172.30.0.0/16", "  blockSize: 26")).await;
    apply(&ds, &pool("other", "172.31.0.0/16", "  blockSize: 26")).await;
    let ipam = IpamClient::new(ds.clone());
    let used = ipam.auto_assign(&req("n1", "pod-a", 1)).await.unwrap().v4[0].addr();
    let mut empty_req = req("n2", "pod-b", 1);
    empty_req.pools_v4 = vec!["old".into()];
    ipam.auto_assign(&empty_req).await.unwrap();
    ipam.release_by_handle("pod-b").await.unwrap();
    let mut kept_req = req("n3", "pod-c", 1);
    kept_req.pools_v4 = vec!["other".into()];
    let kept = ipam.auto_assign(&kept_req).await.unwrap().v4[0].trunc();
    // Another writer left an affinity with no block, in the old pool's range.
    ds.create("/calico/ipam/v2/host/n4/ipv4/block/172.30.9.0-26", br#"{"state":"confirmed","deleted":false}"#)
        .await
        .unwrap();
    let blocks = |v: Vec<String>| v.into_iter().filter(|k| k.contains("/assignment/")).collect::<Vec<_>>();
    assert_eq!(blocks(keys(&ds).await).len(), 3);

    let rs = ResourceStore::new(ds.clone());
    rs.delete(gingham_api::Kind::IPPool, None, "old", None).await.unwrap();
    let released = ipam.release_blocks_outside_pools().await.unwrap();
    let used_block = ipnet::IpNet::new(used, 26).unwrap().trunc();
    assert!(released.contains(&(used_block, false)), "{released:?}");
    assert_eq!(
        released.iter().filter(|(_, deleted)| *deleted).count(),
        2,
        "empty block and stray affinity: {released:?}"
    );
    let after = keys(&ds).await;
    assert_eq!(blocks(after.clone()).len(), 2, "the used block stays, unaffine, with the other pool's: {after:?}");
    assert!(
        !after.iter().any(|k| k.contains("/host/n1/") || k.contains("/host/n2/") || k.contains("/host/n4/")),
        "{after:?}"
    );
    assert!(after.iter().any(|k| k.contains("/host/n3/")), "the other pool keeps its affinity: {after:?}");
    let b = block(&ds, &format!("/calico/ipam/v2/assignment/ipv4/block/{}", used_block.to_string().replace('/', "-")))
        .await;
    assert_eq!(b.affinity, None);
    assert_eq!(
        ipam.holder(used).await.unwrap().map(|(h, _)| h),
        Some("pod-a".to_string()),
        "the pod keeps its address"
    );
    assert!(ipam.release_blocks_outside_pools().await.unwrap().is_empty(), "idempotent");
    assert!(ipam.affine_blocks("n3", true).await.unwrap().contains(&kept));

    // Its last address released: the block goes.
    assert_eq!(ipam.release_by_handle("pod-a").await.unwrap(), vec![used]);
    assert_eq!(blocks(keys(&ds).await).len(), 1, "{:?}", keys(&ds).await);

    // Recreated with /25 blocks: fresh blocks of that size.
    apply(&ds, &pool("old", "172.30.0.0/16", "  blockSize: 25")).await;
    let got = ipam.auto_assign(&req("n1", "pod-d", 1)).await.unwrap().v4[0];
    assert_eq!(ipam.affine_blocks("n1", true).await.unwrap(), vec![ipnet::IpNet::new(got.addr(), 25).unwrap().trunc()]);
}

/// IPAMConfiguration: the v3 resource is the truth, mirrored to Calico's `/calico/ipam/v2/config`
/// (its field names); without a v3 resource, what a Calico tool wrote there is honoured.
async fn ipam_configuration_is_mirrored(ds: Arc<dyn Datastore>) {
    let ipam = IpamClient::new(ds.clone());
    assert!(!ipam.mirror_config().await.unwrap(), "nothing to mirror");
    // A Calico tool's config alone.
    ds.create(
        "/calico/ipam/v2/config",
        br#"{"strict_affinity":true,"auto_allocate_blocks":true,"maxBlocksPerHost":4}"#,
    )
    .await
    .unwrap();
    let s = ipam.settings().await.unwrap();
    assert!(s.strict_affinity && s.max_blocks_per_host == 4, "{s:?}");
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: false, maxBlocksPerHost: 0}\n").await;
    assert!(!ipam.settings().await.unwrap().strict_affinity, "v3 wins");
    assert!(ipam.mirror_config().await.unwrap());
    let v: serde_json::Value =
        serde_json::from_slice(&ds.get("/calico/ipam/v2/config").await.unwrap().unwrap().value).unwrap();
    assert_eq!(v, serde_json::json!({"strict_affinity": false, "auto_allocate_blocks": true, "maxBlocksPerHost": 0}));
    assert!(!ipam.mirror_config().await.unwrap(), "unchanged: no write");
}

/// IPReservation: reserved addresses are never auto-assigned (not even by borrowing), while an
/// address asked for explicitly may be one, as in Calico; a reservation change is seen at once.
async fn reserved_addresses_are_not_handed_out(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("default-ipv4-ippool", "172.30.0.0/24", "  blockSize: 26")).await;
    apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPReservation\nmetadata: {name: r}\n\
         spec: {reservedCIDRs: [172.30.0.0/28, 172.30.0.64/27, 172.30.0.200, 172.30.0.128/26]}\n",
    )
    .await;
    let ipam = IpamClient::new(ds.clone());
    let reserved: Vec<ipnet::IpNet> = ["172.30.0.0/28", "172.30.0.64/27", "172.30.0.200/32", "172.30.0.128/26"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    let mut got = Vec::new();
    for i in 0..5 {
        got.extend(ipam.auto_assign(&req("n1", &format!("h{i}"), 20)).await.unwrap().v4);
    }
    // 256 - 16 - 32 - 64 - 1 = 143 addresses are free to hand out.
    let more = match ipam.auto_assign(&req("n1", "more", 100)).await {
        Err(IpamError::Exhausted { got, .. }) => got,
        other => panic!("the pool runs out: {other:?}"),
    };
    assert!(got.iter().all(|n| !reserved.iter().any(|r| r.contains(&n.addr()))), "{got:?}");
    assert_eq!(got.len() + more, 143, "every unreserved address, and no other");
    let other = ipam.auto_assign(&req("n2", "borrower", 200)).await;
    let borrowed = match other {
        Ok(a) => a.v4,
        Err(_) => vec![],
    };
    assert!(borrowed.iter().all(|n| !reserved.iter().any(|r| r.contains(&n.addr()))), "borrowing skips them too");
    // Explicitly: allowed.
    let attrs = [("node".to_string(), "n1".to_string())].into();
    ipam.assign_ip("172.30.0.3".parse().unwrap(), "explicit", &attrs, "n1", false).await.unwrap();
}

/// ipCooldownSeconds: a released address is not handed out again before its cooldown (here a
/// /30 block with one address cooling: the next pod gets another block's address); without a
/// cooldown the freed address is the next one out, as before.
async fn released_addresses_cool_down(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("default-ipv4-ippool", "172.30.0.0/29", "  blockSize: 30")).await;
    let ipam = IpamClient::new(ds.clone());
    let first = ipam.auto_assign(&req("n1", "a", 4)).await.unwrap().v4;
    ipam.release_by_handle("a").await.unwrap();
    // No cooldown: the block's freed addresses come back at once.
    let again = ipam.auto_assign(&req("n1", "b", 1)).await.unwrap().v4[0];
    assert!(first.contains(&again), "{again} is one of {first:?}");
    ipam.release_by_handle("b").await.unwrap();
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {ipCooldownSeconds: 60}\n").await;
    let c = ipam.auto_assign(&req("n1", "c", 1)).await.unwrap().v4[0];
    assert!(!first.iter().any(|n| n.addr() == c.addr()), "{c} was released moments ago: not reused");
    let blocks = keys(&ds).await.into_iter().filter(|k| k.contains("/block/") && k.contains("assignment")).count();
    assert_eq!(blocks, 2, "a second block was claimed instead");
}

/// Allocations decide from a cached configuration; what other writers change meanwhile — a pool
/// disabled, a new pool, a node relabelled out of a pool's nodeSelector — is seen by the next one.
async fn cached_configuration_follows_other_writers(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("first", "10.50.0.0/24", "")).await;
    let ipam = IpamClient::new(ds.clone());
    let v4 = |a: gingham_ipam::Assigned| a.v4[0].addr().to_string();
    assert!(v4(ipam.auto_assign(&req("n1", "a", 1)).await.unwrap()).starts_with("10.50.0."));
    // Another writer disables the pool and adds one: the block n1 owns has room, but is not used.
    apply(&ds, &pool("first", "10.50.0.0/24", "  disabled: true")).await;
    apply(&ds, &pool("second", "10.51.0.0/24", "")).await;
    assert!(v4(ipam.auto_assign(&req("n1", "b", 1)).await.unwrap()).starts_with("10.51.0."));
    // A pool for rack a only; n1 is in rack a, then is moved to rack b.
    apply(&ds, &pool("second", "10.51.0.0/24", "  disabled: true")).await;
    apply(&ds, &pool("rack-a", "10.52.0.0/24", "  nodeSelector: rack == 'a'")).await;
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1, labels: {rack: a}}\nspec: {}\n")
        .await;
    assert!(v4(ipam.auto_assign(&req("n1", "c", 1)).await.unwrap()).starts_with("10.52.0."));
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1, labels: {rack: b}}\nspec: {}\n")
        .await;
    let err = ipam.auto_assign(&req("n1", "d", 1)).await.unwrap_err();
    assert!(err.to_string().starts_with("no configured pools for node n1"), "{err}");
    // A pool added while a refusal was cached: the refusal is confirmed against a fresh read.
    apply(&ds, &pool("any", "10.53.0.0/24", "")).await;
    assert!(v4(ipam.auto_assign(&req("n1", "e", 1)).await.unwrap()).starts_with("10.53.0."));
    // An IPAMConfiguration that appears (under the guarded prefix) is followed too.
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {maxBlocksPerHost: 1}\n").await;
    let mut many = req("n1", "f", 300);
    many.pools_v4 = vec!["any".into()];
    let err = ipam.auto_assign(&many).await.unwrap_err();
    assert!(err.to_string().starts_with("block limit reached"), "{err}");
}

/// A block that names its node but lost its affinity record (a release cut short) is adopted
/// by the node's next claim in a new client (an agent start), not left beside a new block.
async fn orphaned_blocks_are_adopted(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("p", "172.31.0.0/16", "  blockSize: 26")).await;
    let ipam = IpamClient::new(ds.clone());
    let first = ipam.auto_assign(&req("node-1", "k8s-pod-network.a", 1)).await.unwrap().v4[0];
    let affinity = keys(&ds).await.into_iter().find(|k| k.starts_with("/calico/ipam/v2/host/node-1/")).unwrap();
    ds.delete(&affinity, None).await.unwrap();
    let restarted = IpamClient::new(ds.clone());
    let next = restarted.auto_assign(&req("node-1", "k8s-pod-network.b", 1)).await.unwrap().v4[0];
    assert_eq!(next.trunc(), first.trunc(), "the orphan is adopted, no new block claimed");
    let now = keys(&ds).await;
    assert!(now.contains(&affinity), "its affinity is back: {now:?}");
    assert_eq!(now.iter().filter(|k| k.contains("/assignment/")).count(), 1, "{now:?}");
}

macro_rules! both {
    ($($name:ident),*) => {
        mod embedded { $( #[tokio::test] async fn $name() { let (ds, _b) = super::open("embedded").await; super::$name(ds).await; } )* }
        mod etcd { $( #[tokio::test] async fn $name() { let (ds, _b) = super::open("etcd").await; super::$name(ds).await; } )* }
    };
}

both!(
    dual_stack_and_no_auto_blocks,
    assign_claims_and_layout,
    steady_state_is_one_write,
    borrowing_strict_affinity_and_limits,
    explicit_addresses_and_guards,
    selectors_and_reclaim,
    tunnel_addresses,
    check_finds_problems,
    deleted_pools_release_their_blocks,
    ipam_configuration_is_mirrored,
    reserved_addresses_are_not_handed_out,
    released_addresses_cool_down,
    cached_configuration_follows_other_writers,
    orphaned_blocks_are_adopted
);

/// Twenty releases at once on one block, from one client (the agent's 20-way DELs): every
/// address comes back. (A release that found the block taken by another task for its write
/// once took it for absent and released nothing.)
async fn concurrent_releases_free_everything(ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("default-ipv4-ippool", "172.30.0.0/24", "  blockSize: 26")).await;
    let ipam = Arc::new(IpamClient::new(ds.clone()));
    for round in 0..5 {
        let handles: Vec<String> = (0..20).map(|i| format!("k8s-pod-network.r{round}-{i}")).collect();
        for h in &handles {
            ipam.auto_assign(&req("node-1", h, 1)).await.unwrap();
        }
        let tasks: Vec<_> = handles
            .iter()
            .map(|h| {
                let (ipam, h) = (ipam.clone(), h.clone());
                tokio::spawn(async move { ipam.release_by_handle(&h).await.unwrap().len() })
            })
            .collect();
        let mut freed = 0;
        for t in tasks {
            freed += t.await.unwrap();
        }
        assert_eq!(freed, 20, "round {round}: every release frees its address");
        let blocks = ipam.all_blocks(true).await.unwrap();
        assert!(blocks.iter().all(|(b, _)| b.is_empty()), "round {round}: nothing left allocated");
    }
}

mod concurrent {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded() {
        let (ds, _b) = super::open("embedded").await;
        super::concurrent_releases_free_everything(ds).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn etcd() {
        let (ds, _b) = super::open("etcd").await;
        super::concurrent_releases_free_everything(ds).await;
    }
}

/// The same on the Kubernetes API (Calico's CRDs, one key at a time in Calico's KDD order): one
/// real kube-apiserver, emptied between the tests, with the Kubernetes Nodes the tests' Calico
/// Nodes are written into. Not run here: `steady_state_is_one_write` (a new handle is a write
/// of its own without transactions), `ipam_configuration_is_mirrored` (one IPAMConfig object
/// serves both here) and `check_finds_problems` (its fixture writes WorkloadEndpoints, which
/// this layout derives from Pods: not built yet).
mod kubernetes {
    use super::*;
    use gingham_store::kubernetes::{KubeConfig, KubeStore};
    use gingham_store::testing::kube::KubeApiServer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ipam_on_the_kubernetes_api() {
        let k = KubeApiServer::start().expect("kube-apiserver starts (scripts/kube-build.sh builds it)");
        let crds: Vec<serde_json::Value> = gingham_manifests::render(&Default::default())
            .into_iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .collect();
        k.apply(&gingham_manifests::to_yaml(&crds).unwrap());
        let plurals: Vec<String> = crds
            .iter()
            .map(|d| format!("{}.crd.projectcalico.org", d["spec"]["names"]["plural"].as_str().unwrap()))
            .collect();
        let tests: [(&str, fn(Arc<dyn Datastore>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);
            10] = [
            ("dual_stack_and_no_auto_blocks", |ds| Box::pin(dual_stack_and_no_auto_blocks(ds))),
            ("assign_claims_and_layout", |ds| Box::pin(assign_claims_and_layout(ds))),
            ("borrowing_strict_affinity_and_limits", |ds| Box::pin(borrowing_strict_affinity_and_limits(ds))),
            ("explicit_addresses_and_guards", |ds| Box::pin(explicit_addresses_and_guards(ds))),
            ("deleted_pools_release_their_blocks", |ds| Box::pin(deleted_pools_release_their_blocks(ds))),
            ("reserved_addresses_are_not_handed_out", |ds| Box::pin(reserved_addresses_are_not_handed_out(ds))),
            ("released_addresses_cool_down", |ds| Box::pin(released_addresses_cool_down(ds))),
            ("selectors_and_reclaim", |ds| Box::pin(selectors_and_reclaim(ds))),
            ("tunnel_addresses", |ds| Box::pin(tunnel_addresses(ds))),
            ("cached_configuration_follows_other_writers", |ds| {
                Box::pin(cached_configuration_follows_other_writers(ds))
            }),
        ];
        for (name, test) in tests {
            k.kubectl_ok(&["delete", &plurals.join(","), "--all", "--wait=false"]);
            k.kubectl_ok(&["delete", "nodes", "--all", "--wait=false"]);
            for node in ["a1", "a2", "b1", "n1", "node-1", "node-2"] {
                k.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n"));
            }
            let ds: Arc<dyn Datastore> =
                Arc::new(KubeStore::connect(&KubeConfig { kubeconfig: Some(k.kubeconfig.clone()) }).await.unwrap());
            eprintln!("kubernetes: {name}");
            test(ds).await;
        }
    }
}

// --- several processes at once -------------------------------------------------------------

const WORKER_ENV: &str = "GINGHAM_IPAM_WORKER";

/// The body of each worker process the concurrency tests start: allocate `n` addresses spread
/// over three nodes, release every fifth, and write "handle ip" for what is still held.
async fn worker(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let (id, n) = (parts[0], parts[1].parse::<usize>().unwrap());
    let ds: Arc<dyn Datastore> = match parts[2] {
        "embedded" => Arc::new(EmbeddedStore::open(parts[3]).unwrap()),
        _ => Arc::new(
            gingham_store::etcd::EtcdStore::connect(&gingham_store::etcd::EtcdConfig {
                endpoints: vec![parts[3].into()],
                ..Default::default()
            })
            .await
            .unwrap(),
        ),
    };
    let ipam = IpamClient::new(ds);
    let mut out = String::new();
    for i in 0..n {
        let handle = format!("w{id}-{i}");
        let node = ["node-1", "node-2", "node-3"][i % 3];
        let got = ipam.auto_assign(&req(node, &handle, 1)).await.unwrap();
        if i % 5 == 4 {
            assert_eq!(ipam.release_by_handle(&handle).await.unwrap(), vec![got.v4[0].addr()]);
        } else {
            out.push_str(&format!("{handle} {}\n", got.v4[0].addr()));
        }
    }
    std::fs::write(parts[4], out).unwrap();
}

/// Started as a separate process by the concurrency tests (with the worker variable set); run
/// directly, it checks the worker itself on a small embedded store.
#[tokio::test]
async fn worker_process() {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        return worker(&spec).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (ds, out) = (Arc::new(EmbeddedStore::open(&db).unwrap()) as Arc<dyn Datastore>, dir.path().join("out.txt"));
    apply(&ds, &pool("p", "10.70.0.0/24", "")).await;
    worker(&format!("0|15|embedded|{}|{}", db.display(), out.display())).await;
    assert_eq!(std::fs::read_to_string(out).unwrap().lines().count(), 12);
}

async fn many_processes(backend: &str, target: &str, ds: Arc<dyn Datastore>) {
    apply(&ds, &pool("default-ipv4-ippool", "10.60.0.0/16", "")).await;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let (procs, per) = (4, 500);
    let children: Vec<_> = (0..procs)
        .map(|p| {
            let out = dir.path().join(format!("w{p}.txt"));
            std::process::Command::new(&exe)
                .args(["worker_process", "--exact", "--test-threads=1"])
                .env(WORKER_ENV, format!("{p}|{per}|{backend}|{target}|{}", out.display()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a worker failed");
    }
    // No address twice, and every held address is exactly what IPAM records.
    let mut held: BTreeMap<IpAddr, String> = BTreeMap::new();
    for p in 0..procs {
        for line in std::fs::read_to_string(dir.path().join(format!("w{p}.txt"))).unwrap().lines() {
            let (h, ip) = line.split_once(' ').unwrap();
            assert!(held.insert(ip.parse().unwrap(), h.to_string()).is_none(), "{ip} handed out twice");
        }
    }
    assert_eq!(held.len(), procs * per * 4 / 5);
    let ipam = IpamClient::new(ds.clone());
    let mut recorded: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (b, _) in ipam.all_blocks(true).await.unwrap() {
        b.check().unwrap();
        assert!(b.affinity.as_deref().is_some_and(|a| a.starts_with("host:node-")));
        for ord in 0..b.size() as u32 {
            if let Some(h) = b.handle_of(ord) {
                recorded.insert(b.ip(ord), h.to_string());
                *counts.entry(h.to_string()).or_default().entry(b.cidr.to_string()).or_default() += 1;
            }
        }
    }
    assert_eq!(recorded, held, "IPAM's allocations are exactly the addresses the workers hold");
    let handles = ds.list("/calico/ipam/v2/handle/").await.unwrap();
    assert_eq!(handles.items.len(), held.len(), "one handle record per held address, none left over");
    for kv in handles.items {
        let h: IpamHandle = serde_json::from_slice(&kv.value).unwrap();
        let id = kv.key.trim_start_matches("/calico/ipam/v2/handle/");
        assert_eq!(Some(&h.block), counts.get(id), "handle {id}");
    }
    // Blocks are claimed only when a node's blocks are full: 1,600 addresses over 3 nodes need
    // 27 /26 blocks; processes racing to claim for the same node may each add one more.
    let claimed = ipam.all_blocks(true).await.unwrap().len();
    assert!((27..=27 + 3 * (procs - 1)).contains(&claimed), "{claimed} blocks claimed");
}

#[tokio::test]
async fn four_processes_share_one_etcd() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let server =
        EtcdServer::start_in(if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") })
            .unwrap();
    let ds: Arc<dyn Datastore> = Arc::new(server.connect().await.unwrap());
    many_processes("etcd", &server.config.endpoints[0], ds).await;
}

#[tokio::test]
async fn four_processes_share_one_embedded_store() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let ds: Arc<dyn Datastore> = Arc::new(EmbeddedStore::open(&path).unwrap());
    many_processes("embedded", path.to_str().unwrap(), ds).await;
}
