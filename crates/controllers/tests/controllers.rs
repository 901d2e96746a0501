//! The controllers on both backends (the embedded store and a real etcd): a node deleted with
//! live pods, leak GC with a short grace period (and an endpoint write in flight), dry runs,
//! empty-block reclaim, and two instances racing for the lease.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gingham_api::Kind;
use gingham_controllers::lease::Lease;
use gingham_controllers::{Controllers, Settings, cleanup_node};
use gingham_ipam::tunnel::TunnelKind;
use gingham_ipam::{AutoAssign, IpamClient};
use gingham_store::testing::{Backend, apply_yaml, open_backend};
use gingham_store::{Datastore, ResourceStore};

async fn open(kind: &str) -> (Arc<dyn Datastore>, Backend) {
    open_backend(kind).await
}

async fn apply(ds: &Arc<dyn Datastore>, yaml: &str) {
    apply_yaml(ds, yaml).await
}

async fn setup(ds: &Arc<dyn Datastore>) {
    apply(
        ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 172.30.0.0/16, blockSize: 26, vxlanMode: Always}\n",
    )
    .await;
    for n in ["n1", "n2"] {
        apply(ds, &format!("apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: {n}}}\nspec: {{}}\n"))
            .await;
    }
}

/// A pod on `node`: its address (from `pool` when given) and, with `wep`, its endpoint.
async fn pod(ds: &Arc<dyn Datastore>, ipam: &IpamClient, node: &str, name: &str, wep: bool) -> IpAddr {
    let handle = format!("k8s-pod-network.c-{name}");
    let req = AutoAssign {
        num_v4: 1,
        handle: handle.clone(),
        node: node.into(),
        attrs: [
            ("node".to_string(), node.to_string()),
            ("pod".to_string(), name.to_string()),
            ("namespace".to_string(), "default".to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let ip = ipam.auto_assign(&req).await.unwrap().v4[0].addr();
    if wep {
        endpoint(ds, node, name, ip).await;
    }
    ip
}

async fn endpoint(ds: &Arc<dyn Datastore>, node: &str, name: &str, ip: IpAddr) {
    apply(
        ds,
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: {node}-k8s-{name}-eth0, namespace: default}}\n\
             spec: {{node: {node}, orchestrator: k8s, workload: '', pod: {name}, endpoint: eth0, interfaceName: cali{name}, \
             containerID: c-{name}, ipNetworks: ['{ip}/32']}}\n"
        ),
    )
    .await;
}

async fn held(ipam: &IpamClient, ip: IpAddr) -> Option<String> {
    ipam.holder(ip).await.unwrap().map(|(h, _)| h)
}

async fn keys(ds: &Arc<dyn Datastore>, prefix: &str) -> Vec<String> {
    ds.list(prefix).await.unwrap().items.into_iter().map(|kv| kv.key).collect()
}

fn fast() -> Settings {
    Settings {
        leak_grace: Some(Duration::from_millis(300)),
        block_grace: Duration::from_millis(300),
        period: Duration::from_millis(100),
        dry_run: false,
    }
}

