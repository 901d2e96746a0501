//! gingham's speaker against real BGP implementations (BIRD 2 here; installed by the test
//! command), each test in a network namespace of its own with the speakers on addresses of
//! its loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_bgp::fsm::{Config, State};
use gingham_bgp::packet::{AsPathSegment, Attrs, SegmentKind};
use gingham_bgp::rib::FibChange;
use gingham_bgp::tasks::{self, Command as Cmd, PeerConfig, SocketHooks, Speaker, SpeakerConfig};
use ipnet::IpNet;

const AS: u32 = 64512;
const WAIT: Duration = Duration::from_secs(20);

/// A namespace for one test, removed (with everything in it) on every exit path.
struct Ns {
    name: String,
    path: PathBuf,
}

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("gbgp-{}-{tag}", std::process::id());
        let _ = gingham_kernel::netns::delete(&name);
        let path = gingham_kernel::netns::add(&name).expect("creating a network namespace");
        Ns { name, path }
    }

    /// Run the test body on a thread inside the namespace, with a runtime of its own.
    fn run<F: std::future::Future<Output = ()>>(&self, body: impl FnOnce() -> F + Send + 'static) {
        gingham_kernel::in_netns(&self.path, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let nl = gingham_kernel::Netlink::current().unwrap();
                let lo = nl.link("lo").await.unwrap().unwrap();
                nl.set_up(lo.index).await.unwrap();
                for a in ["10.255.0.1/32", "10.255.0.2/32", "fd00:255::1/128", "fd00:255::2/128"] {
                    nl.add_address(lo.index, a.parse().unwrap()).await.unwrap();
                }
                body().await
            })
        })
        .expect("entering the test namespace");
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = gingham_kernel::netns::delete(&self.name);
    }
}

/// Another namespace joined to the test's by a veth (10.254.0.2 here, 10.254.0.3 there),
/// with 10.255.0.3 on its loopback: a router that is not on this host. Each side routes the
/// other's loopback addresses over the veth. Call from inside the test's namespace.
struct Far {
    _ns: Ns,
    file: std::fs::File,
}

impl Far {
    async fn new(tag: &str) -> Far {
        let ns = Ns::new(tag);
        let file = std::fs::File::open(&ns.path).unwrap();
        let here = gingham_kernel::Netlink::current().unwrap();
        here.add_veth("far0", "far1", &file, 1500, None).await.unwrap();
        let i = here.link("far0").await.unwrap().unwrap().index;
        here.add_address(i, "10.254.0.2/24".parse().unwrap()).await.unwrap();
        here.set_up(i).await.unwrap();
        let mut r = gingham_kernel::Route::via(net("10.255.0.3/32"), "10.254.0.3".parse().unwrap(), i, 4);
        r.scope_link = false;
        here.replace_route(&r).await.unwrap();
        let path = ns.path.clone();
        // The far side's own links, from a thread inside it.
        let far = gingham_kernel::Netlink::in_namespace(&path).unwrap();
        let lo = far.link("lo").await.unwrap().unwrap().index;
        far.set_up(lo).await.unwrap();
        far.add_address(lo, "10.255.0.3/32".parse().unwrap()).await.unwrap();
        let j = far.link("far1").await.unwrap().unwrap().index;
        far.add_address(j, "10.254.0.3/24".parse().unwrap()).await.unwrap();
        far.set_up(j).await.unwrap();
        let mut r = gingham_kernel::Route::via(net("10.255.0.0/24"), "10.254.0.2".parse().unwrap(), j, 4);
        r.scope_link = false;
        far.replace_route(&r).await.unwrap();
        Far { _ns: ns, file }
    }
}

/// A BIRD 2 daemon with the given protocol configuration, stopped on drop.
struct Bird {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bird {
    fn start(router_id: &str, protocols: &str) -> Bird {
        Bird::start_in(None, router_id, protocols)
    }

