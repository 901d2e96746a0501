//! The kernel wrappers against the real kernel, inside network namespaces this test creates and
//! always removes (also when an assertion fails).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use gingham_kernel::{Netlink, Route, in_netns, open_netns, sysctl};

/// A named network namespace, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("gk-{}-{tag}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("iproute2 is installed");
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        Ns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test]
async fn veth_into_namespace_addresses_routes_sysctls() {
    let host = Ns::new("host");
    let pod = Ns::new("pod");
    let h = Netlink::in_namespace(&host.path()).unwrap();
    let p = Netlink::in_namespace(&pod.path()).unwrap();
    let mac = [0xee; 6];
    h.add_veth("calitest0", "eth0", &open_netns(&pod.path()).unwrap(), 1450, Some(mac)).await.unwrap();
    // The peer was created inside the pod namespace, not in the host one.
    let hl = h.link("calitest0").await.unwrap().unwrap();
    assert_eq!((hl.mac, hl.mtu, hl.kind.as_deref()), (Some(mac), 1450, Some("veth")));
    assert!(h.link("eth0").await.unwrap().is_none());
    let pl = p.link("eth0").await.unwrap().unwrap();
    assert_eq!(pl.mtu, 1450);
    assert!(matches!(
        h.add_veth("calitest0", "eth1", &open_netns(&pod.path()).unwrap(), 1450, None).await,
        Err(gingham_kernel::KernelError::Exists(_))
    ));
    // The peer's MAC chosen by the caller (an ADD records it before the pair exists).
    let peer_mac = [0x0a, 0x58, 0x01, 0x02, 0x03, 0x04];
    h.add_veth_with_macs("calitest1", "eth1", &open_netns(&pod.path()).unwrap(), 1500, Some(mac), Some(peer_mac))
        .await
        .unwrap();
    assert_eq!(p.link("eth1").await.unwrap().unwrap().mac, Some(peer_mac));
    assert_eq!(h.link("calitest1").await.unwrap().unwrap().mac, Some(mac));
    assert!(h.delete_link("calitest1").await.unwrap());

    let pod_ip: ipnet::IpNet = "10.65.0.5/32".parse().unwrap();
    p.add_address(pl.index, pod_ip).await.unwrap();
    p.add_address(pl.index, pod_ip).await.unwrap(); // idempotent
    p.set_up(pl.index).await.unwrap();
    h.set_up(hl.index).await.unwrap();
    let v4: Vec<_> = p.addresses(pl.index).await.unwrap().into_iter().filter(|a| a.addr().is_ipv4()).collect();
    assert_eq!(v4, vec![pod_ip]);
    let gw: IpAddr = "169.254.1.1".parse().unwrap();
    p.replace_route(&Route::device("169.254.1.1/32".parse().unwrap(), pl.index, 3)).await.unwrap();
    p.replace_route(&Route::via("0.0.0.0/0".parse().unwrap(), gw, pl.index, 3)).await.unwrap();
    let host_route = Route::device(pod_ip, hl.index, 3);
    h.replace_route(&host_route).await.unwrap();
    h.replace_route(&host_route).await.unwrap(); // replace is idempotent
    let routes = p.routes(true).await.unwrap();
    assert!(
        routes.iter().any(|r| r.dst.to_string() == "0.0.0.0/0" && r.gateway == Some(gw) && r.oif == Some(pl.index)),
        "{routes:?}"
    );
    assert!(routes.iter().any(|r| r.dst.to_string() == "169.254.1.1/32" && r.scope_link));
    let hr = h.routes(true).await.unwrap();
    assert!(hr.iter().any(|r| r.dst == pod_ip && r.oif == Some(hl.index) && r.scope_link && r.protocol == 3), "{hr:?}");
    // The kernel agrees (as `ip route` shows it).
    let shown = Command::new("ip").args(["-n", &host.0, "route", "show", "10.65.0.5"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout).trim(),
        "10.65.0.5 dev calitest0 scope link" /* ip omits proto boot */
    );

    // Sysctls land in the namespace they are written in.
    sysctl::write_in(
        &host.path(),
        vec![(vec!["net".into(), "ipv4".into(), "conf".into(), "calitest0".into(), "proxy_arp".into()], "1".into())],
    )
    .unwrap();
    let v =
        in_netns(&host.path(), || sysctl::read(&["net", "ipv4", "conf", "calitest0", "proxy_arp"])).unwrap().unwrap();
    assert_eq!(v, "1");

    // One lookup names the FIB entry an address meets: the /32 here, a covering route, or none.
    let found = h.route_for(pod_ip.addr()).await.unwrap().expect("the host route");
    assert_eq!((found.dst, found.oif, found.protocol), (pod_ip, Some(hl.index), 3));
    let block = Route::device("10.65.0.0/26".parse().unwrap(), hl.index, 3);
    h.replace_route(&block).await.unwrap();
    let other = h.route_for("10.65.0.9".parse().unwrap()).await.unwrap().expect("the covering route");
    assert_eq!(other.dst, block.dst);
    assert!(h.route_for("10.99.1.1".parse().unwrap()).await.unwrap().is_none(), "no route, no match");
    for kind in ["blackhole", "unreachable", "prohibit"] {
        let st = Command::new("ip").args(["-n", &host.0, "route", "add", kind, "10.98.0.0/24"]).status().unwrap();
        assert!(st.success());
        assert!(h.route_for("10.98.0.1".parse().unwrap()).await.unwrap().is_none(), "a {kind} route is no match");
        Command::new("ip").args(["-n", &host.0, "route", "del", "10.98.0.0/24"]).status().unwrap();
    }
    assert!(h.route_for("fd00::1".parse().unwrap()).await.unwrap().is_none(), "IPv6: no route, no match");
    assert!(h.delete_route(&block).await.unwrap());
    assert!(h.delete_route(&host_route).await.unwrap());
    assert!(!h.delete_route(&host_route).await.unwrap());
    assert!(h.route_for(pod_ip.addr()).await.unwrap().is_none());
    // Deleting the host end removes the pair, in both namespaces.
    assert!(h.delete_link("calitest0").await.unwrap());
    assert!(!h.delete_link("calitest0").await.unwrap());
    assert!(p.link("eth0").await.unwrap().is_none());
}

