//! iperf3 between two network namespaces, for the datapath benchmarks.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// iperf3 from namespace `src` to `ip` served in namespace `dst`: TCP Gbit/s, or with `udp` the
/// 64-byte datagrams per second that arrived. Fails the benchmark loudly when iperf3 does.
pub fn iperf(src: &str, dst: &str, ip: &str, secs: u32, port: u16, udp: bool) -> f64 {
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
    let out = Command::new("ip").args(&args).output().expect("iperf3 client");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let fail = || -> ! {
        eprintln!("iperf3 {src} → {ip}: {}", String::from_utf8_lossy(&out.stdout));
        std::process::exit(1)
    };
    if udp {
        let sum = &v["end"]["sum"];
        let (packets, lost, seconds) = (sum["packets"].as_f64(), sum["lost_packets"].as_f64(), sum["seconds"].as_f64());
        match (packets, lost, seconds) {
            (Some(p), Some(l), Some(s)) if s > 0.0 => (p - l) / s,
            _ => fail(),
        }
    } else {
        v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or_else(|| fail()) / 1e9
    }
}
