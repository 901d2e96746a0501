//! The `gingham` binary end to end: seeds, output formats, bad input, several processes on one
//! embedded store, and the same commands against a real etcd.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gingham_store::testing::EtcdServer;
use gingham_store::testing::kube::KubeApiServer;

const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seeds");

/// A fresh embedded store (or an etcd, or a Kubernetes API server) and a way to run gingham
/// against it.
struct Env {
    _dir: tempfile::TempDir,
    store: PathBuf,
    etcd: Option<String>,
    kubeconfig: Option<PathBuf>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store.db");
        Env { _dir: dir, store, etcd: None, kubeconfig: None }
    }

    fn kubernetes(kubeconfig: &Path) -> Env {
        Env { kubeconfig: Some(kubeconfig.into()), ..Env::new() }
    }

    fn etcd(endpoint: &str) -> Env {
        Env { etcd: Some(endpoint.to_string()), ..Env::new() }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gingham"));
        c.args(args).env_remove("ETCD_ENDPOINTS").env_remove("DATASTORE_TYPE").env_remove("GINGHAM_CONFIG");
        match (&self.etcd, &self.kubeconfig) {
            (Some(e), _) => c.env("DATASTORE_TYPE", "etcdv3").env("ETCD_ENDPOINTS", e),
            (_, Some(k)) => c.env("DATASTORE_TYPE", "kubernetes").env("KUBECONFIG", k),
            _ => c.env("GINGHAM_STORE_PATH", &self.store),
        };
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run, require success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "gingham {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run, require failure, return stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "gingham {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }

    fn with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child =
            self.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }
}

fn seed(name: &str) -> String {
    Path::new(SEEDS).join(name).display().to_string()
}

fn seed_files() -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(SEEDS).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
    v.sort();
    v
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn every_seed_applies_to_a_fresh_store() {
    for f in seed_files() {
        let env = Env::new();
        let out = env.ok(&["apply", "-f", &f]);
        assert!(out.starts_with("Successfully applied "), "{f}: {out}");
    }
}

