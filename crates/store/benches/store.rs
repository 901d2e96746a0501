//! Store latency and throughput, embedded beside etcd in one run:
//! `cargo bench -p gingham-store` (etcd-server must be installed; the test command installs it).
//! Set GINGHAM_BENCH_N to change the operation count (default 2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_store::embedded::EmbeddedStore;
use gingham_store::testing::EtcdServer;
use gingham_store::{Datastore, Event};

struct Stat {
    p50: Duration,
    p99: Duration,
    ops_per_sec: f64,
}

fn stat(mut lat: Vec<Duration>, wall: Duration) -> Stat {
    lat.sort();
    let n = lat.len().max(1);
    Stat { p50: lat[n / 2], p99: lat[(n * 99 / 100).min(n - 1)], ops_per_sec: lat.len() as f64 / wall.as_secs_f64() }
}

async fn timed<F, Fut>(n: usize, mut op: F) -> Stat
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        op(i).await;
        lat.push(t.elapsed());
    }
    stat(lat, start.elapsed())
}

const VALUE: &[u8] = &[b'x'; 400]; // about the size of a stored IPPool

/// Every measurement for one backend; `second` is another handle on the same data (another
/// process's view) for the cross-handle watch measurement.
async fn run(ds: Arc<dyn Datastore>, second: Arc<dyn Datastore>, n: usize) -> Vec<(&'static str, Stat)> {
    let mut out = Vec::new();
    out.push((
        "create",
        timed(n, |i| {
            let ds = ds.clone();
            async move {
                ds.create(&format!("/b/c/{i:06}"), VALUE).await.unwrap();
            }
        })
        .await,
    ));
    out.push((
        "get",
        timed(n, |i| {
            let ds = ds.clone();
            async move {
                ds.get(&format!("/b/c/{i:06}")).await.unwrap().unwrap();
            }
        })
        .await,
    ));
    let mut rev = ds.create("/b/cas", VALUE).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        rev = ds.update("/b/cas", VALUE, rev).await.unwrap();
        lat.push(t.elapsed());
    }
    out.push(("update (compare-and-swap)", stat(lat, start.elapsed())));

    // 8 writers at once: what a burst of pod starts on several nodes looks like.
    let per = n / 8;
    let start = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let ds = ds.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    ds.create(&format!("/b/p/{w}/{i:06}"), VALUE).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    out.push(("create, 8 concurrent writers", stat(lat, start.elapsed())));

    // list of 10k: fill with 8 concurrent writers, then list repeatedly.
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let ds = ds.clone();
            tokio::spawn(async move {
                for i in (w..10_000).step_by(8) {
                    ds.create(&format!("/b/l/{i:06}"), VALUE).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut list = timed(20, |_| {
        let ds = ds.clone();
        async move {
            assert_eq!(ds.list("/b/l/").await.unwrap().items.len(), 10_000);
        }
    })
    .await;
    list.ops_per_sec *= 10_000.0; // report objects per second
    out.push(("list 10k (objects/s)", list));

    for (label, writer) in
        [("watch delivery, same handle", ds.clone()), ("watch delivery, other handle", second.clone())]
    {
        let mut w = ds.watch("/b/w/", 0).await.unwrap();
        let m = (n / 4).max(50);
        let mut lat = Vec::with_capacity(m);
        let start = Instant::now();
        for i in 0..m {
            let key = format!("/b/w/{label}/{i}");
            let t = Instant::now();
            writer.create(&key, VALUE).await.unwrap();
            loop {
                match w.next_timeout(Duration::from_secs(10)).await {
                    Some(Ok(Event::Put(kv))) if kv.key == key => break,
                    Some(Ok(_)) => {}
                    other => panic!("watch failed: {other:?}"),
                }
            }
            lat.push(t.elapsed());
        }
        out.push((label, stat(lat, start.elapsed())));
    }
    out
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    let n: usize = std::env::var("GINGHAM_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("bench.db");
        let embedded: Arc<dyn Datastore> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let embedded2: Arc<dyn Datastore> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let e = run(embedded, embedded2, n).await;

        let server = EtcdServer::start().expect("etcd-server must be installed");
        let etcd: Arc<dyn Datastore> = Arc::new(server.connect().await.unwrap());
        let etcd2: Arc<dyn Datastore> = Arc::new(server.connect().await.unwrap());
        let x = run(etcd, etcd2, n).await;

        println!("store benchmark: n={n} per operation, 400-byte values, both stores' files under /tmp; load average {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" "));
        println!("embedded = SQLite WAL, synchronous=NORMAL (no fsync per commit); etcd = etcd 3.4 single member (fsync per commit)\n");
        println!("{:<30} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12} {:>16}", "operation", "emb p50us", "emb p99us", "emb ops/s", "etcd p50us", "etcd p99us", "etcd ops/s", "ops/s emb/etcd");
        for ((name, a), (_, b)) in e.iter().zip(&x) {
            println!(
                "{:<30} {:>10} {:>10} {:>12.0} {:>10} {:>10} {:>12.0} {:>15.2}x",
                name, us(a.p50), us(a.p99), a.ops_per_sec, us(b.p50), us(b.p99), b.ops_per_sec, a.ops_per_sec / b.ops_per_sec
            );
        }
    });
}
