//! Allocation throughput and latency, embedded store beside a real etcd in one run:
//! `cargo bench -p gingham-ipam`. GINGHAM_BENCH_N sets allocations per run (default 2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_api::parse_documents;
use gingham_ipam::{AutoAssign, IpamClient};
use gingham_store::embedded::EmbeddedStore;
use gingham_store::testing::{CountingStore, EtcdServer};
use gingham_store::{Datastore, ResourceStore};

struct Row {
    allocs_per_sec: f64,
    p50: Duration,
    p99: Duration,
    writes_per_alloc: f64,
    blocks: usize,
}

fn req(node: &str, handle: String) -> AutoAssign {
    AutoAssign {
        num_v4: 1,
        attrs: [
            ("node".to_string(), node.to_string()),
            ("namespace".to_string(), "bench".to_string()),
            ("pod".to_string(), handle.clone()),
        ]
        .into(),
        handle,
        node: node.to_string(),
        ..Default::default()
    }
}

async fn setup(ds: &Arc<dyn Datastore>) {
    let rs = ResourceStore::new(ds.clone());
    let yaml = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.128.0.0/12, blockSize: 26}\n";
    for d in parse_documents("bench", yaml).unwrap() {
        rs.apply(d.object).await.unwrap();
    }
}

/// `writers` tasks, each a node of its own with its own client, allocating `n / writers` each.
async fn run(ds: Arc<dyn Datastore>, n: usize, writers: usize) -> Row {
    let counting = Arc::new(CountingStore::new(ds));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let ds: Arc<dyn Datastore> = counting.clone();
            tokio::spawn(async move {
                let ipam = IpamClient::new(ds);
                let node = format!("bench-node-{writers}-{w}");
                let mut lat = Vec::new();
                for i in 0..n / writers {
                    let t = Instant::now();
                    ipam.auto_assign(&req(&node, format!("k8s-pod-network.{writers}-{w}-{i}"))).await.unwrap();
                    lat.push(t.elapsed());
                }
                (lat, ipam.affine_blocks(&node, true).await.unwrap().len())
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut blocks = 0;
    for t in tasks {
        let (l, b) = t.await.unwrap();
        lat.extend(l);
        blocks += b;
    }
    let wall = start.elapsed();
    lat.sort();
    let total = lat.len();
    // Writes beyond one per allocation are block claims (one each).
    Row {
        allocs_per_sec: total as f64 / wall.as_secs_f64(),
        p50: lat[total / 2],
        p99: lat[(total * 99 / 100).min(total - 1)],
        writes_per_alloc: counting.writes() as f64 / total as f64,
        blocks,
    }
}

fn main() {
    let n: usize = std::env::var("GINGHAM_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let embedded: Arc<dyn Datastore> = Arc::new(EmbeddedStore::open(dir.path().join("ipam.db")).unwrap());
        setup(&embedded).await;
        let e1 = run(embedded.clone(), n, 1).await;
        let e8 = run(embedded, n, 8).await;
        let server = EtcdServer::start().expect("etcd-server must be installed");
        let etcd: Arc<dyn Datastore> = Arc::new(server.connect().await.unwrap());
        setup(&etcd).await;
        let x1 = run(etcd.clone(), n, 1).await;
        let x8 = run(etcd, n, 8).await;
        println!(
            "IPAM benchmark: {n} single-address allocations per run, /26 blocks, files under /tmp; load average {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split(' ')
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("8-way = 8 nodes allocating at once, each with its own client (as 8 agents would)\n");
        println!(
            "{:<10} {:<12} {:>10} {:>9} {:>9} {:>13} {:>7} {:>8} {:>6}",
            "store", "mode", "allocs/s", "p50 us", "p99 us", "writes/alloc", "blocks", "target", "met"
        );
        for (store, mode, r, target) in [
            ("embedded", "sequential", &e1, 5000.0),
            ("embedded", "8-way", &e8, 5000.0),
            ("etcd", "sequential", &x1, 500.0),
            ("etcd", "8-way", &x8, 500.0),
        ] {
            println!(
                "{:<10} {:<12} {:>10.0} {:>9.0} {:>9.0} {:>13.3} {:>7} {:>8} {:>6}",
                store,
                mode,
                r.allocs_per_sec,
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                r.writes_per_alloc,
                r.blocks,
                format!(">={target}"),
                if r.allocs_per_sec >= target { "yes" } else { "NO" }
            );
        }
        println!(
            "\nratio embedded/etcd allocs/s: sequential {:.1}x, 8-way {:.1}x",
            e1.allocs_per_sec / x1.allocs_per_sec,
            e8.allocs_per_sec / x8.allocs_per_sec
        );
    });
}
