//! What a large cluster costs one node agent: a simulated cluster of N Nodes (one block each,
//! 30 WorkloadEndpoints per node, their IPAM allocations and handles) in the embedded store and
//! in a real etcd, and one real agent on node-0 of it, in a namespace of its own. Reported: time
//! to first full sync, RSS, CPU while the rest of the cluster churns at 20 changes/s, latency
//! from a remote block claim to the route in this agent's kernel, and how often it listed the
//! datastore. The same figures for the agent before the watch-fed cache (commit e5049a0, path
//! in GINGHAM_OLD_AGENT; scripts/bench.sh builds it), each of its phases capped in time. Then
//! ten idle agents on one embedded store: their total CPU.
//!
//! The `kubernetes` backend is a real kube-apiserver (on a real etcd) holding the same cluster
//! as Kubernetes objects: 1,000 Nodes and 30,000 Pods (Calico's annotations on both) plus the
//! IPAM CRDs; it runs at 1,000 nodes only (the size; 5,000 would spend the bench's time
//! limit creating objects).
//!
//! `cargo bench -p gingham --bench scale`; GINGHAM_SCALE_NODES (1000,5000), GINGHAM_SCALE_CHURN_SECS (10),
//! GINGHAM_SCALE_BACKENDS (embedded,etcd,kubernetes), GINGHAM_BENCH_ROUNDS (3): rounds per store and
//! size on the same populated cluster, gingham and the old agent alternating (who goes first swaps
//! each round); first sync as min/median/max, the rest medians. Three, not nine: a round is two
//! agents' full syncs plus their churn phases, and nine of them at every size and store would not
//! fit the bench's time limit (the figures are latencies and memory, not a throughput).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_ipam::block::AllocationBlock;
use gingham_ipam::model::{BlockAffinity, IpamHandle, affinity_key, block_key, handle_key};
use gingham_kernel::KernelEvent;
use gingham_store::{Condition, Datastore, TxnOp};
use ipnet::IpNet;

const G: &str = env!("CARGO_BIN_EXE_gingham");
const WEPS: usize = 30;

/// Namespaces a run of this benchmark left behind (killed before its cleanup could run, e.g.
/// by a machine restart): `gsc<pid>-…` / `gsi<pid>-…` whose process is gone.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("gsc").or_else(|| name.strip_prefix("gsi")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

struct Ns(String);
impl Ns {
    fn new(name: String) -> Ns {
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Ns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
    fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip").arg("-n").arg(&self.0).args(args).status().is_ok_and(|s| s.success());
        assert!(ok, "ip -n {} {args:?}", self.0);
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn block_cidr(i: usize) -> IpNet {
    // Blocks /26 of 10.0.0.0/8, in order.
    let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + (i as u32) * 64;
    IpNet::new(IpAddr::V4(base.into()), 26).unwrap()
}

fn node_ip(i: usize) -> String {
    // Inside the agent's 10.96.0.0/12 underlay, so routes to every node are on-link.
    let n = u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)) + i as u32;
    std::net::Ipv4Addr::from(n).to_string()
}

fn node_json(i: usize) -> Vec<u8> {
    serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "Node",
        "metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}"), "rack": format!("r{}", i % 20)}},
        "spec": {"bgp": {"ipv4Address": format!("{}/12", node_ip(i))}}})
    .to_string()
    .into_bytes()
}

fn wep(i: usize, j: usize, ip: IpAddr, generation: usize) -> (String, Vec<u8>) {
    let ns = format!("ns-{}", j % 10);
    let pod = format!("app-{}-{i}-{j}", j % 5);
    let name = format!("node--{i}-k8s-{}-eth0", pod.replace('-', "--"));
    let key = format!("/calico/resources/v3/projectcalico.org/workloadendpoints/{ns}/{name}");
    let v = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns, "labels": {
            "app": format!("app-{}", j % 5), "pod-template-hash": format!("h{}", i % 97), "generation": generation.to_string(),
            "projectcalico.org/namespace": ns, "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"orchestrator": "k8s", "node": format!("node-{i}"), "pod": pod, "endpoint": "eth0",
            "containerID": format!("{:064x}", i * 1000 + j), "ipNetworks": [format!("{ip}/32")],
            "profiles": [format!("kns.{ns}")], "interfaceName": format!("cali{:011x}", i * 1000 + j)}});
    (key, v.to_string().into_bytes())
}

