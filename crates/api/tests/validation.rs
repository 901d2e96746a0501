//! Each kind's validation rules, one accepted and rejected example per rule, checked by path.

use gingham_api::parse_documents;

fn doc(api: &str, kind: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: ns1\nspec:\n{spec}\n")
}

fn calico(kind: &str, name: &str, spec: &str) -> String {
    let d = doc("projectcalico.org/v3", kind, name, spec);
    // Cluster-scoped kinds must not carry a namespace.
    if ["NetworkPolicy", "NetworkSet", "WorkloadEndpoint"].contains(&kind) {
        d
    } else {
        d.replace("  namespace: ns1\n", "")
    }
}

/// The error text for `text`, or "" if it is valid.
fn check(text: &str) -> String {
    match parse_documents("t.yaml", text) {
        Ok(_) => String::new(),
        Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
    }
}

#[track_caller]
fn accepts(text: &str) {
    let e = check(text);
    assert!(e.is_empty(), "expected valid:\n{text}\n→ {e}");
}

#[track_caller]
fn rejects(text: &str, path_and_message: &str) {
    let e = check(text);
    assert!(e.contains(path_and_message), "expected {path_and_message:?} for:\n{text}\n→ {e:?}");
}

#[test]
fn ippool() {
    accepts(&calico("IPPool", "v6", "  cidr: fd00:10::/48\n  vxlanMode: Always"));
    rejects(
        &calico("IPPool", "p", "  cidr: fd00::/48\n  ipipMode: Always"),
        "spec.ipipMode: IPIP is not supported on IPv6 pools",
    );
    rejects(&calico("IPPool", "p", "  cidr: fd00::/48\n  blockSize: 100"), "spec.blockSize: 100 is outside 116..128");
    rejects(
        &calico("IPPool", "p", "  cidr: 10.0.0.0/24\n  blockSize: 22"),
        "spec.blockSize: 22 is larger than the pool itself",
    );
    rejects(
        &calico("IPPool", "p", "  cidr: 169.254.0.0/20"),
        "spec.cidr: 169.254.0.0/20 overlaps the link-local range",
    );
    rejects(
        &calico("IPPool", "p", "  cidr: 10.0.0.0/16\n  ipipMode: always"),
        "spec.ipipMode: \"always\" is not one of Never, Always, CrossSubnet",
    );
    rejects(
        &calico("IPPool", "p", "  cidr: 10.0.0.0/16\n  nodeSelector: global()"),
        "spec.nodeSelector: global() is not allowed",
    );
    rejects(
        &calico("IPPool", "p", "  cidr: 10.0.0.0/16\n  allowedUses: [LoadBalancer, Workload]"),
        "spec.allowedUses: LoadBalancer cannot be combined",
    );
    rejects(&calico("IPPool", "p", "  natOutgoing: true"), "spec.cidr: a CIDR is required");
    rejects(&calico("IPPool", "Bad_Name", "  cidr: 10.0.0.0/16"), "metadata.name: \"Bad_Name\" is not a valid name");
    // The v1 shape is converted on read.
    let docs = parse_documents(
        "t",
        &calico(
            "IPPool",
            "old",
            "  cidr: 10.0.0.0/16\n  ipip: {enabled: true, mode: cross-subnet}\n  nat-outgoing: true",
        ),
    )
    .unwrap();
    assert_eq!(docs[0].object.spec["ipipMode"], "CrossSubnet");
    assert_eq!(docs[0].object.spec["natOutgoing"], true);
}

