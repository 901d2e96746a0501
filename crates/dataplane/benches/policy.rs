//! Policy programming, gingham beside a Felix-style iptables ruleset measured in the same run:
//! 1,000 local endpoints and 100 / 1,000 / 5,000 policies (each selecting the endpoints of one
//! app in one namespace, allowing another app on one port) — the full sync, one local label
//! change (set memberships and the endpoint's own chain), one pod elsewhere joining a set.
//! gingham: the engine's calculation plus one transaction. Felix-style: the ipsets (`ipset
//! restore`) and chains (`iptables-restore`: per policy `cali-pi-*`, per endpoint `cali-tw-*`,
//! a dispatch chain) this bench generates; the label change is an `ipset` del/add and the
//! endpoint's chain rewritten, the pod elsewhere one `ipset add`. Everything in a namespace the
//! bench creates and removes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gingham_dataplane::policy::{PolicyConfig, PolicyManager};
use gingham_kernel::nft::Nft;
use gingham_policy::Engine;
use gingham_policy::engine::Item;
use gingham_policy::index::ItemData;
use gingham_policy::rules::network_policy;

const ENDPOINTS: usize = 1000;
const APPS: usize = 50;
const NAMESPACES: usize = 10;
/// Label changes (and floor measurements) per size; the median is shown.
const LABEL_RUNS: usize = 21;
/// The app endpoint 0 moves to: in its namespace, as many policies select it as app-0's.
const MOVED_TO: usize = 10;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = gingham_kernel::netns::delete(&self.0);
    }
}

fn endpoint(i: usize, app: usize) -> Item {
    let ns = format!("ns-{}", i % NAMESPACES);
    let labels = BTreeMap::from([
        ("app".to_string(), format!("app-{app}")),
        ("projectcalico.org/namespace".to_string(), ns.clone()),
    ]);
    let ip = format!("10.{}.{}.{}/32", 60 + i / 65536, (i / 256) % 256, i % 256);
    Item {
        data: ItemData { labels, profiles: vec![format!("kns.{ns}")], nets: vec![ip.parse().unwrap()], ports: vec![] },
        local_interface: Some(format!("calib{i:010}")),
    }
}

fn policy_json(j: usize) -> String {
    format!(
        r#"{{"order":{j},"selector":"app == 'app-{}'","types":["Ingress"],"ingress":[{{"action":"Allow","protocol":"TCP","source":{{"selector":"app == 'app-{}'"}},"destination":{{"ports":[{}]}}}}]}}"#,
        j % APPS,
        (j + 1) % APPS,
        8000 + j % 1000
    )
}

fn run(ns: &str, program: &str, args: &[&str], input: &str) -> Duration {
    let t = Instant::now();
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed()
}

/// Endpoint `i`'s Felix-style chain when it is of app `app` (its rules, after a flush).
fn felix_endpoint(i: usize, app: usize, policies: usize, declare: bool) -> String {
    let ns = i % NAMESPACES;
    let c = format!("cali-tw-calib{i:010}");
    // Declaring the chain flushes it (iptables-restore --noflush, as Felix writes it).
    let mut t = if declare { format!(":{c} - [0:0]\n") } else { String::new() };
    let _ = write!(
        t,
        "-A {c} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A {c} -j MARK --set-xmark 0x0/0x30000\n"
    );
    for j in (0..policies).filter(|j| j % APPS == app && j % NAMESPACES == ns) {
        let _ = writeln!(
            t,
            "-A {c} -m mark --mark 0x0/0x20000 -j cali-pi-p{j}\n-A {c} -m mark --mark 0x10000/0x10000 -j RETURN"
        );
    }
    let _ = writeln!(t, "-A {c} -j DROP");
    t
}