/// nftables through libnftables in the namespace's own worker: atomic batches, incremental set
/// and chain changes, nothing outside the namespace.
#[tokio::test]
async fn nftables_batches_are_atomic_and_incremental() {
    use gingham_kernel::nft::*;
    let ns = Ns::new("nft");
    let nft = Nft::in_namespace_file(&open_netns(&ns.path()).unwrap()).unwrap();
    let t = Table::new(Family::Ip, "gktest");
    let set = Set { name: "pools".into(), kind: SetType::Ipv4Addr, interval: true };
    let net = |s: &str| Element::Net(s.parse().unwrap());
    nft.apply(&[
        Op::AddTable(t.clone()),
        Op::AddSet(t.clone(), set.clone()),
        Op::AddElements(t.clone(), "pools".into(), vec![net("10.0.0.0/16"), net("10.9.0.0/16")]),
        Op::AddChain(
            t.clone(),
            "post".into(),
            Some(BaseChain {
                kind: ChainType::Nat,
                hook: Hook::Postrouting,
                priority: PRIORITY_SRCNAT,
                accept_by_default: true,
            }),
        ),
        Op::AddRule(
            t.clone(),
            "post".into(),
            Rule::new(
                vec![Match::AddrInSet { addr: Addr::Source, v6: false, set: "pools".into(), negate: false }],
                vec![Statement::Masquerade { fully_random: true }],
            ),
        ),
    ])
    .await
    .unwrap();
    let listed = nft.list_table(&t).await.unwrap().unwrap();
    assert!(listed.contains("10.0.0.0/16") && listed.contains("ip saddr @pools masquerade fully-random"), "{listed}");
    // Only in the namespace.
    let root = Command::new("nft").args(["list", "table", "ip", "gktest"]).output().unwrap();
    assert!(!root.status.success(), "nothing in the root namespace");
    // Incremental: one element out, one in; one chain's rules replaced.
    nft.apply(&[
        Op::DeleteElements(t.clone(), "pools".into(), vec![net("10.9.0.0/16")]),
        Op::AddElements(t.clone(), "pools".into(), vec![net("10.7.0.0/16")]),
        Op::FlushChain(t.clone(), "post".into()),
        Op::AddRule(t.clone(), "post".into(), Rule::new(vec![Match::UdpDport(4789)], vec![Statement::Accept])),
    ])
    .await
    .unwrap();
    let listed = nft.list_table(&t).await.unwrap().unwrap();
    assert!(listed.contains("10.7.0.0/16") && !listed.contains("10.9.0.0/16"), "{listed}");
    assert!(listed.contains("udp dport 4789 accept") && !listed.contains("masquerade"), "{listed}");
    // All or nothing: a batch whose last op fails changes nothing.
    let err = nft
        .apply(&[
            Op::AddElements(t.clone(), "pools".into(), vec![net("10.5.0.0/16")]),
            Op::AddRule(
                t.clone(),
                "post".into(),
                Rule::new(
                    vec![Match::AddrInSet { addr: Addr::Source, v6: false, set: "missing".into(), negate: false }],
                    vec![Statement::Drop],
                ),
            ),
        ])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    assert!(!nft.list_table(&t).await.unwrap().unwrap().contains("10.5.0.0/16"), "the batch's first op did not land");
    nft.apply(&[Op::DeleteTable(t.clone())]).await.unwrap();
    assert_eq!(nft.list_table(&t).await.unwrap(), None);
    nft.apply(&[Op::DeleteTable(t.clone())]).await.unwrap();
}