fn put(key: String, value: Vec<u8>) -> TxnOp {
    TxnOp::Put { key, value, condition: Condition::Any }
}

/// A block of node `i` with 30 allocations, its affinity and handles.
fn block_ops(i: usize, owner: usize) -> (Vec<TxnOp>, Vec<IpAddr>) {
    let cidr = block_cidr(i);
    let mut b = AllocationBlock::new(cidr, Some(format!("host:node-{owner}")), Some("2026-12-01T00:00:00Z".into()), 1);
    let mut ops = Vec::new();
    let mut ips = Vec::new();
    for j in 0..WEPS {
        let handle = format!("k8s-pod-network.{:064x}", i * 1000 + j);
        let attrs: BTreeMap<String, String> =
            [("node", format!("node-{owner}")), ("namespace", format!("ns-{}", j % 10)), ("pod", format!("p{j}"))]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        b.allocate_ordinal(j as u32, &handle, &attrs);
        ips.push(b.ip(j as u32));
        let h = IpamHandle { block: [(cidr.to_string(), 1)].into(), ..Default::default() };
        ops.push(put(handle_key(&handle), serde_json::to_vec(&h).unwrap()));
    }
    ops.push(put(block_key(&cidr), serde_json::to_vec(&b).unwrap()));
    ops.push(put(
        affinity_key(&format!("node-{owner}"), &cidr),
        serde_json::to_vec(&BlockAffinity::confirmed()).unwrap(),
    ));
    (ops, ips)
}

async fn write_all(ds: &dyn Datastore, ops: Vec<TxnOp>) {
    let chunk = ds.max_txn_ops().min(1000);
    for c in ops.chunks(chunk) {
        ds.txn(c).await.expect("populating the store");
    }
}

/// The simulated cluster: pool, N nodes, N blocks, 30 N endpoints and handles.
async fn populate(ds: &dyn Datastore, nodes: usize) {
    let pool = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "pool"},
        "spec": {"cidr": "10.0.0.0/8", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Never", "natOutgoing": true,
                 "nodeSelector": "all()", "allowedUses": ["Workload", "Tunnel"], "assignmentMode": "Automatic"}});
    let mut ops =
        vec![put("/calico/resources/v3/projectcalico.org/ippools/pool".into(), pool.to_string().into_bytes())];
    for i in 0..nodes {
        ops.push(put(format!("/calico/resources/v3/projectcalico.org/nodes/node-{i}"), node_json(i)));
        let (b, ips) = block_ops(i, i);
        ops.extend(b);
        for (j, ip) in ips.into_iter().enumerate() {
            let (k, v) = wep(i, j, ip, 0);
            ops.push(put(k, v));
        }
        if ops.len() > 5000 {
            write_all(ds, std::mem::take(&mut ops)).await;
        }
    }
    write_all(ds, ops).await;
}

