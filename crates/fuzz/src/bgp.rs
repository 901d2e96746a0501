//! The BGP decode path: messages as a peer could send them. The generator builds valid
//! messages from our own types (so mutations start deep inside OPENs and UPDATEs); the check
//! repairs the header (marker, length) so mutated bodies are parsed, not refused at byte 16.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gingham_bgp::fsm::{Config, Event, Fsm};
use gingham_bgp::packet::{
    AddPathMode, AsPathSegment, Attrs, Capability, Codec, Family, GracefulRestart, Message, MpReach, MpUnreach, Nlri,
    Open, Origin, SegmentKind, Update, cease,
};
use gingham_bgp::rib::{PeerInfo, Rib};
use ipnet::IpNet;

use crate::Rng;

/// The first input byte picks the session's codec; the rest is one message.
fn codec_of(b: u8) -> Codec {
    let families: std::collections::BTreeSet<Family> = Family::ALL.into_iter().collect();
    Codec {
        four_octet_as: b & 1 != 0,
        add_path_rx: if b & 2 != 0 { families.clone() } else { Default::default() },
        add_path_tx: if b & 4 != 0 { families } else { Default::default() },
    }
}

pub fn check(input: &[u8]) {
    let Some((&flags, msg)) = input.split_first() else { return };
    let codec = codec_of(flags);
    let mut msg = msg.to_vec();
    if msg.len() >= 19 {
        msg[..16].fill(0xff);
        let len = msg.len().min(u16::MAX as usize) as u16;
        msg[16..18].copy_from_slice(&len.to_be_bytes());
    }
    let decoded = Message::decode(&msg, &codec);
    let Ok(m) = decoded else { return };
    // What we accept we can say again, and read back the same (UPDATE problems aside: a
    // discarded attribute is gone from the re-encoded message by design).
    let same = Codec { add_path_tx: codec.add_path_rx.clone(), ..codec.clone() };
    if let Ok(bytes) = m.encode(&same) {
        let again = Message::decode(&bytes, &same).unwrap_or_else(|e| panic!("{m:?} re-encoded does not decode: {e}"));
        let strip = |m: Message| match m {
            Message::Update(mut u) => {
                u.problems.clear();
                Message::Update(u)
            }
            m => m,
        };
        if !matches!(&m, Message::Update(u) if !u.problems.is_empty()) {
            assert_eq!(strip(again), strip(m.clone()), "round trip");
        }
    }
    // And what the session does with it: the FSM in Established, the RIB.
    let mut fsm = Fsm::new(Config::new(64512, 64512, Ipv4Addr::new(10, 0, 0, 1)));
    fsm.handle(Event::Start);
    fsm.handle(Event::TcpConnected);
    fsm.handle(Event::Received(Message::Open(Config::new(64512, 0, Ipv4Addr::new(10, 0, 0, 2)).open())));
    fsm.handle(Event::Received(Message::Keepalive));
    let actions = fsm.handle(Event::Received(m));
    let mut rib = Rib::new(64512, Ipv4Addr::new(10, 0, 0, 1), Some(Ipv4Addr::new(1, 1, 1, 1)));
    rib.set_peer(
        1,
        PeerInfo {
            address: "10.0.0.2".parse().unwrap(),
            remote_as: 64512,
            local_as: 64512,
            rr_client: true,
            next_hop: gingham_bgp::rib::NextHopMode::Auto,
            allow_own_as: 0,
            filters: Default::default(),
        },
    );
    rib.set_peer(
        2,
        PeerInfo {
            address: "10.0.0.3".parse().unwrap(),
            remote_as: 65000,
            local_as: 64512,
            rr_client: false,
            next_hop: gingham_bgp::rib::NextHopMode::Auto,
            allow_own_as: 1,
            filters: Default::default(),
        },
    );
    rib.peer_up(2, Family::ALL.into_iter().collect(), Family::ALL.into_iter().collect());
    for a in actions {
        if let gingham_bgp::fsm::Action::Update(u) = a {
            let _ = rib.update(1, Ipv4Addr::new(10, 0, 0, 2), &u);
            let _ = rib.update(2, Ipv4Addr::new(10, 0, 0, 3), &u);
            let _ = rib.peer_down(1, true);
            let _ = rib.sweep_stale(1, None);
        }
    }
}

fn prefix(rng: &mut Rng, v6: bool) -> IpNet {
    if v6 {
        let a = Ipv6Addr::from((rng.next() as u128) << 64 | rng.next() as u128);
        IpNet::new(IpAddr::V6(a), rng.below(129) as u8).unwrap().trunc()
    } else {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(rng.next() as u32)), rng.below(33) as u8).unwrap().trunc()
    }
}

fn nlri(rng: &mut Rng, v6: bool) -> Vec<Nlri> {
    (0..rng.below(6)).map(|_| Nlri { prefix: prefix(rng, v6), path_id: rng.below(4) as u32 }).collect()
}

