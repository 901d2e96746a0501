use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::packet::{AsPathSegment, Attrs, Family, Nlri, Origin, SegmentKind, Update, UpdateProblem};

const AS: u32 = 64512;

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 0, n))
}
fn rid(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}
fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn peer(n: u8, remote_as: u32, rr_client: bool) -> PeerInfo {
    PeerInfo {
        address: ip(n),
        remote_as,
        local_as: AS,
        rr_client,
        next_hop: NextHopMode::Auto,
        allow_own_as: 0,
        filters: Default::default(),
    }
}
fn path(asns: &[u32]) -> Attrs {
    Attrs {
        origin: Origin::Igp,
        as_path: if asns.is_empty() {
            vec![]
        } else {
            vec![AsPathSegment { kind: SegmentKind::Sequence, asns: asns.to_vec() }]
        },
        ..Default::default()
    }
}
fn announce(prefix: &str, nh: u8, attrs: Attrs) -> Update {
    let mut attrs = attrs;
    attrs.next_hop = Some(Ipv4Addr::new(192, 168, 0, nh));
    Update { attrs: Some(attrs), nlri: vec![Nlri::new(net(prefix))], ..Default::default() }
}
fn all() -> BTreeSet<Family> {
    Family::ALL.into_iter().collect()
}
fn hops(ch: &Changes, prefix: &str) -> Option<Vec<IpAddr>> {
    ch.fib.iter().find(|f| f.prefix == net(prefix)).map(|f| f.next_hops.to_vec())
}

/// A RIB with peers 1..=n (given AS and client flag), all up without ADD-PATH.
fn rib(cluster: Option<Ipv4Addr>, peers: &[(u8, u32, bool)]) -> Rib {
    let mut r = Rib::new(AS, rid(100), cluster);
    for &(n, asn, client) in peers {
        r.set_peer(n as u32, peer(n, asn, client));
        r.peer_up(n as u32, all(), BTreeSet::new());
    }
    r
}

#[test]
fn best_path_follows_the_decision_process() {
    let cases: Vec<(&str, Attrs, Attrs)> = vec![
        ("local-pref", Attrs { local_pref: Some(200), ..path(&[1, 2, 3]) }, path(&[1])),
        ("as-path length", path(&[1]), path(&[1, 2])),
        ("origin", path(&[1]), Attrs { origin: Origin::Incomplete, ..path(&[1]) }),
        ("MED, same neighbour AS", Attrs { med: Some(5), ..path(&[1]) }, Attrs { med: Some(10), ..path(&[1]) }),
        (
            "originator id",
            Attrs { originator_id: Some(rid(1)), ..path(&[]) },
            Attrs { originator_id: Some(rid(9)), ..path(&[]) },
        ),
        (
            "cluster list",
            Attrs { cluster_list: vec![rid(7)], ..path(&[]) },
            Attrs { cluster_list: vec![rid(7), rid(8)], ..path(&[]) },
        ),
    ];
    for (what, better, worse) in cases {
        for order in [true, false] {
            let mut r = rib(None, &[(1, AS, false), (2, AS, false)]);
            let (first, second) = if order { ((1, &better), (2, &worse)) } else { ((2, &worse), (1, &better)) };
            r.update(first.0, rid(first.0 as u8), &announce("10.0.0.0/26", first.0 as u8, first.1.clone()));
            r.update(second.0, rid(second.0 as u8), &announce("10.0.0.0/26", second.0 as u8, second.1.clone()));
            let (src, _, _) = r.best(&net("10.0.0.0/26")).unwrap();
            assert_eq!(src, Source::Peer(1), "{what}");
        }
    }
}