fn seed_readback(env: &Env) {
    env.ok(&["apply", "-f", &seed("ippool-ipip-always.yaml")]);
    assert_eq!(
        env.ok(&["get", "ippool", "-o", "wide"]),
        "NAME                  CIDR            NAT    IPIPMODE   VXLANMODE   DISABLED   SELECTOR\n\
         default-ipv4-ippool   172.20.0.0/16   true   Always     Never       false      all()\n\n"
    );
    assert_eq!(
        env.ok(&["get", "ippools"]),
        "NAME                  CIDR            SELECTOR\ndefault-ipv4-ippool   172.20.0.0/16   all()\n\n"
    );
    // The same pool redefined step by step, as the seeds do: encapsulation may change.
    env.ok(&["apply", "-f", &seed("ippool-no-encap.yaml")]);
    assert!(
        env.ok(&["get", "ipp", "-o", "wide"]).contains("default-ipv4-ippool   172.20.0.0/16   true   Never      Never")
    );

    env.ok(&["apply", "-f", &seed("bgpconfiguration-no-mesh.yaml")]);
    assert_eq!(
        env.ok(&["get", "bgpconfig"]),
        "NAME      LOGSEVERITY   MESHENABLED   ASNUMBER\ndefault   Info          false         64512\n\n"
    );

    env.ok(&["apply", "-f", &seed("node-rr.yaml")]);
    assert_eq!(
        env.ok(&["get", "node", "-o", "wide"]),
        "NAME            ASN     IPV4               IPV6\n192.168.10.11   64512   192.168.10.11/24\n\n"
    );
    // A node without its own AS shows the cluster default in parentheses.
    env.ok(&["patch", "node", "192.168.10.11", "-p", r#"{"spec":{"bgp":{"asNumber":null}}}"#]);
    assert!(env.ok(&["get", "nodes", "-o", "wide"]).contains("192.168.10.11   (64512)   192.168.10.11/24"));

    let yaml = env.ok(&["get", "ippool", "default-ipv4-ippool", "-o", "yaml"]);
    for line in [
        "apiVersion: projectcalico.org/v3",
        "kind: IPPool",
        "  name: default-ipv4-ippool",
        "  cidr: 172.20.0.0/16",
        "  blockSize: 26",
        "  natOutgoing: true",
        "  nodeSelector: all()",
    ] {
        assert!(yaml.lines().any(|l| l == line), "missing {line:?} in\n{yaml}");
    }
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["get", "ippool", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "IPPoolList");
    assert_eq!(json["items"][0]["spec"]["ipipMode"], "Never");
    // What get prints applies back unchanged.
    let out = env.with_stdin(&["apply", "-f", "-"], &yaml);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    env.ok(&[
        "apply",
        "-f",
        &seed("networkpolicy-allow-web-to-api.yaml"),
        "-f",
        &seed("networkpolicy-limit-external-access.yaml"),
    ]);
    let all = env.ok(&["get", "knp", "-A"]);
    assert!(all.starts_with("NAMESPACE              NAME                    PODSELECTOR    POLICYTYPES\n"), "{all}");
    assert!(all.contains("restricted-namespace   limit-external-access   all()          Egress"), "{all}");
    assert_eq!(
        env.ok(&["get", "knp", "-n", "my-namespace"]),
        "NAME               PODSELECTOR    POLICYTYPES\nallow-web-to-api   app == 'api'   Ingress\n\n"
    );

    env.ok(&["apply", "-f", &seed("bgppeer-rr-mode1.yaml")]);
    assert_eq!(
        env.ok(&["get", "bgppeer"]),
        "NAME         PEERIP   NODE              ASN\nrr-to-node            !has(calico-rr)\nrr-to-rr              has(calico-rr)\n\n"
    );
}

#[test]
fn seeds_read_back_in_calicoctl_formats() {
    seed_readback(&Env::new());
}

#[test]
fn seeds_read_back_from_etcd() {
    let server = EtcdServer::start().expect("etcd-server must be installed");
    let env = Env::etcd(&server.config.endpoints[0]);
    for _ in 0..100 {
        if env.run(&["get", "ippool"]).status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    seed_readback(&env);
    assert!(env.ok(&["datastore"]).starts_with("etcd http://127.0.0.1:"));
}

/// The same commands with the Kubernetes API as the datastore (Calico's CRDs, installed from
/// `gingham manifests`); what gingham writes, kubectl reads, and the other way round.
#[test]
fn seeds_read_back_from_the_kubernetes_api() {
    let k = KubeApiServer::start().expect("kube-apiserver starts (scripts/kube-build.sh builds it)");
    let env = Env::kubernetes(&k.kubeconfig);
    let out =
        k.kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(env.ok(&["manifests"]).as_bytes())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    k.kubectl_ok(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]);
    // What a kubelet and the cluster's users would have made: the node, the policies' namespaces.
    k.kubectl_ok(&["create", "namespace", "my-namespace"]);
    k.kubectl_ok(&["create", "namespace", "restricted-namespace"]);
    let node = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "192.168.10.11", "labels": {"kubernetes.io/os": "linux"}}}"#;
    let out = k.kubectl_with_input(&["create", "-f", "-"], Some(node.as_bytes())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    seed_readback(&env);
    assert!(env.ok(&["datastore"]).starts_with("kubernetes https://127.0.0.1:"));
    // kubectl and gingham agree on the pools, in Calico's CRD form.
    let cidr =
        k.kubectl_ok(&["get", "ippools.crd.projectcalico.org", "default-ipv4-ippool", "-o", "jsonpath={.spec.cidr}"]);
    assert!(env.ok(&["get", "ippool"]).contains(&format!("default-ipv4-ippool   {cidr}")));
    // The Calico Node is the Kubernetes Node's annotations and labels; the kubelet's stay.
    let ann = k.kubectl_ok(&["get", "node", "192.168.10.11", "-o", "jsonpath={.metadata.annotations}"]);
    assert!(ann.contains(r#""projectcalico.org/IPv4Address":"192.168.10.11/24""#), "{ann}");
    assert!(!ann.contains("projectcalico.org/ASNumber"), "the patch removed the AS number: {ann}");
    let labels = k.kubectl_ok(&["get", "node", "192.168.10.11", "-o", "jsonpath={.metadata.labels}"]);
    assert!(labels.contains("kubernetes.io/os"), "{labels}");
    let e = env.fails(&["delete", "node", "192.168.10.11"]);
    assert!(e.contains("kubectl delete node 192.168.10.11"), "{e}");
    assert!(labels.contains(r#""calico-rr":"true""#), "the seed's label: {labels}");
}

#[test]
fn operator_network_is_mapped_onto_ippool_and_bgpconfiguration() {
    let env = Env::new();
    let out = env.run(&["apply", "-f", &seed("operator-calico-network.yaml")]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was written as IPPool default-ipv4-ippool")
            && err.contains("was written as BGPConfiguration default"),
        "{err}"
    );
    assert!(
        env.ok(&["get", "ippool", "-o", "wide"])
            .contains("default-ipv4-ippool   192.168.0.0/16   true   Never      CrossSubnet   false      all()")
    );
    assert!(env.ok(&["get", "bgpconfig"]).contains("default   -             true          -"));
}

#[test]
fn bad_input_names_file_document_resource_and_field() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let pool = |name: &str, spec: &str| {
        format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n{spec}\n")
    };
    let good = pool("good", "  cidr: 10.10.0.0/16");
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed.yaml", "apiVersion: projectcalico.org/v3\nkind: [IPPool\n".into(), "malformed.yaml: malformed YAML/JSON"),
        ("kind.yaml", format!("{good}---\napiVersion: projectcalico.org/v3\nkind: IPPoool\nmetadata: {{name: x}}\n"), "kind.yaml: document 2: IPPoool x: kind: unknown kind \"IPPoool\""),
        ("field.yaml", pool("p", "  cidr: 10.0.0.0/16\n  ipipmode: Always"), "field.yaml: document 1: IPPool p: spec.ipipmode: unknown field `ipipmode`"),
        ("cidr.yaml", pool("p", "  cidr: 10.0.0.0/33"), "cidr.yaml: document 1: IPPool p: spec.cidr: \"10.0.0.0/33\" is not a valid CIDR"),
        ("hostbits.yaml", pool("p", "  cidr: 10.0.0.1/16"), "hostbits.yaml: document 1: IPPool p: spec.cidr: 10.0.0.1/16 has host bits set; did you mean 10.0.0.0/16?"),
        ("block.yaml", pool("default-ipv4-ippool", "  cidr: 10.0.0.0/16\n  blockSize: 33"), "block.yaml: document 1: IPPool default-ipv4-ippool: spec.blockSize: 33 is outside 20..32"),
        ("sel.yaml", pool("p", "  cidr: 10.0.0.0/16\n  nodeSelector: rack = 'a'"), "sel.yaml: document 1: IPPool p: spec.nodeSelector: invalid selector \"rack = 'a'\""),
        (
            "port.yaml",
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec:\n  ingress:\n  - action: Allow\n    protocol: TCP\n    destination:\n      ports: [80, '90:85']\n".into(),
            "port.yaml: document 1: NetworkPolicy ns1/p: spec.ingress[0].destination.ports[1]: port range \"90:85\" has min > max",
        ),
        ("noname.yaml", "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {labels: {a: b}}\nspec: {nets: [10.0.0.0/8]}\n".into(), "noname.yaml: document 1: GlobalNetworkSet <no name>: metadata.name: a name is required"),
        ("proto.yaml", "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  egress:\n  - action: Allow\n    protocol: 300\n".into(), "spec.egress[0].protocol: protocol 300 is outside 1..255"),
        // Valid resource, but no agent would enforce it as written: refused before writing.
        ("untracked.yaml", "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: raw}\nspec:\n  doNotTrack: true\n  applyOnForward: true\n  ingress: [{action: Allow}]\n".into(), "untracked.yaml: document 1: GlobalNetworkPolicy raw: spec.doNotTrack/preDNAT: untracked and pre-DNAT policies are not supported yet"),
        ("asn.yaml", "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 99999999999}\n".into(), "BGPPeer p: spec.asNumber: 99999999999 is not a valid AS number"),
    ];
    for (file, text, want) in cases {
        let path = write(dir.path(), file, &text);
        let err = env.fails(&["apply", "-f", &path]);
        let want = want.replace(&format!("{file}:"), &format!("{path}:"));
        assert!(err.contains(&want), "{file}: expected {want:?} in\n{err}");
    }
    // Nothing from any of those files was written, not even the valid document before the bad one.
    assert_eq!(env.ok(&["get", "ippool"]), "NAME   CIDR   SELECTOR\n\n");

    // Immutable fields: the error says how to migrate, and nothing else in the apply is written.
    env.ok(&["apply", "-f", &seed("ippool-ipip-always.yaml")]);
    let err = env.fails(&["apply", "-f", &seed("ippool-resize.yaml")]);
    assert!(
        err.contains(
            "ippool-resize.yaml: document 2: IPPool default-ipv4-ippool: spec.blockSize: cannot change from 26 to 25"
        ),
        "{err}"
    );
    assert!(err.contains("To migrate, create a new IPPool"), "{err}");
    assert!(
        !env.ok(&["get", "ippool"]).contains("temporary-pool"),
        "document 1 must not be written when document 2 is refused"
    );
    let err = env.fails(&["patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"cidr":"10.1.0.0/16"}}"#]);
    assert!(err.contains("IPPool default-ipv4-ippool: spec.cidr: cannot change"), "{err}");
    let err = env.fails(&["patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"vxlanMode":"Always"}}"#]);
    assert!(err.contains("IPPool default-ipv4-ippool: spec.vxlanMode: IPIP and VXLAN cannot both be enabled"), "{err}");
    let err = env.fails(&["get", "ippol"]);
    assert!(err.contains("unknown resource type \"ippol\""), "{err}");
}

#[test]
fn create_replace_delete_patch_label() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "gns.yaml",
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: external\n  labels: {role: db}\nspec:\n  nets: [10.20.0.0/16]\n",
    );
    assert_eq!(env.ok(&["create", "-f", &f]), "Successfully created 1 'GlobalNetworkSet' resource(s)\n");
    assert!(env.fails(&["create", "-f", &f]).contains("already exists"));
    assert_eq!(env.ok(&["create", "-f", &f, "--skip-exists"]), "No resources created: all 1 already exist\n");
    assert_eq!(env.ok(&["replace", "-f", &f]), "Successfully replaced 1 'GlobalNetworkSet' resource(s)\n");

    // replace with a stale resourceVersion is refused (compare-and-swap).
    let stale = write(
        dir.path(),
        "stale.yaml",
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: external\n  resourceVersion: '1'\nspec:\n  nets: [10.30.0.0/16]\n",
    );
    assert!(env.fails(&["replace", "-f", &stale]).contains("changed by someone else"));

    assert_eq!(
        env.ok(&["patch", "globalnetworkset", "external", "-p", r#"{"spec":{"nets":["10.40.0.0/16"]}}"#]),
        "Successfully patched 1 'GlobalNetworkSet' resource\n"
    );
    assert!(env.ok(&["get", "gns", "-o", "wide"]).contains("external   10.40.0.0/16"));
    assert_eq!(
        env.ok(&["label", "gns", "external", "tier=backend"]),
        "Successfully set label tier on globalnetworkset external\n"
    );
    assert!(env.fails(&["label", "gns", "external", "tier=frontend"]).contains("--overwrite"));
    assert_eq!(
        env.ok(&["label", "gns", "external", "tier=frontend", "--overwrite"]),
        "Successfully updated label tier on globalnetworkset external\n"
    );
    assert!(env.fails(&["label", "gns", "external", "bad key=x"]).contains("metadata.labels.bad key"));
    assert_eq!(
        env.ok(&["label", "gns", "external", "tier-"]),
        "Successfully removed label tier from globalnetworkset external\n"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["get", "gns", "external", "-o", "json"])).unwrap();
    assert_eq!(json["metadata"]["labels"], serde_json::json!({"role": "db"}));
    assert_eq!(json["spec"]["nets"], serde_json::json!(["10.40.0.0/16"]));

    // Namespaced kinds: -n, default namespace, -A.
    let np = write(
        dir.path(),
        "np.yaml",
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: allow}\nspec:\n  selector: app == 'web'\n  ingress: [{action: Allow}]\n",
    );
    env.ok(&["apply", "-f", &np, "-n", "team-a"]);
    env.ok(&["apply", "-f", &np]);
    assert_eq!(env.ok(&["get", "np", "-A"]), "NAMESPACE   NAME\ndefault     allow\nteam-a      allow\n\n");
    assert_eq!(
        env.ok(&["get", "networkpolicy", "-n", "team-a", "-o", "wide"]),
        "NAME    ORDER   SELECTOR\nallow           app == 'web'\n\n"
    );

    assert_eq!(
        env.ok(&["delete", "np", "allow", "-n", "team-a"]),
        "Successfully deleted 1 'NetworkPolicy' resource(s)\n"
    );
    assert!(
        env.fails(&["delete", "np", "allow", "-n", "team-a"]).contains("resource does not exist: NetworkPolicy(allow)")
    );
    assert_eq!(
        env.ok(&["delete", "np", "allow", "-n", "team-a", "--skip-not-exists"]),
        "Successfully deleted 0 'NetworkPolicy' resource(s)\n"
    );
    assert_eq!(env.ok(&["delete", "-f", &f]), "Successfully deleted 1 'GlobalNetworkSet' resource(s)\n");
    assert!(env.fails(&["get", "gns", "external"]).contains("resource does not exist: GlobalNetworkSet(external)"));
}

#[test]
fn selector_eval() {
    let env = Env::new();
    assert_eq!(env.ok(&["selector", "eval", "app == 'web' && !has(canary)", "--labels", r#"{"app":"web"}"#]), "true\n");
    assert_eq!(env.ok(&["selector", "eval", "tier in {'db', 'cache'}", "--labels", r#"{"tier":"web"}"#]), "false\n");
    assert_eq!(env.ok(&["selector", "eval", "missing != 'x'"]), "true\n");
    let out = env.run(&["selector", "eval", "app == 'web' & b == 'c'"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at position 13") && err.contains("app == 'web' & b == 'c'\n             ^"), "{err}");
}

/// Several gingham processes write to one embedded store at once; nothing is lost.
#[test]
fn several_processes_share_the_embedded_store() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let docs: String = (0..10)
                .map(|j| format!("---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: set-{i}-{j}}}\nspec: {{nets: [10.{i}.{j}.0/24]}}\n"))
                .collect();
            let f = write(dir.path(), &format!("p{i}.yaml"), &docs);
            env.cmd(&["apply", "-f", &f]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let listing = env.ok(&["get", "globalnetworksets"]);
    assert_eq!(listing.lines().filter(|l| l.starts_with("set-")).count(), 80);
}

#[test]
fn datastore_is_chosen_from_flags_file_and_environment() {
    let env = Env::new();
    assert_eq!(env.ok(&["datastore"]), format!("embedded store {}\n", env.store.display()));
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    assert_eq!(
        env.ok(&["--store-path", other.to_str().unwrap(), "datastore"]),
        format!("embedded store {}\n", other.display())
    );
    let cfg = write(
        dir.path(),
        "gingham.cfg",
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {{}}\nspec:\n  datastoreType: embedded\n  storePath: {}\n",
            dir.path().join("cfg.db").display()
        ),
    );
    assert_eq!(env.ok(&["-c", &cfg, "datastore"]), format!("embedded store {}\n", dir.path().join("cfg.db").display()));
    let err = env
        .cmd(&["datastore"])
        .env_remove("GINGHAM_STORE_PATH")
        .env("DATASTORE_TYPE", "etcdv3")
        .env("ETCD_ENDPOINTS", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("etcd"), "{}", String::from_utf8_lossy(&err.stderr));
}

#[test]
fn ipam_show_check_release() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "setup.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv4-ippool}\nspec: {cidr: 10.65.0.0/16, blockSize: 26}\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1}\nspec: {}\n",
    );
    env.ok(&["apply", "-f", &f]);
    // Allocate as the node agent would (the library, on the same store file).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ips = rt.block_on(async {
        let ds = std::sync::Arc::new(gingham_store::embedded::EmbeddedStore::open(&env.store).unwrap());
        let req = gingham_ipam::AutoAssign {
            num_v4: 5,
            handle: "k8s-pod-network.c1".into(),
            node: "n1".into(),
            attrs: [("node", "n1"), ("namespace", "default"), ("pod", "web-1")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        gingham_ipam::IpamClient::new(ds).auto_assign(&req).await.unwrap().v4
    });
    let show = env.ok(&["ipam", "show"]);
    assert_eq!(
        show,
        "+----------+--------------+-----------+------------+--------------+\n\
         | GROUPING |     CIDR     | IPS TOTAL | IPS IN USE |   IPS FREE   |\n\
         +----------+--------------+-----------+------------+--------------+\n\
         | IP Pool  | 10.65.0.0/16 |     65536 |     5 (0%) | 65531 (100%) |\n\
         +----------+--------------+-----------+------------+--------------+\n"
    );
    let blocks = env.ok(&["ipam", "show", "--show-blocks"]);
    assert!(
        blocks.contains(&format!("| Block    | {:<12} |        64 |     5 (8%) |     59 (92%) |", ips[0].trunc())),
        "{blocks}"
    );
    let ip = ips[0].addr().to_string();
    assert_eq!(
        env.ok(&["ipam", "show", &format!("--ip={ip}")]),
        format!(
            "IP {ip} is in use\nHandle ID: k8s-pod-network.c1\nAttributes:\n    namespace: default\n    node: n1\n    pod: web-1\n"
        )
    );
    assert_eq!(env.ok(&["ipam", "show", "--ip=10.65.255.255"]), "IP 10.65.255.255 is not assigned\n");
    assert!(env.ok(&["ipam", "show", "--show-configuration"]).contains("| StrictAffinity     | false |"));
    // No endpoint uses these addresses: check reports each as a leak, with the command to fix it.
    // …and exits 1, so scripts notice.
    let out = env.run(&["ipam", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ipam check found 5 problems"));
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        report.starts_with("Checking IPAM for inconsistencies...\nLoading all IPAM blocks...\nFound 1 IPAM blocks.\n"),
        "{report}"
    );
    assert!(report.contains(&format!("{ip} is allocated (handle k8s-pod-network.c1, pod default/web-1) but no endpoint or node uses it: gingham ipam release --ip={ip}")));
    assert!(report.ends_with("Check complete; found 5 problems.\n"), "{report}");
    assert_eq!(env.ok(&["ipam", "release", &format!("--ip={ip}")]), format!("Successfully released IP {ip}\n"));
    assert!(env.fails(&["ipam", "release", &format!("--ip={ip}")]).contains("is not assigned"));
    assert!(
        String::from_utf8(env.run(&["ipam", "check"]).stdout).unwrap().ends_with("Check complete; found 4 problems.\n")
    );
    assert!(env.ok(&["ipam", "show"]).contains("|     4 (0%) | 65532 (100%) |"));

    // A report of the 4 leaks; one address is then taken by an endpoint, one released and
    // reallocated (same handle, new sequence number): release --from-report frees exactly the
    // other 2.
    let report = dir.path().join("report.json");
    assert_eq!(env.run(&["ipam", "check", "-o", report.to_str().unwrap()]).status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["leakedIPs"].as_array().unwrap().len(), 4, "{json}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&report).unwrap().permissions().mode() & 0o777, 0o644);
    let (used, again) = (ips[1].addr(), ips[2].addr());
    let wep = write(
        dir.path(),
        "wep.yaml",
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: n1-k8s-web--1-eth0, namespace: default}}\n\
             spec: {{node: n1, orchestrator: k8s, pod: web-1, endpoint: eth0, interfaceName: cali1, ipNetworks: ['{used}/32']}}\n"
        ),
    );
    env.ok(&["apply", "-f", &wep]);
    rt.block_on(async {
        let ds = std::sync::Arc::new(gingham_store::embedded::EmbeddedStore::open(&env.store).unwrap());
        let ipam = gingham_ipam::IpamClient::new(ds);
        ipam.release_ips(&[again], &Default::default()).await.unwrap();
        let attrs = [("node".to_string(), "n1".to_string())].into();
        ipam.assign_ip(again, "k8s-pod-network.c1", &attrs, "n1", false).await.unwrap();
    });
    let out = env.ok(&["ipam", "release", "--from-report", report.to_str().unwrap()]);
    assert!(out.starts_with("Released 2 of the report's 4 leaked addresses."), "{out}");
    assert!(
        out.contains(&format!("kept {used} (in use")) && out.contains(&format!("kept {again} (in use or reallocated")),
        "{out}"
    );
    assert!(env.ok(&["ipam", "show", &format!("--ip={used}")]).contains("is in use"));
    assert!(env.ok(&["ipam", "show", &format!("--ip={again}")]).contains("is in use"));
    assert!(env.ok(&["ipam", "show"]).contains("|     2 (0%) |"));
    // Another cluster's report is refused.
    let ci = write(
        dir.path(),
        "ci.yaml",
        "apiVersion: projectcalico.org/v3\nkind: ClusterInformation\nmetadata: {name: default}\nspec: {clusterGUID: aaaa}\n",
    );
    env.ok(&["apply", "-f", &ci]);
    let mut other = json.clone();
    other["clusterGUID"] = "bbbb".into();
    std::fs::write(&report, other.to_string()).unwrap();
    assert!(
        env.fails(&["ipam", "release", "--from-report", report.to_str().unwrap()])
            .contains("the report is of cluster bbbb")
    );
}

fn pool(name: &str, cidr: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}}}\n")
}

/// Multi-document writes are all or nothing: every document is checked (among themselves and
/// against the store) before one transaction writes them all.
#[test]
fn multi_document_writes_are_all_or_nothing() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let nothing = |env: &Env| !env.ok(&["get", "ippool"]).contains("p1");
    // The same resource twice.
    let f = write(dir.path(), "dup.yaml", &format!("{}---\n{}", pool("p1", "10.1.0.0/16"), pool("p1", "10.1.0.0/16")));
    assert!(env.fails(&["apply", "-f", &f]).contains("document 2: IPPool p1: the same resource as"));
    assert!(nothing(&env));
    // A resourceVersion that is no revision, and one that is not the stored one.
    let f = write(
        dir.path(),
        "rv.yaml",
        &format!(
            "{}---\n{}",
            pool("p1", "10.1.0.0/16"),
            pool("p2", "10.2.0.0/16").replace("{name: p2}", "{name: p2, resourceVersion: 'abc'}")
        ),
    );
    assert!(env.fails(&["apply", "-f", &f]).contains("metadata.resourceVersion: \"abc\" is not a revision number"));
    assert!(nothing(&env));
    env.ok(&["apply", "-f", &write(dir.path(), "p2.yaml", &pool("p2", "10.2.0.0/16"))]);
    let f = write(
        dir.path(),
        "replace.yaml",
        &format!(
            "{}---\n{}",
            pool("p2", "10.2.0.0/16").replace("{cidr: 10.2.0.0/16}", "{cidr: 10.2.0.0/16, disabled: true}"),
            pool("p1", "10.1.0.0/16")
        )
        .replace("{name: p2}", "{name: p2, resourceVersion: '999'}"),
    );
    assert!(env.fails(&["apply", "-f", &f]).contains("changed by someone else"));
    assert!(nothing(&env) && !env.ok(&["get", "ippool", "-o", "yaml"]).contains("disabled: true"));
    // Two files in a directory, the second bad: the first is not written either.
    let sub = dir.path().join("two");
    std::fs::create_dir(&sub).unwrap();
    write(&sub, "a.yaml", &pool("p1", "10.1.0.0/16"));
    write(&sub, "b.yaml", &pool("p3", "10.2.128.0/17"));
    assert!(env.fails(&["apply", "-f", sub.to_str().unwrap()]).contains("overlaps IPPool p2"));
    assert!(nothing(&env));
    // Deletes too: one missing resource means none is deleted.
    assert!(env.fails(&["delete", "ippool", "p2", "nope"]).contains("nothing was deleted"));
    assert!(env.ok(&["get", "ippool"]).contains("p2"));
}

/// Overlapping pools are refused, as Calico does; re-applying a pool is not an overlap.
#[test]
fn ipam_split_replaces_a_pool_with_smaller_ones_in_one_step() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: big, labels: {team: a}}\n\
         spec: {cidr: 10.70.0.0/16, blockSize: 26, vxlanMode: Always, natOutgoing: true}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: small}\nspec: {cidr: 10.71.0.0/24, blockSize: 26}\n",
    );
    env.ok(&["apply", "-f", &f]);
    assert!(env.fails(&["ipam", "split", "3", "--name", "big"]).contains("power of two"));
    assert!(env.fails(&["ipam", "split", "8", "--name", "small"]).contains("smaller than one block"));
    assert!(env.fails(&["ipam", "split", "2", "--name", "nope"]).contains("no IPPool named nope"));
    let out = env.ok(&["ipam", "split", "4", "--cidr", "10.70.0.0/16"]);
    assert_eq!(
        out,
        "IP Pool big was successfully split into 4 smaller pools.\nCreated split-big-0 with CIDR 10.70.0.0/18.\n\
         Created split-big-1 with CIDR 10.70.64.0/18.\nCreated split-big-2 with CIDR 10.70.128.0/18.\n\
         Created split-big-3 with CIDR 10.70.192.0/18.\n"
    );
    let pools = env.ok(&["get", "ippool", "-o", "yaml"]);
    assert!(!pools.contains("name: big\n"), "{pools}");
    assert_eq!(pools.matches("vxlanMode: Always").count(), 4, "settings kept: {pools}");
    assert_eq!(pools.matches("team: a").count(), 4, "labels kept: {pools}");
}

#[test]
fn overlapping_pools_are_refused() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.yaml", &pool("a", "10.70.0.0/16"));
    env.ok(&["apply", "-f", &a]);
    env.ok(&["apply", "-f", &a]);
    let b = write(dir.path(), "b.yaml", &pool("b", "10.70.1.0/24"));
    assert!(env.fails(&["apply", "-f", &b]).contains("spec.cidr: 10.70.1.0/24 overlaps IPPool a (10.70.0.0/16)"));
    let both = write(dir.path(), "c.yaml", &format!("{}---\n{}", pool("c", "10.80.0.0/16"), pool("d", "10.80.0.0/12")));
    assert!(env.fails(&["create", "-f", &both]).contains("overlaps"));
    assert!(!env.ok(&["get", "ippool"]).contains("10.80"));
}

#[test]
fn patch_honours_resource_version_and_apply_survives_symlink_loops() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pool("a", "10.70.0.0/16"));
    std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).unwrap();
    assert_eq!(
        env.ok(&["apply", "-R", "-f", dir.path().to_str().unwrap()]),
        "Successfully applied 1 'IPPool' resource(s)\n"
    );
    let rv = env.ok(&["get", "ippool", "a", "-o", "json"]);
    let rv: serde_json::Value = serde_json::from_str(&rv).unwrap();
    let rv = rv["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let stale = format!(
        "{{\"metadata\":{{\"resourceVersion\":\"{}\"}},\"spec\":{{\"disabled\":true}}}}",
        rv.parse::<i64>().unwrap() - 1
    );
    assert!(env.fails(&["patch", "ippool", "a", "-p", &stale]).contains("changed by someone else"));
    assert!(
        env.fails(&["patch", "ippool", "a", "-p", "{\"metadata\":{\"resourceVersion\":\"abc\"}}"])
            .contains("not a revision number")
    );
    let fresh = format!("{{\"metadata\":{{\"resourceVersion\":\"{rv}\"}},\"spec\":{{\"disabled\":true}}}}");
    env.ok(&["patch", "ippool", "a", "-p", &fresh]);
    assert!(env.ok(&["get", "ippool", "a", "-o", "yaml"]).contains("disabled: true"));
}