/// A node deleted with live pods: its endpoints, pods' and tunnel addresses and affinities go;
/// an address another node's pod borrowed from its block stays that pod's (the block stays,
/// without an owner, until it empties).
async fn node_deleted_with_live_pods(ds: Arc<dyn Datastore>) {
    setup(&ds).await;
    let ipam = IpamClient::new(ds.clone());
    let a = pod(&ds, &ipam, "n1", "a", true).await;
    let tunnel = ipam.ensure_tunnel_address("n1", TunnelKind::Vxlan).await.unwrap().unwrap();
    // n2's pod with an address in n1's block (borrowed, as when n2 had no room).
    let borrowed: IpAddr = match a {
        IpAddr::V4(v) => IpAddr::V4((u32::from(v) + 10).into()),
        _ => unreachable!(),
    };
    let attrs = [
        ("node".to_string(), "n2".to_string()),
        ("pod".to_string(), "b".to_string()),
        ("namespace".to_string(), "default".to_string()),
    ]
    .into();
    ipam.assign_ip(borrowed, "k8s-pod-network.c-b", &attrs, "n2", false).await.unwrap();
    endpoint(&ds, "n2", "b", borrowed).await;
    let c = pod(&ds, &ipam, "n2", "c", true).await;

    let rs = ResourceStore::new(ds.clone());
    rs.delete(Kind::Node, None, "n1", None).await.unwrap();
    let mut ctl = Controllers::default();
    let r = ctl.pass(&ipam, &fast()).await.unwrap();
    assert_eq!(r.nodes_cleaned, vec!["n1".to_string()]);
    assert_eq!(held(&ipam, a).await, None, "n1's pod address released");
    assert_eq!(held(&ipam, tunnel).await, None, "n1's tunnel address released");
    assert!(
        rs.list(Kind::WorkloadEndpoint, Some("default"))
            .await
            .unwrap()
            .iter()
            .all(|w| !w.metadata.name.starts_with("n1-"))
    );
    assert!(keys(&ds, "/calico/ipam/v2/host/n1/").await.is_empty(), "no affinity left");
    assert_eq!(
        held(&ipam, borrowed).await.as_deref(),
        Some("k8s-pod-network.c-b"),
        "n2's borrowed address is its pod's"
    );
    assert_eq!(held(&ipam, c).await.as_deref(), Some("k8s-pod-network.c-c"));
    let check = gingham_ipam::check::check(&ipam).await.unwrap();
    assert!(check.problems.iter().all(|p| !p.contains("n1")), "{:?}", check.problems);
    // Nothing more to do; and no address of n1's block is handed out while b lives there.
    assert_eq!(ctl.pass(&ipam, &fast()).await.unwrap().nodes_cleaned, Vec::<String>::new());
    for i in 0..5 {
        let ip = pod(&ds, &ipam, "n2", &format!("new{i}"), true).await;
        assert_ne!(ip, borrowed);
    }
    // b goes: its block goes with its last address.
    ipam.release_by_handle("k8s-pod-network.c-b").await.unwrap();
    let blocks = keys(&ds, "/calico/ipam/v2/assignment/").await;
    assert_eq!(blocks.len(), 1, "only n2's own block: {blocks:?}");
    // The CLI's path (cleanup_node) is idempotent.
    assert_eq!(cleanup_node(&ipam, "n1").await.unwrap(), Default::default());
}

/// Leak GC: an address nothing uses is released once it has looked leaked for the grace
/// period; one whose endpoint is written meanwhile (an ADD in flight) is not; a dry run only
/// reports.
async fn leak_gc_with_a_grace_period(ds: Arc<dyn Datastore>) {
    setup(&ds).await;
    let ipam = IpamClient::new(ds.clone());
    let live = pod(&ds, &ipam, "n1", "live", true).await;
    let leaked = pod(&ds, &ipam, "n1", "leaked", false).await;
    let in_flight = pod(&ds, &ipam, "n2", "inflight", false).await;
    // Held for another plugin (gingham-ipam under ptp): no endpoint will ever record it.
    let mut other_plugin = AutoAssign { num_v4: 1, handle: "ptpnet.x".into(), node: "n2".into(), ..Default::default() };
    other_plugin.attrs = [("node".to_string(), "n2".to_string()), ("endpoint".to_string(), "none".to_string())].into();
    let ipam_only = ipam.auto_assign(&other_plugin).await.unwrap().v4[0].addr();
    let mut ctl = Controllers::default();

    let dry = Settings { dry_run: true, leak_grace: Some(Duration::ZERO), ..fast() };
    let r = Controllers::default().pass(&ipam, &dry).await.unwrap();
    assert_eq!(r.leak_candidates, 2);
    assert_eq!(r.released_handles.len(), 2, "a dry run reports: {r:?}");
    assert!(held(&ipam, leaked).await.is_some() && held(&ipam, in_flight).await.is_some(), "and releases nothing");

    let r = ctl.pass(&ipam, &fast()).await.unwrap();
    assert_eq!((r.leak_candidates, r.released_handles.len()), (2, 0), "first seen: not yet");
    endpoint(&ds, "n2", "inflight", in_flight).await; // the ADD finishes its endpoint write
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = ctl.pass(&ipam, &fast()).await.unwrap();
    assert_eq!(r.released_handles, vec![("k8s-pod-network.c-leaked".to_string(), vec![leaked])]);
    assert_eq!(held(&ipam, leaked).await, None);
    assert!(held(&ipam, in_flight).await.is_some(), "the endpoint written within the grace period keeps it");
    assert!(held(&ipam, live).await.is_some());
    assert!(held(&ipam, ipam_only).await.is_some(), "another plugin's address is never judged by endpoints");
    // A pool deleted behind the CLI's back (another writer): the next pass releases its blocks.
    ResourceStore::new(ds.clone()).delete(Kind::IPPool, None, "p", None).await.unwrap();
    let r = ctl.pass(&ipam, &Settings { leak_grace: None, ..fast() }).await.unwrap();
    assert!(!r.pool_blocks_released.is_empty(), "{r:?}");
    assert!(keys(&ds, "/calico/ipam/v2/host/").await.is_empty(), "no block keeps an owner outside every pool");
    apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 172.30.0.0/16, blockSize: 26}\n").await;
    // GC off.
    let _ = pod(&ds, &ipam, "n1", "leaked2", false).await;
    let off = Settings { leak_grace: None, ..fast() };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(ctl.pass(&ipam, &off).await.unwrap().released_handles.is_empty());
}