/// The same cluster in a Kubernetes API server: Nodes and Pods as the kubelets would have made
/// them (Calico's annotations on both), IPAM objects as CRDs; 16 writers at once.
async fn populate_kube(kube: Arc<gingham_store::kubernetes::KubeStore>, nodes: usize) {
    use serde_json::json;
    let ds: Arc<dyn Datastore> = kube.clone();
    let pool = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "pool"},
        "spec": {"cidr": "10.0.0.0/8", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Never", "natOutgoing": true,
                 "nodeSelector": "all()", "allowedUses": ["Workload", "Tunnel"], "assignmentMode": "Automatic"}});
    ds.create("/calico/resources/v3/projectcalico.org/ippools/pool", pool.to_string().as_bytes()).await.unwrap();
    for n in 0..10 {
        let ns = format!("ns-{n}");
        kube.create_object(
            "/api/v1",
            "namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await
        .unwrap();
        let sa =
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}});
        kube.create_object("/api/v1", "serviceaccounts", &sa).await.unwrap();
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (kube, ds, next) = (kube.clone(), ds.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= nodes {
                    return;
                }
                let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}"),
                    "labels": {"kubernetes.io/hostname": format!("node-{i}"), "rack": format!("r{}", i % 20)},
                    "annotations": {"projectcalico.org/IPv4Address": format!("{}/12", node_ip(i))}}});
                kube.create_object("/api/v1", "nodes", &node).await.unwrap();
                let (ops, ips) = block_ops(i, i);
                for op in ops {
                    ds.txn(&[op]).await.expect("an IPAM object");
                }
                for (j, ip) in ips.into_iter().enumerate() {
                    let (_, wep) = wep(i, j, ip, 0);
                    let w: serde_json::Value = serde_json::from_slice(&wep).unwrap();
                    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": w["spec"]["pod"], "namespace": w["metadata"]["namespace"],
                            "labels": {"app": format!("app-{}", j % 5), "pod-template-hash": format!("h{}", i % 97)},
                            "annotations": {"cni.projectcalico.org/podIPs": format!("{ip}/32"),
                                            "cni.projectcalico.org/containerID": w["spec"]["containerID"]}},
                        "spec": {"nodeName": format!("node-{i}"), "automountServiceAccountToken": false,
                                 "containers": [{"name": "c", "image": "app"}]}});
                    kube.create_object("/api/v1", "pods", &pod).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn proc_stat(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat.rsplit(')').next().unwrap_or("").split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // utime + stime (ticks of 1/100 s), RSS and peak RSS (KiB).
    (f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0), kb("VmRSS:"), kb("VmHWM:"))
}

fn http(ns: &Path, port: u16, path: &str) -> String {
    let f = std::fs::File::open(ns).unwrap();
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .join()
    .unwrap_or_default()
}