fn attrs(rng: &mut Rng) -> Attrs {
    let seg = |rng: &mut Rng| AsPathSegment {
        kind: *rng.pick(&[
            SegmentKind::Sequence,
            SegmentKind::Set,
            SegmentKind::ConfedSequence,
            SegmentKind::ConfedSet,
        ]),
        asns: (0..1 + rng.below(5)).map(|_| *rng.pick(&[64512, 65000, 4_200_000_001, 23456, 1])).collect(),
    };
    Attrs {
        origin: *rng.pick(&[Origin::Igp, Origin::Egp, Origin::Incomplete]),
        as_path: (0..rng.below(3)).map(|_| seg(rng)).collect(),
        next_hop: rng.chance(80).then(|| Ipv4Addr::from(rng.next() as u32 | 0x0100_0000)),
        med: rng.chance(30).then(|| rng.next() as u32),
        local_pref: rng.chance(50).then(|| rng.next() as u32),
        atomic_aggregate: rng.chance(10),
        aggregator: rng.chance(10).then(|| (rng.next() as u32, Ipv4Addr::from(rng.next() as u32))),
        communities: (0..rng.below(3)).map(|_| rng.next() as u32).collect(),
        large_communities: (0..rng.below(2)).map(|_| [rng.next() as u32, 1, 2]).collect(),
        originator_id: rng.chance(20).then(|| Ipv4Addr::from(rng.next() as u32)),
        cluster_list: (0..rng.below(3)).map(|_| Ipv4Addr::from(rng.next() as u32)).collect(),
        other: vec![],
    }
}

fn message(rng: &mut Rng) -> Message {
    match rng.below(6) {
        0 => {
            let mut caps = vec![];
            for f in Family::ALL {
                if rng.chance(70) {
                    caps.push(Capability::Multiprotocol(f));
                }
            }
            if rng.chance(50) {
                caps.push(Capability::RouteRefresh);
            }
            if rng.chance(50) {
                caps.push(Capability::GracefulRestart(GracefulRestart {
                    restarting: rng.chance(50),
                    time: rng.below(4096) as u16,
                    families: vec![(Family::Ipv4Unicast, rng.chance(50))],
                }));
            }
            if rng.chance(50) {
                caps.push(Capability::AddPath(vec![(
                    *rng.pick(&Family::ALL),
                    *rng.pick(&[AddPathMode::Receive, AddPathMode::Send, AddPathMode::Both]),
                )]));
            }
            Message::Open(Open::new(
                *rng.pick(&[64512, 4_200_000_001, 1]),
                *rng.pick(&[0, 3, 90, 240]),
                Ipv4Addr::from(rng.next() as u32 | 1),
                caps,
            ))
        }
        1 | 2 => {
            let v6 = rng.chance(40);
            let mut u = Update { attrs: rng.chance(90).then(|| attrs(rng)), ..Default::default() };
            if v6 {
                u.mp_reach = rng.chance(70).then(|| MpReach {
                    family: Family::Ipv6Unicast,
                    next_hop: IpAddr::V6(Ipv6Addr::from(rng.next() as u128 + 1)),
                    link_local: rng.chance(30).then(|| Ipv6Addr::from(0xfe80u128 << 112 | 1)),
                    nlri: nlri(rng, true),
                });
                u.mp_unreach =
                    rng.chance(40).then(|| MpUnreach { family: Family::Ipv6Unicast, withdrawn: nlri(rng, true) });
            } else {
                u.nlri = nlri(rng, false);
                u.withdrawn = nlri(rng, false);
            }
            Message::Update(u)
        }
        3 => Message::Update(Update::end_of_rib(*rng.pick(&Family::ALL))),
        4 => Message::Notification(cease(rng.below(10) as u8)),
        _ => Message::Keepalive,
    }
}

pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let flags = rng.next() as u8;
    let mut codec = codec_of(flags);
    // Encode as the receiver expects, except sometimes (a peer that disagrees on ADD-PATH).
    if !rng.chance(10) {
        codec.add_path_tx = codec.add_path_rx.clone();
    }
    let bytes = message(rng).encode(&codec).unwrap_or_default();
    let mut out = vec![flags];
    out.extend(bytes);
    out
}

pub fn corpus() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(7);
    (0..64).map(|_| generate(&mut rng)).collect()
}

/// Bytes that appear in attribute headers and NLRI (ASCII only: the vocabulary is text).
pub const TOKENS: &[&str] = &[
    "\x40\x01\x01\x00",
    "\x40\x02\x00",
    "\x40\x03\x04\x0a\x00\x00\x01",
    "\x18\x0a\x00\x00",
    "\x00\x00",
    "\x02\x01",
    "\x00\x02\x01",
    "\x20",
    "\x7f",
];
