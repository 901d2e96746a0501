//! What one nftables change costs: libnftables inside the agent (crates/kernel's `Nft`) beside
//! spawning an `nft -f -` process per change (what the agent did before), on a table that also
//! holds 10,000 rules, in a namespace of its own. `cargo bench -p gingham-kernel --bench nft`.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gingham_kernel::netns;
use gingham_kernel::nft::*;

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
    let started = Instant::now();
    nft.apply(&ops).await.unwrap();
    let load = started.elapsed();
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
    for i in 0..200u32 {
        let s = Instant::now();
        nft.apply(&[Op::AddElements(t.clone(), "s".into(), vec![elem(i)])]).await.unwrap();
        lib_elem.push(s.elapsed());
        let s = Instant::now();
        nft.apply(&chain_ops(i)).await.unwrap();
        lib_chain.push(s.elapsed());
    }
    for i in 200..260u32 {
        let s = Instant::now();
        nft_process(&ns, &render(&[Op::AddElements(t.clone(), "s".into(), vec![elem(i)])]).unwrap());
        proc_elem.push(s.elapsed());
        let s = Instant::now();
        nft_process(&ns, &render(&chain_ops(i)).unwrap());
        proc_chain.push(s.elapsed());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "nftables change cost, table with 10,000 rules (loaded in {:.0} ms); load average {}",
        ms(load),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "{:<34} {:>14} {:>14} {:>16}",
        "change", "nft process p50/p99 ms", "libnftables p50/p99 ms", "p50 lib/process"
    );
    for (what, p, l) in
        [("add one set element", proc_elem, lib_elem), ("replace one chain (flush + 2 rules)", proc_chain, lib_chain)]
    {
        let (pp50, pp99) = pct(p);
        let (lp50, lp99) = pct(l);
        println!(
            "{what:<34} {:>10.2} / {:<9.2} {:>11.2} / {:<9.2} {:>13.3}x",
            ms(pp50),
            ms(pp99),
            ms(lp50),
            ms(lp99),
            lp50.as_secs_f64() / pp50.as_secs_f64()
        );
    }
    nft.apply(&[Op::DeleteTable(t)]).await.unwrap();
}