/// Named namespaces as iproute2 keeps them, bridges, enslaving, commands inside a namespace.
#[tokio::test]
async fn named_namespaces_bridges_and_commands() {
    use gingham_kernel::netns;
    let name = format!("gk-{}-named", std::process::id());
    let path = netns::add(&name).unwrap();
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = gingham_kernel::netns::delete(&self.0);
        }
    }
    let _del = Del(name.clone());
    assert!(netns::add(&name).is_err(), "an existing one is an error");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&name), "ip netns sees it");
    let nl = Netlink::in_namespace(&path).unwrap();
    let br = nl.add_bridge("br0").await.unwrap();
    let ns_file = open_netns(&path).unwrap();
    nl.add_veth("port1", "port1p", &ns_file, 1500, None).await.unwrap();
    let port = nl.link("port1").await.unwrap().unwrap().index;
    nl.set_master(port, br).await.unwrap();
    let out = netns::command(&ns_file, "ip").unwrap().args(["-o", "link", "show", "port1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("master br0"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(netns::add("../escape").is_err());
    netns::delete(&name).unwrap();
    assert!(!path.exists());
    netns::delete(&name).unwrap();
}

/// Equal-cost routes: one multipath route, read back as the same gateways, replaced by a
/// single-path one and back.
#[tokio::test]
async fn ecmp_routes_are_one_multipath_route() {
    let a = Ns::new("ecmp");
    let b = Ns::new("ecmp-far");
    let n = Netlink::in_namespace(&a.path()).unwrap();
    n.add_veth("ecmp0", "ecmp1", &open_netns(&b.path()).unwrap(), 1500, None).await.unwrap();
    let i = n.link("ecmp0").await.unwrap().unwrap().index;
    n.add_address(i, "10.1.0.1/24".parse().unwrap()).await.unwrap();
    n.set_up(i).await.unwrap();
    let g = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut r = Route::via("10.9.0.0/24".parse().unwrap(), g("10.1.0.2"), i, 12);
    r.also_via = vec![g("10.1.0.3"), g("10.1.0.4")];
    n.replace_route(&r).await.unwrap();
    let shown = Command::new("ip").args(["-n", &a.0, "route", "show", "10.9.0.0/24"]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert_eq!(shown.matches("nexthop via").count(), 3, "{shown}");
    let back = n.routes(true).await.unwrap().into_iter().find(|x| x.dst == r.dst).unwrap();
    assert_eq!(
        (back.gateway, back.also_via.clone(), back.oif, back.protocol),
        (r.gateway, r.also_via.clone(), Some(i), 12)
    );
    // Down to one path, and the kernel's view follows.
    let single = Route::via(r.dst, g("10.1.0.3"), i, 12);
    n.replace_route(&single).await.unwrap();
    let back = n.routes(true).await.unwrap().into_iter().find(|x| x.dst == r.dst).unwrap();
    assert_eq!((back.gateway, back.also_via.len()), (Some(g("10.1.0.3")), 0));
    assert!(n.delete_route(&single).await.unwrap());
}

/// Route changes in bulk (many messages per datagram): each change gets its own result, a
/// failing one in the middle does not take the others with it, and deleting what is not
/// there is reported as such.
#[tokio::test]
async fn route_changes_in_bulk_answer_each_change() {
    use gingham_kernel::RouteOp;
    let a = Ns::new("bulk");
    let b = Ns::new("bulk-far");
    let n = Netlink::in_namespace(&a.path()).unwrap();
    n.add_veth("bulk0", "bulk1", &open_netns(&b.path()).unwrap(), 1500, None).await.unwrap();
    let i = n.link("bulk0").await.unwrap().unwrap().index;
    n.add_address(i, "10.1.0.1/24".parse().unwrap()).await.unwrap();
    n.set_up(i).await.unwrap();
    let gw: IpAddr = "10.1.0.2".parse().unwrap();
    let mut routes: Vec<Route> = (0..1500u32)
        .map(|k| Route::via(format!("10.{}.{}.0/24", 50 + k / 256, k % 256).parse().unwrap(), gw, i, 12))
        .collect();
    // The 700th has a gateway no device reaches: the kernel refuses it alone.
    routes[700] = Route::via("10.49.0.0/24".parse().unwrap(), "10.200.0.1".parse().unwrap(), i, 12);
    let ops: Vec<RouteOp> = routes.iter().map(RouteOp::Replace).collect();
    let results = n.change_routes(&ops).await;
    assert_eq!(results.len(), 1500);
    assert!(results[700].is_err(), "{:?}", results[700]);
    assert_eq!(results.iter().filter(|r| matches!(r, Ok(true))).count(), 1499);
    let kernel = n.routes(true).await.unwrap().into_iter().filter(|r| r.protocol == 12).count();
    assert_eq!(kernel, 1499);
    // Deleting: one that is there, one that is not.
    let gone = n.change_routes(&[RouteOp::Delete(&routes[0]), RouteOp::Delete(&routes[700])]).await;
    assert!(matches!(gone[..], [Ok(true), Ok(false)]), "{gone:?}");
}

/// Every operation, match and statement, applied over netlink by gingham into one table and
/// through libnftables from its text into another: `nft list` shows the two tables alike. Then
/// incremental changes both ways, a fresh handle that must ask the kernel about a set, a
/// failing batch that changes nothing and names what failed, and a commit by someone else
/// told apart from ours.
#[tokio::test]
async fn netlink_transactions_list_as_libnftables_writes_them() {
    use gingham_kernel::nft::*;
    let ns = Ns::new("wire");
    let nft = Nft::in_namespace_file(&open_netns(&ns.path()).unwrap()).unwrap();
    let net = |s: &str| Element::Net(s.parse().unwrap());
    let ipnet = |s: &str| -> ipnet::IpNet { s.parse().unwrap() };
    let (src, dst) = (Addr::Source, Addr::Destination);
    let v4 = Match::NfProto { v6: false };
    let v6 = Match::NfProto { v6: true };
    let proto = |p: u8| Match::L4Proto { proto: p, negate: false };
    let rules = vec![
        Rule::new(vec![Match::CtEstablished], vec![Statement::Accept]),
        Rule::new(
            vec![Match::IifnamePrefix("cali".into()), Match::CtInvalid],
            vec![Statement::Counter, Statement::Drop],
        ),
        Rule::new(vec![Match::Iifname("lo".into())], vec![Statement::Accept]),
        Rule::new(vec![Match::Oifname("eth0".into()), Match::OifnamePrefix("veth".into())], vec![Statement::Return]),
        Rule::new(vec![], vec![Statement::MarkClear(0x3_0000)]),
        Rule::new(vec![], vec![Statement::IfnameVmap { input: true, map: "from-wl".into() }]),
        Rule::new(vec![], vec![Statement::IfnameVmap { input: false, map: "to-wl".into() }]),
        Rule::new(vec![Match::Mark { bits: 0x1_0000, set: false }], vec![Statement::Counter, Statement::Drop]),
        Rule::new(vec![Match::Mark { bits: 0x1_0000, set: true }], vec![Statement::Jump("pi-x".into())]),
        Rule::new(
            vec![
                v4.clone(),
                proto(6),
                Match::AddrInSet { addr: src, v6: false, set: "s4".into(), negate: false },
                Match::AddrInSet { addr: dst, v6: false, set: "s4".into(), negate: true },
                Match::Ports { addr: dst, ranges: vec![(80, 80), (8000, 8080)], negate: false },
            ],
            vec![Statement::Counter, Statement::MarkSet(0x1_0000), Statement::Return],
        ),
        Rule::new(
            vec![
                v6.clone(),
                proto(17),
                Match::AddrInSet { addr: src, v6: true, set: "s6".into(), negate: false },
                Match::Ports { addr: src, ranges: vec![(53, 53)], negate: true },
                Match::Ports { addr: dst, ranges: vec![(1000, 2000)], negate: false },
            ],
            vec![Statement::Counter, Statement::Drop],
        ),
        Rule::new(
            vec![
                v4.clone(),
                Match::AddrIn {
                    addr: src,
                    v6: false,
                    nets: vec![ipnet("10.0.0.0/8"), ipnet("192.168.1.1/32")],
                    negate: false,
                },
                Match::AddrIn { addr: src, v6: false, nets: vec![ipnet("10.1.0.0/16")], negate: true },
                Match::AddrIn { addr: dst, v6: false, nets: vec![ipnet("172.16.0.7/32")], negate: true },
                Match::Ports { addr: dst, ranges: vec![(443, 443), (8443, 8443)], negate: true },
            ],
            vec![Statement::Log("calico-packet: ".into())],
        ),
        Rule::new(
            vec![
                v6.clone(),
                Match::AddrIn {
                    addr: dst,
                    v6: true,
                    nets: vec![ipnet("fd00::/64"), ipnet("fd01::1/128")],
                    negate: false,
                },
            ],
            vec![Statement::Goto("pi-x".into())],
        ),
        Rule::new(
            vec![Match::Addr { addr: dst, net: ipnet("10.2.0.0/16"), negate: false }, Match::TcpDport(179)],
            vec![Statement::Accept],
        ),
        Rule::new(
            vec![Match::Addr { addr: src, net: ipnet("fd00::1/128"), negate: true }, Match::UdpDport(4789)],
            vec![Statement::Notrack],
        ),
        Rule::new(
            vec![
                v4.clone(),
                proto(6),
                Match::AddrProtoPortInSet { addr: dst, v6: false, set: "n4".into(), negate: false },
            ],
            vec![Statement::Accept],
        ),
        Rule::new(
            vec![v6.clone(), Match::AddrProtoPortInSet { addr: dst, v6: true, set: "n6".into(), negate: true }],
            vec![Statement::Accept],
        ),
        Rule::new(
            vec![v4.clone(), proto(1), Match::Icmp { v6: false, kind: 8, code: None, negate: false }],
            vec![Statement::Accept],
        ),
        Rule::new(
            vec![v4.clone(), proto(1), Match::Icmp { v6: false, kind: 3, code: Some(4), negate: false }],
            vec![Statement::Accept],
        ),
        Rule::new(
            vec![v6.clone(), proto(58), Match::Icmp { v6: true, kind: 128, code: None, negate: true }],
            vec![Statement::Drop],
        ),
        Rule::new(vec![Match::Icmpv6Types(vec![130, 131, 135, 136])], vec![Statement::Accept]),
        Rule::new(vec![Match::L4Proto { proto: 132, negate: true }], vec![Statement::Counter]),
    ];
    let build = |t: &Table| -> Vec<Op> {
        let set = |name: &str, kind, interval| Op::AddSet(t.clone(), Set { name: name.into(), kind, interval });
        let elements = |set: &str, e: Vec<Element>| Op::AddElements(t.clone(), set.into(), e);
        let base = |hook, priority, accept_by_default| {
            Some(BaseChain { kind: ChainType::Filter, hook, priority, accept_by_default })
        };
        let mut ops = vec![
            Op::AddTable(t.clone()),
            set("s4", SetType::Ipv4Addr, true),
            set("s6", SetType::Ipv6Addr, true),
            set("h4", SetType::Ipv4Addr, false),
            set("ifs", SetType::Ifname, false),
            set("n4", SetType::Ipv4ProtoPort, false),
            set("n6", SetType::Ipv6ProtoPort, false),
            Op::AddIfnameVmap(t.clone(), "from-wl".into()),
            Op::AddIfnameVmap(t.clone(), "to-wl".into()),
            Op::AddChain(t.clone(), "pi-x".into(), None),
            Op::AddRule(t.clone(), "pi-x".into(), Rule::new(vec![], vec![Statement::Return])),
            Op::AddChain(t.clone(), "tw-cali1".into(), None),
            elements("s4", vec![net("10.0.0.1/32"), net("10.0.0.2/31"), net("10.1.0.0/16"), net("255.255.255.0/24")]),
            elements("s6", vec![net("fd00::1/128"), net("fd00:1::/64")]),
            elements("h4", vec![net("10.9.0.1/32"), net("10.9.0.2/32")]),
            elements("ifs", vec![Element::Ifname("cali1".into())]),
            elements(
                "n4",
                vec![
                    Element::ProtoPort("10.0.0.1".parse().unwrap(), 6, 8080),
                    Element::ProtoPort("10.0.0.2".parse().unwrap(), 17, 53),
                ],
            ),
            elements("n6", vec![Element::ProtoPort("fd00::1".parse().unwrap(), 6, 80)]),
            elements("to-wl", vec![Element::IfJump("cali1".into(), "tw-cali1".into())]),
            Op::AddChain(t.clone(), "forward".into(), base(Hook::Forward, PRIORITY_FILTER, true)),
            Op::AddChain(t.clone(), "input".into(), base(Hook::Input, PRIORITY_FILTER, false)),
            Op::AddChain(t.clone(), "raw".into(), base(Hook::Prerouting, PRIORITY_RAW, true)),
            Op::AddChain(
                t.clone(),
                "post".into(),
                Some(BaseChain {
                    kind: ChainType::Nat,
                    hook: Hook::Postrouting,
                    priority: PRIORITY_SRCNAT,
                    accept_by_default: true,
                }),
            ),
            Op::AddRule(
                t.clone(),
                "post".into(),
                Rule::new(
                    vec![Match::AddrInSet { addr: src, v6: false, set: "s4".into(), negate: false }],
                    vec![Statement::Masquerade { fully_random: true }],
                ),
            ),
            Op::AddRule(
                t.clone(),
                "post".into(),
                Rule::new(vec![v4.clone()], vec![Statement::Masquerade { fully_random: false }]),
            ),
            Op::AddRule(
                t.clone(),
                "input".into(),
                Rule::new(vec![Match::Iifname("lo".into())], vec![Statement::Accept]),
            ),
        ];
        ops.extend(rules.iter().map(|r| Op::AddRule(t.clone(), "forward".into(), r.clone())));
        ops
    };
    let (wire, text) = (Table::new(Family::Inet, "gkwire"), Table::new(Family::Inet, "gktext"));
    nft.apply(&build(&wire)).await.unwrap();
    nft.apply_with_libnftables(&build(&text)).await.unwrap();
    let same = |what: &'static str| {
        let (nft, wire, text) = (nft.clone(), wire.clone(), text.clone());
        async move {
            let w = nft.list_table(&wire).await.unwrap().unwrap().replace("gkwire", "TABLE");
            let t = nft.list_table(&text).await.unwrap().unwrap().replace("gktext", "TABLE");
            assert_eq!(w, t, "{what}: over netlink (left) vs libnftables (right)");
            w
        }
    };
    let listed = same("the whole table").await;
    for expect in [
        "ct state established,related accept",
        "iifname \"cali*\"",
        "ip saddr @s4 ip daddr != @s4",
        "tcp dport { 80, 8000-8080 }",
        "icmpv6 type",
        "masquerade fully-random",
        "\"cali1\" : jump tw-cali1",
        "elements = { \"cali1\" }",
        "10.1.0.0/16",
        "ipv4_addr . inet_proto . inet_service",
    ] {
        assert!(listed.contains(expect), "{expect:?} in:\n{listed}");
    }

    // Incremental changes, both ways: elements out and in, one chain's rules replaced, a set
    // and a chain deleted, a map entry removed.
    let change = |t: &Table| {
        vec![
            Op::DeleteElements(t.clone(), "s4".into(), vec![net("10.0.0.2/31"), net("255.255.255.0/24")]),
            Op::AddElements(t.clone(), "s4".into(), vec![net("10.7.0.0/16")]),
            Op::DeleteElements(t.clone(), "h4".into(), vec![net("10.9.0.1/32")]),
            Op::FlushSet(t.clone(), "s6".into()),
            Op::DeleteElements(t.clone(), "to-wl".into(), vec![Element::IfJump("cali1".into(), "tw-cali1".into())]),
            Op::DeleteChain(t.clone(), "tw-cali1".into()),
            Op::FlushChain(t.clone(), "input".into()),
            Op::AddRule(
                t.clone(),
                "input".into(),
                Rule::new(vec![Match::UdpDport(4789)], vec![Statement::Counter, Statement::Accept]),
            ),
            Op::DeleteSet(t.clone(), "ifs".into()),
        ]
    };
    nft.apply(&change(&wire)).await.unwrap();
    nft.apply_with_libnftables(&change(&text)).await.unwrap();
    let listed = same("after incremental changes").await;
    assert!(!listed.contains("10.0.0.2/31") && listed.contains("10.7.0.0/16"), "{listed}");
    assert!(!listed.contains("tw-cali1") && !listed.contains("set ifs"), "{listed}");
    assert!(!nft.changed_by_others().await.unwrap(), "our own transactions, both ways");

    // A fresh handle (a restarted agent) knows nothing of the sets: it asks the kernel whether
    // a set is an interval set before encoding its elements.
    let fresh = Nft::in_namespace_file(&open_netns(&ns.path()).unwrap()).unwrap();
    let more = |t: &Table| {
        vec![
            Op::AddElements(t.clone(), "s4".into(), vec![net("10.8.0.0/16")]),
            Op::AddElements(t.clone(), "h4".into(), vec![net("10.9.0.3/32")]),
        ]
    };
    fresh.apply(&more(&wire)).await.unwrap();
    nft.apply_with_libnftables(&more(&text)).await.unwrap();
    same("elements from a fresh handle").await;
    drop(fresh);

    // All or nothing: a batch whose later operation fails changes nothing, and the error says
    // which operation; the socket is fine afterwards.
    let missing = Rule::new(
        vec![Match::AddrInSet { addr: src, v6: false, set: "missing".into(), negate: false }],
        vec![Statement::Drop],
    );
    let err = nft
        .apply(&[
            Op::AddElements(wire.clone(), "s4".into(), vec![net("10.5.0.0/16")]),
            Op::AddRule(wire.clone(), "input".into(), missing),
        ])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("add rule inet gkwire input ip saddr @missing drop"), "{err}");
    assert!(!nft.list_table(&wire).await.unwrap().unwrap().contains("10.5.0.0/16"), "the first change did not land");
    let err = nft.apply(&[Op::DeleteElements(wire.clone(), "s6".into(), vec![net("fd09::/64")])]).await.unwrap_err();
    assert!(err.to_string().contains("delete element inet gkwire s6"), "{err}");
    nft.apply(&[Op::AddElements(wire.clone(), "s4".into(), vec![net("10.5.0.0/16")])]).await.unwrap();
    assert!(nft.list_table(&wire).await.unwrap().unwrap().contains("10.5.0.0/16"));
    // Bad names never reach the kernel.
    assert!(nft.apply(&[Op::FlushChain(wire.clone(), "x; flush ruleset".into())]).await.is_err());
    let bad = Op::AddElements(wire.clone(), "h4".into(), vec![Element::Ifname("a\"b".into())]);
    assert!(nft.apply(&[bad]).await.is_err());

    // Someone else's commit is told apart.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "add", "table", "inet", "someone-else"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(nft.changed_by_others().await.unwrap(), "a commit by another process");
    assert!(!nft.changed_by_others().await.unwrap(), "and only once");

    // A big batch (megabytes: a full sync's size) goes in one transaction.
    let big = Table::new(Family::Inet, "gkbig");
    let mut ops = vec![Op::AddTable(big.clone())];
    for c in 0..3000 {
        let chain = format!("c{c}");
        ops.push(Op::AddChain(big.clone(), chain.clone(), None));
        for r in &rules[13..15] {
            ops.push(Op::AddRule(big.clone(), chain.clone(), r.clone()));
        }
    }
    nft.apply(&ops).await.unwrap();
    let listed = nft.list_table(&big).await.unwrap().unwrap();
    assert!(listed.contains("chain c2999 {"), "{}", &listed[listed.len().saturating_sub(500)..]);
    for t in [&wire, &text, &big] {
        nft.apply(&[Op::DeleteTable(t.clone())]).await.unwrap();
    }
}