#[test]
fn med_is_compared_only_within_one_neighbouring_as() {
    let mut r = rib(None, &[(1, AS, false), (2, AS, false), (3, AS, false)]);
    // From AS 1 with MED 50 (router id 1), from AS 2 with MED 0 (router id 2), from AS 1 with MED 10 (router id 3).
    r.update(1, rid(1), &announce("10.0.0.0/26", 1, Attrs { med: Some(50), ..path(&[1]) }));
    r.update(2, rid(2), &announce("10.0.0.0/26", 2, Attrs { med: Some(0), ..path(&[2]) }));
    r.update(3, rid(3), &announce("10.0.0.0/26", 3, Attrs { med: Some(10), ..path(&[1]) }));
    // AS 1's best is peer 3 (MED 10); between AS 1 and AS 2 MED does not count: router id 2 < 3.
    assert_eq!(r.best(&net("10.0.0.0/26")).unwrap().0, Source::Peer(2));
}

#[test]
fn ebgp_beats_ibgp_and_equal_paths_make_ecmp() {
    let mut r = rib(None, &[(1, AS, false), (2, 65001, false), (3, 65002, false)]);
    r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[65009])));
    let ch = r.update(2, rid(2), &announce("10.0.0.0/26", 2, path(&[65001])));
    assert_eq!(hops(&ch, "10.0.0.0/26"), Some(vec![ip(2)]));
    let ch = r.update(3, rid(3), &announce("10.0.0.0/26", 3, path(&[65002])));
    assert_eq!(hops(&ch, "10.0.0.0/26"), Some(vec![ip(2), ip(3)]));
    // One withdrawn: one hop left; both: the route goes (an empty set), then nothing more.
    let ch = r.update(2, rid(2), &Update { withdrawn: vec![Nlri::new(net("10.0.0.0/26"))], ..Default::default() });
    assert_eq!(hops(&ch, "10.0.0.0/26"), Some(vec![ip(3)]));
}

#[test]
fn ibgp_routes_are_not_passed_between_ibgp_peers_without_reflection() {
    let mut r = rib(None, &[(1, AS, false), (2, AS, false), (3, 65001, false)]);
    let ch = r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[])));
    assert!(!ch.peers.contains_key(&2), "{ch:?}");
    let to_ebgp = &ch.peers[&3].announce;
    assert_eq!(to_ebgp.len(), 1);
    let (_, out) = &to_ebgp[0];
    // eBGP: our AS in front, next hop ourselves, no LOCAL_PREF.
    assert_eq!(out.next_hop, NextHop::Local);
    assert_eq!(out.attrs.as_path, vec![AsPathSegment { kind: SegmentKind::Sequence, asns: vec![AS] }]);
    assert_eq!(out.attrs.local_pref, None);
    // Our own routes go to everyone, next hop ourselves, with LOCAL_PREF inside the AS.
    let ch = r.originate(net("10.9.0.0/26"), path(&[]));
    assert_eq!(ch.peers.len(), 3);
    let (_, to_ibgp) = &ch.peers[&1].announce[0];
    assert_eq!((to_ibgp.next_hop, to_ibgp.attrs.local_pref), (NextHop::Local, Some(DEFAULT_LOCAL_PREF)));
    assert!(ch.fib.is_empty(), "our own routes are not ours to program: {ch:?}");
}

#[test]
fn a_route_reflector_reflects_with_originator_and_cluster() {
    let cluster = Ipv4Addr::new(1, 0, 0, 1);
    let mut r = rib(Some(cluster), &[(1, AS, true), (2, AS, true), (3, AS, false)]);
    // A client's route: to the other client and to the non-client, attributes as RFC 4456 says.
    let ch = r.update(1, rid(1), &announce("10.0.1.0/26", 1, path(&[])));
    assert_eq!(ch.peers.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    for id in [2, 3] {
        let (_, out) = &ch.peers[&id].announce[0];
        assert_eq!(out.next_hop, NextHop::Address(ip(1)), "iBGP keeps the next hop");
        assert_eq!(out.attrs.originator_id, Some(rid(1)));
        assert_eq!(out.attrs.cluster_list, vec![cluster]);
    }
    // A non-client's route: to clients only.
    let ch = r.update(3, rid(3), &announce("10.0.3.0/26", 3, path(&[])));
    assert_eq!(ch.peers.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    // Loops: our cluster in the list, or our identifier as originator: ignored.
    let ch = r.update(3, rid(3), &announce("10.0.4.0/26", 3, Attrs { cluster_list: vec![cluster], ..path(&[]) }));
    assert!(ch.fib.is_empty() && ch.peers.is_empty());
    let ch = r.update(3, rid(3), &announce("10.0.5.0/26", 3, Attrs { originator_id: Some(rid(100)), ..path(&[]) }));
    assert!(ch.fib.is_empty() && ch.peers.is_empty());
}

#[test]
fn our_own_as_in_an_external_path_is_a_loop() {
    let mut r = rib(None, &[(1, 65001, false)]);
    assert!(r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[65001, AS]))).fib.is_empty());
    let mut p = peer(1, 65001, false);
    p.allow_own_as = 1;
    r.set_peer(1, p);
    assert!(!r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[65001, AS]))).fib.is_empty());
}

