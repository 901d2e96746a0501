//! iperf3 between two network namespaces, for the datapath benchmarks.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// iperf3 from namespace `src` to `ip` served in namespace `dst`: TCP Gbit/s, or with `udp` the
/// 64-byte datagrams per second that arrived. Fails the benchmark loudly when iperf3 does.
#[allow(dead_code)] // not every benchmark that includes this file uses both
pub fn iperf(src: &str, dst: &str, ip: &str, secs: u32, port: u16, udp: bool) -> f64 {
    iperf_with_cpu(src, dst, ip, secs, port, udp).0
}

/// The machine's busy CPU time so far (every CPU, user + system + softirq …), from /proc/stat.
fn busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: f64 = f.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).take(6).map(|(_, v)| v).sum();
    busy / 100.0 // USER_HZ
}

/// [`iperf`], with the CPU time the whole machine spent per GB that arrived (TCP; 0 for UDP):
/// less noisy than throughput on a machine whose speed drifts, and it counts what the
/// datapath costs (the stack, the rules) rather than how fast one stream went.
#[allow(dead_code)]
pub fn iperf_with_cpu(src: &str, dst: &str, ip: &str, secs: u32, port: u16, udp: bool) -> (f64, f64) {
    let port_s = port.to_string();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(
        Command::new("ip")
            .args(["netns", "exec", dst, "iperf3", "-s", "-1", "-p", &port_s])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 server"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let secs_s = secs.to_string();
    let mut args = vec!["netns", "exec", src, "iperf3", "-c", ip, "-p", &port_s, "-t", &secs_s, "-J"];
    args.extend(["--connect-timeout", "3000"]);
    if udp {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let cpu0 = busy_secs();
    let out = Command::new("ip").args(&args).output().expect("iperf3 client");
    let cpu = busy_secs() - cpu0;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let fail = || -> ! {
        eprintln!("iperf3 {src} → {ip}: {}", String::from_utf8_lossy(&out.stdout));
        std::process::exit(1)
    };
    if udp {
        let sum = &v["end"]["sum"];
        let (packets, lost, seconds) = (sum["packets"].as_f64(), sum["lost_packets"].as_f64(), sum["seconds"].as_f64());
        match (packets, lost, seconds) {
            (Some(p), Some(l), Some(s)) if s > 0.0 => ((p - l) / s, 0.0),
            _ => fail(),
        }
    } else {
        let rx = &v["end"]["sum_received"];
        let gbps = rx["bits_per_second"].as_f64().unwrap_or_else(|| fail()) / 1e9;
        let gb = rx["bytes"].as_f64().unwrap_or_else(|| fail()) / 1e9;
        (gbps, if gb > 0.0 { cpu / gb } else { 0.0 })
    }
}
