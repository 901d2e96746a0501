//! gingham's speaker against real BGP implementations (BIRD 2 here; installed by the test
//! command), each test in a network namespace of its own with the speakers on addresses of
//! its loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_bgp::fsm::{Config, State};
use gingham_bgp::packet::{AsPathSegment, Attrs, SegmentKind};
use gingham_bgp::rib::FibChange;
use gingham_bgp::tasks::{self, Command as Cmd, KeySocket, PeerConfig, Speaker, SpeakerConfig};
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
                for a in ["10.255.0.1/32", "10.255.0.2/32", "10.255.0.3/32", "fd00:255::1/128", "fd00:255::2/128"] {
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

/// A BIRD 2 daemon with the given protocol configuration, stopped on drop.
struct Bird {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bird {
    fn start(router_id: &str, protocols: &str) -> Bird {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("bird.conf");
        let socket = dir.path().join("bird.ctl");
        std::fs::write(
            &conf,
            format!(
                "router id {router_id};\nlog \"{}\" all;\nprotocol device {{ }}\n{protocols}\n",
                dir.path().join("bird.log").display()
            ),
        )
        .unwrap();
        let child = Command::new("bird")
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bird2 must be installed (scripts/install-deps.sh)");
        let b = Bird { child, socket, _dir: dir };
        let t = Instant::now();
        while !b.socket.exists() {
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
        let t = Instant::now();
        loop {
            let out = self.cli(cmd);
            if ok(&out) {
                return out;
            }
            assert!(t.elapsed() < WAIT, "`birdc {cmd}` never became what was expected:\n{out}\nlog:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peer(name: &str, address: &str, remote_as: u32) -> PeerConfig {
    let mut fsm = Config::new(AS, remote_as, Ipv4Addr::new(10, 255, 0, 2));
    fsm.connect_retry = Duration::from_secs(1);
    PeerConfig {
        name: name.into(),
        address: address.parse().unwrap(),
        port: 179,
        fsm,
        rr_client: false,
        keep_next_hop: false,
        allow_own_as: 0,
        password: None,
        source: Some("10.255.0.2".parse().unwrap()),
        next_hop_v4: Some(Ipv4Addr::new(10, 255, 0, 2)),
        next_hop_v6: Some("fd00:255::2".parse().unwrap()),
    }
}

async fn speaker(cluster_id: Option<Ipv4Addr>) -> Speaker {
    let keys: KeySocket = Arc::new(|fd, peer, key| gingham_kernel::tcp::set_md5_key(fd, peer, key));
    tasks::start(
        SpeakerConfig {
            asn: AS,
            router_id: Ipv4Addr::new(10, 255, 0, 2),
            cluster_id,
            listen: Some(SocketAddr::new("10.255.0.2".parse().unwrap(), 179)),
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

/// Wait for the forwarding change of `prefix` that satisfies `ok`.
async fn fib_until(s: &mut Speaker, prefix: &str, ok: impl Fn(&[IpAddr]) -> bool) -> Vec<IpAddr> {
    let want = net(prefix);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.fib.recv()).await {
            Ok(Some(FibChange { prefix, next_hops })) if prefix == want && ok(&next_hops) => return next_hops,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the speaker stopped"),
            Err(_) => panic!("no forwarding change for {prefix} as expected within {WAIT:?}"),
        }
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
        let _ = AsPathSegment { kind: SegmentKind::Sequence, asns: vec![] };
        let _ = Path::new("/");
    });
}
