//! Peers that misbehave cannot stall the others: one floods UPDATEs as fast as it can write,
//! one connects and never says anything, one stops reading what we send. Meanwhile a
//! well-behaved peer's session stays up, its route is learned at once, and another task on the
//! speaker's runtime (the agent's CNI service shares it) keeps its pace. All on loopback
//! addresses of this host; the peers are raw TCP clients speaking our own codec.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gingham_bgp::fsm::{Config, State};
use gingham_bgp::packet::{AsPathSegment, Attrs, Codec, Message, Nlri, SegmentKind, Update};
use gingham_bgp::tasks::{self, Command as Cmd, PeerConfig, SpeakerConfig};
use ipnet::IpNet;

const SPEAKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const GOOD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const FLOOD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const DEAF: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const SILENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

fn codec() -> Codec {
    Codec { four_octet_as: true, ..Default::default() }
}

/// Connect from `from`, exchange OPENs and KEEPALIVEs: an established session.
fn session(from: Ipv4Addr, to: SocketAddr, asn: u32) -> TcpStream {
    let s = connect_from(from, to);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = Config::new(asn, 64512, from);
    c.graceful_restart = None;
    c.add_path = gingham_bgp::packet::AddPathMode::Receive;
    let mut w = &s;
    w.write_all(&Message::Open(c.open()).encode(&Codec::default()).unwrap()).unwrap();
    let (mut got, mut buf, mut messages) = (Vec::new(), [0u8; 4096], 0);
    while messages < 2 {
        let k = (&s).read(&mut buf).unwrap();
        assert!(k > 0, "the speaker closed the session from {from}");
        got.extend_from_slice(&buf[..k]);
        while let Ok(Some(len)) = Message::frame_len(&got) {
            got.drain(..len);
            messages += 1;
        }
    }
    w.write_all(&Message::Keepalive.encode(&Codec::default()).unwrap()).unwrap();
    s
}

fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from((from, 0))).unwrap();
            match sock.connect(to).await {
                Ok(s) => {
                    let s = s.into_std().unwrap();
                    s.set_nonblocking(false).unwrap();
                    return s;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connecting from {from}: {e}"),
            }
        }
    })
}

fn update(prefixes: &[IpNet], announce: bool, next_hop: Ipv4Addr, asn: u32) -> Vec<u8> {
    let nlri: Vec<Nlri> = prefixes.iter().map(|p| Nlri::new(*p)).collect();
    let u = if announce {
        Update {
            attrs: Some(Attrs {
                as_path: vec![AsPathSegment { kind: SegmentKind::Sequence, asns: vec![asn] }],
                next_hop: Some(next_hop),
                ..Default::default()
            }),
            nlri,
            ..Default::default()
        }
    } else {
        Update { withdrawn: nlri, ..Default::default() }
    };
    Message::Update(u).encode(&codec()).unwrap()
}

/// Keep reading (and dropping) what the speaker sends, until the connection ends.
fn drain(s: &TcpStream) -> std::thread::JoinHandle<()> {
    let s = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while matches!((&s).read(&mut buf), Ok(k) if k > 0) {}
    })
}