#[test]
fn treat_as_withdraw_removes_what_the_peer_had_sent() {
    let mut r = rib(None, &[(1, AS, false)]);
    r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[])));
    let mut bad = announce("10.0.0.0/26", 1, path(&[]));
    bad.problems.push(UpdateProblem::TreatAsWithdraw("malformed MED".into()));
    assert_eq!(hops(&r.update(1, rid(1), &bad), "10.0.0.0/26"), Some(vec![]));
    assert!(r.is_empty());
}

#[test]
fn graceful_restart_keeps_stale_routes_until_end_of_rib() {
    let mut r = rib(None, &[(1, AS, false), (2, 65001, false)]);
    r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[])));
    r.update(1, rid(1), &announce("10.0.1.0/26", 1, path(&[])));
    let ch = r.peer_down(1, true);
    assert!(ch.fib.is_empty() && ch.peers.is_empty(), "stale routes stay: {ch:?}");
    // It comes back and sends one of the two again, then End-of-RIB: the other goes.
    r.peer_up(1, all(), BTreeSet::new());
    assert!(r.update(1, rid(1), &announce("10.0.0.0/26", 1, path(&[]))).fib.is_empty());
    let ch = r.sweep_stale(1, Some(Family::Ipv4Unicast));
    assert_eq!(ch.fib, vec![FibChange { prefix: net("10.0.1.0/26"), next_hops: NextHops::None }]);
    assert_eq!(ch.peers[&2].withdraw, vec![Nlri::new(net("10.0.1.0/26"))]);
    // Without graceful restart the routes go at once.
    let ch = r.peer_down(1, false);
    assert_eq!(ch.fib, vec![FibChange { prefix: net("10.0.0.0/26"), next_hops: NextHops::None }]);
}

#[test]
fn add_path_peers_get_every_equal_path_by_its_own_identifier() {
    let cluster = Ipv4Addr::new(1, 0, 0, 1);
    let mut r = Rib::new(AS, rid(100), Some(cluster));
    for n in 1..=3 {
        r.set_peer(n, peer(n as u8, AS, true));
    }
    r.peer_up(1, all(), BTreeSet::new());
    r.peer_up(2, all(), BTreeSet::new());
    r.peer_up(3, all(), all());
    // Peers 1 and 2 announce the same service range: peer 3 (ADD-PATH) gets both.
    r.update(1, rid(1), &announce("10.96.0.0/12", 1, path(&[])));
    let ch = r.update(2, rid(2), &announce("10.96.0.0/12", 2, path(&[])));
    let ids: Vec<u32> = ch.peers[&3].announce.iter().map(|(n, _)| n.path_id).collect();
    assert_eq!(ids.len(), 1, "only the new path is announced: {ch:?}");
    let (received, sent) = r.counts(3);
    assert_eq!((received, sent), (0, 2));
    let ch = r.update(1, rid(1), &Update { withdrawn: vec![Nlri::new(net("10.96.0.0/12"))], ..Default::default() });
    assert_eq!(ch.peers[&3].withdraw.len(), 1);
    assert!(ch.peers[&3].withdraw[0].path_id != ids[0]);
}

