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

    assert!(h.delete_route(&host_route).await.unwrap());
    assert!(!h.delete_route(&host_route).await.unwrap());
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

/// Set elements over netlink directly land as libnftables would write them: the same elements
/// sent both ways to two sets of one type list identically; a failing change is all-or-nothing;
/// and a commit by someone else is told apart from ours.
#[tokio::test]
async fn set_elements_over_netlink_match_libnftables() {
    use gingham_kernel::nft::*;
    let ns = Ns::new("wire");
    let nft = Nft::in_namespace_file(&open_netns(&ns.path()).unwrap()).unwrap();
    let t = Table::new(Family::Inet, "gkwire");
    let mut ops = vec![Op::AddTable(t.clone())];
    for name in ["text4", "wire4"] {
        ops.push(Op::AddSet(t.clone(), Set { name: name.into(), kind: SetType::Ipv4Addr, interval: true }));
    }
    for name in ["text6", "wire6"] {
        ops.push(Op::AddSet(t.clone(), Set { name: name.into(), kind: SetType::Ipv6Addr, interval: true }));
    }
    for name in ["textpp", "wirepp"] {
        ops.push(Op::AddSet(t.clone(), Set { name: name.into(), kind: SetType::Ipv4ProtoPort, interval: false }));
    }
    nft.apply(&ops).await.unwrap();
    assert!(!nft.changed_by_others().await.unwrap(), "our own transaction");
    let net = |s: &str| Element::Net(s.parse().unwrap());
    let v4 = vec![net("10.0.0.1/32"), net("10.0.0.2/31"), net("10.1.0.0/16"), net("255.255.255.0/24")];
    let v6 = vec![net("fd00::1/128"), net("fd00:1::/64")];
    let pp = vec![
        Element::ProtoPort("10.0.0.1".parse().unwrap(), 6, 8080),
        Element::ProtoPort("10.0.0.2".parse().unwrap(), 17, 53),
    ];
    let change = |set: &str, interval: bool, add: bool, elements: Vec<Element>| SetElements {
        table: t.clone(),
        set: set.into(),
        interval,
        add,
        elements,
    };
    nft.apply(&[
        Op::AddElements(t.clone(), "text4".into(), v4.clone()),
        Op::AddElements(t.clone(), "text6".into(), v6.clone()),
        Op::AddElements(t.clone(), "textpp".into(), pp.clone()),
    ])
    .await
    .unwrap();
    nft.apply_elements(vec![
        change("wire4", true, true, v4.clone()),
        change("wire6", true, true, v6.clone()),
        change("wirepp", false, true, pp.clone()),
    ])
    .await
    .unwrap();
    let elements = |listing: &str, set: &str| -> String {
        let from = listing.find(&format!("set {set} {{")).unwrap();
        let body = &listing[from..];
        let body = &body[..body.find('}').unwrap()];
        body.lines().filter(|l| !l.contains("set ")).map(str::trim).collect::<Vec<_>>().join(" ")
    };
    let listing = nft.list_table(&t).await.unwrap().unwrap();
    for (a, b) in [("text4", "wire4"), ("text6", "wire6"), ("textpp", "wirepp")] {
        assert_eq!(elements(&listing, a), elements(&listing, b), "{a} vs {b}:\n{listing}");
        assert!(elements(&listing, b).contains("elements"), "{listing}");
    }
    assert!(!nft.changed_by_others().await.unwrap(), "element batches are ours too");

    // Deleting over the wire: exactly those elements go.
    nft.apply_elements(vec![change("wire4", true, false, vec![net("10.0.0.2/31"), net("255.255.255.0/24")])])
        .await
        .unwrap();
    nft.apply(&[Op::DeleteElements(t.clone(), "text4".into(), vec![net("10.0.0.2/31"), net("255.255.255.0/24")])])
        .await
        .unwrap();
    let listing = nft.list_table(&t).await.unwrap().unwrap();
    assert_eq!(elements(&listing, "text4"), elements(&listing, "wire4"), "{listing}");
    assert!(!elements(&listing, "wire4").contains("10.0.0.2"), "{listing}");

    // All or nothing: a batch whose second change fails (deleting what is not there) leaves
    // its first undone, and the socket is fine afterwards.
    let err = nft
        .apply_elements(vec![
            change("wire4", true, true, vec![net("10.9.0.0/16")]),
            change("wire6", true, false, vec![net("fd09::/64")]),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("set elements"), "{err}");
    assert!(!nft.list_table(&t).await.unwrap().unwrap().contains("10.9.0.0/16"), "the first change did not land");
    nft.apply_elements(vec![change("wire4", true, true, vec![net("10.9.0.0/16")])]).await.unwrap();
    assert!(nft.list_table(&t).await.unwrap().unwrap().contains("10.9.0.0/16"));

    // Someone else's commit is told apart.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "add", "table", "inet", "someone-else"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(nft.changed_by_others().await.unwrap(), "a commit by another process");
    assert!(!nft.changed_by_others().await.unwrap(), "and only once");
    nft.apply(&[Op::DeleteTable(t.clone())]).await.unwrap();
}
