//! Policy before the first packet, measured in a 2-node lab with 100 policies: pods are created
//! on node-1 at 10 pods/s through the CNI plugin; for each, the ADD's duration, then from the
//! moment ADD returns until its first UDP packet to a pod on node-2 is answered — that pod's
//! ingress policy admits only `app == 'client'`, so the answer needs node-2's set to hold the
//! new pod's address (the propagation through the datastore), and the new pod's own egress
//! policy to be in place on node-1. The goal: first packet p99 < 5 ms. No peer runs
//! here (Calico is not on this machine): the table gives gingham's figures beside the goal.
//! `cargo bench -p gingham --bench first_packet`; GINGHAM_BENCH_PODS overrides 50.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "common/lab.rs"]
mod lab;
use lab::Lab;

const G: &str = env!("CARGO_BIN_EXE_gingham");
const PORT: u16 = 7777;

fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("pod namespace");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn policies() -> String {
    let mut y = String::from(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: server-admits-clients}\n\
         spec:\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n  - action: Allow\n    protocol: UDP\n    \
         source: {selector: app == 'client'}\n    destination: {ports: [7777]}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: clients-reach-servers}\n\
         spec:\n  selector: app == 'client'\n  types: [Egress]\n  egress:\n  - action: Allow\n    protocol: UDP\n    \
         destination: {selector: app == 'server', ports: [7777]}\n",
    );
    for i in 0..98 {
        y.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: other-{i}}}\n\
             spec:\n  order: {i}\n  selector: app == 'other-{i}'\n  ingress:\n  - action: Allow\n    protocol: TCP\n    \
             source: {{selector: app == 'peer-{i}'}}\n    destination: {{ports: [{}]}}\n",
            8000 + i
        ));
    }
    y
}

fn main() {
    let pods: usize = std::env::var("GINGHAM_BENCH_PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let lab = Lab::up("gfp", &["--nodes", "2", "--pods-per-node", "0"]);
    lab.ok(&["lab", "pod", "add", "node-2", "default/server", "--labels", "app=server"]);
    lab.apply("policies.yaml", &policies());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut state = lab.state();
    let server_ip = state.pod("default/server").expect("server pod").ips[0].clone();
    let server_ns = state.pod("default/server").expect("server pod").netns.clone();

    // The server echoes every datagram until the bench ends.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let server = in_netns(&server_ns, move || {
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind server");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let mut buf = [0u8; 64];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], peer);
            }
        }
    });

    let exe = PathBuf::from(G);
    let labels = BTreeMap::from([("app".to_string(), "client".to_string())]);
    let (mut adds, mut firsts, mut lost) = (Vec::new(), Vec::new(), 0usize);
    let pace = Duration::from_millis(100);
    let started = Instant::now();
    for i in 0..pods {
        let due = started + pace * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        let p = rt
            .block_on(gingham_lab::pod_add(
                &mut state,
                Path::new(&exe),
                "node-1",
                &format!("bench/client-{i}"),
                &labels,
                &Default::default(),
            ))
            .expect("pod add");
        let returned = Instant::now();
        adds.push(returned - t);
        let target = format!("{server_ip}:{PORT}");
        // From the moment ADD returned: a datagram every 100 µs until one is answered (2 s cap).
        let first = in_netns(&p.netns, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind client");
            sock.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 64];
            while returned.elapsed() < Duration::from_secs(2) {
                let _ = sock.send_to(b"first", &target);
                std::thread::sleep(Duration::from_micros(100));
                if sock.recv_from(&mut buf).is_ok() {
                    return Some(returned.elapsed());
                }
            }
            None
        })
        .join()
        .expect("client thread");
        match first {
            Some(d) => firsts.push(d),
            None => lost += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    if firsts.is_empty() {
        eprintln!("no pod's first packet was answered within 2 s: policy or routing is broken");
        std::process::exit(1);
    }
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "Policy before the first packet: {pods} pods at 10 pods/s on node-1 of a 2-node lab, 100 policies; each pod's first UDP packet to a policed pod on node-2"
    );
    println!("{:<40} {:>10} {:>10} {:>10}  goal", "", "p50", "p99", "max");
    let row = |name: &str, v: &mut Vec<Duration>, goal: &str| {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        let max = v.iter().max().copied().unwrap_or_default();
        println!("{name:<40} {:>10} {:>10} {:>10}  {goal}", ms(p50), ms(p99), ms(max));
    };
    row("pod created (netns + CNI ADD)", &mut adds, "");
    row("ADD returned → first packet answered", &mut firsts, "p99 < 5 ms");
    println!("(answered: {} of {pods}; the rest not within 2 s)", firsts.len());
    if lost > 0 {
        std::process::exit(1);
    }
}
