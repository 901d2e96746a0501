//! Inputs that get past the first token: generators that follow each language's grammar (and
//! break it now and then), and corpora of valid inputs to mutate.

use crate::Rng;
use serde_json::{Value, json};

pub const SELECTOR_TOKENS: &[&str] = &[
    "&&",
    "||",
    "!",
    "(",
    ")",
    "==",
    "!=",
    " in ",
    " not in ",
    " contains ",
    " starts with ",
    " ends with ",
    "has(",
    "all()",
    "global()",
    "{",
    "}",
    ",",
    "'",
    "\"",
    "app",
    "'web'",
    "\"x\"",
    " ",
    "\t",
];
pub const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "1e999",
    "-0",
    "\"cniVersion\"",
    "\"1.0.0\"",
    "\"prevResult\"",
    "\"ips\"",
    "\"address\"",
    "\"10.0.0.1/32\"",
    "\"runtimeConfig\"",
    "\"\\u0000\"",
    "\\",
];
pub const YAML_TOKENS: &[&str] = &[
    "---\n",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "? ",
    "|\n",
    ">\n",
    "#",
    "\n  ",
    "\n",
    "'",
    "\"",
    "kind: ",
    "apiVersion: projectcalico.org/v3\n",
    "spec:\n",
    "metadata: {name: x}\n",
    "<<: *a\n",
    "~",
    "0x1F",
    "1e9",
    "yes",
    "on",
    ".inf",
    "2001:db8::/64",
    "10.0.0.0/8",
];

const LABELS: &[&str] = &["a", "app", "role", "k8s-app", "projectcalico.org/namespace", "x.y/z_w", "A1"];
const VALUES: &[&str] = &["b", "web", "", "kube-dns", "a b", "'", "\"", "é", "x\"y"];

fn quoted(rng: &mut Rng) -> String {
    let v = *rng.pick(VALUES);
    if v.contains('\'') {
        format!("\"{v}\"")
    } else if rng.chance(50) {
        format!("'{v}'")
    } else if v.contains('"') {
        format!("'{v}'")
    } else {
        format!("\"{v}\"")
    }
}

fn ws(rng: &mut Rng) -> &'static str {
    *rng.pick(&["", " ", "  ", "\t", " \t "])
}

fn sel_expr(rng: &mut Rng, depth: usize, out: &mut String) {
    if depth > 6 || rng.chance(35) {
        let l = *rng.pick(LABELS);
        match rng.below(10) {
            0 => out.push_str(&format!("has({}{l}{})", ws(rng), ws(rng))),
            1 => out.push_str("all()"),
            2 => out.push_str("global()"),
            3 | 4 => {
                let n = rng.below(4);
                let set: Vec<String> = (0..n).map(|_| quoted(rng)).collect();
                let op = if rng.chance(50) { "in" } else { "not  in" };
                out.push_str(&format!("{l} {op} {{{}}}", set.join(&format!(",{}", ws(rng)))));
            }
            _ => {
                let op = *rng.pick(&["==", "!=", "contains", "starts with", "ends with"]);
                out.push_str(&format!("{l}{}{op}{}{}", ws(rng), ws(rng), quoted(rng)));
            }
        }
        return;
    }
    match rng.below(4) {
        0 => {
            out.push_str(&"!".repeat(1 + rng.below(3)));
            sel_expr(rng, depth + 1, out);
        }
        1 => {
            out.push('(');
            sel_expr(rng, depth + 1, out);
            out.push(')');
        }
        _ => {
            let op = if rng.chance(50) { " && " } else { " || " };
            for i in 0..2 + rng.below(3) {
                if i > 0 {
                    out.push_str(op);
                }
                sel_expr(rng, depth + 1, out);
            }
        }
    }
}

/// A selector from the grammar; sometimes wrapped in hundreds of parentheses or negations.
pub fn selector(rng: &mut Rng) -> Vec<u8> {
    let mut s = String::new();
    sel_expr(rng, 0, &mut s);
    if rng.chance(5) {
        let n = rng.below(400);
        s = format!("{}{s}{}", "(".repeat(n), ")".repeat(n.saturating_sub(rng.below(2))));
    }
    if rng.chance(3) {
        s = format!("{}{s}", "!".repeat(rng.below(5000)));
    }
    s.into_bytes()
}