/// KEEPALIVEs every 300 ms while `run` holds (what keeps a session up whether it reads or not).
fn keepalives(s: &TcpStream, run: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let s = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let k = Message::Keepalive.encode(&Codec::default()).unwrap();
        while run.load(Ordering::Relaxed) {
            if (&s).write_all(&k).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

fn peer(name: &str, address: Ipv4Addr, asn: u32) -> PeerConfig {
    let mut f = Config::new(64512, asn, SPEAKER);
    f.passive = true;
    // Short, so that a stalled instance would show as an expired session.
    f.hold_time = 6;
    f.graceful_restart = None;
    PeerConfig::new(name, IpAddr::V4(address), f)
}

#[test]
fn misbehaving_peers_do_not_stall_the_others() {
    // The speaker and a ticker share one thread, as a single-threaded agent would.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut s = tasks::start(
            SpeakerConfig {
                asn: 64512,
                router_id: SPEAKER,
                cluster_id: None,
                listen: Some(SocketAddr::from((SPEAKER, 0))),
                // Small, so that the peer that stops reading reaches it within the test.
                max_queued: 4 << 20,
            },
            None,
        )
        .await
        .unwrap();
        let to = s.listening.unwrap();
        s.commands
            .send(Cmd::SetPeers(vec![
                peer("Good", GOOD, 64512),
                peer("Flood", FLOOD, 65001),
                peer("Deaf", DEAF, 64512),
                peer("Silent", SILENT, 64512),
            ]))
            .unwrap();
        let ticks = tokio::spawn(async {
            let mut worst = Duration::ZERO;
            let mut last = Instant::now();
            let end = last + Duration::from_secs(12);
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
                worst = worst.max(last.elapsed());
                last = Instant::now();
            }
            worst
        });
        let run = Arc::new(AtomicBool::new(true));
        let r = run.clone();
        // The peers, on threads of their own.
        let peers = std::thread::spawn(move || {
            let good = session(GOOD, to, 64512);
            let _good_reader = drain(&good);
            let _good_keepalives = keepalives(&good, r.clone());
            let deaf = session(DEAF, to, 64512);
            let _deaf_keepalives = keepalives(&deaf, r.clone());
            let silent = connect_from(SILENT, to);
            let flood = session(FLOOD, to, 65001);
            let _flood_reader = drain(&flood);
            let flooding = {
                let r = r.clone();
                let flood = flood.try_clone().unwrap();
                std::thread::spawn(move || {
                    let prefixes: Vec<IpNet> = (0..800u32)
                        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x1400_0000 + (i << 8))), 24).unwrap())
                        .collect();
                    let on = update(&prefixes, true, FLOOD, 65001);
                    let off = update(&prefixes, false, FLOOD, 65001);
                    let mut sent = 0u64;
                    while r.load(Ordering::Relaxed) {
                        if (&flood).write_all(&on).is_err() || (&flood).write_all(&off).is_err() {
                            break;
                        }
                        sent += 2;
                    }
                    sent
                })
            };
            // The flood under way: the good peer announces a route of its own.
            std::thread::sleep(Duration::from_secs(1));
            let mine: IpNet = "10.77.0.0/24".parse().unwrap();
            (&good).write_all(&update(&[mine], true, GOOD, 64512)).unwrap();
            let announced = Instant::now();
            std::thread::sleep(Duration::from_secs(10));
            r.store(false, Ordering::Relaxed);
            let updates = flooding.join().unwrap();
            drop((good, deaf, silent, flood));
            (announced, updates)
        });
        let mine: IpNet = "10.77.0.0/24".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut learned_at = None;
        let mut deaf_dropped = None;
        while !peers.is_finished() {
            assert!(Instant::now() < deadline, "the peers' script did not end");
            let batch = match tokio::time::timeout(Duration::from_millis(200), s.fib.recv()).await {
                Ok(Some(b)) => b,
                Ok(None) => panic!("the speaker stopped"),
                Err(_) => Vec::new(),
            };
            if learned_at.is_none() && batch.iter().any(|f| f.prefix == mine && !f.next_hops.is_empty()) {
                learned_at = Some(Instant::now());
            }
            if deaf_dropped.is_none() {
                let st = s.status().await;
                if let Some(d) = st.iter().find(|p| p.name == "Deaf" && p.state != State::Established && p.flaps > 0) {
                    deaf_dropped = d.last_error.clone();
                }
                let good = st.iter().find(|p| p.name == "Good").unwrap();
                assert!(good.flaps == 0, "the good session went down: {:?}", good.last_error);
            }
        }
        let (announced, updates) = peers.join().unwrap();
        let st = s.status().await;
        let good = st.iter().find(|p| p.name == "Good").unwrap();
        assert_eq!((good.state, good.flaps), (State::Established, 0), "{:?}", good.last_error);
        let silent = st.iter().find(|p| p.name == "Silent").unwrap();
        assert_ne!(silent.state, State::Established);
        assert!(updates > 1000, "the flood was a flood: {updates} UPDATEs");
        let took = learned_at.expect("the good peer's route was learned during the flood") - announced;
        // Learned while the flood goes on (it lasts ten seconds more), not after it: the
        // frames of every connection share one fair queue.
        assert!(took < Duration::from_secs(5), "the good peer's route took {took:?} behind the flood");
        let why = deaf_dropped.expect("the peer that stopped reading was dropped");
        assert!(why.contains("does not read"), "{why}");
        let worst = ticks.await.unwrap();
        assert!(worst < Duration::from_millis(500), "another task on the runtime waited {worst:?}");
        eprintln!("flood: {updates} UPDATEs; good route learned in {took:?}; worst tick gap {worst:?}; deaf: {why}");
    });
}