/// The Felix-style ruleset for the same model: ipsets, then chains.
fn felix(policies: usize) -> (String, String) {
    let mut sets = String::new();
    for a in 0..APPS {
        let _ = writeln!(sets, "create cali40s-app-{a} hash:ip family inet maxelem 1048576");
        for i in (0..ENDPOINTS).filter(|i| i % APPS == a) {
            let _ = writeln!(sets, "add cali40s-app-{a} 10.{}.{}.{}", 60 + i / 65536, (i / 256) % 256, i % 256);
        }
    }
    let mut t = String::from("*filter\n:cali-to-wl-dispatch - [0:0]\n");
    for j in 0..policies {
        let _ = writeln!(t, ":cali-pi-p{j} - [0:0]");
    }
    for i in 0..ENDPOINTS {
        let _ = writeln!(t, ":cali-tw-calib{i:010} - [0:0]");
    }
    for j in 0..policies {
        let _ = writeln!(
            t,
            "-A cali-pi-p{j} -p tcp -m set --match-set cali40s-app-{} src -m multiport --dports {} -j MARK --set-xmark 0x10000/0x10000\n\
             -A cali-pi-p{j} -m mark --mark 0x10000/0x10000 -j RETURN",
            (j + 1) % APPS,
            8000 + j % 1000
        );
    }
    for i in 0..ENDPOINTS {
        t.push_str(&felix_endpoint(i, i % APPS, policies, false));
        let _ = writeln!(t, "-A cali-to-wl-dispatch -o calib{i:010} -g cali-tw-calib{i:010}");
    }
    t.push_str("-A cali-to-wl-dispatch -j DROP\nCOMMIT\n");
    (sets, t)
}

/// One Felix-style round at `n` policies, in a namespace of its own: (sync, label, pod).
fn felix_round(n: usize, round: usize) -> (Duration, Duration, Duration) {
    // Felix-style, in its own namespace.
    let f = Ns(format!("gbpf-{}-{n}-{round}", std::process::id()));
    gingham_kernel::netns::add(&f.0).unwrap();
    let (sets, rules) = felix(n);
    let felix_sync = run(&f.0, "ipset", &["restore"], &sets) + run(&f.0, "iptables-restore", &["--noflush"], &rules);
    // A local endpoint's label, back and forth: its set memberships and its chain.
    let felix_label = median(
        (0..LABEL_RUNS)
            .map(|k| {
                let (from, to) = if k % 2 == 0 { (0, MOVED_TO) } else { (MOVED_TO, 0) };
                run(
                    &f.0,
                    "ipset",
                    &["restore"],
                    &format!("del cali40s-app-{from} 10.60.0.0\nadd cali40s-app-{to} 10.60.0.0\n"),
                ) + run(
                    &f.0,
                    "iptables-restore",
                    &["--noflush"],
                    &format!("*filter\n{}COMMIT\n", felix_endpoint(0, to, n, true)),
                )
            })
            .collect(),
    );
    // A pod elsewhere: one set member.
    let felix_remote = run(&f.0, "ipset", &["restore"], "add cali40s-app-1 10.61.0.0\n");
    drop(f);
    (felix_sync, felix_label, felix_remote)
}

