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

/// Whether `from` (a lab pod) reaches `to_ip:port` of pod `to` by TCP (accepted) or UDP (the
/// echo returns), with a listener in `to` only for this probe.
fn reaches(lab: &Lab, from: &str, to: &str, to_ip: &str, proto: &str, port: u16) -> bool {
    use std::os::fd::AsFd;
    let netns = |pod: &str| {
        std::fs::File::open(format!("/var/run/netns/{}-pod-{}", lab.prefix, pod.replace('/', "-"))).unwrap()
    };
    let inside = |f: std::fs::File, job: Box<dyn FnOnce() -> bool + Send>| {
        std::thread::spawn(move || {
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            job()
        })
    };
    let addr: std::net::SocketAddr = format!("{to_ip}:{port}").parse().unwrap();
    let timeout = std::time::Duration::from_secs(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let tcp = proto == "TCP";
    let server = inside(
        netns(to),
        Box::new(move || {
            if tcp {
                let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
                l.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                let end = std::time::Instant::now() + timeout * 2;
                while std::time::Instant::now() < end {
                    if l.accept().is_ok() {
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            } else {
                let s = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
                s.set_read_timeout(Some(timeout * 2)).unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 16];
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], peer);
                    return true;
                }
            }
            false
        }),
    );
    ready_rx.recv().unwrap();
    let client = inside(
        netns(from),
        Box::new(move || {
            if tcp {
                std::net::TcpStream::connect_timeout(&addr, timeout).is_ok()
            } else {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(timeout)).unwrap();
                let _ = s.send_to(b"probe", addr);
                let mut buf = [0u8; 16];
                s.recv_from(&mut buf).is_ok()
            }
        }),
    );
    let reached = client.join().unwrap();
    let _ = server.join();
    reached
}

/// Both seed policies, unchanged, on pods with the seed's labels; and Calico's serviceAccounts
/// match, on lab pods given a service account.
#[test]
fn seed_policies_and_service_accounts_by_real_packets() {
    let lab = lab();
    let setup = lab.dir.path().join("seed-setup.yaml");
    std::fs::write(
        &setup,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: my-namespace, labels: {name: my-namespace}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: elsewhere, labels: {name: elsewhere}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: restricted-namespace}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: seed-external}\n\
         spec: {cidr: 10.0.0.0/24, nodeSelector: '!all()', natOutgoing: false}\n",
    )
    .unwrap();
    lab.ok(&["apply", "-f", setup.to_str().unwrap()]);
    for (node, pod, labels, extra) in [
        ("node-1", "my-namespace/api", "app=api", vec![]),
        ("node-2", "my-namespace/web", "app=web", vec![]),
        ("node-3", "my-namespace/other", "app=other", vec![]),
        ("node-2", "my-namespace/robot", "app=other", vec!["--service-account", "probe-sa"]),
        ("node-3", "elsewhere/web", "app=web", vec!["--service-account", "probe-sa"]),
        ("node-1", "restricted-namespace/r", "app=r", vec![]),
        ("node-2", "default/external", "app=ext", vec!["--ip", "10.0.0.5"]),
    ] {
        let mut args = vec!["lab", "pod", "add", node, pod, "--labels", labels];
        args.extend(extra);
        lab.ok(&args);
    }
    let seeds = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seeds");
    for f in ["networkpolicy-allow-web-to-api.yaml", "networkpolicy-limit-external-access.yaml"] {
        lab.ok(&["apply", "-f", &format!("{seeds}/{f}")]);
    }
    let sa = lab.dir.path().join("sa.yaml");
    std::fs::write(
        &sa,
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: robots-on-81, namespace: my-namespace}\n\
         spec:\n  order: 10\n  selector: app == 'api'\n  ingress:\n  - action: Allow\n    protocol: TCP\n    \
         source: {serviceAccounts: {names: [probe-sa]}}\n    destination: {ports: [81]}\n",
    )
    .unwrap();
    lab.ok(&["apply", "-f", sa.to_str().unwrap()]);
    // The probe waits until every agent enforces what is stored.
    lab.ok(&["lab", "probe", "--port", "80"]);
    let ip = |pod: &str| {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(lab.dir.path().join("state.json")).unwrap()).unwrap();
        let p = state["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).cloned().unwrap();
        p["ips"][0].as_str().unwrap().to_string()
    };
    let (api, web, external) = (ip("my-namespace/api"), ip("my-namespace/web"), ip("default/external"));
    assert_eq!(external, "10.0.0.5");
    let r = ip("restricted-namespace/r");
    let want: Vec<(&str, &str, &str, &str, u16, bool)> = vec![
        // allow-web-to-api: app=web of a namespace labelled name=my-namespace, TCP 80 only.
        ("my-namespace/web", "my-namespace/api", &api, "TCP", 80, true),
        ("my-namespace/web", "my-namespace/api", &api, "TCP", 81, false),
        ("my-namespace/other", "my-namespace/api", &api, "TCP", 80, false),
        ("elsewhere/web", "my-namespace/api", &api, "TCP", 80, false),
        ("x/a", "my-namespace/api", &api, "TCP", 80, false),
        ("my-namespace/api", "my-namespace/web", &web, "TCP", 80, true),
        // serviceAccounts (Calico policy, order 10): the namespace's probe-sa pod on 81; a pod
        // of that name elsewhere is not in this namespace's serviceAccounts match.
        ("my-namespace/robot", "my-namespace/api", &api, "TCP", 81, true),
        ("my-namespace/robot", "my-namespace/api", &api, "TCP", 80, false),
        ("elsewhere/web", "my-namespace/api", &api, "TCP", 81, false),
        // limit-external-access: TCP 80 and UDP 53 to 10.0.0.0/24, nothing else out.
        ("restricted-namespace/r", "default/external", &external, "TCP", 80, true),
        ("restricted-namespace/r", "default/external", &external, "UDP", 53, true),
        ("restricted-namespace/r", "default/external", &external, "TCP", 81, false),
        ("restricted-namespace/r", "default/external", &external, "UDP", 80, false),
        ("restricted-namespace/r", "my-namespace/web", &web, "TCP", 80, false),
        ("default/external", "restricted-namespace/r", &r, "TCP", 80, true),
    ];
    let mut wrong = Vec::new();
    for (from, to, to_ip, proto, port, expect) in want {
        let got = reaches(&lab, from, to, to_ip, proto, port);
        if got != expect {
            wrong.push(format!("{from} → {to} {proto} {port}: expected {expect}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
