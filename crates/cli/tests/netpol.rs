//! Network policy conformance by real packets: the Kubernetes e2e model (`lab up
//! --netpol-model`: namespaces x, y, z with pods a, b, c on three nodes) driven through `gingham
//! apply -f` and `gingham lab probe`, each case compared with its truth table and printed
//! e2e-style when it differs. Upstream e2e cases, Calico's own kinds and semantics.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const G: &str = env!("CARGO_BIN_EXE_gingham");
const PODS: [&str; 9] = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];
static SEQ: AtomicUsize = AtomicUsize::new(0);

struct Lab {
    dir: tempfile::TempDir,
    prefix: String,
    env: Vec<(String, String)>,
}

impl Lab {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(G);
        c.args(args).env("GINGHAM_LAB_DIR", self.dir.path()).env("GINGHAM_LAB_PREFIX", &self.prefix);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "gingham {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.cmd(&["lab", "down"]).output();
    }
}

fn lab() -> Lab {
    let prefix = format!("gnp{}{}", std::process::id() % 10_000, SEQ.fetch_add(1, Ordering::SeqCst));
    let mut lab = Lab { dir: tempfile::tempdir().unwrap(), prefix, env: vec![] };
    lab.ok(&["lab", "up", "--netpol-model", "--quiet"]);
    for line in lab.ok(&["lab", "env"]).lines() {
        if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
            lab.env.push((k.into(), v.into()));
        }
    }
    lab
}

/// The expected matrix: `reach(src, dst)` with pods as (namespace, name).
fn truth(reach: impl Fn((&str, &str), (&str, &str)) -> bool) -> String {
    let split = |p: &'static str| p.split_once('/').unwrap();
    let mut out = String::new();
    for s in PODS {
        let cells: String = PODS
            .iter()
            .map(|d| {
                if *d == s {
                    '-'
                } else if reach(split(s), split(d)) {
                    '.'
                } else {
                    'X'
                }
            })
            .collect();
        out.push_str(&format!("{s} {cells}\n"));
    }
    out
}

fn header() -> String {
    format!("    {}\n", PODS.iter().map(|p| p.replace('/', "")).collect::<Vec<_>>().join(" "))
}

struct Case {
    name: &'static str,
    yaml: &'static str,
    /// (protocol, port, expected)
    probes: Vec<(&'static str, u16, String)>,
}

fn all(_: (&str, &str), _: (&str, &str)) -> bool {
    true
}

fn cases() -> Vec<Case> {
    let knp = |ns: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: '{ns}'}}\nspec:\n{spec}"
        )
    };
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        Case {
            name: "default deny ingress",
            yaml: leak(knp("x", "deny", "  podSelector: {}\n")),
            probes: vec![("TCP", 80, truth(|_, d| d.0 != "x")), ("UDP", 81, truth(|_, d| d.0 != "x"))],
        },
        Case {
            name: "default deny egress",
            yaml: leak(knp("x", "deny", "  podSelector: {}\n  policyTypes: [Egress]\n")),
            probes: vec![("TCP", 80, truth(|s, _| s.0 != "x"))],
        },
        Case {
            name: "allow from the same namespace",
            yaml: leak(knp("x", "same-ns", "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n")),
            probes: vec![("TCP", 80, truth(|s, d| d.0 != "x" || s.0 == "x"))],
        },
        Case {
            name: "namespaceSelector matchExpressions",
            yaml: leak(knp(
                "x",
                "ns-in",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        \
                 matchExpressions: [{key: ns, operator: In, values: ['y']}]\n",
            )),
            probes: vec![("TCP", 80, truth(|s, d| d != ("x", "a") || s.0 == "y"))],
        },
        Case {
            name: "namespace AND pod selector in one peer",
            yaml: leak(knp(
                "x",
                "and",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: 'y'}}\n      \
                 podSelector: {matchLabels: {pod: b}}\n",
            )),
            probes: vec![("TCP", 80, truth(|s, d| d != ("x", "a") || s == ("y", "b")))],
        },
        Case {
            name: "namespace OR pod selector in two peers",
            yaml: leak(knp(
                "x",
                "or",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: 'y'}}\n    \
                 - podSelector: {matchLabels: {pod: b}}\n",
            )),
            probes: vec![("TCP", 80, truth(|s, d| d != ("x", "a") || s.0 == "y" || s == ("x", "b")))],
        },
        Case {
            name: "numeric port",
            yaml: leak(knp(
                "x",
                "port",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81}]\n",
            )),
            probes: vec![("TCP", 80, truth(|_, d| d != ("x", "a"))), ("TCP", 81, truth(all))],
        },
        Case {
            name: "named port, UDP",
            yaml: leak(knp(
                "x",
                "named",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: serve-80-udp, protocol: UDP}]\n",
            )),
            probes: vec![
                ("UDP", 80, truth(all)),
                ("UDP", 81, truth(|_, d| d != ("x", "a"))),
                ("TCP", 80, truth(|_, d| d != ("x", "a"))),
            ],
        },
        Case {
            name: "endPort",
            yaml: leak(knp(
                "x",
                "range",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 79, endPort: 80}]\n",
            )),
            probes: vec![("TCP", 80, truth(all)), ("TCP", 81, truth(|_, d| d != ("x", "a")))],
        },
        Case {
            name: "ipBlock with except",
            yaml: leak(knp(
                "x",
                "cidr",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 172.20.0.0/16, except: [172.20.2.0/24]}\n",
            )),
            probes: vec![("TCP", 80, truth(|s, d| d != ("x", "a") || s.0 != "y"))],
        },
        Case {
            name: "egress to one namespace, two policies add up",
            yaml: leak(format!(
                "{}---\n{}",
                knp(
                    "x",
                    "egress-z",
                    "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {ns: z}}\n"
                ),
                knp(
                    "x",
                    "egress-yb",
                    "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {}\n      podSelector: {matchLabels: {pod: b}}\n"
                )
            )),
            // Kubernetes defaulting: egress rules present, so both types — a's ingress is denied too.
            probes: vec![("TCP", 80, truth(|s, d| d != ("x", "a") && (s != ("x", "a") || d.0 == "z" || d.1 == "b")))],
        },
        Case {
            name: "Calico order, Deny and Pass (Pass skips the Kubernetes policy's tier to the profile)",
            yaml: leak(format!(
                "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: deny-a-pass-rest}}\nspec:\n  order: 10\n  \
                 selector: projectcalico.org/namespace == 'y'\n  ingress:\n  - action: Log\n  - action: Deny\n    source: {{selector: pod == 'a'}}\n  \
                 - action: Pass\n---\n{}",
                knp("y", "deny", "  podSelector: {}\n")
            )),
            probes: vec![("TCP", 80, truth(|s, d| d.0 != "y" || s.1 != "a"))],
        },
        Case {
            name: "GlobalNetworkSet in a selector, notPorts",
            yaml: "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: x-pods, labels: {role: blocked}}\nspec:\n  nets: [172.20.1.0/24]\n---\n\
                   apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: c-pods}\nspec:\n  order: 5\n  selector: pod == 'c'\n  ingress:\n  \
                   - action: Deny\n    source: {selector: role == 'blocked'}\n  - action: Allow\n    protocol: TCP\n    destination: {notPorts: [81]}\n",
            probes: vec![("TCP", 80, truth(|s, d| d.1 != "c" || s.0 != "x")), ("TCP", 81, truth(|_, d| d.1 != "c"))],
        },
        Case {
            name: "Tier: an earlier tier's Allow is final, its defaultAction Pass falls through to the default tier",
            yaml: leak(format!(
                "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: security}}\nspec: {{order: 100, defaultAction: Pass}}\n---\n\
                 apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: security.allow-a}}\nspec:\n  tier: security\n  \
                 order: 1000\n  selector: projectcalico.org/namespace == 'z'\n  ingress:\n  - action: Allow\n    source: {{selector: pod == 'a'}}\n---\n{}",
                knp("z", "deny", "  podSelector: {}\n")
            )),
            probes: vec![("TCP", 80, truth(|s, d| d.0 != "z" || s.1 == "a"))],
        },
        Case {
            name: "Calico NetworkPolicy with notSelector and notNets",
            yaml: "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: not, namespace: z}\nspec:\n  selector: pod == 'b'\n  ingress:\n  \
                   - action: Allow\n    source: {notSelector: pod == 'c', notNets: [172.20.1.1/32]}\n",
            probes: vec![("TCP", 80, truth(|s, d| d != ("z", "b") || (s.0 == "z" && s.1 != "c")))],
        },
    ]
}

