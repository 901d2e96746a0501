//! Datapath throughput: iperf3 TCP pod-to-pod on one node, across nodes natively, and across
//! nodes over VXLAN — gingham's lab beside the same path built by hand with iproute2
//! (fixtures/lab-underlay.sh, the project's reference script), in one run. Per path the three
//! labs (hand-built, gingham, gingham with natOutgoing) are up side by side and measured in
//! turn, the order rotating every run; min/median/max of the runs and the ratio of medians.
//! `cargo bench -p gingham --bench datapath`; GINGHAM_BENCH_RUNS (9) and GINGHAM_BENCH_SECS (3).

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/iperf.rs"]
mod iperf;
#[path = "common/stats.rs"]
mod stats;
use stats::{median, min_med_max};
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
    prefix: &'static str,
}

impl GinghamLab {
    /// `nat`: keep the lab pool's natOutgoing (the hand-built path has no NAT; without it the
    /// two do the same job). `prefix` names its namespaces, so two can be up at once.
    fn up(encap: &str, nat: bool, prefix: &'static str) -> GinghamLab {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let lab = GinghamLab { dir, prefix };
        sh(
            &[G, "lab", "up", "--quiet", "--nodes", "2", "--pods-per-node", "2", "--encap", encap],
            &[("GINGHAM_LAB_DIR", &d), ("GINGHAM_LAB_PREFIX", prefix)],
        );
        if !nat {
            let store = lab.dir.path().join("store.db");
            sh(
                &[G, "patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"natOutgoing":false}}"#],
                &[("GINGHAM_STORE_PATH", store.to_str().unwrap())],
            );
            std::thread::sleep(Duration::from_millis(1000)); // the agents' next sync removes the table
        }
        lab
    }
    fn ip(&self, pod: &str) -> String {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("state.json")).unwrap()).unwrap();
        s["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap()["ips"][0].as_str().unwrap().to_string()
    }
    /// The namespace of a lab pod (`default/pod-1-1`).
    fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{}", self.prefix, pod.replace('/', "-"))
    }
    /// iperf3 TCP from one lab pod to another's address: Gbit/s.
    fn iperf(&self, src: &str, dst: &str, secs: u32) -> (f64, f64) {
        iperf::iperf_with_cpu(&self.pod_ns(src), &self.pod_ns(dst), &self.ip(dst), secs, 5301, false)
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

fn main() {
    let runs: usize = std::env::var("GINGHAM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    let secs: u32 = std::env::var("GINGHAM_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // (path, hand-built mode, gingham encap, same node?)
    let paths = [
        ("pod→pod, same node", "native", "none", true),
        ("pod→pod, across nodes, native", "native", "none", false),
        ("pod→pod, across nodes, VXLAN", "vxlan", "vxlan", false),
    ];
    // Per run: (Gb/s, CPU s per GB).
    type Row = (&'static str, Vec<(f64, f64)>, Vec<(f64, f64)>, Vec<(f64, f64)>);
    let mut rows: Vec<Row> = Vec::new();
    for (name, mode, encap, same) in paths {
        // The hand-built lab lives in the root namespace's bridge, gingham's labs in their own
        // namespaces: all three are up at once.
        let _hand = HandLab::up(mode);
        let plain = GinghamLab::up(encap, false, "gb");
        let nat = GinghamLab::up(encap, true, "gn");
        let (hand_dst, hand_ip) = if same { ("pod1-2", "172.20.1.2") } else { ("pod2-1", "172.20.2.1") };
        let dst = if same { "default/pod-1-2" } else { "default/pod-2-1" };
        let (mut hand, mut ging, mut ging_nat) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            for turn in 0..3 {
                match (run + turn) % 3 {
                    0 => hand.push(iperf::iperf_with_cpu("pod1-1", hand_dst, hand_ip, secs, 5301, false)),
                    1 => ging.push(plain.iperf("default/pod-1-1", dst, secs)),
                    _ => ging_nat.push(nat.iperf("default/pod-1-1", dst, secs)),
                }
            }
        }
        rows.push((name, hand, ging, ging_nat));
    }
    println!(
        "datapath benchmark: iperf3 TCP, 1 stream, {secs} s, {runs} runs of each, in rotating order; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "hand-built = fixtures/lab-underlay.sh (iproute2 by hand, no NAT); gingham = `gingham lab up` (agents + CNI),"
    );
    println!("natOutgoing off for the like-for-like ratio; the last columns keep the pool's natOutgoing on");
    println!("Gb/s as min/median/max over the runs; ratios of medians");
    println!("CPU ms/GB: the whole machine's busy CPU time per GB received (median; below 1x is cheaper)\n");
    println!(
        "{:<32} {:>18} {:>18} {:>8} {:>18} {:>8}   {:>9} {:>9} {:>7} {:>9} {:>7}",
        "path",
        "hand-built Gb/s",
        "gingham Gb/s",
        "ratio",
        "+natOutgoing Gb/s",
        "ratio",
        "hand CPU",
        "gingham",
        "ratio",
        "+nat",
        "ratio"
    );
    for (name, h, g, gn) in rows {
        let rate = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<f64>>();
        let cpu = |v: &[(f64, f64)]| median(v.iter().map(|x| x.1 * 1e3).collect());
        let (h_, g_, gn_) = (rate(&h), rate(&g), rate(&gn));
        let (mh, mg, mgn) = (median(h_.clone()), median(g_.clone()), median(gn_.clone()));
        let (ch, cg, cgn) = (cpu(&h), cpu(&g), cpu(&gn));
        println!(
            "{:<32} {:>18} {:>18} {:>7.2}x {:>18} {:>7.2}x   {:>9.0} {:>9.0} {:>6.2}x {:>9.0} {:>6.2}x",
            name,
            min_med_max(&h_, 2),
            min_med_max(&g_, 2),
            mg / mh,
            min_med_max(&gn_, 2),
            mgn / mh,
            ch,
            cg,
            cg / ch,
            cgn,
            cgn / ch
        );
    }
}