#[test]
fn bgp_kinds() {
    accepts(&calico("BGPPeer", "tor", "  peerIP: '[fd00::1]:1179'\n  asNumber: 64513\n  nodeSelector: rack == 'a'"));
    rejects(&calico("BGPPeer", "p", "  peerIP: 10.0.0.1"), "spec.asNumber: required when peerIP is set");
    rejects(
        &calico("BGPPeer", "p", "  peerSelector: all()\n  peerIP: 10.0.0.1\n  asNumber: 1"),
        "spec.peerSelector: peerIP and asNumber must be empty",
    );
    rejects(
        &calico("BGPPeer", "p", "  node: n1\n  nodeSelector: all()\n  peerSelector: all()"),
        "spec.nodeSelector: node and nodeSelector cannot both be set",
    );
    rejects(
        &calico("BGPPeer", "p", "  peerIP: 10.0.0.300\n  asNumber: 1"),
        "spec.peerIP: \"10.0.0.300\" is not an IP address",
    );
    rejects(
        &calico("BGPPeer", "p", "  peerSelector: all()\n  keepaliveTime: soon"),
        "spec.keepaliveTime: \"soon\" is not a duration",
    );
    // BGPFilter as Calico's documentation shows it, and its mistakes by field.
    accepts(&calico(
        "BGPFilter",
        "my-filter",
        "  exportV4:\n  - action: Accept\n    matchOperator: In\n    cidr: 77.0.0.0/16\n    source: RemotePeers\n  - action: Reject\n    interface: '*.calico'\n  importV4:\n  - action: Accept\n    matchOperator: In\n    cidr: 55.0.0.0/16\n    prefixLength:\n      min: 30\n  importV6:\n  - action: Accept\n    matchOperator: Equal\n    cidr: 5000::0/64\n  - action: Reject",
    ));
    rejects(
        &calico("BGPFilter", "f", "  exportV4:\n  - action: Drop"),
        "spec.exportV4[0].action: \"Drop\" is not one of",
    );
    rejects(
        &calico("BGPFilter", "f", "  importV4:\n  - action: Reject\n    matchOperator: In\n    cidr: fd00::/64"),
        "spec.importV4[0].cidr: fd00::/64 is not an IPv4 CIDR",
    );
    rejects(
        &calico("BGPFilter", "f", "  importV6:\n  - action: Reject\n    cidr: fd00::/64"),
        "spec.importV6[0]: cidr and matchOperator go together",
    );
    rejects(
        &calico(
            "BGPFilter",
            "f",
            "  exportV4:\n  - action: Reject\n    matchOperator: In\n    cidr: 10.0.0.0/8\n    prefixLength:\n      min: 40",
        ),
        "spec.exportV4[0].prefixLength.min: 40 is outside 0..32",
    );
    accepts(&calico("BGPConfiguration", "node.n1", "  asNumber: '1.10'\n  listenPort: 1179"));
    rejects(&calico("BGPConfiguration", "mine", "  asNumber: 1"), "metadata.name: \"mine\": BGPConfiguration is named");
    rejects(
        &calico("BGPConfiguration", "default", "  communities: [{name: a, value: '1:2:3:4'}]"),
        "spec.communities[0].value",
    );
    rejects(&calico("BGPConfiguration", "default", "  logSeverityScreen: Loud"), "spec.logSeverityScreen");
    rejects(
        &calico("Node", "n1", "  bgp: {ipv4Address: 'fd00::1/64'}"),
        "spec.bgp.ipv4Address: fd00::1/64 is not an IPv4 address",
    );
    rejects(&calico("Node", "n1", "  bgp: {routeReflectorClusterID: abc}"), "spec.bgp.routeReflectorClusterID");
    rejects(&calico("Node", "n1", "  vxlanTunnelMACAddr: 66:zz:00:00:00:00"), "spec.vxlanTunnelMACAddr");
}