/// Empty blocks: reclaimed once seen empty a grace period apart; every node keeps one.
async fn empty_blocks_are_reclaimed_but_one_stays(ds: Arc<dyn Datastore>) {
    setup(&ds).await;
    let ipam = IpamClient::new(ds.clone());
    // n1 fills one block (64) and spills into a second; then its pods go.
    let mut handles = Vec::new();
    for i in 0..65 {
        pod(&ds, &ipam, "n1", &format!("p{i}"), false).await;
        handles.push(format!("k8s-pod-network.c-p{i}"));
    }
    assert_eq!(keys(&ds, "/calico/ipam/v2/host/n1/").await.len(), 2);
    for h in &handles {
        ipam.release_by_handle(h).await.unwrap();
    }
    let mut ctl = Controllers::default();
    let quiet = Settings { leak_grace: None, ..fast() };
    assert!(ctl.pass(&ipam, &quiet).await.unwrap().reclaimed_blocks.is_empty(), "seen empty once");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ctl.pass(&ipam, &quiet).await.unwrap().reclaimed_blocks.len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(ctl.pass(&ipam, &quiet).await.unwrap().reclaimed_blocks.is_empty(), "the node keeps one");
    assert_eq!(keys(&ds, "/calico/ipam/v2/host/n1/").await.len(), 1);
}

/// Two instances race for the lease: exactly one leads; the other takes over only after the
/// leader stops renewing for a whole lease duration.
async fn two_controllers_race_for_the_lease(ds: Arc<dyn Datastore>) {
    let d = Duration::from_millis(400);
    let (mut a, mut b) = (Lease::new("a", d), Lease::new("b", d));
    let (ra, rb) = tokio::join!(a.try_hold(ds.as_ref()), b.try_hold(ds.as_ref()));
    assert!(ra.unwrap() ^ rb.unwrap(), "exactly one leads");
    let (leader, standby) = if a.is_held() { (&mut a, &mut b) } else { (&mut b, &mut a) };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(leader.try_hold(ds.as_ref()).await.unwrap(), "renewed");
        assert!(!standby.try_hold(ds.as_ref()).await.unwrap(), "a renewed lease is not taken");
    }
    // The leader stops renewing: the standby waits a whole duration, then leads.
    assert!(!standby.try_hold(ds.as_ref()).await.unwrap());
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(standby.try_hold(ds.as_ref()).await.unwrap(), "taken over after expiry");
    assert!(!leader.try_hold(ds.as_ref()).await.unwrap(), "the old leader sees it lost");
    // A clean stop hands it over at once.
    standby.release(ds.as_ref()).await;
    assert!(leader.try_hold(ds.as_ref()).await.unwrap());
}

macro_rules! both {
    ($($name:ident),*) => {
        mod embedded { $( #[tokio::test] async fn $name() { let (ds, _b) = super::open("embedded").await; super::$name(ds).await; } )* }
        mod etcd { $( #[tokio::test] async fn $name() { let (ds, _b) = super::open("etcd").await; super::$name(ds).await; } )* }
    };
}

both!(
    node_deleted_with_live_pods,
    leak_gc_with_a_grace_period,
    empty_blocks_are_reclaimed_but_one_stays,
    two_controllers_race_for_the_lease
);