/// Reading never creates a store; a user who may only read the file can read it.
#[test]
fn readers_never_create_and_read_only_users_can_read() {
    let env = Env::new();
    assert!(env.fails(&["get", "ippool"]).contains("does not exist"));
    assert!(env.fails(&["ipam", "show"]).contains("does not exist"));
    assert!(!env.store.exists(), "a read created nothing");
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.yaml", &pool("a", "10.70.0.0/16"));
    let out = env.run(&["apply", "-f", &f]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("note: created a new embedded store"));
    // nobody may read the file (0644) and enter its directory, but not write either.
    use std::os::unix::fs::PermissionsExt;
    let parent = env.store.parent().unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_gingham")])
            .args(args)
            .env("GINGHAM_STORE_PATH", &env.store)
            .output()
            .unwrap()
    };
    let got = as_nobody(&["get", "ippool"]);
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert!(String::from_utf8_lossy(&got.stdout).contains("10.70.0.0/16"));
    // Also while a writer holds the store open (its -wal and -shm files exist).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let writer = gingham_store::embedded::EmbeddedStore::open(&env.store).unwrap();
    rt.block_on(gingham_store::Datastore::create(&writer, "/x/held", b"v")).unwrap();
    let got = as_nobody(&["get", "ippool"]);
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    drop(writer);
    let denied = as_nobody(&["apply", "-f", &f]);
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains(&env.store.display().to_string()) && err.contains("read-only for this user"), "{err}");
}

