//! BGP feed benchmark: 100,000 IPv4 prefixes from an injector peer (UPDATEs encoded before
//! the clock starts, so the feed is never the bottleneck) into gingham's speaker and into
//! BIRD 2, each in a namespace of its own, in the same run: time until every prefix is in the
//! Loc-RIB and in the kernel's FIB, and memory per route.
//! `cargo bench -p gingham-bgp --bench feed` (root; bird2 installed by scripts/install-deps.sh).
//! GINGHAM_FEED_PREFIXES changes the count; GINGHAM_BENCH_ROUNDS (9) the rounds, the two
//! receivers alternating (which goes first swaps every round): min/median/max of the rounds,
//! ratios of medians.

use std::io::{Read as _, Write as _};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
#[path = "../../cli/benches/common/stats.rs"]
mod stats;

use gingham_bgp::fsm::Config;
use gingham_bgp::packet::{AsPathSegment, Attrs, Codec, Family, Message, Nlri, Open, SegmentKind, Update};
use gingham_bgp::tasks::{self, Command as Cmd, PeerConfig, SpeakerConfig};
use gingham_dataplane::routes::{BGP_PROTO, Dev, RouteManager, Source, Target};
use ipnet::IpNet;

const LIMIT: Duration = Duration::from_secs(300);

struct Ns {
    name: String,
}

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("gbf-{}-{tag}", std::process::id());
        let _ = gingham_kernel::netns::delete(&name);
        gingham_kernel::netns::add(&name).expect("creating a namespace (run as root)");
        Ns { name }
    }
    fn path(&self) -> std::path::PathBuf {
        gingham_kernel::netns::path(&self.name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = gingham_kernel::netns::delete(&self.name);
    }
}

/// The receiver's namespace: `far0` 10.254.0.2/24 towards the injector's 10.254.0.3 (in a
/// second namespace), so learned routes have a real gateway.
async fn wire(rx: &Ns, inj: &Ns) {
    let here = gingham_kernel::Netlink::in_namespace(&rx.path()).unwrap();
    let inj_file = std::fs::File::open(inj.path()).unwrap();
    here.add_veth("far0", "far1", &inj_file, 1500, None).await.unwrap();
    let i = here.link("far0").await.unwrap().unwrap().index;
    here.add_address(i, "10.254.0.2/24".parse().unwrap()).await.unwrap();
    here.set_up(i).await.unwrap();
    let lo = here.link("lo").await.unwrap().unwrap().index;
    here.set_up(lo).await.unwrap();
    let there = gingham_kernel::Netlink::in_namespace(&inj.path()).unwrap();
    let j = there.link("far1").await.unwrap().unwrap().index;
    there.add_address(j, "10.254.0.3/24".parse().unwrap()).await.unwrap();
    there.set_up(j).await.unwrap();
}

/// The feed, encoded: 200 /24s per UPDATE, AS paths of two, next hop the injector.
fn feed(n: usize) -> Vec<u8> {
    let codec = Codec { four_octet_as: true, ..Default::default() };
    let mut out = Vec::new();
    let prefixes: Vec<Nlri> = (0..n)
        .map(|i| Nlri::new(IpNet::new(IpAddr::V4(Ipv4Addr::from(0x1400_0000u32 + ((i as u32) << 8))), 24).unwrap()))
        .collect();
    for (k, chunk) in prefixes.chunks(200).enumerate() {
        let attrs = Attrs {
            as_path: vec![AsPathSegment { kind: SegmentKind::Sequence, asns: vec![65001, 65100 + (k % 50) as u32] }],
            next_hop: Some(Ipv4Addr::new(10, 254, 0, 3)),
            ..Default::default()
        };
        let u = Update { attrs: Some(attrs), nlri: chunk.to_vec(), ..Default::default() };
        out.extend(Message::Update(u).encode(&codec).unwrap());
    }
    out.extend(Message::Update(Update::end_of_rib(Family::Ipv4Unicast)).encode(&codec).unwrap());
    out
}