#[test]
fn policies_and_endpoints() {
    let rule = |r: &str| calico("GlobalNetworkPolicy", "p", &format!("  ingress:\n  - {r}"));
    accepts(&rule(
        "{action: Allow, protocol: TCP, source: {nets: [10.0.0.0/8], selector: \"role == 'db'\"}, destination: {ports: [80, '8000:8080', http]}}",
    ));
    accepts(&rule("{action: Deny, protocol: ICMP, icmp: {type: 8, code: 0}}"));
    rejects(&rule("{protocol: TCP}"), "spec.ingress[0].action: an action is required");
    rejects(&rule("{action: allow}"), "spec.ingress[0].action: \"allow\" is not one of");
    rejects(
        &rule("{action: Allow, destination: {ports: [80]}}"),
        "spec.ingress[0].destination.ports: ports need protocol TCP, UDP or SCTP",
    );
    rejects(
        &rule("{action: Allow, protocol: ICMP, icmp: {code: 1}}"),
        "spec.ingress[0].icmp.code: an ICMP code needs an ICMP type",
    );
    rejects(
        &rule("{action: Allow, protocol: UDP, icmp: {type: 1}}"),
        "spec.ingress[0].icmp: ICMP matches need protocol ICMP",
    );
    rejects(&rule("{action: Allow, ipVersion: 5}"), "spec.ingress[0].ipVersion: 5 is not 4 or 6");
    rejects(&rule("{action: Allow, source: {notNets: [nope]}}"), "spec.ingress[0].source.notNets[0]");
    rejects(
        &rule("{action: Allow, protocol: TCP, source: {notPorts: ['Bad_Name']}}"),
        "spec.ingress[0].source.notPorts[0]",
    );
    rejects(
        &calico("GlobalNetworkPolicy", "p", "  doNotTrack: true\n  ingress: [{action: Allow}]"),
        "spec.applyOnForward: doNotTrack policies need applyOnForward",
    );
    rejects(
        &calico("GlobalNetworkPolicy", "p", "  preDNAT: true\n  applyOnForward: true\n  egress: [{action: Allow}]"),
        "spec.egress: preDNAT policies are ingress-only",
    );
    let both =
        parse_documents("t", &calico("NetworkPolicy", "p", "  ingress: [{action: Allow}]\n  egress: [{action: Deny}]"))
            .unwrap();
    assert_eq!(both[0].object.spec["types"], serde_json::json!(["Ingress", "Egress"]));
    rejects(&calico("GlobalNetworkSet", "s", "  nets: [10.0.0.0/8, bogus]"), "spec.nets[1]");
    rejects(&calico("NetworkSet", "s", "  nets: [bogus]"), "spec.nets[0]");
    accepts(&calico(
        "WorkloadEndpoint",
        "n1-k8s-pod-eth0",
        "  node: n1\n  ipNetworks: [10.0.0.5/32, 'fd00::5/128']\n  ports: [{name: http, protocol: TCP, port: 80}]",
    ));
    rejects(
        &calico("WorkloadEndpoint", "w", "  ipNetworks: [10.0.0.0/24]"),
        "spec.ipNetworks[0]: 10.0.0.0/24: workload addresses must be /32 or /128",
    );
    rejects(&calico("HostEndpoint", "h", "  node: n1"), "spec.interfaceName: set interfaceName or expectedIPs");
    rejects(&calico("HostEndpoint", "h", "  interfaceName: eth0"), "spec.node: the node is required");
    rejects(&calico("Profile", "p", "  labelsToApply: {'bad key': x}"), "spec.labelsToApply.bad key");
    rejects(
        &calico("GlobalNetworkSet", "s", "  nets: []")
            .replace("metadata:\n", "metadata:\n  labels: {app: 'not valid!'}\n"),
        "metadata.labels.app",
    );
    rejects(
        &calico("IPPool", "p", "  cidr: 10.0.0.0/16").replace("metadata:\n", "metadata:\n  namespace: x\n"),
        "metadata.namespace: IPPool is cluster-scoped",
    );
}