/// One gingham round at `n` policies, in a namespace of its own: (sync, label, pod, calc, floor).
fn gingham_round(
    rt: &tokio::runtime::Runtime,
    n: usize,
    round: usize,
) -> (Duration, Duration, Duration, Duration, Duration) {
    // gingham.
    let g = Ns(format!("gbpg-{}-{n}-{round}", std::process::id()));
    let path = gingham_kernel::netns::add(&g.0).unwrap();
    let nft = Nft::in_namespace_file(&std::fs::File::open(&path).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft, PolicyConfig::default());
    let out = rt.block_on(async {
        let t = Instant::now();
        let mut e = Engine::default();
        for i in 0..ENDPOINTS {
            e.set_item(&format!("wep/{i}"), Some(endpoint(i, i % APPS)));
        }
        for j in 0..n {
            let spec = serde_json::from_str(&policy_json(j)).unwrap();
            e.set_policy(
                &format!("ns-{}/p{j}", j % NAMESPACES),
                Some(network_policy(&spec, &format!("ns-{}", j % NAMESPACES)).unwrap()),
            );
        }
        let d = e.take_dirty();
        let calc = t.elapsed();
        m.apply(&e, &d).await.unwrap();
        let sync = t.elapsed();
        // One label change, back and forth: endpoint 0 moves from app-0 to app-10 (from one
        // list of 20 policies to another) and back. The bench's 1,000 endpoints have 50
        // distinct policy lists, as replicas do; a cluster of unique pods shares less.
        let mut labels = Vec::new();
        for k in 0..LABEL_RUNS {
            let t = Instant::now();
            e.set_item("wep/0", Some(endpoint(0, if k % 2 == 0 { MOVED_TO } else { 0 })));
            let d = e.take_dirty();
            m.apply(&e, &d).await.unwrap();
            labels.push(t.elapsed());
        }
        let label = median(labels);
        // The kernel's floor for any change that adds a verdict: it re-validates every jump
        // of the table at commit. One chain with one `accept` rule, added and removed.
        let floor = {
            use gingham_kernel::nft::{Op, Rule, Statement};
            let t = gingham_dataplane::policy::table();
            let mut runs = Vec::new();
            for _ in 0..LABEL_RUNS {
                let s = Instant::now();
                m.nft()
                    .apply(&[
                        Op::AddChain(t.clone(), "floor".into(), None),
                        Op::AddRule(t.clone(), "floor".into(), Rule::new(vec![], vec![Statement::Accept])),
                    ])
                    .await
                    .unwrap();
                runs.push(s.elapsed());
                let gone = [Op::FlushChain(t.clone(), "floor".into()), Op::DeleteChain(t.clone(), "floor".into())];
                m.nft().apply(&gone).await.unwrap();
            }
            median(runs)
        };
        // A pod elsewhere starts: only set members change.
        let t = Instant::now();
        let mut remote = endpoint(ENDPOINTS, 1);
        remote.local_interface = None;
        e.set_item("wep/remote", Some(remote));
        let d = e.take_dirty();
        m.apply(&e, &d).await.unwrap();
        (sync, label, t.elapsed(), calc, floor)
    });
    drop(m);
    drop(g);
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!(
        "Policy programming: {ENDPOINTS} local endpoints, N policies (each: {} endpoints selected, an ingress rule with a selector set and a port)",
        ENDPOINTS / APPS / NAMESPACES * NAMESPACES / NAMESPACES
    );
    println!(
        "{:>9} {:>13} {:>13} {:>6} {:>13} {:>13} {:>6} {:>13} {:>13} {:>6} {:>11} {:>13}",
        "policies",
        "gingham sync",
        "Felix sync",
        "ratio",
        "gingham label",
        "Felix label",
        "ratio",
        "gingham pod",
        "Felix pod",
        "ratio",
        "sync: calc",
        "kernel floor"
    );
    let rounds: usize = std::env::var("GINGHAM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let mut sync_spreads = Vec::new();
    for n in [100usize, 1000, 5000] {
        // Alternating rounds (who goes first swaps each round); each figure is a median of them.
        let (mut fx, mut gg) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                fx.push(felix_round(n, round));
                gg.push(gingham_round(&rt, n, round));
            } else {
                gg.push(gingham_round(&rt, n, round));
                fx.push(felix_round(n, round));
            }
        }
        let (felix_sync, felix_label, felix_remote) = (
            median(fx.iter().map(|r| r.0).collect()),
            median(fx.iter().map(|r| r.1).collect()),
            median(fx.iter().map(|r| r.2).collect()),
        );
        let (sync, label, remote, calc, floor) = (
            median(gg.iter().map(|r| r.0).collect()),
            median(gg.iter().map(|r| r.1).collect()),
            median(gg.iter().map(|r| r.2).collect()),
            median(gg.iter().map(|r| r.3).collect()),
            median(gg.iter().map(|r| r.4).collect()),
        );
        let spread = |v: Vec<Duration>| {
            let ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            let (lo, hi) = ms.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            format!("{lo:.1}-{hi:.1}")
        };
        sync_spreads.push((n, spread(gg.iter().map(|r| r.0).collect()), spread(fx.iter().map(|r| r.0).collect())));
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        println!(
            "{n:>9} {:>13} {:>13} {:>5.2}x {:>13} {:>13} {:>5.2}x {:>13} {:>13} {:>5.2}x {:>11} {:>13}",
            ms(sync),
            ms(felix_sync),
            sync.as_secs_f64() / felix_sync.as_secs_f64(),
            ms(label),
            ms(felix_label),
            label.as_secs_f64() / felix_label.as_secs_f64(),
            ms(remote),
            ms(felix_remote),
            remote.as_secs_f64() / felix_remote.as_secs_f64(),
            ms(calc),
            ms(floor)
        );
    }
    for (n, g, f) in sync_spreads {
        println!("sync at {n} policies, min-max over the rounds: gingham {g} ms, Felix-style {f} ms");
    }
    println!(
        "(every figure: the median of {rounds} alternating rounds, ratios of medians; label: a local endpoint changes app and back, each round's median of {LABEL_RUNS} — its set memberships and its own chain, now a goto to the chain its 20 new policies' replicas share; pod: an endpoint on another node joins a set.\n \
         gingham: calculation + one transaction; Felix-style: ipset restore + iptables-restore, process start included as Felix pays it;\n \
         kernel floor: one chain with one accept rule added to gingham's table — every commit adding a verdict re-validates the table's jumps)"
    );
}
