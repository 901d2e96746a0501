//! Datapath throughput: iperf3 TCP pod-to-pod on one node, across nodes natively, and across
//! nodes over VXLAN — gingham's lab beside the same path built by hand with iproute2
//! (fixtures/lab-underlay.sh, the project's reference script), in one run, alternating.
//! `cargo bench -p gingham --bench datapath`; GINGHAM_BENCH_RUNS (3) and GINGHAM_BENCH_SECS (3).

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/iperf.rs"]
mod iperf;
use std::time::Duration;

const G: &str = env!("CARGO_BIN_EXE_gingham");

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/fixtures/lab-underlay.sh")
}

fn sh(args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct GinghamLab {
    dir: tempfile::TempDir,
}

impl GinghamLab {
    /// `nat`: keep the lab pool's natOutgoing (the hand-built path has no NAT; without it the
    /// two do the same job).
    fn up(encap: &str, nat: bool) -> GinghamLab {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        sh(
            &[G, "lab", "up", "--quiet", "--nodes", "2", "--pods-per-node", "2", "--encap", encap],
            &[("GINGHAM_LAB_DIR", &d), ("GINGHAM_LAB_PREFIX", "gb")],
        );
        if !nat {
            let store = dir.path().join("store.db");
            sh(
                &[G, "patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"natOutgoing":false}}"#],
                &[("GINGHAM_STORE_PATH", store.to_str().unwrap())],
            );
            std::thread::sleep(Duration::from_millis(1000)); // the agents' next sync removes the table
        }
        GinghamLab { dir }
    }
    fn ip(&self, pod: &str) -> String {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("state.json")).unwrap()).unwrap();
        s["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap()["ips"][0].as_str().unwrap().to_string()
    }
}

impl Drop for GinghamLab {
    fn drop(&mut self) {
        let _ = Command::new(G).args(["lab", "down"]).env("GINGHAM_LAB_DIR", self.dir.path()).output();
    }
}

struct HandLab {
    state: tempfile::TempDir,
}

impl HandLab {
    fn up(mode: &str) -> HandLab {
        let state = tempfile::tempdir().unwrap();
        let st = state.path().join("s");
        sh(
            &["bash", script().to_str().unwrap(), "up", "-n", "2", "-p", "2", "-m", mode],
            &[("LAB_STATE", st.to_str().unwrap())],
        );
        HandLab { state }
    }
}

impl Drop for HandLab {
    fn drop(&mut self) {
        let st = self.state.path().join("s");
        let _ = Command::new("bash").args([script().to_str().unwrap(), "down"]).env("LAB_STATE", st).output();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("GINGHAM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let secs: u32 = std::env::var("GINGHAM_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // (path, hand-built mode, gingham encap, same node?)
    let paths = [
        ("pod→pod, same node", "native", "none", true),
        ("pod→pod, across nodes, native", "native", "none", false),
        ("pod→pod, across nodes, VXLAN", "vxlan", "vxlan", false),
    ];
    let mut rows: Vec<(&str, f64, f64, f64)> = Vec::new();
    for (name, mode, encap, same) in paths {
        let (mut hand, mut ging, mut ging_nat) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            {
                let _lab = HandLab::up(mode);
                let (dst, ip) = if same { ("pod1-2", "172.20.1.2") } else { ("pod2-1", "172.20.2.1") };
                hand.push(iperf::iperf("pod1-1", dst, ip, secs, 5301, false));
            }
            for (nat, out) in [(false, &mut ging), (true, &mut ging_nat)] {
                let lab = GinghamLab::up(encap, nat);
                let (dst, pod) = if same {
                    ("gb-pod-default-pod-1-2", "default/pod-1-2")
                } else {
                    ("gb-pod-default-pod-2-1", "default/pod-2-1")
                };
                out.push(iperf::iperf("gb-pod-default-pod-1-1", dst, &lab.ip(pod), secs, 5301, false));
            }
        }
        rows.push((name, median(hand), median(ging), median(ging_nat)));
    }
    println!(
        "datapath benchmark: iperf3 TCP, 1 stream, {secs} s, median of {runs} alternating runs; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "hand-built = fixtures/lab-underlay.sh (iproute2 by hand, no NAT); gingham = `gingham lab up` (agents + CNI),"
    );
    println!("natOutgoing off for the like-for-like ratio; the last columns keep the pool's natOutgoing on\n");
    println!(
        "{:<34} {:>15} {:>13} {:>13} {:>16} {:>13}",
        "path", "hand-built Gb/s", "gingham Gb/s", "gingham/hand", "+natOutgoing Gb/s", "ratio"
    );
    for (name, h, g, gn) in rows {
        println!("{:<34} {:>15.2} {:>13.2} {:>12.2}x {:>16.2} {:>12.2}x", name, h, g, g / h, gn, gn / h);
    }
}
