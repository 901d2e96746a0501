//! A route reflector with 500 client sessions (loopback addresses of one namespace), each
//! client advertising one block: gingham's speaker beside BIRD 2, same run. Reported: time
//! until every client holds every other client's block, the reflector's RSS growth and CPU.
//! The clients are small speakers of this benchmark, run by a second copy of this program in
//! the namespace (so the reflector's figures are its own).
//! `cargo bench -p gingham-bgp --bench reflector` (root); GINGHAM_RR_CLIENTS changes the count.

use std::collections::HashSet;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
#[path = "../../cli/benches/common/stats.rs"]
mod stats;

use gingham_bgp::fsm::Config;
use gingham_bgp::packet::{Attrs, Capability, Codec, Family, Message, Nlri, Open, Update};
use gingham_bgp::tasks::{self, Command as Cmd, PeerConfig, SpeakerConfig};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(240);
const RR: [u8; 4] = [10, 199, 0, 1];

fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn block(i: usize) -> IpNet {
    IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 100 + (i / 256) as u8, (i % 256) as u8, 0)), 24).unwrap()
}

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = gingham_kernel::netns::delete(&self.0);
    }
}

fn namespace(tag: &str, n: usize) -> (Ns, std::path::PathBuf) {
    let ns = Ns(format!("gbr-{}-{tag}", std::process::id()));
    let path = gingham_kernel::netns::add(&ns.0).expect("creating a namespace (run as root)");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nl = gingham_kernel::Netlink::in_namespace(&path).unwrap();
        let lo = nl.link("lo").await.unwrap().unwrap().index;
        nl.set_up(lo).await.unwrap();
        nl.add_address(lo, IpNet::new(IpAddr::V4(RR.into()), 32).unwrap()).await.unwrap();
        for i in 0..n {
            nl.add_address(lo, IpNet::new(IpAddr::V4(client_ip(i)), 32).unwrap()).await.unwrap();
        }
    });
    (ns, path)
}

/// One client: connect, advertise its block, print `done` once it holds every other block,
/// then keep the session.
async fn client(i: usize, n: usize) {
    let target = SocketAddr::from((RR, 179));
    let mut s = loop {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(IpAddr::V4(client_ip(i)), 0)).unwrap();
        match sock.connect(target).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let codec = Codec { four_octet_as: true, ..Default::default() };
    let caps = vec![Capability::Multiprotocol(Family::Ipv4Unicast), Capability::RouteRefresh];
    s.write_all(&Message::Open(Open::new(64512, 240, client_ip(i), caps)).encode(&codec).unwrap()).await.unwrap();
    let attrs = Attrs { next_hop: Some(client_ip(i)), local_pref: Some(100), ..Default::default() };
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 65536]);
    let mut seen: HashSet<IpNet> = HashSet::new();
    let (mut sent, mut done) = (false, false);
    loop {
        while let Ok(Some(len)) = Message::frame_len(&buf) {
            let m = Message::decode(&buf[..len], &codec);
            buf.drain(..len);
            match m {
                Ok(Message::Open(_)) => s.write_all(&Message::Keepalive.encode(&codec).unwrap()).await.unwrap(),
                Ok(Message::Keepalive) if !sent => {
                    let u =
                        Update { attrs: Some(attrs.clone()), nlri: vec![Nlri::new(block(i))], ..Default::default() };
                    s.write_all(&Message::Update(u).encode(&codec).unwrap()).await.unwrap();
                    sent = true;
                }
                Ok(Message::Update(u)) => {
                    seen.extend(u.announced().map(|(n, _)| n.prefix));
                }
                Ok(Message::Notification(e)) => panic!("client {i}: the reflector said {e}"),
                _ => {}
            }
        }
        if !done && seen.len() >= n - 1 {
            done = true;
            println!("done {i}");
        }
        // Keep the session alive however long the reflector takes.
        let k = tokio::select! {
            r = s.read(&mut chunk) => r.unwrap_or(0),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                s.write_all(&Message::Keepalive.encode(&codec).unwrap()).await.unwrap();
                continue;
            }
        };
        if k == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn run_clients(n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(client(i, n))).collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// The clients' process, stopped however the measurement ends.
