use std::collections::BTreeMap;
use std::net::IpAddr;

use gingham_store::{Event, KeyValue};
use serde_json::json;

use super::*;

fn put(c: &mut Cache, key: String, value: serde_json::Value) {
    c.apply(&Event::Put(KeyValue { key, value: value.to_string().into_bytes(), mod_revision: 1, create_revision: 1 }));
}

fn node(c: &mut Cache, name: &str, ip: &str, labels: serde_json::Value, bgp_extra: serde_json::Value) {
    let mut bgp = json!({"ipv4Address": format!("{ip}/24")});
    for (k, v) in bgp_extra.as_object().cloned().unwrap_or_default() {
        bgp[k] = v;
    }
    put(
        c,
        format!("/calico/resources/v3/projectcalico.org/nodes/{name}"),
        json!({"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {"bgp": bgp}}),
    );
}

fn resource(c: &mut Cache, plural: &str, kind: &str, name: &str, spec: serde_json::Value) {
    put(
        c,
        format!("/calico/resources/v3/projectcalico.org/{plural}/{name}"),
        json!({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name}, "spec": spec}),
    );
}

fn mesh_off(c: &mut Cache) {
    let spec = json!({"nodeToNodeMeshEnabled": false, "asNumber": 64512});
    resource(c, "bgpconfigurations", "BGPConfiguration", "default", spec);
}

fn selector_peer(c: &mut Cache, name: &str, nodes: &str, peers: &str) {
    resource(c, "bgppeers", "BGPPeer", name, json!({"nodeSelector": nodes, "peerSelector": peers}));
}

fn peer_names(p: &Plan) -> Vec<(String, bool, bool, u32)> {
    p.peers.iter().map(|p| (p.name.clone(), p.fsm.passive, p.rr_client, p.fsm.remote_as)).collect()
}

#[test]
fn the_mesh_peers_with_every_other_node_and_one_side_connects() {
    let mut c = Cache::new("n1");
    node(&mut c, "n1", "10.0.0.1", json!({}), json!({}));
    node(&mut c, "n2", "10.0.0.2", json!({}), json!({"asNumber": 64600}));
    node(&mut c, "n3", "10.0.0.10", json!({}), json!({}));
    let p = plan(&c, "n1", None);
    let s = p.speaker.as_ref().unwrap();
    assert_eq!((s.asn, s.router_id), (DEFAULT_AS, "10.0.0.1".parse().unwrap()));
    // "10.0.0.10" > "10.0.0.1" and "10.0.0.2" > "10.0.0.1" as strings: n1 waits for both.
    assert_eq!(
        peer_names(&p),
        vec![("Mesh_10_0_0_2".into(), true, false, 64600), ("Mesh_10_0_0_10".into(), true, false, DEFAULT_AS)]
    );
    let p3 = plan(&c, "n3", None);
    // From n3 ("10.0.0.10"): "10.0.0.1" is smaller (n3 connects), "10.0.0.2" is greater (n3 waits).
    assert_eq!(p3.peers.iter().map(|p| p.fsm.passive).collect::<Vec<_>>(), vec![false, true]);
    // Mesh off: no peers.
    resource(
        &mut c,
        "bgpconfigurations",
        "BGPConfiguration",
        "default",
        json!({"nodeToNodeMeshEnabled": false, "asNumber": 65000}),
    );
    let p = plan(&c, "n1", None);
    assert!(p.peers.is_empty());
    assert_eq!(p.speaker.unwrap().asn, 65000);
}

#[test]
fn explicit_peers_are_named_as_bird_names_them() {
    let mut c = Cache::new("n1");
    node(&mut c, "n1", "10.0.0.1", json!({"rack": "a"}), json!({}));
    resource(&mut c, "bgppeers", "BGPPeer", "tor", json!({"peerIP": "10.0.0.254:1790", "asNumber": 65001}));
    resource(
        &mut c,
        "bgppeers",
        "BGPPeer",
        "rack-a",
        json!({"nodeSelector": "rack == 'a'", "peerIP": "10.0.0.253", "asNumber": 65002, "keepOriginalNextHop": true}),
    );
    resource(
        &mut c,
        "bgppeers",
        "BGPPeer",
        "rack-b",
        json!({"nodeSelector": "rack == 'b'", "peerIP": "10.0.0.252", "asNumber": 65003, "nextHopMode": "Self", "reachableBy": "10.0.0.1",
               "filters": ["edge", "missing"]}),
    );
    let p = plan(&c, "n1", None);
    assert_eq!(
        peer_names(&p),
        vec![
            ("Node_10_0_0_253".into(), false, false, 65002),
            ("Global_10_0_0_254_port_1790".into(), false, false, 65001)
        ]
    );
    assert_eq!(p.peers[0].next_hop, gingham_bgp::rib::NextHopMode::Keep);
    assert_eq!(p.peers[1].port, 1790);
    // A node of rack b gets that rack's peer, next hop Self.
    node(&mut c, "n2", "10.0.0.2", json!({"rack": "b"}), json!({}));
    resource(
        &mut c,
        "bgpfilters",
        "BGPFilter",
        "edge",
        json!({"exportV4": [{"action": "Reject", "matchOperator": "In", "cidr": "10.65.0.0/16", "prefixLength": {"min": 26}},
                            {"action": "Reject", "matchOperator": "Equal", "cidr": "not-a-cidr"}],
               "importV6": [{"action": "Reject"}]}),
    );
    let p = plan(&c, "n2", None);
    let rack_b = p.peers.iter().find(|p| p.name == "Node_10_0_0_252").expect("rack b's peer");
    assert_eq!(rack_b.next_hop, gingham_bgp::rib::NextHopMode::SelfAddress);
    // Its filters: the rules of `edge` ("missing" names nothing; the rule with a CIDR that
    // is not one matches nothing, so it is left out).
    use gingham_bgp::filter::{Match, Rule};
    let f = &rack_b.filters;
    assert_eq!(
        f.export,
        vec![Rule {
            accept: false,
            v6: false,
            prefix: Some(Match::In { net: "10.65.0.0/16".parse().unwrap(), min: 26, max: 32 }),
            remote_only: false,
            interface: None
        }]
    );
    assert_eq!(f.import, vec![Rule { accept: false, v6: true, prefix: None, remote_only: false, interface: None }]);
    assert!(!f.exports(&"10.65.3.0/26".parse().unwrap(), false) && f.exports(&"10.65.0.0/24".parse().unwrap(), false));
    // reachableBy: a kernel route to the peer through that gateway, on the nodes that peer.
    assert_eq!(p.statics, [("10.0.0.252/32".parse().unwrap(), "10.0.0.1".parse().unwrap())].into());
    assert!(plan(&c, "n1", None).statics.is_empty());
}

/// ../shared/examples/seeds/bgppeer-rr-mode1.yaml on four nodes: r1 and r2 reflect (cluster
/// 224.0.0.1, label calico-rr), n3 and n4 are clients.
#[test]
fn seed_route_reflector_setup_1() {
    let mut c = Cache::new("r1");
    for (n, ip) in [("r1", "10.0.0.1"), ("r2", "10.0.0.2")] {
        node(
            &mut c,
            n,
            ip,
            json!({"calico-rr": "true"}),
            json!({"routeReflectorClusterID": "224.0.0.1", "asNumber": 64512}),
        );
    }
    for (n, ip) in [("n3", "10.0.0.3"), ("n4", "10.0.0.4")] {
        node(&mut c, n, ip, json!({}), json!({}));
    }
    mesh_off(&mut c);
    selector_peer(&mut c, "rr-to-node", "!has(calico-rr)", "has(calico-rr)");
    selector_peer(&mut c, "rr-to-rr", "has(calico-rr)", "has(calico-rr)");
    let names = |n: &str| plan(&c, n, None).peers.iter().map(|p| (p.name.clone(), p.rr_client)).collect::<Vec<_>>();
    // Clients peer with both reflectors only.
    assert_eq!(names("n3"), vec![("Node_10_0_0_1".into(), false), ("Node_10_0_0_2".into(), false)]);
    // A reflector peers with everyone: the other reflector as a non-client, the rest as clients.
    assert_eq!(
        names("r1"),
        vec![("Node_10_0_0_2".into(), false), ("Node_10_0_0_3".into(), true), ("Node_10_0_0_4".into(), true)]
    );
    assert_eq!(plan(&c, "r1", None).speaker.unwrap().cluster_id, Some("224.0.0.1".parse().unwrap()));
}

/// bgppeer-rr-mode2.yaml on six nodes: AS 64512 (n1–n3, reflector n1) and AS 64513 (n4–n6,
/// reflector n4).
#[test]
fn seed_route_reflector_setup_2() {
    let mut c = Cache::new("n1");
    for i in 1..=6 {
        let (asn, group) = if i <= 3 { (64512, "rr1") } else { (64513, "rr2") };
        let rr = i == 1 || i == 4;
        let labels = if rr { json!({"calico-group": group}) } else { json!({"calico-rr": group}) };
        let extra = if rr {
            json!({"asNumber": asn, "routeReflectorClusterID": "224.0.0.1"})
        } else {
            json!({"asNumber": asn})
        };
        node(&mut c, &format!("n{i}"), &format!("10.0.0.{i}"), labels, extra);
    }
    mesh_off(&mut c);
    selector_peer(&mut c, "rr1-to-node", "calico-rr == 'rr1'", "calico-group == 'rr1'");
    selector_peer(&mut c, "rr2-to-node", "calico-rr == 'rr2'", "calico-group == 'rr2'");
    selector_peer(&mut c, "rr1-to-rr2", "calico-group == 'rr1'", "calico-group == 'rr2'");
    let peers = |n: &str| {
        plan(&c, n, None).peers.iter().map(|p| (p.name.clone(), p.rr_client, p.fsm.remote_as)).collect::<Vec<_>>()
    };
    assert_eq!(peers("n2"), vec![("Node_10_0_0_1".into(), false, 64512)]);
    assert_eq!(peers("n5"), vec![("Node_10_0_0_4".into(), false, 64513)]);
    assert_eq!(
        peers("n1"),
        vec![
            ("Node_10_0_0_2".into(), true, 64512),
            ("Node_10_0_0_3".into(), true, 64512),
            ("Node_10_0_0_4".into(), false, 64513)
        ]
    );
    assert_eq!(
        peers("n4"),
        vec![
            ("Node_10_0_0_1".into(), false, 64512),
            ("Node_10_0_0_5".into(), true, 64513),
            ("Node_10_0_0_6".into(), true, 64513)
        ]
    );
}

#[test]
fn exports_are_own_blocks_borrowed_addresses_and_services_but_not_vxlan() {
    let mut c = Cache::new("n1");
    node(&mut c, "n1", "10.0.0.1", json!({}), json!({}));
    resource(
        &mut c,
        "ippools",
        "IPPool",
        "bgp",
        json!({"cidr": "172.20.0.0/16", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Never"}),
    );
    resource(
        &mut c,
        "ippools",
        "IPPool",
        "vx",
        json!({"cidr": "172.30.0.0/16", "blockSize": 26, "vxlanMode": "Always"}),
    );
    resource(
        &mut c,
        "ippools",
        "IPPool",
        "quiet",
        json!({"cidr": "172.40.0.0/16", "blockSize": 26, "disableBGPExport": true}),
    );
    let block = |c: &mut Cache, cidr: &str, owner: &str, borrower: Option<&str>| {
        let mut b =
            gingham_ipam::block::AllocationBlock::new(cidr.parse().unwrap(), Some(format!("host:{owner}")), None, 1);
        if let Some(n) = borrower {
            b.allocate_ordinal(1, "h", &[("node".to_string(), n.to_string())].into_iter().collect());
        }
        put(c, gingham_ipam::model::block_key(&cidr.parse().unwrap()), serde_json::to_value(&b).unwrap());
    };
    block(&mut c, "172.20.0.0/26", "n1", None);
    block(&mut c, "172.30.0.0/26", "n1", None);
    block(&mut c, "172.40.0.0/26", "n1", None);
    block(&mut c, "172.20.0.64/26", "n2", Some("n1"));
    resource(
        &mut c,
        "bgpconfigurations",
        "BGPConfiguration",
        "default",
        json!({
        "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
        "communities": [{"name": "svc", "value": "65000:100"}],
        "prefixAdvertisements": [{"cidr": "10.96.0.0/12", "communities": ["svc", "65000:1:2"]}]}),
    );
    let p = plan(&c, "n1", None);
    let got: Vec<String> = p.exports.keys().map(|n| n.to_string()).collect();
    assert_eq!(got, vec!["10.96.0.0/12", "172.20.0.0/26", "172.20.0.65/32"]);
    let svc = &p.exports[&"10.96.0.0/12".parse::<IpNet>().unwrap()];
    assert_eq!(svc.communities, vec![65000 << 16 | 100]);
    assert_eq!(svc.large_communities, vec![[65000, 1, 2]]);
}

#[test]
fn durations_and_passwords() {
    assert_eq!(parse_duration("120s"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
    assert_eq!(parse_duration("5"), None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bgp")).unwrap();
    std::fs::write(dir.path().join("bgp").join("pw"), "s3cret\n").unwrap();
    let pw = |name: &str, key: &str| {
        let p: Password = serde_json::from_value(json!({"secretKeyRef": {"name": name, "key": key}})).unwrap();
        password(&Some(p), Some(dir.path()))
    };
    assert_eq!(pw("bgp", "pw"), Some("s3cret".into()));
    assert_eq!(pw("..", "pw"), None);
    assert_eq!(pw("bgp", "../bgp/pw"), None);
    let _ = (BTreeMap::<u8, u8>::new(), IpAddr::from([0, 0, 0, 0]));
}