pub fn selector_corpus() -> Vec<Vec<u8>> {
    [
        "app == 'web'",
        "has(projectcalico.org/namespace) && role in {'db', 'cache'}",
        "!(a == 'b' || c != 'd') && all()",
        "k8s-app not in {} || x starts with 'p' && y ends with \"q\"",
        "global()",
        "",
        "  ( ( a contains 'b' ) )  ",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Any JSON value, small.
fn any_json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.next() as i64 >> rng.below(64)),
        3 => json!(*rng.pick(&["", "eth0", "10.0.0.1", "10.0.0.1/24", "fd00::1", "1.0.0", "../x", "a\nb", "0.3.1"])),
        4 => json!(1.5e300),
        5 => Value::Array((0..rng.below(4)).map(|_| any_json(rng, depth + 1)).collect()),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                m.insert((*rng.pick(&["a", "ips", "address", "version", "x"])).to_string(), any_json(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A field that is usually right and sometimes anything at all.
fn or_any(rng: &mut Rng, good: Value) -> Value {
    if rng.chance(12) { any_json(rng, 2) } else { good }
}

fn prev_result(rng: &mut Rng) -> Value {
    let ip = |rng: &mut Rng| {
        json!({ "address": *rng.pick(&["10.65.0.5/32", "fd00::5/128", "10.0.0.1/24", "bad"]),
                "gateway": *rng.pick(&["169.254.1.1", "fe80::1", "x"]), "interface": rng.below(3), "version": "4" })
    };
    let n = rng.below(3);
    let ips: Vec<Value> = (0..n).map(|_| ip(rng)).collect();
    let mut r = json!({
        "cniVersion": *rng.pick(gingham_cni::spec::SUPPORTED_VERSIONS),
        "interfaces": [{ "name": "eth0", "mac": "ee:ee:ee:ee:ee:ee", "sandbox": "/run/netns/x", "mtu": 1450 }],
        "ips": ips,
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dns": { "nameservers": ["10.96.0.10"] }
    });
    for k in ["interfaces", "ips", "routes", "dns"] {
        if rng.chance(15) {
            r[k] = any_json(rng, 2);
        }
    }
    r
}

/// A CNI network configuration as a runtime hands it over, with parts of it wrong.
pub fn cni_config(rng: &mut Rng) -> Vec<u8> {
    let version = json!(*rng.pick(&["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0", "2.0.0"]));
    let name = json!(*rng.pick(&["k8s-pod-network", "podman", "a.b_c-d", "../etc", ""]));
    let mut c = json!({
        "cniVersion": or_any(rng, version),
        "name": or_any(rng, name),
        "type": "gingham",
        "mtu": or_any(rng, json!(1450)),
        "ipam": or_any(rng, json!({ "type": "gingham-ipam", "assign_ipv6": "true", "ipv4_pools": ["default-ipv4-ippool"] })),
    });
    if rng.chance(50) {
        c["prevResult"] = prev_result(rng);
    }
    if rng.chance(40) {
        let ip = *rng.pick(&["10.65.0.9", "fd00::9/64", "nonsense"]);
        let rc = json!({ "labels": { "app": "web" }, "ips": [ip],
                         "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] });
        c["runtimeConfig"] = or_any(rng, rc);
    }
    if rng.chance(30) {
        c["args"] = or_any(rng, json!({ "cni": { "labels": { "a": "b" } } }));
    }
    if rng.chance(20) {
        c["cni.dev/valid-attachments"] = or_any(rng, json!([{ "containerID": "c1", "ifname": "eth0" }]));
    }
    if rng.chance(10) {
        c["interface_prefix"] = any_json(rng, 3);
    }
    let mut text = c.to_string().into_bytes();
    if rng.chance(20) {
        text = crate::mutate(rng, &text, JSON_TOKENS);
    }
    // The environment part of the target reads lines 1–3 after the JSON.
    if rng.chance(30) {
        let id = *rng.pick(&["c1", "918383d5576a436bda0d1c08825c903e2db949edb55c626bc57bbb042ffd5c45", "../x", ""]);
        let args = *rng.pick(&[
            "IgnoreUnknown=1;K8S_POD_NAME=x",
            "IP=10.0.0.1,fd00::1",
            "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b",
            "broken",
            "IP=",
        ]);
        text = format!("{id}\neth0\n{args}").into_bytes();
    }
    text
}

pub fn cni_corpus() -> Vec<Vec<u8>> {
    [
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"gingham","mtu":0,"ipam":{"type":"gingham-ipam"}}"#,
        r#"{"cniVersion":"0.3.1","name":"n","type":"gingham","prevResult":{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.0.0.2/32","interface":0}]}}"#,
        r#"{"cniVersion":"1.1.0","name":"n","type":"gingham","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        r#"{"cniVersion":"1.0.0","name":"podman","type":"gingham","runtimeConfig":{"ips":["10.88.0.5","fd00::5"]}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

const KINDS: &[(&str, &str)] = &[
    ("projectcalico.org/v3", "IPPool"),
    ("projectcalico.org/v3", "BGPPeer"),
    ("projectcalico.org/v3", "BGPConfiguration"),
    ("projectcalico.org/v3", "NetworkPolicy"),
    ("projectcalico.org/v3", "GlobalNetworkPolicy"),
    ("projectcalico.org/v3", "Node"),
    ("projectcalico.org/v3", "WorkloadEndpoint"),
    ("projectcalico.org/v3", "GlobalNetworkSet"),
    ("projectcalico.org/v3", "FelixConfiguration"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "Namespace"),
    ("operator.tigera.io/v1", "Installation"),
    ("projectcalico.org/v3", "IPPoolList"),
];

/// A YAML scalar: plain, quoted or one of YAML 1.1's surprises.
fn scalar(rng: &mut Rng) -> String {
    (*rng.pick(&[
        "10.0.0.0/16",
        "fd00::/108",
        "26",
        "Always",
        "CrossSubnet",
        "Never",
        "true",
        "on",
        "no",
        "~",
        "'quoted'",
        "\"dq\"",
        "app == 'web'",
        "[]",
        "{}",
        "-1",
        "65536",
        "1e3",
        "0o17",
        "x",
        "\"\\u0041\"",
        "!!str 5",
    ]))
    .to_string()
}

const FIELDS: &[&str] = &[
    "cidr",
    "blockSize",
    "ipipMode",
    "vxlanMode",
    "natOutgoing",
    "disabled",
    "nodeSelector",
    "selector",
    "order",
    "ingress",
    "egress",
    "action",
    "protocol",
    "source",
    "destination",
    "nets",
    "ports",
    "asNumber",
    "peerIP",
    "node",
    "types",
    "podSelector",
    "policyTypes",
    "matchLabels",
    "ipNetworks",
    "interfaceName",
    "calicoNetwork",
    "ipPools",
    "items",
];

fn yaml_value(rng: &mut Rng, indent: usize, depth: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match rng.below(if depth > 3 { 1 } else { 4 }) {
        0 => {
            out.push(' ');
            out.push_str(&scalar(rng));
            out.push('\n');
        }
        1 => {
            out.push('\n');
            for _ in 0..1 + rng.below(3) {
                out.push_str(&format!("{pad}- {}:", rng.pick(FIELDS)));
                yaml_value(rng, indent + 4, depth + 1, out);
            }
        }
        2 => {
            out.push_str(&format!(" [{}, {}]\n", scalar(rng), scalar(rng)));
        }
        _ => {
            out.push('\n');
            for _ in 0..1 + rng.below(4) {
                out.push_str(&format!("{pad}{}:", rng.pick(FIELDS)));
                yaml_value(rng, indent + 2, depth + 1, out);
            }
        }
    }
}

/// One or more resource documents with known kinds and field names and random values.
pub fn document(rng: &mut Rng) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..1 + rng.below(3) {
        if i > 0 {
            out.push_str("---\n");
        }
        let (api, kind) = *rng.pick(KINDS);
        out.push_str(&format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {}\n",
            rng.pick(&["p1", "default", "a.b", "X", "node-1"])
        ));
        if rng.chance(30) {
            out.push_str(&format!("  namespace: {}\n", rng.pick(&["default", "x", "Bad_NS"])));
        }
        if rng.chance(20) {
            out.push_str(&format!("  resourceVersion: {}\n", rng.pick(&["'12'", "abc", "-1", "99999999999999999999"])));
        }
        out.push_str("spec:");
        yaml_value(rng, 2, 0, &mut out);
    }
    if rng.below(300) == 0 {
        // Aliases that multiply (a YAML bomb; the parser's alias budget stops it, in ~20 ms).
        out = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d]\n".into();
    }
    if rng.chance(2) {
        let n = 50 + rng.below(3000);
        out = format!("{}1{}", "[".repeat(n), "]".repeat(n));
    }
    let mut bytes = out.into_bytes();
    if rng.chance(25) {
        bytes = crate::mutate(rng, &bytes, YAML_TOKENS);
    }
    bytes
}

pub fn document_corpus() -> Vec<Vec<u8>> {
    [
        include_str!("../../cli/tests/fixtures/seeds/bgpconfiguration-no-mesh.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/bgppeer-rr-mode1.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/bgppeer-rr-mode2.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/ippool-ipip-always.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/ippool-no-encap.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/ippool-resize.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/ippool-vxlan-always.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/networkpolicy-allow-web-to-api.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/networkpolicy-limit-external-access.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/node-rr.yaml"),
        include_str!("../../cli/tests/fixtures/seeds/operator-calico-network.yaml"),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
