//! CNI ADD/DEL latency and pods/s: gingham beside the distribution's ptp + host-local doing the
//! same job (veth, /32, routes), in one run. `cargo bench -p gingham --bench cni`.
//! Both plugins are exec'd directly inside a private "host" namespace (entered with setns in the
//! child): per round, N sequential ADDs and DELs, then N ADDs / DELs with J in flight, the two
//! plugins alternating (which goes first swaps every round). gingham's agent runs as on a real
//! node (routes and network policy programmed; ADD returns once the pod's rules are in place).
//! Three node states: idle IPv4, idle dual stack, and loaded (LOAD_PODS pods of each plugin and
//! 1,000 policies already there). The kernel's own floor — a veth pair created into a pod
//! namespace and deleted again by netlink inside this process — is measured in the same run.
//! GINGHAM_BENCH_N (100), GINGHAM_BENCH_J (20), GINGHAM_BENCH_ROUNDS (9) override the defaults.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "common/stats.rs"]
mod stats;
use stats::{median, min_med_max};

const G: &str = env!("CARGO_BIN_EXE_gingham");
/// The plugin as `gingham cni install` installs it.
const PLUGIN: &str = env!("CARGO_BIN_EXE_gingham-cni");

/// Namespaces this run made and its agent, for the signal handler to remove.
static MADE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static AGENT_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// SIGTERM (a time limit) or SIGINT: stop the agent and remove the namespaces, then exit.
/// The signals are blocked in every thread and waited for on one of their own; children
/// unblock them before exec.
fn clean_up_on_signal() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().expect("block signals");
    std::thread::spawn(move || {
        let Ok(sig) = set.wait() else { return };
        let pid = AGENT_PID.load(std::sync::atomic::Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        for name in MADE.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        eprintln!("cni benchmark: stopped by {sig:?}; its namespaces and agent are gone");
        std::process::exit(1);
    });
}

/// In a child between fork and exec: the signals this process blocks are the child's to take.
fn unblock_signals() -> std::io::Result<()> {
    nix::sys::signal::SigSet::all().thread_unblock().map_err(std::io::Error::from)
}