struct Clients(Child);
impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the clients in the namespace and wait until all of them are done.
fn clients(ns_path: &std::path::Path, n: usize) -> (Result<Duration, usize>, Clients) {
    let f = std::fs::File::open(ns_path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = gingham_kernel::netns::command(&f, exe)
        .unwrap()
        .args(["--clients", &n.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let out = child.stdout.take().unwrap();
    let child = Clients(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            if l.is_ok_and(|l| l.starts_with("done")) && tx.send(()).is_err() {
                return;
            }
        }
    });
    for k in 0..n {
        let left = LIMIT.saturating_sub(start.elapsed());
        if rx.recv_timeout(left).is_err() {
            return (Err(k), child);
        }
    }
    (Ok(start.elapsed()), child)
}

fn stat(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<u64> = s.rsplit(')').next().unwrap_or("").split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

struct Row {
    /// Err: how many clients had converged when the time limit struck.
    converge: Result<Duration, usize>,
    rss_kib: u64,
    cpu_s: f64,
}

fn gingham(n: usize) -> Row {
    let (_ns, path) = namespace("g", n);
    let p2 = path.clone();
    gingham_kernel::in_netns(&path, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let me = std::process::id();
            let (t0, r0) = stat(me);
            let s = tasks::start(
                SpeakerConfig {
                    asn: 64512,
                    router_id: RR.into(),
                    cluster_id: Some(Ipv4Addr::new(1, 1, 1, 1)),
                    listen: Some(SocketAddr::from((RR, 179))),
                    max_queued: tasks::MAX_QUEUED,
                },
                None,
            )
            .await
            .unwrap();
            let peers = (0..n)
                .map(|i| {
                    let mut f = Config::new(64512, 64512, RR.into());
                    f.passive = true;
                    f.add_path = gingham_bgp::packet::AddPathMode::Receive;
                    PeerConfig { rr_client: true, ..PeerConfig::new(format!("Node_{i}"), IpAddr::V4(client_ip(i)), f) }
                })
                .collect();
            s.commands.send(Cmd::SetPeers(peers)).unwrap();
            let path = p2.clone();
            let (converge, clients) = tokio::task::spawn_blocking(move || clients(&path, n)).await.unwrap();
            let (t1, r1) = stat(me);
            drop(clients);
            Row { converge, rss_kib: r1.saturating_sub(r0), cpu_s: (t1 - t0) as f64 / 100.0 }
        })
    })
    .unwrap()
}

fn bird(n: usize) -> Row {
    let (_ns, path) = namespace("b", n);
    let mut c = String::from(
        "router id 10.199.0.1;\nprotocol device { }\nprotocol direct { ipv4; interface \"lo\"; }\n\
         template bgp rr_client_tpl { local 10.199.0.1 as 64512; rr client; rr cluster id 1.1.1.1; passive on; multihop;\n\
           strict bind on; error wait time 1, 5; ipv4 { import all; export all; }; }\n",
    );
    for i in 0..n {
        c.push_str(&format!("protocol bgp c{i} from rr_client_tpl {{ neighbor {} as 64512; }}\n", client_ip(i)));
    }
    let bird = common::Bird::start(&path, &c);
    let (t0, r0) = stat(bird.pid());
    let (converge, clients) = clients(&path, n);
    let (t1, r1) = stat(bird.pid());
    drop(clients);
    drop(bird);
    Row { converge, rss_kib: r1.saturating_sub(r0), cpu_s: (t1 - t0) as f64 / 100.0 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--clients") {
        run_clients(args[i + 1].parse().unwrap());
        return;
    }
    let n: usize = std::env::var("GINGHAM_RR_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let rounds: usize = std::env::var("GINGHAM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let (mut gs, mut bs) = (Vec::new(), Vec::new());
    // Alternating, who goes first swapping each round. A reflector that does not converge runs
    // no more rounds (its row says so): BIRD on this machine often does not within the limit,
    // and nine such waits would not fit the bench's time.
    for round in 0..rounds {
        for g in if round % 2 == 0 { [true, false] } else { [false, true] } {
            let failed = |rows: &[Row]| rows.iter().any(|r| r.converge.is_err());
            match g {
                true if !failed(&gs) => gs.push(gingham(n)),
                false if !failed(&bs) => bs.push(bird(n)),
                _ => {}
            }
        }
    }
    let (median, spread) = (stats::median, |v: &[f64]| stats::min_med_max(v, 2));
    println!(
        "\nRoute reflector: {n} client sessions, one block each, until every client has every other block ({} routes delivered), alternating rounds (gingham+BIRD) {}+{}; load average {}",
        n * (n - 1),
        gs.len(),
        bs.len(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "min/median/max of the rounds; memory from each reflector's first round (later in-process rounds reuse freed memory)"
    );
    println!("{:<10} {:>20} {:>14} {:>20}", "reflector", "converge s", "RSS delta MiB", "CPU s");
    let converged = |rows: &[Row]| -> Result<Vec<f64>, String> {
        rows.iter()
            .map(|r| match r.converge {
                Ok(d) => Ok(d.as_secs_f64()),
                Err(k) => Err(format!("> {} ({k}/{n})", LIMIT.as_secs())),
            })
            .collect()
    };
    let cpu = |rows: &[Row]| rows.iter().map(|r| r.cpu_s).collect::<Vec<f64>>();
    for (name, rows) in [("gingham", &gs), ("BIRD 2", &bs)] {
        let conv = converged(rows).map(|v| spread(&v)).unwrap_or_else(|e| e);
        println!("{:<10} {:>20} {:>14.1} {:>20}", name, conv, rows[0].rss_kib as f64 / 1024.0, spread(&cpu(rows)));
    }
    if let (Ok(gc), Ok(bc)) = (converged(&gs), converged(&bs)) {
        println!("gingham/BIRD: converge {:.2}x (medians)", median(gc) / median(bc));
    }
    println!(
        "gingham/BIRD: memory {:.2}x, CPU {:.2}x (below 1 is better)",
        gs[0].rss_kib as f64 / bs[0].rss_kib.max(1) as f64,
        median(cpu(&gs)) / median(cpu(&bs)).max(0.01)
    );
    if converged(&gs).is_err() {
        eprintln!("gingham's reflector did not converge within {LIMIT:?}");
        std::process::exit(1);
    }
}
