//! CNI ADD/DEL latency and pods/s: gingham beside the distribution's ptp + host-local doing the
//! same job (veth, /32, routes), in one run. `cargo bench -p gingham --bench cni`.
//! Both plugins are exec'd directly inside a private "host" namespace (entered with setns in the
//! child), N sequential ADDs and DELs, then N ADDs / DELs with J in flight. GINGHAM_BENCH_N and
//! GINGHAM_BENCH_J override N (100) and J (20).

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const G: &str = env!("CARGO_BIN_EXE_gingham");
/// The plugin as `gingham cni install` installs it.
const PLUGIN: &str = env!("CARGO_BIN_EXE_gingham-cni");

struct Ns(String);
impl Ns {
    fn new(name: String) -> Ns {
        let s = Command::new("ip").args(["netns", "add", &name]).status().expect("iproute2");
        assert!(s.success(), "ip netns add {name}");
        Ns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Exec `exe` as a CNI plugin inside `host`; returns (elapsed, stdout, stderr).
fn exec(exe: &Path, host: &Path, cmd: &str, cid: &str, netns: &Path, conf: &Value) -> (Duration, Value, String) {
    let ns = std::fs::File::open(host).expect("host netns");
    let mut c = Command::new(exe);
    c.env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", exe.parent().unwrap_or(Path::new("/")))
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}"))
        // gingham prints where the request's time went (others ignore it).
        .env(gingham_cni::proto::TIMINGS_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Enter the host namespace in the child, between fork and exec.
    unsafe {
        c.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    let start = Instant::now();
    let mut child = c.spawn().expect("spawn plugin");
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let t = start.elapsed();
    assert!(
        out.status.success(),
        "{} {cmd} failed: {}{}",
        exe.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (t, serde_json::from_slice(&out.stdout).unwrap_or(Value::Null), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One request's breakdown: the plugin's own time (start, config, result), the socket and
/// queueing, and each of the agent's steps — or None when the plugin printed none.
fn breakdown(wall: Duration, stderr: &str) -> Option<Vec<(String, Duration)>> {
    let line = stderr.lines().find_map(|l| l.strip_prefix("gingham-cni steps "))?;
    let v: Value = serde_json::from_str(line).ok()?;
    let rt = Duration::from_micros(v["round_trip_us"].as_u64()?);
    let agent: Vec<(String, Duration)> = v["agent"]
        .as_array()?
        .iter()
        .filter_map(|s| Some((s[0].as_str()?.to_string(), Duration::from_micros(s[1].as_u64()?))))
        .collect();
    let in_agent: Duration = agent.iter().map(|(_, d)| *d).sum();
    let mut out = vec![
        ("plugin start, config, result".to_string(), wall.saturating_sub(rt)),
        ("socket round trip, queue".to_string(), rt.saturating_sub(in_agent)),
    ];
    out.extend(agent);
    Some(out)
}

struct Phase {
    p50: Duration,
    p99: Duration,
    pods_per_sec: f64,
}

fn phase(mut lat: Vec<Duration>, wall: Duration) -> Phase {
    lat.sort();
    let n = lat.len();
    Phase { p50: lat[n / 2], p99: lat[(n * 99 / 100).min(n - 1)], pods_per_sec: n as f64 / wall.as_secs_f64() }
}

/// ADD then DEL for `pods`, sequentially (j = 1) or with `j` in flight.
fn run(
    exe: &Path,
    host: &Path,
    pods: &[Ns],
    conf: &Value,
    j: usize,
) -> (Phase, Phase, Vec<Vec<Vec<(String, Duration)>>>) {
    let mut results = Vec::new();
    let mut steps = Vec::new();
    for cmd in ["ADD", "DEL"] {
        let start = Instant::now();
        let done: Vec<(Duration, String)> = std::thread::scope(|s| {
            let chunks: Vec<_> = pods.chunks(pods.len().div_ceil(j)).collect();
            let hs: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|p| {
                                let mut c = conf.clone();
                                if cmd == "DEL" {
                                    c["prevResult"] =
                                        json!({ "cniVersion": c["cniVersion"], "interfaces": [], "ips": [] });
                                }
                                let (t, _, err) = exec(exe, host, cmd, &p.0, &p.path(), &c);
                                (t, err)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let wall = start.elapsed();
        steps.push(done.iter().filter_map(|(t, err)| breakdown(*t, err)).collect());
        results.push(phase(done.into_iter().map(|(t, _)| t).collect(), wall));
    }
    let del = results.pop().unwrap();
    (results.pop().unwrap(), del, steps)
}

/// p50 / p99 of each step over the requests, in the order the steps came.
fn print_breakdown(what: &str, requests: &[Vec<(String, Duration)>]) {
    let mut names: Vec<String> = Vec::new();
    for r in requests {
        for (n, _) in r {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    println!("{what}, {} requests: where the time goes (ms)", requests.len());
    println!("  {:<32} {:>8} {:>8}", "step", "p50", "p99");
    for n in names {
        let mut v: Vec<Duration> =
            requests.iter().filter_map(|r| r.iter().find(|(m, _)| *m == n).map(|(_, d)| *d)).collect();
        v.sort();
        let at = |q: usize| v.get((v.len() * q / 100).min(v.len().saturating_sub(1))).copied().unwrap_or_default();
        println!("  {n:<32} {:>8.2} {:>8.2}", at(50).as_secs_f64() * 1e3, at(99).as_secs_f64() * 1e3);
    }
}

fn main() {
    let n: usize = std::env::var("GINGHAM_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let j: usize = std::env::var("GINGHAM_BENCH_J").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let tag = format!("cb{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let host = Ns::new(format!("{tag}-host"));
    let pods: Vec<Ns> = (0..n).map(|i| Ns::new(format!("{tag}-p{i}"))).collect();

    // ptp + host-local, as tools/cni-baseline.sh configures them.
    let ptp_conf = json!({ "cniVersion": "1.0.0", "name": "cnibench", "type": "ptp", "ipMasq": false, "mtu": 1500,
        "ipam": { "type": "host-local", "ranges": [[{ "subnet": "172.30.0.0/16" }]], "dataDir": dir.path().join("host-local") } });
    let ptp = PathBuf::from("/usr/lib/cni/ptp");

    // gingham: the agent in the same host namespace, an embedded store with one pool.
    let store = dir.path().join("store.db");
    let socket = dir.path().join("agent.sock");
    let mut apply = Command::new(G)
        .args(["apply", "-f", "-"])
        .env("GINGHAM_STORE_PATH", &store)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.66.0.0/16}\n",
        )
        .unwrap();
    assert!(apply.wait().unwrap().success());
    let agent_ns = std::fs::File::open(host.path()).unwrap();
    let mut agent_cmd = Command::new(G);
    agent_cmd
        // The bench's host namespace has no underlay: serve the plugin only.
        .args(["node", "run", "--endpoints-only", "--nodename", "bench-node", "--socket"])
        .arg(&socket)
        .env("GINGHAM_STORE_PATH", &store)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
    unsafe {
        agent_cmd.pre_exec(move || {
            nix::sched::setns(agent_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut agent = Kill(agent_cmd.spawn().unwrap());
    // Fail loudly, never hang: the agent must answer within 20 s, and must not have died.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the gingham agent exited ({status}) before serving; its log:\n{}", log());
        }
        assert!(Instant::now() < deadline, "the gingham agent did not serve within 20 s; its log:\n{}", log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let g_conf = json!({ "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "gingham", "mtu": 1500, "agent_socket": socket, "ipam": { "type": "gingham-ipam" } });
    let gingham = PathBuf::from(PLUGIN);
    // Warm both (first block claim, page cache), then measure back to back.
    let warm = &pods[..1];
    run(&ptp, &host.path(), warm, &ptp_conf, 1);
    run(&gingham, &host.path(), warm, &g_conf, 1);
    let ps = run(&ptp, &host.path(), &pods, &ptp_conf, 1);
    let gs = run(&gingham, &host.path(), &pods, &g_conf, 1);
    let pp = run(&ptp, &host.path(), &pods, &ptp_conf, j);
    let gp = run(&gingham, &host.path(), &pods, &g_conf, j);

    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    println!(
        "CNI benchmark: {n} pods, ADD then DEL, sequential and {j} in flight; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "ptp + host-local (containernetworking-plugins) vs gingham (plugin → agent → IPAM + WorkloadEndpoint in the embedded store)\n"
    );
    println!(
        "{:<22} {:>11} {:>11} {:>9} {:>11} {:>11} {:>9} {:>14}",
        "phase", "ptp p50 ms", "ptp p99 ms", "ptp pods/s", "ging p50 ms", "ging p99 ms", "ging pods/s", "p50 ging/ptp"
    );
    let steps = gs.2.clone();
    for (name, (pa, pd, _), (ga, gd, _)) in [("sequential".to_string(), ps, gs), (format!("{j}-way bursts"), pp, gp)] {
        for (op, p, g) in [("ADD", &pa, &ga), ("DEL", &pd, &gd)] {
            println!(
                "{:<22} {:>11} {:>11} {:>9.0} {:>11} {:>11} {:>9.0} {:>13.2}x",
                format!("{op} {name}"),
                ms(p.p50),
                ms(p.p99),
                p.pods_per_sec,
                ms(g.p50),
                ms(g.p99),
                g.pods_per_sec,
                g.p50.as_secs_f64() / p.p50.as_secs_f64()
            );
        }
    }
    println!();
    print_breakdown("gingham ADD, sequential", &steps[0]);
    print_breakdown("gingham DEL, sequential", &steps[1]);
}