/// Make `target` (a loopback port of this namespace) reachable on `port` of the loopback of
/// namespace `ns`: the agent there cannot reach our loopback, where etcd listens.
fn forward_into(ns: &Path, port: u16, target: std::net::SocketAddr) {
    let f = std::fs::File::open(ns).unwrap();
    // Outbound sockets must be made here, in our namespace: a thread of ours makes them.
    let (req_tx, req_rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<std::net::TcpStream>>();
    std::thread::spawn(move || {
        for reply in req_rx {
            if let Ok(s) = std::net::TcpStream::connect(target) {
                let _ = reply.send(s);
            }
        }
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let _ = ready_tx.send(());
        for inbound in listener.incoming().flatten() {
            let (tx, rx) = std::sync::mpsc::channel();
            if req_tx.send(tx).is_err() {
                return;
            }
            let Ok(outbound) = rx.recv() else { continue };
            for (mut from, mut to) in
                [(inbound.try_clone().unwrap(), outbound.try_clone().unwrap()), (outbound, inbound)]
            {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    let _ = ready_rx.recv();
}

struct Row {
    who: String,
    backend: &'static str,
    nodes: usize,
    sync: Option<Duration>,
    rss_mib: f64,
    peak_mib: f64,
    cpu: Option<f64>,
    p50: Option<Duration>,
    p99: Option<Duration>,
    lists: String,
}

fn start_agent(exe: &Path, ns: &Ns, env: &[(String, String)], socket: &Path, port: u16, extra: &[&str]) -> Agent {
    let f = std::fs::File::open(ns.path()).unwrap();
    let mut c = Command::new(exe);
    c.args(["node", "run", "--nodename", "node-0", "--socket"])
        .arg(socket)
        .args(["--health-listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .envs(env.iter().cloned())
        // The calculated routes this benchmark measures (a 5,000-node BGP mesh is not a setup
        // anyone runs; the BGP benchmark measures BGP).
        .env("CALICO_NETWORKING_BACKEND", "vxlan")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(socket.with_extension("log")).unwrap());
    // SAFETY: only setns(2) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    Agent(c.spawn().expect("start the agent"))
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    who: &str,
    exe: &Path,
    backend: &'static str,
    ds: Arc<dyn Datastore>,
    env: &[(String, String)],
    nodes: usize,
    churn_secs: u64,
    cap: Duration,
) -> Row {
    let ns = Ns::new(format!("gsc{}-{}", std::process::id(), who.len() + nodes));
    // An underlay big enough that every node's address is on-link.
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    ns.ip(&["addr", "add", "10.96.0.1/12", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "eth1", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let port = 9400;
    let mut env = env.to_vec();
    if let Some((_, ep)) = env.iter_mut().find(|(k, _)| k == "ETCD_ENDPOINTS") {
        let target: std::net::SocketAddr = ep.trim_start_matches("http://").parse().unwrap();
        forward_into(&ns.path(), 2379, target);
        *ep = "http://127.0.0.1:2379".into();
    }
    if let Some((_, api)) = env.iter().find(|(k, _)| k == "GINGHAM_BENCH_API") {
        // The API server's loopback address, the same inside the agent's namespace (its
        // certificate names 127.0.0.1).
        let target: std::net::SocketAddr = api.parse().unwrap();
        forward_into(&ns.path(), target.port(), target);
    }
    let t0 = Instant::now();
    let agent = start_agent(exe, &ns, &env, &socket, port, &["--ip", "10.96.0.1/12"]);
    let pid = agent.0.id();
    let mut sync = None;
    while t0.elapsed() < cap {
        if http(&ns.path(), port, "/readiness").contains(" 200 ") {
            sync = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, rss, _) = proc_stat(pid);
    let mut row = Row {
        who: who.into(),
        backend,
        nodes,
        sync,
        rss_mib: rss as f64 / 1024.0,
        peak_mib: 0.0,
        cpu: None,
        p50: None,
        p99: None,
        lists: String::new(),
    };
    if sync.is_none() {
        row.peak_mib = proc_stat(pid).2 as f64 / 1024.0;
        let log = std::fs::read_to_string(socket.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        eprintln!(
            "{who} on {backend} ({nodes} nodes) was not ready within {cap:?}; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!("its readiness: {}", http(&ns.path(), port, "/readiness").lines().last().unwrap_or(""));
        return row;
    }
    // Churn elsewhere: 20 changes/s (a pod's labels change; another's address comes and goes).
    let (cpu0, _, _) = proc_stat(pid);
    // GINGHAM_SCALE_PERF=DIR: record where the agent spends the churn (perf, call graphs).
    let perf = std::env::var("GINGHAM_SCALE_PERF").ok().map(|d| {
        Command::new("perf")
            .args(["record", "-g", "-q", "-p", &pid.to_string(), "-o"])
            .arg(Path::new(&d).join(format!("{who}-{backend}-{nodes}.data")))
            .args(["--", "sleep", &churn_secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    });
    let churn_start = Instant::now();
    let mut n = 0usize;
    while churn_start.elapsed() < Duration::from_secs(churn_secs) {
        let i = 1 + (n * 7919) % (nodes - 1);
        let j = n % WEPS;
        let ip = block_cidr(i).hosts().nth(j).unwrap_or(block_cidr(i).addr());
        let (k, v) = wep(i, j, ip, n + 1);
        let _ = ds.txn(&[put(k, v)]).await;
        n += 1;
        let next = churn_start + Duration::from_millis(50 * n as u64);
        tokio::time::sleep_until(next.into()).await;
    }
    let (cpu1, _, _) = proc_stat(pid);
    if let Some(Ok(mut p)) = perf {
        let _ = p.wait();
    }
    row.cpu = Some((cpu1 - cpu0) as f64 / churn_start.elapsed().as_secs_f64()); // ticks/s = % of a core
    // Remote block claims → route in this agent's kernel.
    // The claim's latency ends when the kernel announces its route: polling a dump of 5,000
    // routes would add milliseconds of its own.
    // The claim's latency ends when the kernel announces its route: a thread of its own in
    // the agent's namespace stamps each route event as it arrives (so nothing this task does
    // after the write, nor polling a dump of 5,000 routes, adds to the figure).
    let (stamps_tx, stamps) = std::sync::mpsc::channel::<(Option<IpNet>, Instant)>();
    let nl = {
        let f = std::fs::File::open(ns.path()).unwrap();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut events = gingham_kernel::route_and_link_events().unwrap();
                let _ = ready_tx.send(());
                while let Some(ev) = events.recv().await {
                    let stamp = match ev {
                        KernelEvent::Route { deleted: false, route } => (Some(route.dst), Instant::now()),
                        KernelEvent::Overrun => (None, Instant::now()),
                        _ => continue,
                    };
                    if stamps_tx.send(stamp).is_err() {
                        return;
                    }
                }
            });
        });
        ready.recv_timeout(Duration::from_secs(10)).expect("route events in the agent's namespace");
        let f = std::fs::File::open(ns.path()).unwrap();
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let _g = rt.enter();
            gingham_kernel::Netlink::current().unwrap()
        })
        .join()
        .unwrap()
    };
    let mut lat = Vec::new();
    for c in 0..50 {
        let idx = nodes + 10 + c;
        let owner = 1 + c % (nodes - 1);
        let (mut ops, _) = block_ops(idx, owner);
        let cidr = block_cidr(idx);
        // The claim is the block and its affinity (the last two ops); the handles of its 30
        // addresses are written first, untimed (on the Kubernetes API they are 30 requests).
        let claim = ops.split_off(ops.len() - 2);
        write_all(ds.as_ref(), ops).await;
        while stamps.try_recv().is_ok() {}
        let t = Instant::now();
        write_all(ds.as_ref(), claim).await;
        let deadline = t + (cap / 10).max(Duration::from_secs(5));
        let seen = loop {
            match stamps.try_recv() {
                Ok((Some(dst), at)) if dst == cidr => break Some(at),
                Ok((None, at)) => {
                    // Events were lost: look at the table itself.
                    if nl.routes(true).await.unwrap_or_default().iter().any(|r| r.dst == cidr) {
                        break Some(at.max(Instant::now()));
                    }
                }
                Ok(_) => {}
                Err(_) if Instant::now() >= deadline => break None,
                Err(_) => tokio::time::sleep(Duration::from_micros(200)).await,
            }
        };
        lat.push(seen.map_or(Duration::MAX, |at| at.saturating_duration_since(t)));
        if seen.is_none() {
            break;
        }
    }
    lat.sort();
    row.p50 = lat.get(lat.len() / 2).copied().filter(|d| *d != Duration::MAX);
    row.p99 = lat.get((lat.len() * 99 / 100).min(lat.len() - 1)).copied().filter(|d| *d != Duration::MAX);
    let m = http(&ns.path(), port, "/metrics");
    row.lists = m
        .lines()
        .find(|l| l.starts_with("gingham_datastore_lists_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|v| v.to_string())
        .unwrap_or_else(|| "every event".into());
    row.peak_mib = proc_stat(pid).2 as f64 / 1024.0;
    // Remove the claims for the next agent.
    for c in 0..50 {
        let idx = nodes + 10 + c;
        let owner = 1 + c % (nodes - 1);
        let _ = ds.delete(&block_key(&block_cidr(idx)), None).await;
        let _ = ds.delete(&affinity_key(&format!("node-{owner}"), &block_cidr(idx)), None).await;
    }
    drop(agent);
    row
}

/// Ten idle agents on one embedded store, routing on (so each watches the store; before the
/// change notification, each polled it every 2 ms): their CPU in total.
fn idle_agents(exe: &Path) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let mut apply = Command::new(G)
        .args(["apply", "-f", "-"])
        .env("GINGHAM_STORE_PATH", &store)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.66.0.0/16}\n")
        .unwrap();
    apply.wait().unwrap();
    let ns = Ns::new(format!("gsi{}-{}", std::process::id(), exe.as_os_str().len()));
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    ns.ip(&["addr", "add", "10.96.0.1/12", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    let env = vec![("GINGHAM_STORE_PATH".to_string(), store.display().to_string())];
    let agents: Vec<Agent> = (0..10)
        .map(|i| {
            let f = std::fs::File::open(ns.path()).unwrap();
            let mut c = Command::new(exe);
            c.args(["node", "run", "--ip", "10.96.0.1/12", "--nodename", &format!("idle-{i}"), "--socket"])
                .arg(dir.path().join(format!("a{i}.sock")))
                .args(["--health-listen", &format!("127.0.0.1:{}", 9500 + i)])
                .envs(env.iter().cloned())
                // Ten agents in one namespace cannot all listen for BGP; the store is measured.
                .env("CALICO_NETWORKING_BACKEND", "vxlan")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: only setns(2) between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                });
            }
            Agent(c.spawn().unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = |a: &[Agent]| a.iter().map(|x| proc_stat(x.0.id()).0).sum::<u64>();
    let before = cpu(&agents);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    (cpu(&agents) - before) as f64 / t.elapsed().as_secs_f64()
}

fn fmt_d(d: Option<Duration>) -> String {
    d.map_or("> cap".into(), |d| {
        if d < Duration::from_secs(1) {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        } else {
            format!("{:.2} s", d.as_secs_f64())
        }
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    remove_stale_namespaces();
    let sizes: Vec<usize> = std::env::var("GINGHAM_SCALE_NODES")
        .unwrap_or_else(|_| "1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let churn: u64 = std::env::var("GINGHAM_SCALE_CHURN_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rounds: usize = std::env::var("GINGHAM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let old = std::env::var("GINGHAM_OLD_AGENT").ok().map(PathBuf::from).filter(|p| p.exists());
    if old.is_none() {
        eprintln!(
            "GINGHAM_OLD_AGENT is not set (scripts/bench.sh builds commit e5049a0): the old agent's rows are skipped"
        );
    }
    let mut rows = Vec::new();
    for &nodes in &sizes {
        let backends = std::env::var("GINGHAM_SCALE_BACKENDS").unwrap_or_else(|_| "embedded,etcd,kubernetes".into());
        for backend in ["embedded", "etcd", "kubernetes"].into_iter().filter(|b| backends.contains(b)) {
            if backend == "kubernetes" && nodes > 1000 {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let etcd = (backend == "etcd").then(|| gingham_store::testing::EtcdServer::start().expect("etcd-server"));
            let kube = (backend == "kubernetes").then(|| {
                let k = gingham_store::testing::kube::KubeApiServer::start().expect("kube-apiserver");
                let crds: Vec<serde_json::Value> = gingham_manifests::render(&Default::default())
                    .into_iter()
                    .filter(|d| d["kind"] == "CustomResourceDefinition")
                    .collect();
                k.apply(&gingham_manifests::to_yaml(&crds).unwrap());
                k
            });
            if let Some(k) = &kube {
                let store = Arc::new(
                    gingham_store::kubernetes::KubeStore::connect(&gingham_store::kubernetes::KubeConfig {
                        kubeconfig: Some(k.kubeconfig.clone()),
                    })
                    .await
                    .unwrap(),
                );
                let t = Instant::now();
                populate_kube(store.clone(), nodes).await;
                eprintln!(
                    "kubernetes: {nodes} Nodes, {} Pods written in {:.1} s",
                    nodes * WEPS,
                    t.elapsed().as_secs_f64()
                );
                let env = vec![
                    ("DATASTORE_TYPE".to_string(), "kubernetes".to_string()),
                    ("KUBECONFIG".to_string(), k.kubeconfig.display().to_string()),
                    ("GINGHAM_BENCH_API".to_string(), k.url.trim_start_matches("https://").to_string()),
                ];
                rows.push(
                    measure(
                        "gingham",
                        Path::new(G),
                        backend,
                        store.clone(),
                        &env,
                        nodes,
                        churn,
                        Duration::from_secs(300),
                    )
                    .await,
                );
                continue;
            }
            let (ds, env): (Arc<dyn Datastore>, Vec<(String, String)>) = match &etcd {
                None => {
                    let path = dir.path().join("store.db");
                    (
                        Arc::new(gingham_store::embedded::EmbeddedStore::open(&path).unwrap()),
                        vec![("GINGHAM_STORE_PATH".into(), path.display().to_string())],
                    )
                }
                Some(s) => (
                    Arc::new(s.connect().await.unwrap()),
                    vec![
                        ("DATASTORE_TYPE".into(), "etcdv3".into()),
                        ("ETCD_ENDPOINTS".into(), s.config.endpoints.join(",")),
                    ],
                ),
            };
            let t = Instant::now();
            populate(ds.as_ref(), nodes).await;
            eprintln!(
                "{backend}: {nodes} nodes, {} endpoints written in {:.1} s",
                nodes * WEPS,
                t.elapsed().as_secs_f64()
            );
            let mut agents = vec![("gingham", PathBuf::from(G), Duration::from_secs(120))];
            if let Some(old) = &old {
                agents.push(("e5049a0", old.clone(), Duration::from_secs(60)));
            }
            for _ in 0..rounds {
                for (who, exe, cap) in &agents {
                    rows.push(measure(who, exe, backend, ds.clone(), &env, nodes, churn, *cap).await);
                }
                agents.reverse();
            }
        }
    }
    let new_idle = idle_agents(Path::new(G));
    let old_idle = old.as_deref().map(idle_agents);
    println!(
        "\nScale benchmark: one agent on node-0 of a simulated cluster ({WEPS} endpoints per node, one block each); churn 20 changes/s for {churn} s; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "{:<9} {:<9} {:>6} {:>9} {:>32} {:>9} {:>10} {:>13} {:>19} {:>14}",
        "agent",
        "store",
        "nodes",
        "endpoints",
        "first sync min/med/max",
        "RSS MiB",
        "peak MiB",
        "CPU % (churn)",
        "claim→route",
        "lists"
    );
    // The rounds of one agent, store and size together, in the order they first ran.
    let mut groups: Vec<Vec<&Row>> = Vec::new();
    for r in &rows {
        match groups.iter_mut().find(|g| (&g[0].who, g[0].backend, g[0].nodes) == (&r.who, r.backend, r.nodes)) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    // A phase past its cap counts as slower than any that finished.
    let med_d = |mut v: Vec<Option<Duration>>| {
        v.sort_by_key(|d| d.unwrap_or(Duration::MAX));
        v[v.len() / 2]
    };
    let med_f = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for g in &groups {
        let r = g[0];
        let mut syncs: Vec<Option<Duration>> = g.iter().map(|r| r.sync).collect();
        syncs.sort_by_key(|d| d.unwrap_or(Duration::MAX));
        let cpu: Vec<f64> = g.iter().filter_map(|r| r.cpu).collect();
        println!(
            "{:<9} {:<9} {:>6} {:>9} {:>32} {:>9.1} {:>10.1} {:>13} {:>19} {:>14}",
            r.who,
            r.backend,
            r.nodes,
            r.nodes * WEPS,
            format!("{} / {} / {}", fmt_d(syncs[0]), fmt_d(syncs[syncs.len() / 2]), fmt_d(syncs[syncs.len() - 1])),
            med_f(g.iter().map(|r| r.rss_mib).collect()),
            med_f(g.iter().map(|r| r.peak_mib).collect()),
            if cpu.is_empty() { "-".into() } else { format!("{:.1}", med_f(cpu)) },
            format!(
                "{} / {}",
                fmt_d(med_d(g.iter().map(|r| r.p50).collect())),
                fmt_d(med_d(g.iter().map(|r| r.p99).collect()))
            ),
            format!("{} ({} rounds)", g[g.len() / 2].lists, g.len())
        );
    }
    println!("(claim→route: p50 / p99 over 50 remote block claims; '> cap': not within the phase's time limit)");
    match old_idle {
        Some(o) => println!(
            "\n10 idle agents on one embedded store: gingham {new_idle:.2}% of a core in total, e5049a0 {o:.2}% ({:.2}x)",
            new_idle / o.max(0.01)
        ),
        None => println!("\n10 idle agents on one embedded store: gingham {new_idle:.2}% of a core in total"),
    }
}