struct Ns(String);
impl Ns {
    fn new(name: String) -> Ns {
        let s = Command::new("ip").args(["netns", "add", &name]).status().expect("iproute2");
        assert!(s.success(), "ip netns add {name}");
        MADE.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
        // No IPv6 duplicate address detection: ptp waits ~1 s per ADD for it to settle, which
        // would measure a timer, not the plugin's work (gingham does not wait for it).
        let s = Command::new("ip")
            .args(["netns", "exec", &name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
            .status()
            .expect("sysctl");
        assert!(s.success(), "accept_dad in {name}");
        Ns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        MADE.lock().unwrap_or_else(|p| p.into_inner()).retain(|n| *n != self.0);
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
            unblock_signals()?;
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
    // Steps that ran beside the others (the agent's kernel part) are not summed.
    let alongside = gingham_agent::steps::ALONGSIDE;
    let in_agent: Duration = agent.iter().filter(|(n, _)| !n.starts_with(alongside)).map(|(_, d)| *d).sum();
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

/// Each request's steps with their durations, as gingham printed them.
type Steps = Vec<Vec<(String, Duration)>>;

/// ADD then DEL for `pods`, sequentially (j = 1) or with `j` in flight; the ADD and DEL phases,
/// and the per-step breakdowns gingham printed for each.
fn run(exe: &Path, host: &Path, pods: &[Ns], conf: &Value, j: usize) -> ([Phase; 2], [Steps; 2]) {
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
    let (del, add) = (results.pop().unwrap(), results.pop().unwrap());
    let (sdel, sadd) = (steps.pop().unwrap(), steps.pop().unwrap());
    ([add, del], [sadd, sdel])
}

/// p50 / p99 of each step over the requests, in the order the steps came.
fn print_breakdown(what: &str, requests: &Steps) {
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

/// Every round's figures for one (node state, ADD or DEL, sequential or J-way) row.
#[derive(Default)]
struct Row {
    ptp: Vec<Phase>,
    ging: Vec<Phase>,
}

/// A node state the rounds run in: the two plugins' configurations.
struct Setting {
    name: &'static str,
    ptp: Value,
    ging: Value,
}

/// The kernel's floor for a pod's veth, with no process start-up: a pair created into the pod's
/// namespace and deleted, by netlink from this process, one at a time. (create p50, delete p50).
fn netlink_floor(host: &Ns, pods: &[Ns]) -> (Duration, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let host = std::fs::File::open(host.path()).unwrap();
    let files: Vec<std::fs::File> = pods.iter().map(|p| std::fs::File::open(p.path()).unwrap()).collect();
    let (create, delete) = gingham_kernel::in_netns_file(&host, move || {
        rt.block_on(async {
            let nl = gingham_kernel::Netlink::current().unwrap();
            let (mut create, mut delete) = (Vec::new(), Vec::new());
            for (i, ns) in files.iter().enumerate() {
                let name = format!("floor{i}");
                let t = Instant::now();
                nl.add_veth(&name, "eth9", ns, 1500, None).await.expect("floor: veth create");
                create.push(t.elapsed());
                let t = Instant::now();
                assert!(nl.delete_link(&name).await.expect("floor: veth delete"), "floor: {name} vanished");
                delete.push(t.elapsed());
            }
            (create, delete)
        })
    })
    .expect("floor: enter the host namespace");
    let mid = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    (mid(create), mid(delete))
}

/// `count` projectcalico.org/v3 NetworkPolicies in namespace `bench`: ten select every pod (an
/// ingress allow from a selector on a port each), the rest select pods that do not exist — a
/// cluster's policies, most of them for other workloads.
fn policies(count: usize) -> String {
    let mut y = String::new();
    for i in 0..count {
        let sel = if i < 10 { "all()".to_string() } else { format!("app == 'other-{i}'") };
        y.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: bench}}\nspec:\n  selector: \"{sel}\"\n  types: [Ingress]\n  ingress:\n  - action: Allow\n    protocol: TCP\n    source: {{selector: \"role == 'client-{i}'\"}}\n    destination: {{ports: [{}]}}\n",
            1000 + i
        ));
    }
    y
}

fn apply(store: &Path, yaml: &str) {
    let mut apply = Command::new(G)
        .args(["apply", "-f", "-"])
        .env("GINGHAM_STORE_PATH", store)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    apply.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    assert!(apply.wait().unwrap().success(), "gingham apply");
}

fn ip(args: &[&str]) {
    let s = Command::new("ip").args(args).status().expect("iproute2");
    assert!(s.success(), "ip {args:?}");
}

const LOAD_PODS: usize = 110;
const LOAD_POLICIES: usize = 1000;

fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (n, j, rounds) = (env("GINGHAM_BENCH_N", 100), env("GINGHAM_BENCH_J", 20), env("GINGHAM_BENCH_ROUNDS", 9));
    clean_up_on_signal();
    let tag = format!("cb{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let host = Ns::new(format!("{tag}-host"));
    let pods: Vec<Ns> = (0..n).map(|i| Ns::new(format!("{tag}-p{i}"))).collect();
    // The node's underlay: an address for the agent to route from (a veth pair inside the
    // namespace), and loopback up for its health endpoint.
    ip(&["-n", &host.0, "link", "set", "lo", "up"]);
    ip(&["-n", &host.0, "link", "add", "bu0", "type", "veth", "peer", "name", "bu1"]);
    ip(&["-n", &host.0, "addr", "add", "10.251.0.1/24", "dev", "bu0"]);
    ip(&["-n", &host.0, "link", "set", "bu0", "up"]);
    ip(&["-n", &host.0, "link", "set", "bu1", "up"]);

    // ptp + host-local, as tools/cni-baseline.sh configures them.
    let host_local = dir.path().join("host-local");
    let ptp_conf = |ranges: Value| {
        json!({ "cniVersion": "1.0.0", "name": "cnibench", "type": "ptp", "ipMasq": false, "mtu": 1500,
        "ipam": { "type": "host-local", "ranges": ranges, "dataDir": host_local } })
    };
    let ptp = PathBuf::from("/usr/lib/cni/ptp");

    // gingham: the agent in the same host namespace, an embedded store with a pool per family.
    let store = dir.path().join("store.db");
    let socket = dir.path().join("agent.sock");
    apply(
        &store,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.66.0.0/16}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bench-v6}\nspec: {cidr: 'fd66::/48'}\n",
    );
    let agent_ns = std::fs::File::open(host.path()).unwrap();
    let mut agent_cmd = Command::new(G);
    agent_cmd
        // A node as in a cluster with the vxlan backend (no BGP peers to wait for).
        .args(["node", "run", "--nodename", "bench-node", "--ip", "10.251.0.1/24", "--backend", "vxlan", "--socket"])
        .arg(&socket)
        .env("GINGHAM_STORE_PATH", &store)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
    unsafe {
        agent_cmd.pre_exec(move || {
            unblock_signals()?;
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
    AGENT_PID.store(agent.0.id() as i32, std::sync::atomic::Ordering::SeqCst);
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
    let ging_conf = |v6: bool| {
        json!({ "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "gingham", "mtu": 1500, "agent_socket": socket,
        "ipam": { "type": "gingham-ipam", "assign_ipv4": "true", "assign_ipv6": if v6 { "true" } else { "false" } } })
    };
    let gingham = PathBuf::from(PLUGIN);
    let v4_range = json!([[{ "subnet": "172.30.0.0/16" }]]);
    let dual_range = json!([[{ "subnet": "172.30.0.0/16" }], [{ "subnet": "fd30::/64" }]]);
    let settings = [
        Setting { name: "idle", ptp: ptp_conf(v4_range.clone()), ging: ging_conf(false) },
        Setting { name: "idle, dual", ptp: ptp_conf(dual_range), ging: ging_conf(true) },
        Setting { name: "loaded", ptp: ptp_conf(v4_range), ging: ging_conf(false) },
    ];

    let floor = netlink_floor(&host, &pods);
    // Warm both (first block claim, page cache).
    for s in &settings[..2] {
        run(&ptp, &host.path(), &pods[..1], &s.ptp, 1);
        run(&gingham, &host.path(), &pods[..1], &s.ging, 1);
    }
    // rows[setting][op][mode]; steps of gingham's sequential requests per setting and op.
    let mut rows: Vec<[[Row; 2]; 2]> = (0..settings.len()).map(|_| Default::default()).collect();
    let mut steps: Vec<[Steps; 2]> = (0..settings.len()).map(|_| Default::default()).collect();
    let mut load: Vec<Ns> = Vec::new();
    for (si, s) in settings.iter().enumerate() {
        if s.name == "loaded" {
            // The load stays for the rest of the run: pods of each plugin, and the policies.
            apply(&store, &policies(LOAD_POLICIES));
            for (exe, conf, who) in [(&ptp, &s.ptp, "lp"), (&gingham, &s.ging, "lg")] {
                let these: Vec<Ns> = (0..LOAD_PODS).map(|i| Ns::new(format!("{tag}-{who}{i}"))).collect();
                for p in &these {
                    exec(exe, &host.path(), "ADD", &p.0, &p.path(), conf);
                }
                load.extend(these);
            }
        }
        for round in 0..rounds {
            for (mode, jj) in [(0, 1), (1, j)] {
                let mut order = [(true, &ptp, &s.ptp), (false, &gingham, &s.ging)];
                if round % 2 == 1 {
                    order.reverse();
                }
                for (is_ptp, exe, conf) in order {
                    let ([add, del], st) = run(exe, &host.path(), &pods, conf, jj);
                    for (op, p) in [(0, add), (1, del)] {
                        let r = &mut rows[si][op][mode];
                        if is_ptp { r.ptp.push(p) } else { r.ging.push(p) }
                    }
                    if !is_ptp && mode == 0 {
                        let [a, d] = st;
                        steps[si][0].extend(a);
                        steps[si][1].extend(d);
                    }
                }
            }
        }
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "CNI benchmark: {n} pods, ADD then DEL, sequential and {j} in flight, {rounds} alternating rounds per node state; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "ptp + host-local (containernetworking-plugins) vs gingham (plugin → agent → IPAM, veth, routes, WorkloadEndpoint, policy in place)"
    );
    println!(
        "loaded = {LOAD_PODS} pods of each plugin and {LOAD_POLICIES} NetworkPolicies (10 select every pod) already there; p50/p99 in ms, min/median/max over the rounds\n"
    );
    println!(
        "{:<28} {:>17} {:>17} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}  {:<17} met",
        "node, phase",
        "ptp p50",
        "ging p50",
        "ptp p99",
        "gin p99",
        "p50 ×",
        "ptp /s",
        "gin /s",
        "/s ×",
        "goal (p50, /s)",
    );
    for (si, s) in settings.iter().enumerate() {
        for (mode, mname) in [(0, "sequential".to_string()), (1, format!("{j}-way"))] {
            for (op, oname, goal) in [(0, "ADD", 0.3), (1, "DEL", 0.5)] {
                let r = &rows[si][op][mode];
                let p50 = |v: &[Phase]| v.iter().map(|p| ms(p.p50)).collect::<Vec<_>>();
                let p99 = |v: &[Phase]| median(v.iter().map(|p| ms(p.p99)).collect());
                let rate = |v: &[Phase]| median(v.iter().map(|p| p.pods_per_sec).collect());
                let ratio = median(p50(&r.ging)) / median(p50(&r.ptp));
                let rate_ratio = rate(&r.ging) / rate(&r.ptp);
                let met = ratio <= goal && rate_ratio >= 4.0;
                println!(
                    "{:<28} {:>17} {:>17} {:>8.1} {:>8.1} {:>6.2}x {:>7.0} {:>7.0} {:>6.1}x  {:<17} {}",
                    format!("{}, {oname} {mname}", s.name),
                    min_med_max(&p50(&r.ptp), 1),
                    min_med_max(&p50(&r.ging), 1),
                    p99(&r.ptp),
                    p99(&r.ging),
                    ratio,
                    rate(&r.ptp),
                    rate(&r.ging),
                    rate_ratio,
                    format!("<={goal}x, >=4x"),
                    if met { "yes" } else { "NO" }
                );
            }
        }
    }
    let ging_del = median(rows[0][1][0].ging.iter().map(|p| ms(p.p50)).collect());
    println!(
        "\nkernel floor (netlink in this process, {n} veth pairs into pod namespaces, one at a time): create p50 {:.2} ms, delete p50 {:.2} ms; idle gingham DEL p50 {ging_del:.2} ms = {:.2}x the delete floor",
        ms(floor.0),
        ms(floor.1),
        ging_del / ms(floor.1)
    );
    println!();
    for (si, s) in settings.iter().enumerate() {
        print_breakdown(&format!("gingham ADD, {}, sequential", s.name), &steps[si][0]);
        print_breakdown(&format!("gingham DEL, {}, sequential", s.name), &steps[si][1]);
    }
    // The load's namespaces (and with them their veths) go when `load` drops.
    drop(load);
}