    /// In the far namespace, when given.
    fn start_in(far: Option<&Far>, router_id: &str, protocols: &str) -> Bird {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("bird.conf");
        let socket = dir.path().join("bird.ctl");
        std::fs::write(
            &conf,
            format!(
                "router id {router_id};\nlog \"{}\" all;\nprotocol device {{ }}\n\
                 protocol direct {{ ipv4; ipv6; interface \"lo\"; }}\n{protocols}\n",
                dir.path().join("bird.log").display()
            ),
        )
        .unwrap();
        // A configuration BIRD refuses is the test's mistake: say so plainly.
        let check = Command::new("bird").arg("-p").arg("-c").arg(&conf).output().expect("bird2 must be installed");
        assert!(check.status.success(), "BIRD refuses its configuration: {}", String::from_utf8_lossy(&check.stderr));
        let mut cmd = match far {
            Some(f) => gingham_kernel::netns::command(&f.file, "bird").unwrap(),
            None => Command::new("bird"),
        };
        let child = cmd
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bird2 must be installed (scripts/install-deps.sh)");
        let mut b = Bird { child, socket, _dir: dir };
        let t = Instant::now();
        while !b.socket.exists() {
            if let Ok(Some(status)) = b.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = b.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("BIRD exited ({status}): {err}");
            }
            assert!(t.elapsed() < WAIT, "BIRD did not start: {}", b.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("bird.log")).unwrap_or_default()
    }