/// Connect from the injector's namespace, open the session (eBGP, AS 65001), send the feed.
/// Returns when the last byte is written; the connection stays open while `hold` lives.
fn inject(inj: &Ns, feed: Vec<u8>, started: std::sync::mpsc::Sender<Instant>) -> std::thread::JoinHandle<()> {
    let path = inj.path();
    std::thread::spawn(move || {
        gingham_kernel::in_netns(&path, move || {
            let target = SocketAddr::from(([10, 254, 0, 2], 179));
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut s = loop {
                match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => panic!("the receiver never listened: {e}"),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut c = Config::new(65001, 64512, Ipv4Addr::new(10, 254, 0, 3));
            c.add_path = gingham_bgp::packet::AddPathMode::Receive;
            c.graceful_restart = None;
            let open: Open = c.open();
            s.write_all(&Message::Open(open).encode(&Codec::default()).unwrap()).unwrap();
            // Their OPEN, then their KEEPALIVE (any order of what follows is fine).
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            let mut messages = 0;
            while messages < 2 {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "the receiver closed the session");
                got.extend_from_slice(&buf[..k]);
                while let Ok(Some(len)) = Message::frame_len(&got) {
                    got.drain(..len);
                    messages += 1;
                }
            }
            s.write_all(&Message::Keepalive.encode(&Codec::default()).unwrap()).unwrap();
            let _ = started.send(Instant::now());
            s.write_all(&feed).unwrap();
            // Keep answering nothing, holding the session while the receiver works.
            std::thread::sleep(Duration::from_secs(600));
        })
        .ok();
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Row {
    rib: Duration,
    fib: Duration,
    rss_delta_kib: u64,
}

/// gingham's speaker with the agent's route manager, in this process (memory: this process's
/// RSS before and after).
fn gingham(n: usize) -> Row {
    let rx = Ns::new("g");
    let inj = Ns::new("gi");
    let path = rx.path();
    let feed = feed(n);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(wire(&rx, &inj));
    let (tx, started) = std::sync::mpsc::channel();
    // The closure owns the injector's namespace and removes it when done.
    let row = gingham_kernel::in_netns(&path, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let nl = gingham_kernel::Netlink::current().unwrap();
            let far0 = nl.link("far0").await.unwrap().unwrap().index;
            let mut routes = RouteManager::new(nl, &[Source { protocol: BGP_PROTO, priority: 5 }]);
            routes.set_device(Dev::Underlay, Some(far0));
            // As the agent: its allocator settings, and a heap trim after every 20,000 routes
            // (gingham_agent's TRIM_AFTER_ROUTES).
            gingham_kernel::memory::keep_large_allocations_mapped();
            let mut trimmer = gingham_kernel::memory::HeapTrimmer::new(20_000);
            let before = rss_kib(std::process::id());
            let mut s = tasks::start(
                SpeakerConfig {
                    asn: 64512,
                    router_id: Ipv4Addr::new(10, 254, 0, 2),
                    cluster_id: None,
                    listen: Some(SocketAddr::from(([10, 254, 0, 2], 179))),
                    max_queued: tasks::MAX_QUEUED,
                },
                None,
            )
            .await
            .unwrap();
            let mut f = Config::new(64512, 65001, Ipv4Addr::new(10, 254, 0, 2));
            f.passive = true;
            s.commands
                .send(Cmd::SetPeers(vec![PeerConfig::new("Global_10_254_0_3", "10.254.0.3".parse().unwrap(), f)]))
                .unwrap();
            let injector = inject(&inj, feed, tx);
            let t0 = tokio::task::spawn_blocking(move || {
                started.recv_timeout(Duration::from_secs(60)).expect("the session came up")
            })
            .await
            .unwrap();
            let deadline = Instant::now() + LIMIT;
            // The Loc-RIB's count, asked every 5 ms as BIRD's is by birdc (the speaker does
            // not wait for the kernel, within the backlog it keeps).
            let commands = s.commands.clone();
            let rib_done = tokio::spawn(async move {
                loop {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let _ = commands.send(Cmd::Status(tx));
                    if rx.await.unwrap_or_default().iter().map(|p| p.received).sum::<usize>() >= n {
                        return t0.elapsed();
                    }
                    assert!(Instant::now() < deadline, "the Loc-RIB within the limit");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let mut learned = 0usize;
            while learned < n {
                let first = tokio::time::timeout_at(deadline.into(), s.fib.recv())
                    .await
                    .expect("the feed within the limit")
                    .expect("the speaker runs");
                // As the agent's model: take what has arrived, then program it in one go.
                let mut batches = vec![first];
                while let Ok(b) = s.fib.try_recv() {
                    batches.push(b);
                }
                let changes: Vec<_> = batches.into_iter().flatten().collect();
                let count = changes.len();
                for f in changes {
                    if let Some(gw) = f.next_hops.first() {
                        learned += 1;
                        routes.set(
                            BGP_PROTO,
                            f.prefix,
                            Some(Target::Via { gateway: *gw, also: Vec::new(), dev: Dev::Underlay, onlink: false }),
                        );
                    }
                }
                routes.apply().await.expect("programming routes");
                trimmer.changed(count);
            }
            let fib = t0.elapsed();
            let rib = rib_done.await.ok();
            let after = rss_kib(std::process::id());
            drop(injector);
            Row { rib: rib.unwrap_or(fib), fib, rss_delta_kib: after.saturating_sub(before) }
        })
    })
    .unwrap();
    row
}

/// BIRD 2 with an eBGP session to the injector and a kernel protocol exporting everything.
fn bird(n: usize) -> Row {
    let rx = Ns::new("b");
    let inj = Ns::new("bi");
    let feed = feed(n);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(wire(&rx, &inj));
    let bird = common::Bird::start(
        &rx.path(),
        "router id 10.254.0.2;\nprotocol device { }\nprotocol direct { ipv4; interface \"far0\"; }\n\
         protocol kernel { ipv4 { export all; }; }\n\
         protocol bgp injector { local 10.254.0.2 as 64512; neighbor 10.254.0.3 as 65001; passive on;\n\
           ipv4 { import all; export none; }; }\n",
    );
    let sock = bird.socket.clone();
    let before = rss_kib(bird.pid());
    let (tx, started) = std::sync::mpsc::channel();
    let injector = inject(&inj, feed, tx);
    let t0 = started.recv_timeout(Duration::from_secs(60)).expect("BIRD's session came up");
    let count = |table: &str| -> usize {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&sock)
            .args(["show", "route", "count", "table", table])
            .output()
            .unwrap();
        // "N of M routes for K networks in table master4"
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("routes for"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let mut rib: Option<Duration> = None;
    let deadline = Instant::now() + LIMIT;
    while rib.is_none() {
        if count("master4") >= n {
            rib = Some(t0.elapsed());
        }
        assert!(Instant::now() < deadline, "BIRD did not take the feed within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The kernel's table, from inside the namespace.
    let kernel = |ns: &Ns| -> usize {
        let out = Command::new("ip").args(["-n", &ns.name, "-4", "route", "show", "proto", "bird"]).output().unwrap();
        out.stdout.iter().filter(|b| **b == b'\n').count()
    };
    let fib = loop {
        if kernel(&rx) >= n {
            break t0.elapsed();
        }
        assert!(Instant::now() < deadline, "BIRD did not program the kernel within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let after = rss_kib(bird.pid());
    drop(bird);
    drop(injector);
    Row { rib: rib.unwrap_or(fib), fib, rss_delta_kib: after.saturating_sub(before) }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("GINGHAM_FEED_PREFIXES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let rounds: usize = std::env::var("GINGHAM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let (mut gs, mut bs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            gs.push(gingham(n));
            bs.push(bird(n));
        } else {
            bs.push(bird(n));
            gs.push(gingham(n));
        }
    }
    let (median, spread) = (stats::median, |v: &[f64]| stats::min_med_max(v, 2));
    let col = |rows: &[Row], f: &dyn Fn(&Row) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let rib = |r: &Row| r.rib.as_secs_f64();
    let fib = |r: &Row| r.fib.as_secs_f64();
    let rss = |r: &Row| r.rss_delta_kib as f64;
    println!(
        "\nBGP feed benchmark: {n} IPv4 prefixes from an injector peer (pre-encoded UPDATEs, 200 prefixes each) over a veth, {rounds} alternating rounds; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "{:<10} {:>18} {:>18} {:>14} {:>14} {:>12}",
        "receiver", "Loc-RIB s", "FIB s", "FIB routes/s", "RSS delta MiB", "bytes/route"
    );
    // Memory from each receiver's first round: later in-process rounds reuse what the
    // allocator kept from the one before, and would show less than a fresh speaker needs.
    for (name, rows) in [("gingham", &gs), ("BIRD 2", &bs)] {
        let (f, m) = (median(col(rows, &fib)), rss(&rows[0]));
        println!(
            "{:<10} {:>18} {:>18} {:>14.0} {:>14.1} {:>12.0}",
            name,
            spread(&col(rows, &rib)),
            spread(&col(rows, &fib)),
            n as f64 / f,
            m / 1024.0,
            m * 1024.0 / n as f64
        );
    }
    println!(
        "gingham/BIRD (medians): Loc-RIB time {:.2}x, FIB time {:.2}x, bytes per route {:.2}x (below 1 is better); times min/median/max, memory from the first round",
        median(col(&gs, &rib)) / median(col(&bs, &rib)),
        median(col(&gs, &fib)) / median(col(&bs, &fib)),
        rss(&gs[0]) / rss(&bs[0]).max(1.0)
    );
}