/// Beyond etcd's --max-txn-ops (128) a batch is written in validated chunks.
#[test]
fn large_batches_fit_etcds_transaction_limit() {
    let server = EtcdServer::start().expect("etcd-server must be installed");
    let env = Env::etcd(&server.config.endpoints[0]);
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..300)
        .map(|i| format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: set-{i}}}\nspec: {{nets: [10.{}.{}.0/24]}}\n", i / 256, i % 256))
        .collect();
    let f = write(dir.path(), "sets.yaml", &docs.join("---\n"));
    let mut out = env.run(&["apply", "-f", &f]);
    for _ in 0..100 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = env.run(&["apply", "-f", &f]);
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Successfully applied 300 'GlobalNetworkSet' resource(s)\n");
    assert_eq!(env.ok(&["get", "globalnetworkset"]).lines().filter(|l| l.starts_with("set-")).count(), 300);
}

/// Two `gingham controllers run` processes on one store: exactly one leads (and says so in
/// its metrics); killed, its standby takes over once the lease runs out.
#[test]
fn two_controller_processes_one_leads_the_other_takes_over() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "p.yaml", &pool("p", "10.80.0.0/16"));
    env.ok(&["apply", "-f", &f]);
    struct Proc(std::process::Child, PathBuf);
    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let start = |name: &str, metrics: bool| {
        let log = dir.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let mut args = vec!["controllers", "run", "--identity", name, "--lease", "2s", "--period", "500ms"];
        if metrics {
            args.extend(["--metrics-listen", "127.0.0.1:0"]);
        }
        let child = env.cmd(&args).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
        Proc(child, log)
    };
    let read = |p: &Proc| std::fs::read_to_string(&p.1).unwrap_or_default();
    let (a, b) = (start("a", true), start("b", false));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let state = |p: &Proc| {
        let t = read(p);
        (t.contains(": leading"), t.contains("standing by"))
    };
    while !(state(&a).0 || state(&a).1) || !(state(&b).0 || state(&b).1) {
        assert!(std::time::Instant::now() < deadline, "a: {}\nb: {}", read(&a), read(&b));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(state(&a).0 ^ state(&b).0, "exactly one leads:\na: {}\nb: {}", read(&a), read(&b));
    // a's metrics say what it is.
    let url = read(&a)
        .lines()
        .find_map(|l| l.strip_prefix("metrics on http://").map(|u| u.trim_end_matches("/metrics").to_string()))
        .unwrap();
    let mut s = std::net::TcpStream::connect(url.as_str()).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let want = format!("gingham_controllers_leading {}", u8::from(state(&a).0));
    assert!(body.contains(&want) && body.contains("gingham_ipam_gc_candidates 0"), "{body}");
    // The leader dies (no clean release): the other leads within a lease or two.
    let (leader, standby) = if state(&a).0 { (a, b) } else { (b, a) };
    drop(leader);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while !read(&standby).contains(": leading") {
        assert!(std::time::Instant::now() < deadline, "no takeover: {}", read(&standby));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `gingham delete node` removes the node's traces itself, as calicoctl's does: its addresses
/// and blocks go with it, and `ipam check` has nothing to say about it afterwards.
#[test]
fn delete_node_removes_its_addresses_and_blocks() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "n.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.81.0.0/16}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1}\nspec: {}\n",
    );
    env.ok(&["apply", "-f", &f]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ds = std::sync::Arc::new(gingham_store::embedded::EmbeddedStore::open(&env.store).unwrap());
        let req = gingham_ipam::AutoAssign {
            num_v4: 2,
            handle: "k8s-pod-network.gone".into(),
            node: "n1".into(),
            attrs: [("node".to_string(), "n1".to_string())].into(),
            ..Default::default()
        };
        gingham_ipam::IpamClient::new(ds).auto_assign(&req).await.unwrap();
    });
    assert!(env.ok(&["ipam", "show"]).contains("|     2 (0%) |"));
    let out = env.ok(&["delete", "node", "n1"]);
    assert!(out.contains("Removed node n1's traces: 0 endpoints, 1 address handles, 1 blocks"), "{out}");
    assert!(env.ok(&["ipam", "show", "--show-blocks"]).contains("|     0 (0%) |"));
    assert!(!env.ok(&["ipam", "show", "--show-blocks"]).contains("| Block"), "no block left");
    assert!(env.ok(&["ipam", "check"]).ends_with("found 0 problems.\n"));
}
