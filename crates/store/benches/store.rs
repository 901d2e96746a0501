//! Store latency and throughput, embedded beside etcd in one run:
//! `cargo bench -p gingham-store` (etcd-server must be installed; the test command installs it).
//! GINGHAM_BENCH_ROUNDS (9) rounds, the two stores alternating (which goes first swaps every
//! round, so the machine's drift hits both alike); ops/s as min/median/max of the rounds, the
//! latencies and the ratio from the medians. GINGHAM_BENCH_N: operations per round (2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_store::embedded::EmbeddedStore;
use gingham_store::testing::EtcdServer;
use gingham_store::{Datastore, Event};

#[path = "../../cli/benches/common/stats.rs"]
mod stats;

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
async fn run(ds: Arc<dyn Datastore>, second: Arc<dyn Datastore>, n: usize, round: usize) -> Vec<(&'static str, Stat)> {
    let mut out = Vec::new();
    out.push((
        "create",
        timed(n, |i| {
            let ds = ds.clone();
            async move {
                ds.create(&format!("/b/{round}/c/{i:06}"), VALUE).await.unwrap();
            }
        })
        .await,
    ));
    out.push((
        "get",
        timed(n, |i| {
            let ds = ds.clone();
            async move {
                ds.get(&format!("/b/{round}/c/{i:06}")).await.unwrap().unwrap();
            }
        })
        .await,
    ));
    let cas = format!("/b/{round}/cas");
    let mut rev = ds.create(&cas, VALUE).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        rev = ds.update(&cas, VALUE, rev).await.unwrap();
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
                    ds.create(&format!("/b/{round}/p/{w}/{i:06}"), VALUE).await.unwrap();
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

    // The 10k listed were written once, before the rounds (fill).
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
        let prefix = format!("/b/{round}/w/");
        let mut w = ds.watch(&prefix, ds.revision().await.unwrap() + 1).await.unwrap();
        let m = (n / 4).max(50);
        let mut lat = Vec::with_capacity(m);
        let start = Instant::now();
        for i in 0..m {
            let key = format!("{prefix}{label}/{i}");
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

/// 10,000 keys under /b/l/ for the list measurement, written by 8 concurrent writers.
async fn fill(ds: &Arc<dyn Datastore>) {
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
}

fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (n, rounds) = (env("GINGHAM_BENCH_N", 2000), env("GINGHAM_BENCH_ROUNDS", 9).max(1));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("bench.db");
        let embedded: Arc<dyn Datastore> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let embedded2: Arc<dyn Datastore> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let server = EtcdServer::start().expect("etcd-server must be installed");
        let etcd: Arc<dyn Datastore> = Arc::new(server.connect().await.unwrap());
        let etcd2: Arc<dyn Datastore> = Arc::new(server.connect().await.unwrap());
        fill(&embedded).await;
        fill(&etcd).await;
        // results[backend][round] = each operation's Stat, in run()'s order
        let mut results: [Vec<Vec<(&'static str, Stat)>>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for b in order {
                let r = match b {
                    0 => run(embedded.clone(), embedded2.clone(), n, round).await,
                    _ => run(etcd.clone(), etcd2.clone(), n, round).await,
                };
                results[b].push(r);
            }
        }

        println!(
            "store benchmark: n={n} per operation, {rounds} alternating rounds, 400-byte values, both stores' files under /tmp; load average {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
        );
        println!("embedded = SQLite WAL, synchronous=NORMAL (no fsync per commit); etcd = etcd 3.4 single member (fsync per commit)");
        println!("ops/s min/median/max over the rounds; p50/p99 the medians of the rounds'; ratio of the median ops/s\n");
        println!(
            "{:<30} {:>9} {:>9} {:>22} {:>9} {:>9} {:>20} {:>14}",
            "operation", "emb p50us", "emb p99us", "emb ops/s", "etcd p50", "etcd p99", "etcd ops/s", "ops/s emb/etcd"
        );
        let ops = results[0][0].len();
        for op in 0..ops {
            let name = results[0][0][op].0;
            let col = |b: usize, f: &dyn Fn(&Stat) -> f64| -> Vec<f64> { results[b].iter().map(|r| f(&r[op].1)).collect() };
            let (p50, p99, rate) = (
                |s: &Stat| s.p50.as_secs_f64() * 1e6,
                |s: &Stat| s.p99.as_secs_f64() * 1e6,
                |s: &Stat| s.ops_per_sec,
            );
            let (e_rate, x_rate) = (col(0, &rate), col(1, &rate));
            println!(
                "{:<30} {:>9.0} {:>9.0} {:>22} {:>9.0} {:>9.0} {:>20} {:>13.2}x",
                name,
                stats::median(col(0, &p50)),
                stats::median(col(0, &p99)),
                stats::min_med_max(&e_rate, 0),
                stats::median(col(1, &p50)),
                stats::median(col(1, &p99)),
                stats::min_med_max(&x_rate, 0),
                stats::median(e_rate.clone()) / stats::median(x_rate.clone())
            );
        }
    });
}