#[test]
fn config_kinds() {
    accepts(&calico(
        "FelixConfiguration",
        "default",
        "  vxlanVNI: 4096\n  routeRefreshInterval: 90s\n  failsafeInboundHostPorts: [{protocol: tcp, port: 22}]",
    ));
    rejects(&calico("FelixConfiguration", "default", "  vxlanVNI: 0"), "spec.vxlanVNI: 0 is outside 1..16777215");
    rejects(
        &calico("FelixConfiguration", "default", "  healthPort: 70000"),
        "spec.healthPort: port 70000 is outside 1..65535",
    );
    rejects(&calico("FelixConfiguration", "default", "  madeUpSetting: true"), "spec.madeUpSetting: unknown field");
    accepts(&calico("IPAMConfiguration", "default", "  strictAffinity: true\n  maxBlocksPerHost: 4"));
    rejects(&calico("IPAMConfig", "default", "  maxBlocksPerHost: -1"), "spec.maxBlocksPerHost");
    rejects(
        &calico("IPAMConfiguration", "other", "  strictAffinity: true"),
        "metadata.name: IPAMConfiguration is a singleton",
    );
    let d = parse_documents("t", &calico("IPAMConfig", "default", "  strictAffinity: true")).unwrap();
    assert_eq!(
        (d[0].object.kind.as_str(), &d[0].object.spec["autoAllocateBlocks"]),
        ("IPAMConfiguration", &serde_json::json!(true))
    );
    accepts(&calico("ClusterInformation", "default", "  clusterGUID: abc\n  datastoreReady: true"));
}

#[test]
fn kubernetes_kinds() {
    let np = |spec: &str| doc("networking.k8s.io/v1", "NetworkPolicy", "p", spec);
    accepts(&np(
        "  podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}\n  ingress:\n  - ports: [{port: 8000, endPort: 8080}]",
    ));
    rejects(
        &np("  podSelector: {matchExpressions: [{key: app, operator: In}]}"),
        "spec.podSelector.matchExpressions[0].values: In needs at least one value",
    );
    rejects(
        &np("  podSelector: {matchExpressions: [{key: app, operator: Matches, values: [a]}]}"),
        "spec.podSelector.matchExpressions[0].operator",
    );
    rejects(
        &np("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/24]}}]"),
        "spec.egress[0].to[0].ipBlock.except[0]: 10.1.0.0/24 is not strictly inside 10.0.0.0/24",
    );
    rejects(
        &np("  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]"),
        "spec.ingress[0].from[0].ipBlock: ipBlock cannot be combined",
    );
    rejects(
        &np("  podSelector: {}\n  ingress:\n  - ports: [{protocol: ICMP, port: 1}]"),
        "spec.ingress[0].ports[0].protocol",
    );
    rejects(
        &np("  podSelector: {}\n  ingress:\n  - ports: [{port: 90, endPort: 80}]"),
        "spec.ingress[0].ports[0].endPort: 80 must be within 90..65535",
    );
    let d = parse_documents("t", &np("  podSelector: {}\n  egress: [{}]")).unwrap();
    assert_eq!(d[0].object.spec["policyTypes"], serde_json::json!(["Ingress", "Egress"]));
    accepts("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: my-namespace\n  labels: {name: my-namespace}\n");
    rejects(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: my.namespace\n",
        "metadata.name: \"my.namespace\" is not a valid namespace name",
    );
}

/// podman passes no K8S_POD_NAMESPACE, so endpoint names carry the 64-hex container ID in one
/// dot-free part; Kubernetes' DNS-1123 subdomain rule caps only the whole name, at 253.
#[test]
fn names_are_dns_subdomains() {
    let id = "918383d5576a436bda0d1c08825c903e2db949edb55c626bc57bbb042ffd5c45";
    accepts(&calico("WorkloadEndpoint", &format!("pmnode-cni-{id}-eth0"), "  node: pmnode"));
    accepts(&calico("NetworkSet", &"a".repeat(253), "  nets: []"));
    rejects(&calico("NetworkSet", &"a".repeat(254), "  nets: []"), "is not a valid name");
    for bad in ["a..b", "-a", "a-", "A", "a_b", "a.-b"] {
        rejects(&calico("NetworkSet", bad, "  nets: []"), "metadata.name");
    }
    // Namespaces stay DNS labels: at most 63.
    rejects(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n", "a".repeat(64)), "metadata.name");
}