#[test]
fn a_peer_that_comes_up_gets_everything_once() {
    let mut r = rib(None, &[(1, 65001, false)]);
    for i in 0..100u32 {
        r.originate(IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 6))), 26).unwrap(), path(&[]));
    }
    r.set_peer(2, peer(2, 65002, false));
    let ch = r.peer_up(2, all(), BTreeSet::new());
    assert_eq!(ch.peers[&2].announce.len(), 100);
    // Nothing changed: nothing to send.
    let again = r.originate(net("10.0.0.0/26"), path(&[]));
    assert!(again.peers.is_empty(), "{again:?}");
}

#[test]
fn a_destination_costs_what_one_path_costs() {
    // The RIB holds one of these per prefix: 100,000 prefixes are 100,000 of them.
    assert!(std::mem::size_of::<Dest>() <= 16, "{}", std::mem::size_of::<Dest>());
}

#[test]
fn what_each_peer_sent_and_has_is_counted_and_listed() {
    // A reflector with two clients: each client's route goes to the other.
    let mut r = rib(Some(rid(100)), &[(1, AS, true), (2, AS, true)]);
    r.update(1, rid(1), &announce("10.0.1.0/26", 1, path(&[])));
    r.update(1, rid(1), &announce("10.0.2.0/26", 1, path(&[])));
    r.update(2, rid(2), &announce("10.0.3.0/26", 2, path(&[])));
    assert_eq!((r.counts(1), r.counts(2)), ((2, 1), (1, 2)));
    let got: Vec<IpNet> = r.received(1).iter().map(|x| x.0.prefix).collect();
    assert_eq!(got, vec![net("10.0.1.0/26"), net("10.0.2.0/26")]);
    let sent: Vec<IpNet> = r.advertised(2).iter().map(|x| x.0.prefix).collect();
    assert_eq!(sent, vec![net("10.0.1.0/26"), net("10.0.2.0/26")]);
    assert_eq!(r.advertised(2)[0].1.attrs.originator_id, Some(rid(1)), "reflected with its originator");
    // A withdrawal and a peer going down are counted off.
    r.update(1, rid(1), &Update { withdrawn: vec![Nlri::new(net("10.0.1.0/26"))], ..Default::default() });
    assert_eq!((r.counts(1), r.counts(2)), ((1, 1), (1, 1)));
    r.peer_down(2, false);
    assert_eq!(r.counts(1), (1, 0));
    assert!(r.received(2).is_empty() && r.advertised(2).is_empty());
}

#[test]
fn next_hop_modes_choose_whose_address_a_route_leaves_with() {
    // Peers 2 (iBGP client) and 3 (eBGP) of a reflector get peer 1's route.
    let mut r = Rib::new(AS, rid(100), Some(rid(100)));
    let modes = [(1, AS, NextHopMode::Auto), (2, AS, NextHopMode::SelfAddress), (3, 65003, NextHopMode::Keep)];
    for (n, asn, mode) in modes {
        r.set_peer(n, PeerInfo { next_hop: mode, rr_client: true, ..peer(n as u8, asn, true) });
        r.peer_up(n, all(), BTreeSet::new());
    }
    let ch = r.update(1, rid(1), &announce("10.0.1.0/26", 1, path(&[])));
    let out = |id: u32| ch.peers[&id].announce[0].1.next_hop;
    assert_eq!(out(2), NextHop::Local, "Self: ours, even to an iBGP peer");
    assert_eq!(out(3), NextHop::Address(ip(1)), "Keep: the original, even over eBGP");
    // Auto: eBGP gets ours (peer 4, no mode), iBGP keeps the original (shown above in
    // a_route_reflector_reflects_with_originator_and_cluster).
    r.set_peer(4, peer(4, 65004, false));
    let ch = r.peer_up(4, all(), BTreeSet::new());
    assert_eq!(ch.peers[&4].announce[0].1.next_hop, NextHop::Local);
}
