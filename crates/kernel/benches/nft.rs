//! What one nftables change costs: gingham's netlink encoding (crates/kernel's `Nft::apply`)
//! beside libnftables inside the process (what the agent used before, `apply_with_libnftables`)
//! and an `nft -f -` process per change (before that), on a table that also holds 10,000
//! rules, in a namespace of its own; and loading those 10,000 rules both in-process ways,
//! GINGHAM_BENCH_ROUNDS (9) times alternating (min/median/max, ratio of medians). The changes
//! are interleaved one by one, 200 of each.
//! `cargo bench -p gingham-kernel --bench nft`.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gingham_kernel::netns;
use gingham_kernel::nft::*;

#[path = "../../cli/benches/common/stats.rs"]
mod stats;

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

fn nft_process(ns: &std::fs::File, script: &str) {
    let mut c = netns::command(ns, "nft").unwrap();
    let mut child =
        c.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("nft");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let name = format!("gkb-{}", std::process::id());
    let path = netns::add(&name).expect("a network namespace");
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = netns::delete(&self.0);
        }
    }
    let _del = Del(name);
    let ns = std::fs::File::open(&path).unwrap();
    let nft = Nft::in_namespace_file(&ns).unwrap();
    let t = Table::new(Family::Inet, "bench");
    let mut ops = vec![
        Op::AddTable(t.clone()),
        Op::AddSet(t.clone(), Set { name: "s".into(), kind: SetType::Ipv4Addr, interval: true }),
        Op::AddChain(t.clone(), "small".into(), None),
        Op::AddChain(t.clone(), "big".into(), None),
    ];
    for i in 0..10_000u32 {
        let net = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
        ops.push(Op::AddRule(
            t.clone(),
            "big".into(),
            Rule::new(
                vec![Match::Addr { addr: Addr::Source, net, negate: false }, Match::TcpDport(1000 + (i % 1000) as u16)],
                vec![Statement::Counter, Statement::Accept],
            ),
        ));
    }
    // Loading 10,000 rules, both in-process ways, into a twin table (removed after each load),
    // in alternating rounds; then the bench table itself, over netlink.
    let rounds: usize = std::env::var("GINGHAM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let twin = Table::new(Family::Inet, "twin");
    let twin_ops: Vec<Op> = ops
        .iter()
        .map(|o| match o {
            Op::AddTable(_) => Op::AddTable(twin.clone()),
            Op::AddSet(_, s) => Op::AddSet(twin.clone(), s.clone()),
            Op::AddChain(_, c, b) => Op::AddChain(twin.clone(), c.clone(), *b),
            Op::AddRule(_, c, r) => Op::AddRule(twin.clone(), c.clone(), r.clone()),
            other => other.clone(),
        })
        .collect();
    let (mut lib_loads, mut wire_loads) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for lib in if round % 2 == 0 { [true, false] } else { [false, true] } {
            let started = Instant::now();
            if lib {
                nft.apply_with_libnftables(&twin_ops).await.unwrap();
                lib_loads.push(started.elapsed().as_secs_f64() * 1e3);
            } else {
                nft.apply(&twin_ops).await.unwrap();
                wire_loads.push(started.elapsed().as_secs_f64() * 1e3);
            }
            nft.apply(&[Op::DeleteTable(twin.clone())]).await.unwrap();
        }
    }
    nft.apply(&ops).await.unwrap();
    let elem = |i: u32| Element::Net(format!("172.{}.{}.0/24", 16 + i / 256, i % 256).parse().unwrap());
    let chain_ops = |i: u32| {
        vec![
            Op::FlushChain(t.clone(), "small".into()),
            Op::AddRule(
                t.clone(),
                "small".into(),
                Rule::new(
                    vec![Match::AddrInSet { addr: Addr::Source, v6: false, set: "s".into(), negate: false }],
                    vec![Statement::Accept],
                ),
            ),
            Op::AddRule(
                t.clone(),
                "small".into(),
                Rule::new(vec![Match::TcpDport(1 + i as u16)], vec![Statement::Drop]),
            ),
        ]
    };
    let (mut lib_elem, mut lib_chain, mut proc_elem, mut proc_chain) = (vec![], vec![], vec![], vec![]);
    let (mut wire_elem, mut wire_chain) = (vec![], vec![]);
    // Alternating, so that drift in the machine's load hits both alike.
    for i in 0..200u32 {
        let s = Instant::now();
        nft.apply(&[Op::AddElements(t.clone(), "s".into(), vec![elem(2 * i)])]).await.unwrap();
        wire_elem.push(s.elapsed());
        let s = Instant::now();
        nft.apply(&chain_ops(i)).await.unwrap();
        wire_chain.push(s.elapsed());
        let s = Instant::now();
        nft.apply_with_libnftables(&[Op::AddElements(t.clone(), "s".into(), vec![elem(2 * i + 1)])]).await.unwrap();
        lib_elem.push(s.elapsed());
        let s = Instant::now();
        nft.apply_with_libnftables(&chain_ops(i)).await.unwrap();
        lib_chain.push(s.elapsed());
    }
    for i in 400..460u32 {
        let s = Instant::now();
        nft_process(&ns, &render(&[Op::AddElements(t.clone(), "s".into(), vec![elem(i)])]).unwrap());
        proc_elem.push(s.elapsed());
        let s = Instant::now();
        nft_process(&ns, &render(&chain_ops(i)).unwrap());
        proc_chain.push(s.elapsed());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |v: &[f64]| stats::median(v.to_vec());
    let spread = |v: &[f64]| stats::min_med_max(v, 0);
    println!(
        "nftables change cost, table with 10,000 rules; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "loading the 10,000 rules, {rounds} alternating rounds, ms min/median/max: gingham netlink {}, libnftables {}: {:.2}x",
        spread(&wire_loads),
        spread(&lib_loads),
        median(&wire_loads) / median(&lib_loads)
    );
    println!(
        "{:<36} {:>22} {:>22} {:>22} {:>10} {:>10}",
        "change (p50 / p99 ms)", "nft process", "libnftables", "gingham netlink", "vs lib", "vs nft"
    );
    for (what, p, l, w) in [
        ("add one set element", proc_elem, lib_elem, wire_elem),
        ("replace one chain (flush + 2 rules)", proc_chain, lib_chain, wire_chain),
    ] {
        let (pp50, pp99) = pct(p);
        let (lp50, lp99) = pct(l);
        let (wp50, wp99) = pct(w);
        println!(
            "{what:<36} {:>10.3} / {:<9.3} {:>10.3} / {:<9.3} {:>10.3} / {:<9.3} {:>9.3}x {:>9.4}x",
            ms(pp50),
            ms(pp99),
            ms(lp50),
            ms(lp99),
            ms(wp50),
            ms(wp99),
            wp50.as_secs_f64() / lp50.as_secs_f64(),
            wp50.as_secs_f64() / pp50.as_secs_f64()
        );
    }
    nft.apply(&[Op::DeleteTable(t)]).await.unwrap();
}