    fn cli(&self, cmd: &str) -> String {
        let out = Command::new("birdc").arg("-s").arg(&self.socket).args(cmd.split_whitespace()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until `birdc cmd` output satisfies `ok`.
    async fn until(&self, cmd: &str, ok: impl Fn(&str) -> bool) -> String {
        poll(&format!("birdc {cmd}"), || self.cli(cmd), ok, || self.log()).await
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `get` until its output satisfies `ok` (failing after WAIT with the output and `log`).
async fn poll(what: &str, get: impl Fn() -> String, ok: impl Fn(&str) -> bool, log: impl Fn() -> String) -> String {
    let t = Instant::now();
    loop {
        let out = get();
        if ok(&out) {
            return out;
        }
        assert!(t.elapsed() < WAIT, "`{what}` never became what was expected:\n{out}\nlog:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn peer(name: &str, address: &str, remote_as: u32) -> PeerConfig {
    let mut fsm = Config::new(AS, remote_as, Ipv4Addr::new(10, 255, 0, 2));
    fsm.connect_retry = Duration::from_secs(1);
    PeerConfig {
        source: Some("10.255.0.2".parse().unwrap()),
        next_hop_v4: Some(Ipv4Addr::new(10, 255, 0, 2)),
        next_hop_v6: Some("fd00:255::2".parse().unwrap()),
        ..PeerConfig::new(name, address.parse().unwrap(), fsm)
    }
}

async fn speaker(cluster_id: Option<Ipv4Addr>) -> Speaker {
    FIB.with(|f| f.borrow_mut().clear());
    let keys = SocketHooks {
        md5: Arc::new(|fd, peer, key| gingham_kernel::tcp::set_md5_key(fd, peer, key)),
        ttl_security: Arc::new(gingham_kernel::tcp::set_ttl_security),
    };
    tasks::start(
        SpeakerConfig {
            asn: AS,
            router_id: Ipv4Addr::new(10, 255, 0, 2),
            cluster_id,
            listen: Some(SocketAddr::new("10.255.0.2".parse().unwrap(), 179)),
            max_queued: tasks::MAX_QUEUED,
        },
        Some(keys),
    )
    .await
    .expect("starting the speaker")
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn attrs() -> Attrs {
    Attrs::default()
}

thread_local! {
    /// The latest forwarding state per prefix this test's speaker reported (each test runs
    /// on a thread of its own).
    static FIB: std::cell::RefCell<std::collections::HashMap<IpNet, Vec<IpAddr>>> = Default::default();
}

/// Wait until the forwarding state of `prefix` satisfies `ok` (changes for other prefixes
/// are remembered, not lost).
async fn fib_until(s: &mut Speaker, prefix: &str, ok: impl Fn(&[IpAddr]) -> bool) -> Vec<IpAddr> {
    let want = net(prefix);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(h) = FIB.with(|f| f.borrow().get(&want).cloned()).filter(|h| ok(h)) {
            return h;
        }
        match tokio::time::timeout_at(deadline, s.fib.recv()).await {
            Ok(Some(batch)) => FIB.with(|f| {
                for FibChange { prefix, next_hops } in batch {
                    f.borrow_mut().insert(prefix, next_hops.to_vec());
                }
            }),
            Ok(None) => panic!("the speaker stopped"),
            Err(_) => panic!(
                "no forwarding change for {prefix} as expected within {WAIT:?}; last: {:?}",
                FIB.with(|f| f.borrow().get(&want).cloned())
            ),
        };
    }
}

async fn state_of(s: &Speaker, name: &str) -> State {
    s.status().await.iter().find(|p| p.name == name).map(|p| p.state).unwrap_or(State::Idle)
}

async fn established(s: &Speaker, name: &str) {
    let t = Instant::now();
    while state_of(s, name).await != State::Established {
        assert!(t.elapsed() < WAIT, "{name} never Established: {:?}", s.status().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const BIRD_IBGP: &str = r#"
protocol static s4 { ipv4; route 10.20.0.0/26 blackhole; }
protocol static s6 { ipv6; route fd00:20::/122 blackhole; }
protocol bgp gingham {
  local 10.255.0.1 as 64512;
  neighbor 10.255.0.2 as 64512;
  strict bind on;
  multihop;
  graceful restart;
  connect retry time 1;
  ipv4 { import all; export all; add paths on; };
  ipv6 { import all; export all; add paths on; next hop address fd00:255::1; };
}
"#;

#[test]
fn ibgp_with_bird_both_families_both_ways() {
    let ns = Ns::new("ibgp");
    ns.run(|| async {
        let bird = Bird::start("10.255.0.1", BIRD_IBGP);
        let mut s = speaker(None).await;
        s.commands.send(Cmd::SetPeers(vec![peer("Mesh_10_255_0_1", "10.255.0.1", AS)])).unwrap();
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        s.commands.send(Cmd::Originate(net("fd00:10::/122"), attrs())).unwrap();
        established(&s, "Mesh_10_255_0_1").await;
        bird.until("show protocols gingham", |o| o.contains("Established")).await;
        // BIRD's routes reach our forwarding table, with its next hops.
        assert_eq!(fib_until(&mut s, "10.20.0.0/26", |h| !h.is_empty()).await, vec![IpAddr::from([10, 255, 0, 1])]);
        assert_eq!(
            fib_until(&mut s, "fd00:20::/122", |h| !h.is_empty()).await,
            vec![IpAddr::V6("fd00:255::1".parse::<Ipv6Addr>().unwrap())]
        );
        // Ours reach BIRD: next hop ourselves, iBGP attributes.
        let r = bird.until("show route 10.10.0.0/26 all", |o| o.contains("10.10.0.0/26")).await;
        assert!(r.contains("BGP.next_hop: 10.255.0.2"), "{r}");
        assert!(r.contains("BGP.local_pref: 100"), "{r}");
        bird.until("show route fd00:10::/122 all", |o| o.contains("BGP.next_hop: fd00:255::2")).await;
        // A released block is withdrawn.
        s.commands.send(Cmd::Withdraw(net("10.10.0.0/26"))).unwrap();
        bird.until("show route 10.10.0.0/26", |o| !o.contains("10.10.0.0/26")).await;
        // BIRD withdraws: the route leaves our table.
        bird.cli("disable s4");
        assert_eq!(fib_until(&mut s, "10.20.0.0/26", |h| h.is_empty()).await, Vec::<IpAddr>::new());
        let st = s.status().await;
        let p = st.iter().find(|p| p.name == "Mesh_10_255_0_1").unwrap();
        let n = p.negotiated.as_ref().unwrap();
        assert!(n.codec.four_octet_as && n.route_refresh, "{n:?}");
        assert_eq!(n.families.len(), 2);
        assert!(n.peer_graceful_restart.is_some());
        assert_eq!(p.advertised, 1, "{p:?}");
    });
}

fn bird_peer(asn: u32, extra: &str) -> String {
    format!(
        r#"
protocol static s4 {{ ipv4; route 10.20.0.0/26 blackhole; }}
protocol bgp gingham {{
  local 10.255.0.1 as 64512;
  neighbor 10.255.0.2 as {asn};
  strict bind on;
  multihop;
  connect retry time 1;
  error wait time 1, 2;
  {extra}
  ipv4 {{ import all; export all; }};
}}
"#
    )
}

/// A BGPFilter on the session: one of BIRD's two routes is refused on the way in, one of our
/// two blocks is held back on the way out.
#[test]
fn filters_decide_what_comes_in_and_goes_out() {
    use gingham_bgp::filter::{Filters, Match, Rule};
    let ns = Ns::new("filter");
    ns.run(|| async {
        let conf = bird_peer(AS, "").replace(
            "protocol static s4 { ipv4; route 10.20.0.0/26 blackhole; }",
            "protocol static s4 { ipv4; route 10.20.0.0/26 blackhole; route 10.30.0.0/26 blackhole; }",
        );
        let bird = Bird::start("10.255.0.1", &conf);
        let mut s = speaker(None).await;
        let mut p = peer("Global_10_255_0_1", "10.255.0.1", AS);
        let rule =
            |accept, prefix| Rule { accept, v6: false, prefix: Some(prefix), remote_only: false, interface: None };
        p.filters = Arc::new(Filters {
            import: vec![rule(false, Match::In { net: net("10.20.0.0/16"), min: 16, max: 32 })],
            export: vec![rule(false, Match::Equal(net("10.11.0.0/26")))],
        });
        s.commands.send(Cmd::SetPeers(vec![p])).unwrap();
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        s.commands.send(Cmd::Originate(net("10.11.0.0/26"), attrs())).unwrap();
        established(&s, "Global_10_255_0_1").await;
        // In: 10.30 is taken, 10.20 never (BIRD sent both in its first UPDATEs, before 10.30's
        // forwarding change reached us, so by then 10.20 would have come too).
        fib_until(&mut s, "10.30.0.0/26", |h| !h.is_empty()).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.commands.send(Cmd::Routes(tx)).unwrap();
        let all: Vec<IpNet> = rx.await.unwrap().into_iter().map(|r| r.0).collect();
        assert!(all.contains(&net("10.30.0.0/26")) && !all.contains(&net("10.20.0.0/26")), "{all:?}");
        // Out: BIRD gets 10.10, not 10.11.
        bird.until("show route 10.10.0.0/26", |o| o.contains("10.10.0.0/26")).await;
        let r = bird.cli("show route 10.11.0.0/26");
        assert!(!r.contains("10.11.0.0/26"), "{r}");
    });
}

#[test]
fn a_bad_open_is_answered_with_its_notification() {
    let ns = Ns::new("badopen");
    ns.run(|| async {
        let bird = Bird::start("10.255.0.1", &bird_peer(AS, ""));
        let s = speaker(None).await;
        // We expect AS 64999; BIRD is 64512: our NOTIFICATION is "bad peer AS".
        s.commands.send(Cmd::SetPeers(vec![peer("Global_10_255_0_1", "10.255.0.1", 64999)])).unwrap();
        bird.until("show protocols all gingham", |o| o.contains("Bad peer AS")).await;
        let t = Instant::now();
        loop {
            let st = s.status().await;
            let e = st[0].last_error.clone().unwrap_or_default();
            if e.contains("bad peer AS") {
                assert_ne!(st[0].state, State::Established);
                break;
            }
            assert!(t.elapsed() < WAIT, "{st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn hold_timer_expiry_takes_the_session_down() {
    let ns = Ns::new("hold");
    ns.run(|| async {
        let bird = Bird::start("10.255.0.1", &bird_peer(AS, "hold time 3;"));
        let mut s = speaker(None).await;
        s.commands.send(Cmd::SetPeers(vec![peer("Mesh_10_255_0_1", "10.255.0.1", AS)])).unwrap();
        established(&s, "Mesh_10_255_0_1").await;
        fib_until(&mut s, "10.20.0.0/26", |h| !h.is_empty()).await;
        // BIRD stops answering but keeps the connection: after 3 s our hold timer fires.
        let pid = bird.child.id().to_string();
        Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        let t = Instant::now();
        let err = loop {
            let st = s.status().await;
            if st[0].state != State::Established {
                break st[0].last_error.clone().unwrap_or_default();
            }
            assert!(t.elapsed() < Duration::from_secs(10), "still up: {st:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        assert!(t.elapsed() >= Duration::from_secs(1), "down too early");
        assert_eq!(err, "Hold timer expired");
        // BIRD offered graceful restart and a hold-timer expiry is not its decision: its route
        // stays (stale) while it comes back.
        bird.until("show protocols all gingham", |o| o.contains("Hold timer expired")).await;
        established(&s, "Mesh_10_255_0_1").await;
    });
}

#[test]
fn md5_passwords_must_match() {
    let ns = Ns::new("md5");
    ns.run(|| async {
        let bird = Bird::start("10.255.0.1", &bird_peer(AS, r#"password "s3cret";"#));
        let s = speaker(None).await;
        let mut p = peer("Global_10_255_0_1", "10.255.0.1", AS);
        p.password = Some("wrong".into());
        s.commands.send(Cmd::SetPeers(vec![p.clone()])).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_ne!(state_of(&s, "Global_10_255_0_1").await, State::Established);
        assert!(!bird.cli("show protocols gingham").contains("Established"));
        // The right password: up (a changed password restarts only that session).
        p.password = Some("s3cret".into());
        s.commands.send(Cmd::SetPeers(vec![p])).unwrap();
        established(&s, "Global_10_255_0_1").await;
    });
}

/// BIRD with `ttl security on` takes only packets sent with TTL 255: with TTL security on our
/// side (Calico's ttlSecurity) the session comes up; turned off, it cannot come up again.
#[test]
fn ttl_security_as_bird_checks_it() {
    let ns = Ns::new("ttl");
    ns.run(|| async {
        let bird = Bird::start("10.255.0.1", &bird_peer(AS, "ttl security on;"));
        let s = speaker(None).await;
        let mut p = peer("Global_10_255_0_1", "10.255.0.1", AS);
        p.ttl_security = Some(1);
        s.commands.send(Cmd::SetPeers(vec![p.clone()])).unwrap();
        established(&s, "Global_10_255_0_1").await;
        bird.until("show protocols gingham", |o| o.contains("Established")).await;
        // Off: the session restarts (its Cease still leaves with TTL 255) and BIRD drops what
        // the new connection sends. (Our OPEN may get through before BIRD sets its minimum
        // TTL on the accepted socket; our KEEPALIVE does not: BIRD stays short of Established.)
        p.ttl_security = None;
        s.commands.send(Cmd::SetPeers(vec![p])).unwrap();
        bird.until("show protocols gingham", |o| !o.contains("Established")).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let st = bird.cli("show protocols gingham");
        assert!(!st.contains("Established"), "BIRD took TTL-64 packets:\n{st}");
    });
}

#[test]
fn graceful_restart_keeps_our_routes_while_we_restart() {
    let ns = Ns::new("gr");
    ns.run(|| async {
        let bird = Bird::start("10.255.0.1", &bird_peer(AS, "graceful restart;"));
        let s = speaker(None).await;
        s.commands.send(Cmd::SetPeers(vec![peer("Mesh_10_255_0_1", "10.255.0.1", AS)])).unwrap();
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        s.commands.send(Cmd::Originate(net("10.11.0.0/26"), attrs())).unwrap();
        bird.until("show route 10.11.0.0/26", |o| o.contains("10.11.0.0/26")).await;
        // The agent dies (no NOTIFICATION, the connection just closes).
        s.task.abort();
        drop(s);
        bird.until("show protocols gingham", |o| !o.contains("Established")).await;
        let kept = bird.cli("show route 10.10.0.0/26 all");
        assert!(kept.contains("10.10.0.0/26"), "BIRD dropped our routes at once:\n{kept}");
        // We come back (restart bit set) with one of the two: after our End-of-RIB the other goes.
        let s = speaker(None).await;
        let mut p = peer("Mesh_10_255_0_1", "10.255.0.1", AS);
        p.fsm.restarting = true;
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        s.commands.send(Cmd::SetPeers(vec![p])).unwrap();
        established(&s, "Mesh_10_255_0_1").await;
        bird.until("show route 10.11.0.0/26", |o| !o.contains("10.11.0.0/26")).await;
        let r = bird.cli("show route 10.10.0.0/26 all");
        assert!(r.contains("10.10.0.0/26") && !r.contains("stale"), "{r}");
    });
}

#[test]
fn route_reflector_client_of_bird() {
    let ns = Ns::new("rrc");
    ns.run(|| async {
        let far = Far::new("rrc-far").await;
        // BIRD on .1 reflects between gingham (.2) and a second BIRD (.3).
        let rr = Bird::start(
            "10.255.0.1",
            r#"
protocol bgp gingham { local 10.255.0.1 as 64512; neighbor 10.255.0.2 as 64512; strict bind on; multihop;
  connect retry time 1; rr client; rr cluster id 1.0.0.1; ipv4 { import all; export all; }; }
protocol bgp client2 { local 10.255.0.1 as 64512; neighbor 10.255.0.3 as 64512; strict bind on; multihop;
  connect retry time 1; rr client; rr cluster id 1.0.0.1; ipv4 { import all; export all; }; }
"#,
        );
        let other = Bird::start_in(
            Some(&far),
            "10.255.0.3",
            r#"
protocol static s4 { ipv4; route 10.30.0.0/26 blackhole; }
protocol bgp reflector { local 10.255.0.3 as 64512; neighbor 10.255.0.1 as 64512; strict bind on; multihop;
  connect retry time 1; ipv4 { import all; export all; next hop self; }; }
"#,
        );
        let mut s = speaker(None).await;
        s.commands.send(Cmd::SetPeers(vec![peer("Node_10_255_0_1", "10.255.0.1", AS)])).unwrap();
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        // The other client's block, via the reflector, keeps its own next hop.
        assert_eq!(fib_until(&mut s, "10.30.0.0/26", |h| !h.is_empty()).await, vec![IpAddr::from([10, 255, 0, 3])]);
        let r = other.until("show route 10.10.0.0/26 all", |o| o.contains("10.10.0.0/26")).await;
        assert!(r.contains("BGP.next_hop: 10.255.0.2"), "{r}");
        assert!(r.contains("BGP.originator_id: 10.255.0.2"), "{r}");
        assert!(r.contains("BGP.cluster_list: 1.0.0.1"), "{r}");
        drop(rr);
    });
}

#[test]
fn route_reflector_for_bird_and_frr_clients() {
    let ns = Ns::new("rr");
    ns.run(|| async {
        let bird = Bird::start(
            "10.255.0.1",
            r#"
protocol static s4 { ipv4; route 10.20.0.0/26 blackhole; }
protocol bgp reflector { local 10.255.0.1 as 64512; neighbor 10.255.0.2 as 64512; strict bind on; multihop;
  connect retry time 1; ipv4 { import all; export all; next hop self; }; }
"#,
        );
        let far = Far::new("rr-far").await;
        let frr = Frr::start(
            &far,
            "10.255.0.3",
            "router bgp 64512\n bgp router-id 10.255.0.3\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
             neighbor 10.255.0.2 remote-as 64512\n neighbor 10.255.0.2 update-source 10.255.0.3\n \
             neighbor 10.255.0.2 timers connect 1\n address-family ipv4 unicast\n  network 10.30.0.0/26\n exit-address-family\n",
        );
        let cluster = Ipv4Addr::new(2, 0, 0, 2);
        let mut s = speaker(Some(cluster)).await;
        let mut a = peer("Node_10_255_0_1", "10.255.0.1", AS);
        a.rr_client = true;
        let mut b = peer("Node_10_255_0_3", "10.255.0.3", AS);
        b.rr_client = true;
        s.commands.send(Cmd::SetPeers(vec![a, b])).unwrap();
        fib_until(&mut s, "10.30.0.0/26", |h| h == [IpAddr::from([10, 255, 0, 3])]).await;
        fib_until(&mut s, "10.20.0.0/26", |h| h == [IpAddr::from([10, 255, 0, 1])]).await;
        // BIRD sees FRR's block reflected: FRR's next hop, FRR as originator, our cluster.
        let r = bird.until("show route 10.30.0.0/26 all", |o| o.contains("10.30.0.0/26")).await;
        assert!(r.contains("BGP.next_hop: 10.255.0.3"), "{r}");
        assert!(r.contains("BGP.originator_id: 10.255.0.3"), "{r}");
        assert!(r.contains("BGP.cluster_list: 2.0.0.2"), "{r}");
        // FRR sees BIRD's.
        let r = frr.until("show bgp ipv4 unicast 10.20.0.0/26", |o| o.contains("10.255.0.1")).await;
        assert!(r.contains("Originator: 10.255.0.1") && r.contains("Cluster list: 2.0.0.2"), "{r}");
    });
}

#[test]
fn ebgp_to_an_frr_tor() {
    let ns = Ns::new("tor");
    ns.run(|| async {
        let far = Far::new("tor-far").await;
        let frr = Frr::start(
            &far,
            "10.255.0.3",
            "router bgp 65001\n bgp router-id 10.255.0.3\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
             neighbor 10.255.0.2 remote-as 64512\n neighbor 10.255.0.2 update-source 10.255.0.3\n \
             neighbor 10.255.0.2 ebgp-multihop 2\n neighbor 10.255.0.2 timers connect 1\n \
             address-family ipv4 unicast\n  network 10.40.0.0/26\n exit-address-family\n \
             address-family ipv6 unicast\n  neighbor 10.255.0.2 activate\n  neighbor 10.255.0.2 route-map v6nh out\n  \
             network fd00:40::/122\n exit-address-family\n\
             route-map v6nh permit 10\n set ipv6 next-hop global fd00:255::3\n",
        );
        let mut s = speaker(None).await;
        s.commands.send(Cmd::SetPeers(vec![peer("Global_10_255_0_3", "10.255.0.3", 65001)])).unwrap();
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        assert_eq!(fib_until(&mut s, "10.40.0.0/26", |h| !h.is_empty()).await, vec![IpAddr::from([10, 255, 0, 3])]);
        // Our block at the ToR: AS path 64512, next hop us.
        let r = frr.until("show bgp ipv4 unicast 10.10.0.0/26", |o| o.contains("10.255.0.2")).await;
        assert!(r.lines().any(|l| l.trim() == "64512"), "{r}");
        let (_, _, a) = routes_of(&s, "10.40.0.0/26").await;
        assert_eq!(a.as_path, vec![AsPathSegment { kind: SegmentKind::Sequence, asns: vec![65001] }]);
        // IPv6 both ways over the IPv4 session: the ToR's next hop as it sets it, ours as we
        // give it for IPv6.
        s.commands.send(Cmd::Originate(net("fd00:10::/122"), attrs())).unwrap();
        assert_eq!(
            fib_until(&mut s, "fd00:40::/122", |h| !h.is_empty()).await,
            vec![IpAddr::V6("fd00:255::3".parse::<Ipv6Addr>().unwrap())]
        );
        let r = frr.until("show bgp ipv6 unicast fd00:10::/122", |o| o.contains("fd00:255::2")).await;
        assert!(r.lines().any(|l| l.trim() == "64512"), "{r}");
    });
}

#[test]
fn gobgp_peers_both_ways() {
    let ns = Ns::new("gobgp");
    ns.run(|| async {
        let nl = gingham_kernel::Netlink::current().unwrap();
        let lo = nl.link("lo").await.unwrap().unwrap().index;
        nl.add_address(lo, "10.255.0.3/32".parse().unwrap()).await.unwrap();
        let g = GoBgp::start(
            r#"
[global.config]
  as = 64512
  router-id = "10.255.0.3"
  port = 179
  local-address-list = ["10.255.0.3"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.255.0.2"
    peer-as = 64512
  [neighbors.transport.config]
    local-address = "10.255.0.3"
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#,
        );
        let mut s = speaker(None).await;
        s.commands.send(Cmd::SetPeers(vec![peer("Mesh_10_255_0_3", "10.255.0.3", AS)])).unwrap();
        s.commands.send(Cmd::Originate(net("10.10.0.0/26"), attrs())).unwrap();
        established(&s, "Mesh_10_255_0_3").await;
        g.cli(&["global", "rib", "add", "-a", "ipv4", "10.50.0.0/26"]);
        assert_eq!(fib_until(&mut s, "10.50.0.0/26", |h| !h.is_empty()).await, vec![IpAddr::from([10, 255, 0, 3])]);
        g.until(&["global", "rib", "-a", "ipv4"], |o| o.contains("10.10.0.0/26") && o.contains("10.255.0.2")).await;
        g.cli(&["global", "rib", "del", "-a", "ipv4", "10.50.0.0/26"]);
        fib_until(&mut s, "10.50.0.0/26", |h| h.is_empty()).await;
        // IPv6 over the same session (MP-BGP), both ways and back out.
        s.commands.send(Cmd::Originate(net("fd00:10::/122"), attrs())).unwrap();
        g.cli(&["global", "rib", "add", "-a", "ipv6", "fd00:50::/122", "nexthop", "fd00:255::3"]);
        assert_eq!(
            fib_until(&mut s, "fd00:50::/122", |h| !h.is_empty()).await,
            vec![IpAddr::V6("fd00:255::3".parse::<Ipv6Addr>().unwrap())]
        );
        g.until(&["global", "rib", "-a", "ipv6"], |o| o.contains("fd00:10::/122") && o.contains("fd00:255::2")).await;
        g.cli(&["global", "rib", "del", "-a", "ipv6", "fd00:50::/122"]);
        fib_until(&mut s, "fd00:50::/122", |h| h.is_empty()).await;
        s.commands.send(Cmd::Withdraw(net("fd00:10::/122"))).unwrap();
        g.until(&["global", "rib", "-a", "ipv6"], |o| !o.contains("fd00:10::/122")).await;
    });
}

async fn routes_of(s: &Speaker, prefix: &str) -> (IpNet, String, Arc<Attrs>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.commands.send(Cmd::Routes(tx)).unwrap();
    rx.await.unwrap().into_iter().find(|r| r.0 == net(prefix)).expect("the route is in the Loc-RIB")
}

/// FRR's zebra and bgpd with a bgpd configuration, in the foreground, stopped on drop.
struct Frr {
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Frr {
    fn start(far: &Far, address: &str, bgpd_conf: &str) -> Frr {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("zebra.conf"), "hostname zebra\n").unwrap();
        std::fs::write(d.join("bgpd.conf"), format!("hostname bgpd\n{bgpd_conf}")).unwrap();
        // The daemons drop to user frr.
        Command::new("chown").args(["-R", "frr:frr"]).arg(d).status().unwrap();
        let daemon = |name: &str, extra: &[&str]| {
            gingham_kernel::netns::command(&far.file, format!("/usr/lib/frr/{name}"))
                .unwrap()
                .args(["-P", "0", "-f"])
                .arg(d.join(format!("{name}.conf")))
                .arg("-i")
                .arg(d.join(format!("{name}.pid")))
                .arg("-z")
                .arg(d.join("zserv.api"))
                .arg("--vty_socket")
                .arg(d)
                .arg("--log")
                .arg(format!("file:{}", d.join(format!("{name}.log")).display()))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("frr must be installed (scripts/install-deps.sh)")
        };
        let zebra = daemon("zebra", &[]);
        let t = Instant::now();
        while !d.join("zserv.api").exists() {
            assert!(t.elapsed() < WAIT, "zebra did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let bgpd = daemon("bgpd", &["-l", address, "-p", "179"]);
        Frr { children: vec![bgpd, zebra], dir }
    }

    fn cli(&self, cmd: &str) -> String {
        let out = Command::new("vtysh").arg("--vty_socket").arg(self.dir.path()).args(["-c", cmd]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn until(&self, cmd: &str, ok: impl Fn(&str) -> bool) -> String {
        let log = || std::fs::read_to_string(self.dir.path().join("bgpd.log")).unwrap_or_default();
        poll(&format!("vtysh -c '{cmd}'"), || self.cli(cmd), ok, log).await
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// gobgpd with a TOML configuration (its API on the namespace's own loopback), stopped on drop.
struct GoBgp {
    child: Child,
    _dir: tempfile::TempDir,
}

impl GoBgp {
    fn start(toml: &str) -> GoBgp {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("gobgpd.toml");
        std::fs::write(&conf, toml).unwrap();
        let child = Command::new("gobgpd")
            .arg("-f")
            .arg(&conf)
            .args(["-p", "--api-hosts", "127.0.0.1:50051", "--pprof-disable"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gobgpd must be installed (scripts/install-deps.sh)");
        let g = GoBgp { child, _dir: dir };
        let t = Instant::now();
        while !g.cli(&["global"]).contains("AS") {
            assert!(t.elapsed() < WAIT, "gobgpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("gobgp").args(["--host", "127.0.0.1", "-p", "50051"]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn until(&self, args: &[&str], ok: impl Fn(&str) -> bool) -> String {
        poll(&format!("gobgp {}", args.join(" ")), || self.cli(args), ok, String::new).await
    }
}

impl Drop for GoBgp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn equal_paths_from_two_birds_make_ecmp() {
    let ns = Ns::new("ecmp");
    ns.run(|| async {
        let far = Far::new("ecmp-far").await;
        let conf = |me: &str| {
            format!(
                "protocol static s4 {{ ipv4; route 10.60.0.0/26 blackhole; }}\n\
                 protocol bgp gingham {{ local {me} as 64512; neighbor 10.255.0.2 as 64512; strict bind on; multihop;\n\
                   connect retry time 1; ipv4 {{ import all; export all; next hop self; }}; }}\n"
            )
        };
        let a = Bird::start("10.255.0.1", &conf("10.255.0.1"));
        let b = Bird::start_in(Some(&far), "10.255.0.3", &conf("10.255.0.3"));
        let mut s = speaker(None).await;
        let mut pb = peer("Node_10_255_0_3", "10.255.0.3", AS);
        pb.source = Some("10.255.0.2".parse().unwrap());
        s.commands.send(Cmd::SetPeers(vec![peer("Node_10_255_0_1", "10.255.0.1", AS), pb])).unwrap();
        let hops = fib_until(&mut s, "10.60.0.0/26", |h| h.len() == 2).await;
        assert_eq!(hops, vec![IpAddr::from([10, 255, 0, 1]), IpAddr::from([10, 255, 0, 3])]);
        // One of them withdraws: one path left.
        b.cli("disable s4");
        assert_eq!(fib_until(&mut s, "10.60.0.0/26", |h| h.len() == 1).await, vec![IpAddr::from([10, 255, 0, 1])]);
        drop(a);
    });
}
