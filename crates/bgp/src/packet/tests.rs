use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

fn four() -> Codec {
    Codec { four_octet_as: true, ..Default::default() }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn round_trip(m: &Message, codec: &Codec) -> Message {
    let bytes = m.encode(codec).unwrap();
    assert_eq!(Message::frame_len(&bytes).unwrap(), Some(bytes.len()));
    Message::decode(&bytes, codec).unwrap()
}

fn attrs() -> Attrs {
    Attrs {
        origin: Origin::Igp,
        as_path: vec![AsPathSegment { kind: SegmentKind::Sequence, asns: vec![4_200_000_001, 64512] }],
        next_hop: Some(Ipv4Addr::new(192, 168, 0, 2)),
        med: Some(10),
        local_pref: Some(100),
        communities: vec![0xfde8_0001],
        large_communities: vec![[4_200_000_001, 1, 2]],
        originator_id: Some(Ipv4Addr::new(10, 0, 0, 1)),
        cluster_list: vec![Ipv4Addr::new(1, 0, 0, 1)],
        ..Default::default()
    }
}

#[test]
fn open_round_trips_with_every_capability() {
    let open = Open::new(
        4_200_000_001,
        90,
        Ipv4Addr::new(10, 0, 0, 1),
        vec![
            Capability::Multiprotocol(Family::Ipv4Unicast),
            Capability::Multiprotocol(Family::Ipv6Unicast),
            Capability::RouteRefresh,
            Capability::GracefulRestart(GracefulRestart {
                restarting: true,
                time: 120,
                families: vec![(Family::Ipv4Unicast, true), (Family::Ipv6Unicast, false)],
            }),
            Capability::AddPath(vec![
                (Family::Ipv4Unicast, AddPathMode::Both),
                (Family::Ipv6Unicast, AddPathMode::Receive),
            ]),
            Capability::Other { code: 73, data: b"node-1".to_vec() },
        ],
    );
    assert_eq!(open.my_as, AS_TRANS);
    let back = round_trip(&Message::Open(open.clone()), &Codec::default());
    let Message::Open(back) = back else { panic!("not an OPEN") };
    assert_eq!(back, open);
    assert_eq!(back.asn(), 4_200_000_001);
    assert_eq!(back.families(), vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert_eq!(back.add_path(Family::Ipv6Unicast), Some(AddPathMode::Receive));
    assert!(back.graceful_restart().unwrap().restarting);
}

#[test]
fn an_open_without_multiprotocol_means_ipv4_only() {
    let open = Open::new(64512, 90, Ipv4Addr::new(10, 0, 0, 1), vec![]);
    assert_eq!(open.families(), vec![Family::Ipv4Unicast]);
    assert_eq!(open.my_as, 64512);
}

#[test]
fn open_errors_name_their_notification() {
    let good = Message::Open(Open::new(64512, 90, Ipv4Addr::new(10, 0, 0, 1), vec![])).encode(&four()).unwrap();
    let with = |i: usize, b: u8| {
        let mut m = good.clone();
        m[i] = b;
        Message::decode(&m, &four()).unwrap_err().notification
    };
    assert_eq!(with(19, 3), open_error(1, vec![0, 4])); // version 3
    assert_eq!((with(23, 1).code, with(23, 1).subcode), (2, 6)); // hold time 1
    let mut zero_id = good.clone();
    zero_id[24..28].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(Message::decode(&zero_id, &four()).unwrap_err().notification.subcode, 3);
    // An optional parameter that is not capabilities.
    let mut p = good.clone();
    p[29] = 1;
    assert_eq!(Message::decode(&p, &four()).unwrap_err().notification, open_error(4, vec![]));
}

#[test]
fn header_errors() {
    let mut ka = Message::Keepalive.encode(&four()).unwrap();
    assert_eq!(ka.len(), 19);
    ka[0] = 0;
    assert_eq!(Message::frame_len(&ka).unwrap_err().notification, header_error(1, vec![]));
    let mut long = Message::Keepalive.encode(&four()).unwrap();
    long[16..18].copy_from_slice(&5000u16.to_be_bytes());
    assert_eq!(Message::frame_len(&long).unwrap_err().notification.subcode, 2);
    let mut kind = Message::Keepalive.encode(&four()).unwrap();
    kind[18] = 9;
    assert_eq!(Message::decode(&kind, &four()).unwrap_err().notification, header_error(3, vec![9]));
    // A KEEPALIVE with a body is a length error.
    let mut fat = Message::Keepalive.encode(&four()).unwrap();
    fat.push(0);
    fat[17] = 20;
    assert_eq!(Message::decode(&fat, &four()).unwrap_err().notification.subcode, 2);
    assert_eq!(Message::frame_len(&fat[..10]).unwrap(), None);
}

#[test]
fn updates_round_trip_in_both_families_with_and_without_path_ids() {
    for add_path in [false, true] {
        for four_octet in [true, false] {
            let mut codec = Codec { four_octet_as: four_octet, ..Default::default() };
            if add_path {
                codec.add_path_rx = Family::ALL.into_iter().collect();
                codec.add_path_tx = codec.add_path_rx.clone();
            }
            let id = if add_path { 7 } else { 0 };
            let u = Update {
                withdrawn: vec![Nlri { prefix: net("10.1.0.0/26"), path_id: id }],
                attrs: Some(attrs()),
                mp_reach: Some(MpReach {
                    family: Family::Ipv6Unicast,
                    next_hop: IpAddr::V6("fd00::2".parse().unwrap()),
                    link_local: Some("fe80::2".parse::<Ipv6Addr>().unwrap()),
                    nlri: vec![
                        Nlri { prefix: net("fd00:1::/122"), path_id: id },
                        Nlri { prefix: net("::/0"), path_id: id },
                    ],
                }),
                mp_unreach: Some(MpUnreach {
                    family: Family::Ipv6Unicast,
                    withdrawn: vec![Nlri { prefix: net("fd00:2::/122"), path_id: id }],
                }),
                nlri: vec![
                    Nlri { prefix: net("10.2.0.0/26"), path_id: id },
                    Nlri { prefix: net("10.3.0.7/32"), path_id: id },
                ],
                problems: vec![],
            };
            let back = round_trip(&Message::Update(u.clone()), &codec);
            assert_eq!(back, Message::Update(u), "add_path {add_path} four_octet {four_octet}");
        }
    }
}

#[test]
fn end_of_rib_markers() {
    for f in Family::ALL {
        let Message::Update(u) = round_trip(&Message::Update(Update::end_of_rib(f)), &four()) else { panic!() };
        assert_eq!(u.is_end_of_rib(), Some(f));
    }
    let mut u = Update::default();
    u.withdrawn.push(Nlri::new(net("10.0.0.0/26")));
    assert_eq!(u.is_end_of_rib(), None);
}

/// An UPDATE body from attribute bytes and IPv4 NLRI bytes.
fn update_with(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(attrs);
    body.extend_from_slice(nlri);
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(2);
    m.extend_from_slice(&body);
    m
}

const ORIGIN_IGP: [u8; 4] = [0x40, 1, 1, 0];
const EMPTY_PATH: [u8; 3] = [0x40, 2, 0];
const NH: [u8; 7] = [0x40, 3, 4, 192, 168, 0, 1];
const NLRI: [u8; 4] = [24, 10, 0, 0];

fn decoded(attrs: &[u8], nlri: &[u8]) -> Result<Update, DecodeError> {
    match Message::decode(&update_with(attrs, nlri), &four())? {
        Message::Update(u) => Ok(u),
        m => panic!("{m:?}"),
    }
}

#[test]
fn rfc7606_malformed_attributes_withdraw_their_routes() {
    let ok = [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH].concat();
    let u = decoded(&ok, &NLRI).unwrap();
    assert!(!u.treat_as_withdraw() && u.problems.is_empty(), "{:?}", u.problems);
    assert_eq!(u.nlri, vec![Nlri::new(net("10.0.0.0/24"))]);
    // ORIGIN 7, a 3-byte NEXT_HOP, a 2-byte MED, a community of 3 bytes: withdraw, keep going.
    for bad in [
        [[0x40, 1, 1, 7].as_slice(), &EMPTY_PATH, &NH].concat(),
        [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &[0x40, 3, 3, 1, 2, 3]].concat(),
        [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH, &[0x80, 4, 2, 0, 1]].concat(),
        [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH, &[0xc0, 8, 3, 0, 1, 2]].concat(),
        [ORIGIN_IGP.as_slice(), &[0x40, 2, 3, 2, 1, 0], &NH].concat(), // a segment runs out
        [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH, &[0x80, 10, 0]].concat(), // empty CLUSTER_LIST
        [[0xc0, 1, 1, 0].as_slice(), &EMPTY_PATH, &NH].concat(),       // ORIGIN marked optional
    ] {
        let u = decoded(&bad, &NLRI).unwrap();
        assert!(u.treat_as_withdraw(), "{bad:?} gave {:?}", u.problems);
        assert_eq!(u.nlri.len(), 1);
    }
    // A missing NEXT_HOP, a missing AS_PATH.
    assert!(decoded(&[ORIGIN_IGP.as_slice(), &EMPTY_PATH].concat(), &NLRI).unwrap().treat_as_withdraw());
    assert!(decoded(&[ORIGIN_IGP.as_slice(), &NH].concat(), &NLRI).unwrap().treat_as_withdraw());
    // Withdrawals alone need no attributes.
    assert!(decoded(&[], &[]).unwrap().problems.is_empty());
}

#[test]
fn rfc7606_attributes_that_are_only_discarded() {
    let base = [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH].concat();
    for extra in [vec![0x40, 6, 1, 0], vec![0xc0, 7, 3, 1, 2, 3], [ORIGIN_IGP.as_slice()].concat()] {
        let u = decoded(&[base.clone(), extra.clone()].concat(), &NLRI).unwrap();
        assert!(!u.treat_as_withdraw(), "{extra:?}");
        assert!(matches!(u.problems.as_slice(), [UpdateProblem::Discarded(_)]), "{extra:?}: {:?}", u.problems);
    }
}

#[test]
fn unknown_optional_transitive_attributes_travel_on_marked_partial() {
    let u =
        decoded(&[ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH, &[0xc0, 99, 2, 7, 7], &[0x80, 98, 1, 1]].concat(), &NLRI)
            .unwrap();
    let other = &u.attrs.unwrap().other;
    assert_eq!(other, &vec![RawAttr { flags: 0xe0, code: 99, value: vec![7, 7] }]);
}

#[test]
fn fatal_update_errors() {
    let base = [ORIGIN_IGP.as_slice(), &EMPTY_PATH, &NH].concat();
    let code = |attrs: &[u8], nlri: &[u8]| {
        let n = decoded(attrs, nlri).unwrap_err().notification;
        (n.code, n.subcode)
    };
    // Unknown well-known attribute; an attribute running past the block; NLRI /33; truncated NLRI.
    assert_eq!(code(&[base.clone(), vec![0x40, 99, 0]].concat(), &NLRI), (3, 2));
    assert_eq!(code(&[base.clone(), vec![0x40, 5, 9, 0]].concat(), &NLRI), (3, 1));
    assert_eq!(code(&base, &[33, 10, 0, 0, 0, 0]), (3, 10));
    assert_eq!(code(&base, &[24, 10, 0]), (3, 10));
    // MP_REACH twice, or malformed.
    let mp = [0x80, 14, 5, 0, 2, 1, 0, 0];
    assert_eq!(code(&[base.clone(), mp.to_vec()].concat(), &[]), (3, 9));
    let mp_ok = [vec![0x80, 14, 21, 0, 2, 1, 16], vec![0xfd; 16], vec![0]].concat();
    assert!(decoded(&[base.clone(), mp_ok.clone()].concat(), &[]).is_ok());
    assert_eq!(code(&[base.clone(), mp_ok.clone(), mp_ok].concat(), &[]), (3, 1));
    // Withdrawn length past the end.
    let mut m = update_with(&base, &NLRI);
    m[19..21].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(Message::decode(&m, &four()).unwrap_err().notification.subcode, 1);
}

#[test]
fn two_octet_sessions_carry_large_asns_in_as4_path() {
    let codec = Codec::default();
    let u = Update { attrs: Some(attrs()), nlri: vec![Nlri::new(net("10.0.0.0/26"))], ..Default::default() };
    let bytes = Message::Update(u.clone()).encode(&codec).unwrap();
    // AS_PATH holds AS_TRANS where the AS does not fit; AS4_PATH the real path.
    assert!(bytes.windows(2).any(|w| w == AS_TRANS.to_be_bytes()));
    let Message::Update(back) = Message::decode(&bytes, &codec).unwrap() else { panic!() };
    assert_eq!(back.attrs.unwrap().as_path, attrs().as_path);
}

#[test]
fn families_we_do_not_route_are_ignored() {
    // MP_REACH for AFI 1 SAFI 133 (flowspec).
    let base = [ORIGIN_IGP.as_slice(), &EMPTY_PATH].concat();
    let u = decoded(&[base, vec![0x80, 14, 5, 0, 1, 133, 0, 0]].concat(), &[]).unwrap();
    assert!(u.mp_reach.is_none() && u.problems.is_empty());
}

#[test]
fn notification_and_route_refresh_round_trip() {
    let n = Message::Notification(cease(2));
    assert_eq!(round_trip(&n, &four()), n);
    let r = Message::RouteRefresh(RouteRefresh { afi: 2, safi: 1 });
    assert_eq!(round_trip(&r, &four()), r);
    assert_eq!(cease(7).to_string(), "Cease: connection collision resolution");
}

proptest::proptest! {
    /// Whatever the bytes, decoding returns; never a panic.
    #[test]
    fn decoding_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), kind in 1u8..6, add in proptest::prelude::any::<bool>()) {
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(kind);
        m.extend_from_slice(&body);
        let mut codec = four();
        if add { codec.add_path_rx = Family::ALL.into_iter().collect(); }
        let _ = Message::decode(&m, &codec);
    }
}
