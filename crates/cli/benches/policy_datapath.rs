//! What policy costs on the wire: pod-to-pod across two lab nodes (native routing), iperf3 TCP
//! throughput and the 64-byte UDP packet rate, with no policy at all (pods keep the untracked
//! fast path), with one small policy on the measured pods (tracked: what giving up `notrack`
//! costs), and with 10,000 rules programmed besides (100 policies of 100 rules each, on other
//! pods of the same nodes: in the kernel, but not on the measured path — verdict maps send each
//! packet straight to its own endpoint's chain). Every column is measured in the same run; the
//! ratio is to the no-policy row. The three states alternate round by round (policies applied
//! and deleted between them), so that the machine's drift hits each alike; min / median / max
//! of the rounds are shown and the ratios are of medians.
//! `cargo bench -p gingham --bench policy_datapath`; GINGHAM_BENCH_RUNS (9) rounds of
//! GINGHAM_BENCH_SECS (3) per measurement.

use std::fmt::Write as _;
use std::process::Command;

#[path = "common/iperf.rs"]
mod iperf;
#[path = "common/lab.rs"]
mod lab;
use iperf::iperf;
use lab::Lab;
use std::time::Duration;

/// The pod namespace of lab pod `pod`.
fn pod_ns(lab: &Lab, pod: &str) -> String {
    format!("{}-pod-{}", lab.prefix, pod.replace('/', "-"))
}

/// Pod `pod`'s first address.
fn pod_ip(lab: &Lab, pod: &str) -> String {
    lab.state().pods.iter().find(|p| p.name == pod).and_then(|p| p.ips.first().cloned()).expect("pod address")
}

/// Rules in node `n`'s policy table.
fn rules(lab: &Lab, n: &str) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{}-{n}", lab.prefix), "nft", "list", "table", "inet", "gingham"])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut in_chain = false;
    let mut count = 0;
    for l in text.lines().map(str::trim) {
        if l.starts_with("chain ") {
            in_chain = true;
        } else if l == "}" {
            in_chain = false;
        } else if in_chain && !l.is_empty() && !l.starts_with("type ") {
            count += 1;
        }
    }
    count
}

/// (min, median, max).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

const SMALL: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: measured}\n\
    spec:\n  order: 1\n  selector: projectcalico.org/namespace == 'default'\n  types: [Ingress, Egress]\n  \
    ingress:\n  - action: Allow\n    source: {selector: projectcalico.org/namespace == 'default'}\n  \
    egress:\n  - action: Allow\n    destination: {selector: projectcalico.org/namespace == 'default'}\n";

/// 100 policies × 100 rules on the `others` pods.
fn bulk() -> String {
    let mut y = String::new();
    for i in 0..100 {
        let _ = write!(
            y,
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: bulk-{i}}}\n\
             spec:\n  order: {}\n  selector: app == 'other'\n  types: [Ingress]\n  ingress:\n",
            10 + i
        );
        for j in 0..100 {
            let _ = write!(
                y,
                "  - action: Allow\n    protocol: TCP\n    source: {{nets: [10.200.{i}.{j}/32]}}\n    destination: {{ports: [{}]}}\n",
                1000 + j
            );
        }
    }
    y
}

fn main() {
    let runs: usize = std::env::var("GINGHAM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    let secs: u32 = std::env::var("GINGHAM_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let lab = Lab::up("gpd", &["--nodes", "2", "--pods-per-node", "1", "--encap", "none"]);
    // natOutgoing off: pod-to-pod only, as the datapath bench's like-for-like rows.
    lab.ok(&["patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"natOutgoing":false}}"#]);
    for n in ["node-1", "node-2"] {
        lab.ok(&["lab", "pod", "add", n, &format!("others/o-{n}"), "--labels", "app=other"]);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (src, dst) = (pod_ns(&lab, "default/pod-1-1"), pod_ns(&lab, "default/pod-2-1"));
    let ip = pod_ip(&lab, "default/pod-2-1");
    let names = ["no policy (untracked fast path)", "one policy on the measured pods", "+ 10,000 rules on other pods"];
    let (mut tcp, mut udp, mut counted) = (vec![Vec::new(); 3], vec![Vec::new(); 3], [0usize; 3]);
    let bulk = bulk();
    for _ in 0..runs {
        for (state, _) in names.iter().enumerate() {
            match state {
                1 => lab.apply("small.yaml", SMALL),
                2 => lab.apply("bulk.yaml", &bulk),
                _ => {}
            }
            counted[state] = rules(&lab, "node-2");
            tcp[state].push(iperf(&src, &dst, &ip, secs, 5302, false));
            udp[state].push(iperf(&src, &dst, &ip, secs, 5302, true));
        }
        lab.delete("bulk.yaml");
        lab.delete("small.yaml");
    }

    println!(
        "Policy datapath: iperf3 pod-1-1 → pod-2-1 across nodes (native), 1 stream, {secs} s, {runs} alternating rounds; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "{:<34} {:>8} {:>22} {:>7} {:>26} {:>7}",
        "policy", "rules", "TCP Gb/s min/med/max", "ratio", "64 B UDP pps min/med/max", "ratio"
    );
    let stats: Vec<_> = (0..3).map(|i| (spread(tcp[i].clone()), spread(udp[i].clone()))).collect();
    let (base_tcp, base_udp) = (stats[0].0.1, stats[0].1.1);
    for (i, name) in names.iter().enumerate() {
        let ((t0, t1, t2), (u0, u1, u2)) = stats[i];
        println!(
            "{name:<34} {:>8} {:>6.2} /{:>6.2} /{:>6.2} {:>6.2}x {:>8.0} /{:>7.0} /{:>7.0} {:>6.2}x",
            counted[i],
            t0,
            t1,
            t2,
            t1 / base_tcp,
            u0,
            u1,
            u2,
            u1 / base_udp
        );
    }
    println!("(rules: in node-2's policy table; goal: ≥ 0.9× the no-rules packet rate with 10,000 rules programmed)");
}
