//! A block claimed on one node → its route in another node's kernel, learned over BGP: a
//! three-node lab (`--encap none`, node-to-node mesh), 100 block claims for node-1 written to
//! the store, each timed until node-2's kernel announces the route (stamped by a thread of its
//! own in node-2's namespace). Calico's path for the same (confd renders BIRD's config, BIRD
//! reloads, BGP, BIRD programs the kernel) takes seconds; the goal here is p99 < 100 ms.
//! `cargo bench -p gingham --bench bgp_claim` (as root).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use gingham_ipam::block::AllocationBlock;
use gingham_ipam::model::{BlockAffinity, affinity_key, block_key};
use gingham_kernel::KernelEvent;
use gingham_store::{Condition, Datastore, TxnOp};
use ipnet::IpNet;

const G: &str = env!("CARGO_BIN_EXE_gingham");
const CLAIMS: usize = 100;

struct Lab(tempfile::TempDir, String);

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(G).arg("lab").arg("--dir").arg(self.0.path()).args(["--prefix", &self.1, "down"]).status();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("gbc{}", std::process::id() % 10000);
    let up = Command::new(G)
        .arg("lab")
        .arg("--dir")
        .arg(dir.path())
        .args(["--prefix", &prefix, "up", "--encap", "none", "--nodes", "3", "--pods-per-node", "1", "-q"])
        .status()
        .expect("running gingham lab up");
    let lab = Lab(dir, prefix.clone());
    assert!(up.success(), "lab up failed");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = lab.0.path().join("store.db");
    let ds = gingham_store::embedded::EmbeddedStore::open(&store).expect("the lab's store");
    // Route events in node-2, stamped where they arrive.
    let (tx, stamps) = std::sync::mpsc::channel::<(IpNet, Instant)>();
    let node2 = std::fs::File::open(format!("/run/netns/{prefix}-node-2")).unwrap();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(node2.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut events = gingham_kernel::route_and_link_events().unwrap();
            let _ = ready_tx.send(());
            while let Some(ev) = events.recv().await {
                if let KernelEvent::Route { deleted: false, route } = ev {
                    if tx.send((route.dst, Instant::now())).is_err() {
                        return;
                    }
                }
            }
        });
    });
    ready.recv_timeout(Duration::from_secs(10)).expect("route events in node-2");
    let mut lat = Vec::new();
    // Blocks of the lab's pool (172.20.0.0/16) from 172.20.128.0 up, skipping any in use.
    let mut next = 0u32;
    for c in 0..CLAIMS {
        let cidr = loop {
            let n = IpNet::new(IpAddr::V4(Ipv4Addr::from(0xac14_8000u32 + (next << 6))), 26).unwrap();
            next += 1;
            if rt.block_on(ds.get(&block_key(&n))).expect("reading the store").is_none() {
                break n;
            }
        };
        let b = AllocationBlock::new(cidr, Some("host:node-1".into()), Some("2026-12-02T00:00:00Z".into()), 1);
        let ops = vec![
            TxnOp::Put { key: block_key(&cidr), value: serde_json::to_vec(&b).unwrap(), condition: Condition::Any },
            TxnOp::Put {
                key: affinity_key("node-1", &cidr),
                value: serde_json::to_vec(&BlockAffinity::confirmed()).unwrap(),
                condition: Condition::Any,
            },
        ];
        while stamps.try_recv().is_ok() {}
        let t = Instant::now();
        rt.block_on(ds.txn(&ops)).expect("claiming a block");
        let deadline = t + Duration::from_secs(10);
        let at = loop {
            match stamps.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((dst, at)) if dst == cidr => break at,
                Ok(_) => {}
                Err(_) => panic!("claim {c}: no route for {cidr} in node-2 within 10 s"),
            }
        };
        lat.push(at.saturating_duration_since(t));
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\nBGP claim → route: {CLAIMS} block claims for node-1, each until node-2's kernel has its route (3-node lab, node-to-node mesh); load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!("{:<10} {:>9} {:>9} {:>9}   goal", "path", "p50 ms", "p99 ms", "max ms");
    println!(
        "{:<10} {:>9.1} {:>9.1} {:>9.1}   p99 < 100 ms (Calico: confd + BIRD reload, seconds)",
        "gingham",
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() * 99 / 100]),
        ms(lat[lat.len() - 1])
    );
}