#[test]
fn e2e_model_matches_every_truth_table() {
    let lab = lab();
    let baseline = lab.ok(&["lab", "probe", "--port", "80"]);
    assert_eq!(baseline, truth(all), "with no policy everything reaches everything:\n{}{baseline}", header());
    let mut failures = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let file = lab.dir.path().join(format!("case-{i}.yaml"));
        std::fs::write(&file, case.yaml).unwrap();
        let f = file.to_str().unwrap();
        lab.ok(&["apply", "-f", f]);
        for (proto, port, want) in &case.probes {
            let got = lab.ok(&["lab", "probe", "--protocol", proto, "--port", &port.to_string()]);
            if &got != want {
                failures.push(format!(
                    "{} ({proto} {port}):\nexpected\n{}{want}got\n{}{got}",
                    case.name,
                    header(),
                    header()
                ));
            }
        }
        lab.ok(&["delete", "-f", f]);
    }
    // The same model answers "why": trace and show agree with the packets.
    let file = lab.dir.path().join("trace.yaml");
    std::fs::write(&file, cases()[4].yaml).unwrap();
    lab.ok(&["apply", "-f", file.to_str().unwrap()]);
    let allowed = lab.ok(&["policy", "trace", "y/b", "x/a", "--port", "80"]);
    assert!(allowed.contains("policy x/knp.default.and") && allowed.ends_with("verdict: Allow\n"), "{allowed}");
    let denied = lab.ok(&["policy", "trace", "y/a", "x/a", "--port", "80"]);
    assert!(denied.contains("end of tier default: Deny") && denied.ends_with("verdict: Deny\n"), "{denied}");
    assert!(
        lab.ok(&["lab", "probe", "--port", "80"]).starts_with(&truth(|s, d| d != ("x", "a") || s == ("y", "b"))[..14])
    );
    let node1 = format!("{}-node-1", lab.prefix);
    let out = Command::new("ip")
        .args(["netns", "exec", &node1, G, "policy", "show", "x/a"])
        .envs(lab.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(
        show.contains("ingress: tier default: x/knp.default.and") && show.contains("chain pi-x_knp.default.and"),
        "{show}"
    );
    let dropped =
        show.lines().find(|l| l.contains("== 0x00000000 counter packets") && l.contains("drop")).unwrap_or_default();
    assert!(!dropped.contains("packets 0 "), "the end-of-tier drop counted the probe's denied packets: {show}");
    lab.ok(&["delete", "-f", file.to_str().unwrap()]);
    let after = lab.ok(&["lab", "probe", "--port", "80"]);
    assert_eq!(after, truth(all), "every policy removed: open again\n{after}");
    assert!(failures.is_empty(), "{} cases differ:\n{}", failures.len(), failures.join("\n"));
}
