//! `gingham lab` end to end: real namespaces, agents, CNI plugin, VXLAN and native routing,
//! NAT outgoing, node removal, agent restart, drift repair. Each test's lab has its own name
//! prefix and directory and is torn down on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const G: &str = env!("CARGO_BIN_EXE_gingham");
static SEQ: AtomicUsize = AtomicUsize::new(0);

struct Lab {
    dir: tempfile::TempDir,
    prefix: String,
    extra_pids: Vec<u32>,
    /// Labs on etcd reach it from this namespace at one fixed address (10.99.0.254): one at a time.
    _etcd_turn: Option<std::sync::MutexGuard<'static, ()>>,
}

static ETCD_LABS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Lab {
    fn up(args: &[&str]) -> Lab {
        let prefix = format!("gt{}{}", std::process::id() % 10_000, SEQ.fetch_add(1, Ordering::SeqCst));
        let etcd_turn = (args.contains(&"etcd") || args.contains(&"kubernetes"))
            .then(|| ETCD_LABS.lock().unwrap_or_else(|p| p.into_inner()));
        let lab = Lab { dir: tempfile::tempdir().unwrap(), prefix, extra_pids: vec![], _etcd_turn: etcd_turn };
        let mut a = vec!["lab", "up", "--quiet"];
        a.extend_from_slice(args);
        // Under umask 000: every file the lab writes must carry its own mode.
        let mut up = Command::new("sh");
        up.args(["-c", "umask 000; exec \"$0\" \"$@\"", G])
            .args(&a)
            .env("GINGHAM_LAB_DIR", lab.dir.path())
            .env("GINGHAM_LAB_PREFIX", &lab.prefix);
        let out = up.output().unwrap();
        assert!(
            out.status.success(),
            "lab up {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(G);
        c.args(args).env("GINGHAM_LAB_DIR", self.dir.path()).env("GINGHAM_LAB_PREFIX", &self.prefix);
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

    /// A gingham command against the lab's datastore (the environment `lab env` prints).
    fn gingham(&self, args: &[&str]) -> String {
        let mut c = self.cmd(args);
        for line in self.ok(&["lab", "env"]).lines() {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                c.env(k, v);
            }
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "gingham {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("state.json")).unwrap()).unwrap()
    }

    fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{}", self.prefix, pod.replace('/', "-"))
    }

    fn pod_ip(&self, pod: &str) -> String {
        let s = self.state();
        s["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap()["ips"][0].as_str().unwrap().to_string()
    }

    fn routes(&self, node: &str) -> String {
        ip(&["-n", &self.ns(node), "route", "show"])
    }

    fn check(&self) -> String {
        self.ok(&["lab", "check"])
    }

    /// The block a node owns (its blackhole route).
    fn own_block(&self, node: &str) -> String {
        let routes = self.routes(node);
        let line = routes.lines().find(|l| l.starts_with("blackhole")).expect("a blackhole route for the node's block");
        line.split_whitespace().nth(1).unwrap_or_default().to_string()
    }

    /// SIGKILL the agent of the `i`-th node (a node gone without a word).
    fn kill_agent(&self, i: usize) {
        let pid = self.state()["nodes"][i]["agent_pid"].as_i64().unwrap();
        Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &self.extra_pids {
            let _ = Command::new("kill").arg("-9").arg(p.to_string()).status();
        }
        let _ = self.cmd(&["lab", "down"]).output();
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `f` on a thread inside the namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn vxlan_lab_check_drift_node_removal_and_pods() {
    let lab = Lab::up(&[]);
    let out = lab.check();
    assert!(out.contains("all 30 pod pairs: ping ok, tcp ok"), "{out}");
    // Calico's VXLAN layout: device, MTU, neighbours, routes.
    let dev = ip(&["-n", &lab.ns("node-1"), "-d", "link", "show", "vxlan.calico"]);
    assert!(
        dev.contains("mtu 1450")
            && dev.contains("vxlan id 4096 local 10.99.0.11 dev eth0")
            && dev.contains("dstport 4789 nolearning"),
        "{dev}"
    );
    assert!(
        ip(&["-n", &lab.pod_ns("default/pod-1-1"), "link", "show", "eth0"]).contains("mtu 1450"),
        "pods get the VXLAN MTU"
    );
    let routes = lab.routes("node-1");
    assert_eq!(routes.lines().filter(|l| l.contains("dev vxlan.calico proto 80 onlink")).count(), 2, "{routes}");
    assert_eq!(routes.lines().filter(|l| l.starts_with("blackhole") && l.contains("proto 80")).count(), 1, "{routes}");
    assert_eq!(ip(&["-n", &lab.ns("node-1"), "neigh", "show", "dev", "vxlan.calico"]).matches("PERMANENT").count(), 2);
    let nft = Command::new("ip")
        .args(["netns", "exec", &lab.ns("node-1"), "nft", "list", "table", "ip", "gingham"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&nft.stdout).contains("masquerade"), "NAT outgoing table present");
    // Health and metrics of node-1's agent.
    let metrics = in_ns(&lab.ns("node-1"), || {
        let mut s = TcpStream::connect("127.0.0.1:9099").unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    assert!(
        metrics.contains("gingham_ready 1")
            && metrics.contains("gingham_sync_seconds_bucket")
            && metrics.contains("gingham_routes_programmed 3"),
        "{metrics}"
    );

    // Drift: a route deleted by hand comes back.
    let victim =
        routes.lines().find(|l| l.contains("vxlan.calico")).unwrap().split_whitespace().next().unwrap().to_string();
    let node1 = lab.ns("node-1");
    Command::new("ip").args(["-n", &node1, "route", "del", &victim]).status().unwrap();
    let took = wait_for("deleted route restored", Duration::from_secs(3), || {
        lab.routes("node-1").contains(&format!("{victim} via"))
    });
    eprintln!("drift repaired in {took:?}");
    // A pod's host route, and its interface's proxy ARP, deleted or changed by hand come back.
    let pod_ip = lab.pod_ip("default/pod-1-1");
    let dev = lab
        .routes("node-1")
        .lines()
        .find(|l| l.starts_with(&format!("{pod_ip} dev")))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    Command::new("ip").args(["-n", &node1, "route", "del", &format!("{pod_ip}/32")]).status().unwrap();
    let took = wait_for("deleted pod route restored", Duration::from_secs(3), || {
        lab.routes("node-1").contains(&format!("{pod_ip} dev {dev}"))
    });
    eprintln!("pod route repaired in {took:?}");
    let proxy_arp = format!("/proc/sys/net/ipv4/conf/{dev}/proxy_arp");
    Command::new("ip").args(["netns", "exec", &node1, "sh", "-c", &format!("echo 0 > {proxy_arp}")]).status().unwrap();
    wait_for("proxy ARP restored by the resync", Duration::from_secs(12), || {
        let out = Command::new("ip").args(["netns", "exec", &node1, "cat", &proxy_arp]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    });

    // Pods come and go through the CNI plugin.
    let out = lab.ok(&["lab", "pod", "add", "node-2", "team-a/extra", "--labels", "app=web"]);
    assert!(out.contains("pod team-a/extra on node-2"), "{out}");
    assert!(lab.check().contains("all 42 pod pairs: ping ok, tcp ok"));
    let wep = lab.gingham(&["get", "wep", "-n", "team-a", "-o", "json"]);
    assert!(wep.contains("\"app\": \"web\""), "{wep}");
    let status = Command::new(G)
        .args(["lab", "exec", "team-a/extra", "--", "ping", "-c", "1", "-W", "2", &lab.pod_ip("default/pod-1-1")])
        .env("GINGHAM_LAB_DIR", lab.dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "lab exec runs in the pod");
    lab.ok(&["lab", "pod", "del", "team-a/extra"]);
    assert!(!lab.gingham(&["get", "wep", "-A"]).contains("extra"));
    let st = lab.ok(&["lab", "status"]);
    assert!(st.contains("node-3") && st.contains("default/pod-3-2") && st.contains("ROUTES on node-2"), "{st}");

    // Node removal: its routes disappear everywhere.
    let node3_block = lab.own_block("node-3");
    lab.kill_agent(2);
    lab.gingham(&["delete", "node", "node-3"]);
    for n in ["node-1", "node-2"] {
        wait_for(&format!("{n} forgets node-3's block"), Duration::from_secs(5), || {
            !lab.routes(n).contains(&node3_block)
        });
        assert_eq!(ip(&["-n", &lab.ns(n), "neigh", "show", "dev", "vxlan.calico"]).matches("PERMANENT").count(), 1);
    }
}

#[test]
fn lab_files_have_their_modes_and_down_removes_only_what_the_lab_made() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::up(&["--nodes", "1", "--pods-per-node", "1"]);
    // The lab runs the cluster controllers, and they lead.
    wait_for("the lab's controllers to lead", Duration::from_secs(10), || {
        std::fs::read_to_string(lab.dir.path().join("controllers.log")).unwrap_or_default().contains(": leading")
    });
    let dir = lab.dir.path();
    let mode = |p: &str| std::fs::symlink_metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        (
            mode("state.json"),
            mode("node-1.log"),
            mode("node-1/net.d/10-gingham.conflist"),
            mode("node-1"),
            mode("store.db")
        ),
        (0o644, 0o644, 0o644, 0o755, 0o644)
    );
    // Someone else's files beside the lab's.
    std::fs::write(dir.join("mine.txt"), b"keep").unwrap();
    std::fs::write(dir.join("node-1/notes.txt"), b"keep").unwrap();
    lab.ok(&["lab", "down"]);
    assert_eq!(std::fs::read(dir.join("mine.txt")).unwrap(), b"keep");
    assert_eq!(std::fs::read(dir.join("node-1/notes.txt")).unwrap(), b"keep");
    for gone in ["state.json", "store.db", "node-1.log", "node-1.sock", "node-1/net.d"] {
        assert!(!dir.join(gone).exists(), "{gone} removed");
    }
    assert!(!ip(&["netns", "list"]).contains(&lab.prefix), "namespaces removed");
    // A directory that is not a lab's is refused, never emptied.
    let out = lab.cmd(&["lab", "down"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no lab at"));
    let out = lab.cmd(&["lab", "up", "--quiet"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not empty and holds no lab"));
    std::fs::write(dir.join("state.json"), b"{ damaged").unwrap();
    let out = lab.cmd(&["lab", "down"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a readable lab state"), "{out:?}");
    assert!(dir.join("mine.txt").exists() && dir.join("state.json").exists(), "nothing deleted");
    std::fs::remove_file(dir.join("state.json")).unwrap();
}

#[test]
fn native_routing_and_nat_outgoing() {
    let lab = Lab::up(&["--encap", "none", "--nodes", "2", "--pods-per-node", "1"]);
    assert!(lab.check().contains("all 2 pod pairs: ping ok, tcp ok"));
    // Learned over the node-to-node mesh (BGP, as `calico_backend: bird`).
    let routes = lab.routes("node-1");
    assert!(routes.contains("via 10.99.0.12 dev eth0 proto bird"), "{routes}");
    assert!(!routes.contains("via 10.99.0.12 dev eth0 proto 80"), "BGP alone routes pools without VXLAN: {routes}");
    assert!(!routes.contains("vxlan"), "{routes}");
    assert!(
        ip(&["-n", &lab.ns("node-1"), "link", "show", "vxlan.calico"]).is_empty(),
        "no VXLAN device without VXLAN pools"
    );
    // A pod reaches an underlay address outside every pool, and the peer sees the node's address.
    let underlay = format!("{}-underlay", lab.prefix);
    let listener = in_ns(&underlay, || TcpListener::bind("10.99.0.1:9000").unwrap());
    let pod = lab.pod_ns("default/pod-1-1");
    let client = std::thread::spawn(move || {
        in_ns(&pod, || {
            TcpStream::connect_timeout(&SocketAddr::from(([10, 99, 0, 1], 9000)), Duration::from_secs(3)).map(|_| ())
        })
    });
    let (_, peer) = listener.accept().unwrap();
    client.join().unwrap().unwrap();
    assert_eq!(peer.ip().to_string(), "10.99.0.11", "masqueraded to node-1's address");
}

#[test]
fn vxlan_cross_subnet() {
    // node-2 sits on a second underlay subnet; node-1 and node-3 share one.
    let lab = Lab::up(&["--encap", "vxlan-crosssubnet", "--nodes", "3", "--pods-per-node", "1"]);
    assert!(lab.check().contains("all 6 pod pairs: ping ok, tcp ok"));
    let routes = lab.routes("node-1");
    assert!(routes.contains("via 10.99.0.13 dev eth0 proto 80"), "same subnet: native\n{routes}");
    assert_eq!(
        routes.lines().filter(|l| l.contains("dev vxlan.calico proto 80 onlink")).count(),
        1,
        "other subnet: VXLAN\n{routes}"
    );
}

#[test]
fn agent_restart_keeps_routes_and_flows() {
    let mut lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let before = lab.routes("node-1");
    let flow = Flow::open(&lab, "default/pod-1-1", "default/pod-2-1", 9100);
    // The agent dies: routes stay, the flow goes on.
    let state = kill_agent(&lab);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(lab.routes("node-1"), before, "routes stay while the agent is down");
    flow.again();
    // The agent comes back and the cluster still checks out.
    restart_agent(&mut lab, &state);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(lab.routes("node-1"), before, "a restarted agent keeps what is right");
    assert!(lab.check().contains("all 2 pod pairs: ping ok, tcp ok"));
}

#[test]
fn lab_on_etcd() {
    let lab = Lab::up(&["--datastore", "etcd", "--nodes", "2", "--pods-per-node", "2"]);
    assert!(lab.check().contains("all 12 pod pairs: ping ok, tcp ok"));
    assert!(lab.ok(&["lab", "env"]).contains("ETCD_ENDPOINTS=http://10.99.0.1:2379"));
    assert!(lab.gingham(&["ipam", "show"]).contains("|     6 (0%) |"), "4 pods + 2 VTEP addresses");
}

/// Calico's host-local mode (USE_POD_CIDR): each Kubernetes Node has a podCIDR, pods get
/// addresses from the distribution's host-local with `"subnet": "usePodCidr"`, the agents route
/// the podCIDRs (here natively, advertised over the BGP mesh) and gingham's IPAM holds nothing.
#[test]
fn lab_with_host_local_on_pod_cidrs() {
    let lab = Lab::up(&[
        "--datastore",
        "kubernetes",
        "--ipam",
        "host-local",
        "--encap",
        "none",
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
    ]);
    assert!(lab.check().contains("all 12 pod pairs: ping ok, tcp ok"));
    for (node, i) in [("node-1", 1), ("node-2", 2)] {
        let cidr: ipnet::IpNet = format!("172.20.{}.0/24", 100 + i).parse().unwrap();
        for j in 1..=2 {
            let ip: std::net::IpAddr = lab.pod_ip(&format!("default/pod-{i}-{j}")).parse().unwrap();
            assert!(cidr.contains(&ip), "{ip} is not in {node}'s podCIDR {cidr}");
        }
        assert!(lab.gingham(&["get", "node", node, "-o", "yaml"]).contains(&cidr.to_string()), "status.podCIDRs");
    }
    // node-1 reaches node-2's podCIDR by the route node-2 advertised over BGP.
    let routes = lab.routes("node-1");
    assert!(routes.contains("172.20.102.0/24 via 10.99.0.12 dev eth0 proto bird"), "{routes}");
    assert!(lab.routes("node-2").contains("blackhole 172.20.102.0/24"), "node-2 holds its own podCIDR");
    // No gingham IPAM in the way: no blocks, and the check knows host-local's addresses.
    let show = lab.gingham(&["ipam", "show", "--show-blocks"]);
    assert!(show.contains("|     0 (0%) |") && !show.contains("| Block "), "no block was claimed:\n{show}");
    let check = lab.gingham(&["ipam", "check"]);
    assert!(
        check.contains("found 0 problems") && check.contains("4 workload IPs lie in their node's podCIDR"),
        "{check}"
    );
    // DEL gives the address back to host-local.
    let ip = lab.pod_ip("default/pod-1-1");
    let file = lab.dir.path().join("node-1/host-local/k8s-pod-network").join(&ip);
    assert!(file.exists(), "host-local records {ip}");
    lab.ok(&["lab", "pod", "del", "default/pod-1-1"]);
    assert!(!file.exists(), "host-local released {ip}");
}

/// The lab on a real kube-apiserver: the lab plays the kubelet (Nodes, then each Pod before its
/// CNI ADD, then the Pod's IPs in its status); agents and controllers run as their service
/// accounts under the manifests' RBAC. A NetworkPolicy created with kubectl is enforced by real
/// packets, and kubectl and gingham agree on what the datastore holds.
#[test]
fn lab_on_the_kubernetes_api() {
    let lab = Lab::up(&["--datastore", "kubernetes", "--nodes", "2", "--pods-per-node", "2"]);
    assert!(lab.check().contains("all 12 pod pairs: ping ok, tcp ok"));
    let env = lab.ok(&["lab", "env"]);
    assert!(env.contains("DATASTORE_TYPE=kubernetes"), "{env}");
    let kubeconfig = env
        .lines()
        .find_map(|l| l.trim_start_matches("export ").strip_prefix("KUBECONFIG="))
        .expect("lab env names the kubeconfig")
        .trim_matches(|c| c == '\'' || c == '"')
        .to_string();
    let bin = gingham_store::testing::kube::kube_bin_dir().unwrap();
    let kubectl = |args: &[&str], input: Option<&str>| -> String {
        let kubeconfig = std::path::Path::new(&kubeconfig);
        let out = gingham_store::testing::kube::run_kubectl(&bin, kubeconfig, args, input.map(str::as_bytes)).unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The Pods' status holds the addresses the plugin gave them.
    let ips = kubectl(
        &["get", "pods", "-n", "default", "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.podIP} {end}"],
        None,
    );
    for pod in ["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"] {
        assert!(ips.contains(&format!("{pod}={}", lab.pod_ip(&format!("default/{pod}")))), "{pod}: {ips}");
    }
    let cidr = kubectl(&["get", "ippools", "default-ipv4-ippool", "-o", "jsonpath={.spec.cidr}"], None);
    assert!(lab.gingham(&["get", "ippool"]).contains(&format!("default-ipv4-ippool   {cidr}")));
    // The controllers lead through a coordination.k8s.io Lease, under their own RBAC.
    let holder = || {
        kubectl(
            &[
                "get",
                "lease",
                "-n",
                "kube-system",
                "-o",
                r#"jsonpath={.items[?(@.metadata.name=="gingham-kube-controllers")].spec.holderIdentity}"#,
            ],
            None,
        )
    };
    wait_for("the controllers to take their Lease", Duration::from_secs(20), || !holder().trim().is_empty());
    let blocks = kubectl(&["get", "ipamblocks", "-o", "name"], None);
    assert_eq!(blocks.lines().count(), 2, "one block per node: {blocks}");
    // A Kubernetes NetworkPolicy made with kubectl: nothing reaches the pods, then all again.
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: default}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    kubectl(&["apply", "-f", "-"], Some(deny));
    let matrix = || {
        let out = lab.cmd(&["lab", "check"]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let denied = wait_for("the policy to deny every pair", Duration::from_secs(20), || {
        matrix().contains("12 of 12 pod pairs failed")
    });
    kubectl(&["delete", "networkpolicy", "deny", "-n", "default"], None);
    wait_for("traffic to flow again", Duration::from_secs(20), || {
        matrix().contains("all 12 pod pairs: ping ok, tcp ok")
    });
    eprintln!("policy from kubectl enforced after {denied:?}");
    // ClusterInformation datastoreReady: false holds the CNI plugin off (as a migration does).
    let info = |ready: bool| {
        format!(
            "apiVersion: crd.projectcalico.org/v1\nkind: ClusterInformation\nmetadata: {{name: default}}\nspec: {{datastoreReady: {ready}}}\n"
        )
    };
    kubectl(&["apply", "-f", "-"], Some(&info(false)));
    let mut n = 0;
    let mut add = || {
        n += 1;
        let out = lab.cmd(&["lab", "pod", "add", "node-1", &format!("default/held-{n}")]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    wait_for("the agent to hold ADDs off", Duration::from_secs(20), || {
        let (ok, err) = add();
        !ok && err.contains("datastoreReady: false")
    });
    kubectl(&["apply", "-f", "-"], Some(&info(true)));
    wait_for("ADDs to go ahead again", Duration::from_secs(20), || add().0);
    // Calico's IPAM annotations, read from the API: the Namespace's pools, the Pod's over them,
    // the Pod's fixed address.
    let pool = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: pool-b}\nspec: {cidr: 172.21.0.0/24, blockSize: 28, natOutgoing: true, vxlanMode: Always, ipipMode: Never, nodeSelector: all()}\n";
    kubectl(&["apply", "-f", "-"], Some(pool));
    kubectl(&["create", "namespace", "team-b"], None);
    kubectl(&["annotate", "namespace", "team-b", r#"cni.projectcalico.org/ipv4pools=["pool-b"]"#], None);
    let ip_of = |out: &str| out.trim().rsplit(": ").next().unwrap_or_default().to_string();
    let p = lab.ok(&["lab", "pod", "add", "node-2", "team-b/from-namespace"]);
    assert!(ip_of(&p).starts_with("172.21.0."), "the Namespace's pool: {p}");
    let p = lab.ok(&[
        "lab",
        "pod",
        "add",
        "node-2",
        "team-b/from-pod",
        "--annotation",
        r#"cni.projectcalico.org/ipv4pools=["default-ipv4-ippool"]"#,
    ]);
    assert!(ip_of(&p).starts_with("172.20."), "the Pod's pool wins: {p}");
    let p = lab.ok(&[
        "lab",
        "pod",
        "add",
        "node-1",
        "default/fixed",
        "--annotation",
        r#"cni.projectcalico.org/ipAddrs=["172.20.250.7"]"#,
    ]);
    assert_eq!(ip_of(&p), "172.20.250.7", "{p}");
    let out = lab
        .cmd(&["lab", "pod", "add", "node-1", "default/bad", "--annotation", "cni.projectcalico.org/ipv4pools=pool-b"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cni.projectcalico.org/ipv4pools of the Pod"), "{err}");
    // A Node deleted in Kubernetes (its kubelet, here its agent, gone first): the controllers
    // drop its block affinities and tunnel address, and the other node forgets its routes.
    let block = lab.own_block("node-2");
    lab.kill_agent(1);
    kubectl(&["delete", "node", "node-2"], None);
    wait_for("node-2's affinities to go", Duration::from_secs(30), || {
        !kubectl(&["get", "blockaffinities", "-o", "name"], None).contains("node-2-")
    });
    assert!(!kubectl(&["get", "ipamhandles", "-o", "name"], None).contains("vxlan-tunnel-addr-node-2"));
    wait_for("node-1 to forget node-2's block", Duration::from_secs(10), || !lab.routes("node-1").contains(&block));
}

#[test]
fn ipip_needs_the_kernel_module() {
    // IPIP's routes are computed (unit tests in gingham-dataplane); programming them needs tunl0.
    let probe = format!("gtipip{}", std::process::id());
    Command::new("ip").args(["netns", "add", &probe]).status().unwrap();
    let ok = Command::new("ip")
        .args(["-n", &probe, "link", "add", "t0", "type", "ipip"])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    Command::new("ip").args(["netns", "del", &probe]).status().unwrap();
    if !ok {
        eprintln!(
            "SKIPPED ipip lab: this kernel has no ipip module (`ip link add type ipip` fails: Unknown device type)"
        );
        return;
    }
    let lab = Lab::up(&["--encap", "ipip", "--nodes", "2", "--pods-per-node", "1"]);
    assert!(lab.check().contains("all 2 pod pairs"));
}

/// etcd stops answering under a running lab with traffic flowing: every kernel object stays,
/// pods keep talking, a CNI DEL completes locally (its records cleaned up once etcd is back),
/// and an agent restarted meanwhile adopts the kernel state instead of tearing it down.
#[test]
fn datastore_outage_keeps_the_dataplane() {
    let mut lab = Lab::up(&["--datastore", "etcd", "--nodes", "2", "--pods-per-node", "2"]);
    let state = lab.state();
    let etcd = state["etcd_pid"].as_i64().unwrap().to_string();
    let ours = |r: String| r.lines().filter(|l| l.contains("proto 80")).map(str::to_string).collect::<Vec<_>>();
    let before = (ours(lab.routes("node-1")), ours(lab.routes("node-2")));
    let gone_ip = lab.pod_ip("default/pod-1-2");
    let env: Vec<(String, String)> = lab
        .ok(&["lab", "env"])
        .lines()
        .filter_map(|l| l.trim_start_matches("export ").split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    struct Resume(String);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0]).status();
        }
    }
    Command::new("kill").args(["-STOP", &etcd]).status().unwrap();
    let resume = Resume(etcd);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!((ours(lab.routes("node-1")), ours(lab.routes("node-2"))), before, "routes stay");
    assert!(lab.check().contains("all 12 pod pairs: ping ok, tcp ok"), "traffic flows without the datastore");
    // A DEL completes locally.
    let t = Instant::now();
    lab.ok(&["lab", "pod", "del", "default/pod-1-2"]);
    assert!(t.elapsed() < Duration::from_secs(15), "DEL took {:?}", t.elapsed());
    assert!(!lab.routes("node-1").contains(&gone_ip), "the pod's veth and route are gone");
    // node-1's agent restarts while etcd is still down: it adopts, it does not tear down.
    let n = &state["nodes"][0];
    Command::new("kill").arg("-9").arg(n["agent_pid"].as_i64().unwrap().to_string()).status().unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", n["netns"].as_str().unwrap(), G, "node", "run", "--nodename", "node-1", "--ip"])
        .arg(n["ip"].as_str().unwrap())
        .arg("--socket")
        .arg(n["socket"].as_str().unwrap())
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lab.extra_pids.push(child.id());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ours(lab.routes("node-1")), before.0, "a restarted agent keeps the routes while etcd is away");
    // etcd is back: the queued DEL finishes, everything converges.
    drop(resume);
    wait_for("the DEL's records to go", Duration::from_secs(30), || {
        !lab.gingham(&["get", "wep"]).contains("pod-1-2")
            && lab.gingham(&["ipam", "show", &format!("--ip={gone_ip}")]).contains("is not assigned")
    });
    assert!(lab.check().contains("all 6 pod pairs: ping ok, tcp ok"));
    let check = lab.gingham(&["ipam", "check"]);
    assert!(check.ends_with("found 0 problems.\n"), "{check}");
    assert_eq!((ours(lab.routes("node-1")), ours(lab.routes("node-2"))), before);
}

/// A node's BGP sessions (peer address → state), from its agent as `gingham node status`
/// reads them.
fn sessions(lab: &Lab, node: &str) -> std::collections::BTreeMap<String, String> {
    let body = in_ns(&lab.ns(node), || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 9099)), Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /bgp/status HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let json: Value = serde_json::from_str(body.split_once("\r\n\r\n").unwrap().1).unwrap();
    json["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["address"].as_str().unwrap().to_string(), p["state"].as_str().unwrap().to_string()))
        .collect()
}

fn established(addrs: &[&str]) -> std::collections::BTreeMap<String, String> {
    addrs.iter().map(|a| (a.to_string(), "Established".to_string())).collect()
}

/// The gateways of a node's BGP routes, with how many routes use each.
fn bgp_gateways(lab: &Lab, node: &str) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for l in lab.routes(node).lines().filter(|l| l.contains("proto bird")) {
        let gw = l.split_whitespace().skip_while(|w| *w != "via").nth(1).unwrap_or("?").to_string();
        *out.entry(gw).or_insert(0) += 1;
    }
    out
}

#[test]
fn route_reflectors_as_in_the_seeds_setup_1() {
    let lab = Lab::up(&["--encap", "none", "--nodes", "4", "--pods-per-node", "1", "--bgp-topology", "rr1"]);
    let check = lab.check();
    assert!(check.contains("all 12 pod pairs: ping ok, tcp ok"), "{check}");
    // Clients peer with both reflectors only; reflectors with everyone.
    for client in ["node-3", "node-4"] {
        assert_eq!(sessions(&lab, client), established(&["10.99.0.11", "10.99.0.12"]), "{client}");
    }
    assert_eq!(sessions(&lab, "node-1"), established(&["10.99.0.12", "10.99.0.13", "10.99.0.14"]));
    assert_eq!(sessions(&lab, "node-2"), established(&["10.99.0.11", "10.99.0.13", "10.99.0.14"]));
    // Every block is reached via its own node (one block per node here).
    assert_eq!(
        bgp_gateways(&lab, "node-3"),
        [("10.99.0.11", 1), ("10.99.0.12", 1), ("10.99.0.14", 1)].map(|(a, n)| (a.to_string(), n)).into(),
        "{}",
        lab.routes("node-3")
    );
    // node status, as calicoctl shows it.
    let status = Command::new("ip")
        .args(["netns", "exec", &lab.ns("node-3"), env!("CARGO_BIN_EXE_gingham"), "node", "status"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(out.contains("IPv4 BGP status") && out.contains("No IPv6 peers found."), "{out}{err}");
    assert_eq!(out.lines().filter(|l| l.contains("| node specific | up    |")).count(), 2, "{out}");
    // Beyond calicoctl: per peer, what it sent and what it has from us.
    let routes = Command::new("ip")
        .args(["netns", "exec", &lab.ns("node-3"), env!("CARGO_BIN_EXE_gingham"), "node", "status", "--routes"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&routes.stdout);
    let sections = |what: &str| out.lines().filter(|l| l.starts_with(what)).map(str::to_string).collect::<Vec<_>>();
    let (received, advertised) = (sections("Routes received from Node_"), sections("Routes advertised to Node_"));
    assert_eq!((received.len(), advertised.len()), (2, 2), "{out}");
    // Each reflector reflects the other three nodes' blocks and gets this node's one.
    assert!(received.iter().all(|l| l.ends_with(": 3")) && advertised.iter().all(|l| l.ends_with(": 1")), "{out}");
}

/// `--tor`: an FRR router on the underlay; every node peers with it over eBGP and gives it
/// its block, while pod traffic keeps the mesh's direct routes.
#[test]
fn a_tor_router_peers_with_every_node() {
    let lab = Lab::up(&["--encap", "none", "--nodes", "3", "--pods-per-node", "1", "--tor"]);
    let check = lab.check();
    assert!(check.contains("all 6 pod pairs: ping ok, tcp ok"), "{check}");
    for node in ["node-1", "node-2", "node-3"] {
        let s = sessions(&lab, node);
        assert_eq!(s.get("10.99.0.253").map(String::as_str), Some("Established"), "{node}: {s:?}");
    }
    let vty = std::path::PathBuf::from(format!("/run/gingham-lab-tor-{}", lab.prefix));
    let tor = |cmd: &str| {
        let out = Command::new("vtysh").arg("--vty_socket").arg(&vty).args(["-c", cmd]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The nodes' blocks, through every node: as BIRD under Calico's export filter, a node
    // passes on to an eBGP peer what it learned from the mesh, with itself as next hop
    // (keepOriginalNextHop would send the owner's address instead).
    let t = Instant::now();
    let routes = loop {
        let r = tor("show ip route bgp");
        let hops = ["10.99.0.11", "10.99.0.12", "10.99.0.13"];
        if hops.iter().all(|h| r.contains(&format!("via {h}"))) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the ToR did not learn every node's block:\n{r}\n{}",
            tor("show bgp summary")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(routes.contains("172.20."), "{routes}");
    // Pods still go node to node: a node's route to another's block is the direct one.
    let r = lab.routes("node-1");
    assert!(
        r.lines().filter(|l| l.starts_with("172.20.") && l.contains("proto bird")).all(|l| !l.contains("10.99.0.253")),
        "{r}"
    );
    // Health: ready with the session up, its metrics per session; the ToR's bgpd dies, and
    // readiness fails naming the peer (as calico-node's -bird-ready) while metrics count it.
    let health = |path: &str| {
        let path = path.to_string();
        in_ns(&lab.ns("node-1"), move || {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 9099)), Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    let up = "gingham_bgp_session_established{peer=\"Global_10_99_0_253\",address=\"10.99.0.253\"} 1";
    assert!(health("/readiness").contains(" 200 "));
    assert!(health("/metrics").contains(up), "{}", health("/metrics"));
    let bgpd = format!("frr/bgpd.*{}", vty.display());
    assert!(Command::new("pkill").args(["-KILL", "-f", &bgpd]).status().unwrap().success(), "no bgpd to stop");
    let t = Instant::now();
    let ready = loop {
        let r = health("/readiness");
        if r.contains(" 503 ") {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "readiness stayed up without the ToR: {r}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(ready.contains("BGP not established with 10.99.0.253"), "{ready}");
    let m = health("/metrics");
    assert!(m.contains(&up.replace("} 1", "} 0")), "{m}");
    assert!(
        m.contains("gingham_bgp_session_flaps_total{peer=\"Global_10_99_0_253\",address=\"10.99.0.253\"} 1"),
        "{m}"
    );
    lab.ok(&["lab", "down"]);
    let left = Command::new("pgrep").args(["-f", &vty.display().to_string()]).output().unwrap();
    assert!(left.stdout.is_empty(), "FRR left running: {}", String::from_utf8_lossy(&left.stdout));
    assert!(!vty.exists(), "{} left behind", vty.display());
}

#[test]
fn route_reflectors_as_in_the_seeds_setup_2() {
    let lab = Lab::up(&["--encap", "none", "--nodes", "6", "--pods-per-node", "1", "--bgp-topology", "rr2"]);
    let check = lab.check();
    assert!(check.contains("all 30 pod pairs: ping ok, tcp ok"), "{check}");
    // Members peer with their group's reflector; the reflectors peer with each other (eBGP).
    for (member, rr) in
        [("node-2", "10.99.0.11"), ("node-3", "10.99.0.11"), ("node-5", "10.99.0.14"), ("node-6", "10.99.0.14")]
    {
        assert_eq!(sessions(&lab, member), established(&[rr]), "{member}");
    }
    assert_eq!(sessions(&lab, "node-1"), established(&["10.99.0.12", "10.99.0.13", "10.99.0.14"]));
    assert_eq!(sessions(&lab, "node-4"), established(&["10.99.0.11", "10.99.0.15", "10.99.0.16"]));
    // Inside an AS a block is reached via its own node; the other AS's blocks via that AS's
    // reflector (next hop self over eBGP, kept when reflected).
    assert_eq!(
        bgp_gateways(&lab, "node-2"),
        [("10.99.0.11", 1), ("10.99.0.13", 1), ("10.99.0.14", 3)].map(|(a, n)| (a.to_string(), n)).into(),
        "{}",
        lab.routes("node-2")
    );
    assert_eq!(
        bgp_gateways(&lab, "node-5"),
        [("10.99.0.11", 3), ("10.99.0.14", 1), ("10.99.0.16", 1)].map(|(a, n)| (a.to_string(), n)).into(),
        "{}",
        lab.routes("node-5")
    );
}

/// Graceful restart with BGP: node-1's agent is killed; its routes stay in its kernel, node-2
/// keeps node-1's block (stale) and the flow goes on; the agent comes back and nothing moves.
#[test]
fn agent_restart_keeps_bgp_routes_and_flows() {
    let mut lab = Lab::up(&["--encap", "none", "--nodes", "2", "--pods-per-node", "1"]);
    let (before1, before2) = (lab.routes("node-1"), lab.routes("node-2"));
    assert!(before2.contains("via 10.99.0.11 dev eth0 proto bird"), "{before2}");
    let flow = Flow::open(&lab, "default/pod-2-1", "default/pod-1-1", 9101);
    let state = kill_agent(&lab);
    // node-2's session to node-1 is gone; it keeps node-1's block as stale.
    wait_for("node-2 to notice", Duration::from_secs(10), || {
        sessions(&lab, "node-2").get("10.99.0.11").is_some_and(|s| s != "Established")
    });
    assert_eq!(lab.routes("node-1"), before1, "node-1's kernel keeps its routes");
    assert_eq!(lab.routes("node-2"), before2, "node-2 keeps node-1's block while it restarts");
    flow.again();
    restart_agent(&mut lab, &state);
    wait_for("the session to come back", Duration::from_secs(20), || {
        sessions(&lab, "node-2").get("10.99.0.11").is_some_and(|s| s == "Established")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.routes("node-1"), before1, "a restarted agent keeps what is right");
    assert_eq!(lab.routes("node-2"), before2, "and its peer too");
    assert!(lab.check().contains("all 2 pod pairs: ping ok, tcp ok"));
}

/// A TCP flow from pod `from` to pod `to` that has exchanged one message; `again` sends the
/// second (and the echo thread ends).
struct Flow {
    conn: TcpStream,
    echo: std::thread::JoinHandle<()>,
}

impl Flow {
    fn open(lab: &Lab, from: &str, to: &str, port: u16) -> Flow {
        let dst = lab.pod_ip(to);
        let server = in_ns(&lab.pod_ns(to), move || TcpListener::bind(("0.0.0.0", port)).unwrap());
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 5];
            for _ in 0..2 {
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
        });
        let mut conn = in_ns(&lab.pod_ns(from), move || TcpStream::connect((dst.as_str(), port)).unwrap());
        let mut buf = [0u8; 5];
        conn.write_all(b"hello").unwrap();
        conn.read_exact(&mut buf).unwrap();
        Flow { conn, echo }
    }

    fn again(mut self) {
        let mut buf = [0u8; 5];
        self.conn.write_all(b"again").unwrap();
        self.conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"again");
        self.echo.join().unwrap();
    }
}

/// Kill node-1's agent (-9, no cleanup), returning the lab state it ran with.
fn kill_agent(lab: &Lab) -> Value {
    let state = lab.state();
    let pid = state["nodes"][0]["agent_pid"].as_i64().unwrap();
    Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap();
    state
}

/// Start node-1's agent again as the lab did.
fn restart_agent(lab: &mut Lab, state: &Value) {
    let n = &state["nodes"][0];
    let child = Command::new("ip")
        .args(["netns", "exec", n["netns"].as_str().unwrap(), G, "node", "run", "--nodename", "node-1"])
        .args(["--ip", n["ip"].as_str().unwrap(), "--socket", n["socket"].as_str().unwrap()])
        .env("GINGHAM_STORE_PATH", lab.dir.path().join("store.db"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lab.extra_pids.push(child.id());
}

/// Policy before the first packet: a pod created into a namespace whose policy denies
/// everything never reaches anything and is never reached; a pod without policy gets its very
/// first packet through the moment its ADD returns; removing the policy opens the pod up.
#[test]
fn policy_before_the_first_packet() {
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let file = lab.dir.path().join("deny.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: locked\n  labels:\n    team: x\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-all\n  namespace: locked\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    )
    .unwrap();
    lab.gingham(&["apply", "-f", file.to_str().unwrap()]);
    let other = lab.pod_ip("default/pod-2-1");
    let exec = |pod: &str, args: &[&str]| {
        lab.cmd(&["lab", "exec", pod, "--"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let ping = |pod: &str, ip: &str| exec(pod, &["ping", "-c", "1", "-W", "1", ip]);

    lab.ok(&["lab", "pod", "add", "node-1", "locked/p"]);
    let locked = lab.pod_ip("locked/p");
    assert!(!ping("locked/p", &other), "a denied pod reaches nothing");
    assert!(!ping("default/pod-2-1", &locked), "a denied pod is reached by nothing");
    assert!(!ping("locked/p", "10.99.0.12"), "not even the other node");

    lab.ok(&["lab", "pod", "add", "node-1", "default/fresh"]);
    assert!(ping("default/fresh", &other), "the first packet after ADD gets through");
    let table = Command::new("ip")
        .args(["netns", "exec", &lab.ns("node-1"), "nft", "list", "table", "inet", "gingham"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("chain po-locked_knp.default.deny-all"), "{table}");

    lab.gingham(&["delete", "-f", file.to_str().unwrap()]);
    wait_for("the pod opens up once its policy is gone", Duration::from_secs(5), || ping("locked/p", &other));
}

/// The policy table is the agent's: changed by hand, it is put back (and the time it took is
/// printed); across an agent restart a denied pod stays denied, and what changed in the store
/// meanwhile is reconciled; FelixConfiguration's defaultEndpointToHostAction and failsafe
/// ports reach the rules.
#[test]
fn policy_survives_hand_edits_and_restarts_and_follows_felix_configuration() {
    let mut lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let file = lab.dir.path().join("deny.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: locked\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-all\n  namespace: locked\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    )
    .unwrap();
    lab.gingham(&["apply", "-f", file.to_str().unwrap()]);
    lab.ok(&["lab", "pod", "add", "node-1", "locked/p"]);
    let other = lab.pod_ip("default/pod-2-1");
    let ping = |lab: &Lab, pod: &str, ip: &str| {
        lab.cmd(&["lab", "exec", pod, "--", "ping", "-c", "1", "-W", "1", ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let nft = |lab: &Lab, args: &[&str]| {
        let out = Command::new("ip").args(["netns", "exec", &lab.ns("node-1"), "nft"]).args(args).output().unwrap();
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!ping(&lab, "locked/p", &other));

    // By hand: the forward chain flushed. The agent notices and restores it.
    let forward = nft(&lab, &["list", "chain", "inet", "gingham", "forward"]);
    assert!(forward.contains("@from-wl"), "{forward}");
    nft(&lab, &["flush", "chain", "inet", "gingham", "forward"]);
    let took = wait_for("the flushed chain to be restored", Duration::from_secs(5), || {
        nft(&lab, &["list", "chain", "inet", "gingham", "forward"]).contains("@from-wl")
    });
    println!("policy table changed by hand: restored after {took:?}");
    assert!(!ping(&lab, "locked/p", &other), "denied again");

    // The agent dies: the rules stay. The policy is deleted meanwhile; the agent that comes
    // back opens the pod (reconciled from the store, not from a flushed table).
    let state = kill_agent(&lab);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ping(&lab, "locked/p", &other), "still denied while the agent is down");
    let knp = lab.dir.path().join("knp.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&knp, text.split("---\n").nth(1).unwrap()).unwrap();
    lab.gingham(&["delete", "-f", knp.to_str().unwrap()]);
    assert!(!ping(&lab, "locked/p", &other), "nobody to program it yet");
    restart_agent(&mut lab, &state);
    wait_for("the restarted agent to open the pod", Duration::from_secs(10), || ping(&lab, "locked/p", &other));

    // FelixConfiguration: workloads may not reach their own host, except on a failsafe port.
    let own_host = "10.99.0.11";
    assert!(ping(&lab, "default/pod-1-1", own_host), "Accept is the default");
    let felix = lab.dir.path().join("felix.yaml");
    std::fs::write(
        &felix,
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata:\n  name: default\n\
         spec:\n  defaultEndpointToHostAction: Drop\n",
    )
    .unwrap();
    lab.gingham(&["apply", "-f", felix.to_str().unwrap()]);
    wait_for("endpoint-to-host Drop to apply", Duration::from_secs(5), || !ping(&lab, "default/pod-1-1", own_host));
    assert!(ping(&lab, "default/pod-1-1", &other), "only traffic to the host is dropped");
    let input = nft(&lab, &["list", "chain", "inet", "gingham", "input"]);
    assert!(input.contains("tcp dport 22 counter"), "failsafe ports: {input}");
    lab.gingham(&["delete", "-f", felix.to_str().unwrap()]);
    wait_for("the default action to come back", Duration::from_secs(5), || ping(&lab, "default/pod-1-1", own_host));
}

/// Seed 003 §5.2, changing a pool's block size, step by step on a 3-node VXLAN lab: every
/// address ends in a /25 block, no block is left outside a pool, `ipam check` is clean and the
/// pods reach each other.
fn block_size_procedure(args: &[&str]) {
    let lab = Lab::up(args);
    let write = |name: &str, text: &str| {
        let f = lab.dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f.to_str().unwrap().to_string()
    };
    let pool = |name: &str, cidr: &str, block: Option<u8>| {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n{}  vxlanMode: Always\n  natOutgoing: true\n",
            block.map(|b| format!("  blockSize: {b}\n")).unwrap_or_default()
        )
    };
    let tunnels = |lab: &Lab| -> Vec<String> {
        lab.gingham(&["get", "node", "-o", "yaml"])
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ipv4VXLANTunnelAddr: "))
            .map(|a| a.trim_matches('"').to_string())
            .collect()
    };
    let blocks = |lab: &Lab| -> Vec<String> {
        lab.gingham(&["ipam", "show", "--show-blocks"])
            .lines()
            .filter(|l| l.starts_with("| Block"))
            .filter_map(|l| l.split('|').nth(2).map(|c| c.trim().to_string()))
            .collect()
    };
    let recreate_pods = |lab: &Lab| {
        for n in 1..=3 {
            lab.ok(&["lab", "pod", "del", &format!("default/pod-{n}-1")]);
            lab.ok(&["lab", "pod", "add", &format!("node-{n}"), &format!("default/pod-{n}-1")]);
        }
    };
    let eventually = |what: &str, f: &dyn Fn() -> bool| {
        wait_for(what, Duration::from_secs(10), f);
    };

    // 1. A temporary pool; 2. the default pool disabled: the tunnel addresses move.
    lab.gingham(&["apply", "-f", &write("temporary.yaml", &pool("temporary-pool", "10.0.0.0/16", None))]);
    lab.gingham(&["patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"disabled":true}}"#]);
    eventually("tunnel addresses to leave the disabled pool", &|| {
        let t = tunnels(&lab);
        t.len() == 3 && t.iter().all(|a| a.starts_with("10.0."))
    });
    // 3. The pods recreated (into the temporary pool); 4. the default pool deleted: its
    // blocks, now empty, go with it.
    recreate_pods(&lab);
    lab.gingham(&["delete", "ippool", "default-ipv4-ippool"]);
    let left = blocks(&lab);
    assert!(left.iter().all(|b| b.starts_with("10.0.")), "the deleted pool's blocks are gone: {left:?}");
    // 5. Recreated with blockSize 25; 6. the temporary pool disabled; 7. the pods recreated.
    lab.gingham(&["apply", "-f", &write("resized.yaml", &pool("default-ipv4-ippool", "172.20.0.0/16", Some(25)))]);
    lab.gingham(&["patch", "ippool", "temporary-pool", "-p", r#"{"spec":{"disabled":true}}"#]);
    eventually("tunnel addresses to move into the resized pool", &|| {
        let t = tunnels(&lab);
        t.len() == 3 && t.iter().all(|a| a.starts_with("172.20."))
    });
    recreate_pods(&lab);
    // 8. The temporary pool deleted.
    lab.gingham(&["delete", "ippool", "temporary-pool"]);

    let blocks = blocks(&lab);
    assert_eq!(blocks.len(), 3, "one block per node: {blocks:?}");
    assert!(blocks.iter().all(|b| b.starts_with("172.20.") && b.ends_with("/25")), "{blocks:?}");
    let in_blocks = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        blocks.iter().any(|b| b.parse::<ipnet::IpNet>().unwrap().contains(&ip))
    };
    for n in 1..=3 {
        let ip = lab.pod_ip(&format!("default/pod-{n}-1"));
        assert!(in_blocks(&ip), "pod-{n}-1 {ip} is in a /25 block of the new pool: {blocks:?}");
    }
    for t in tunnels(&lab) {
        assert!(in_blocks(&t), "tunnel address {t} in a /25 block: {blocks:?}");
    }
    let check = lab.gingham(&["ipam", "check"]);
    assert!(check.contains("found 0 problems"), "{check}");
    // Right away: a tunnel address that moved must not have cost any node its routes.
    let out = lab.cmd(&["lab", "check"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let routes: Vec<String> = (1..=3).map(|n| lab.routes(&format!("node-{n}"))).collect();
    assert!(out.contains("all 6 pod pairs: ping ok, tcp ok"), "{out}\n{}", routes.join("\n"));
}

#[test]
fn block_size_change_as_the_seed_describes() {
    block_size_procedure(&["--nodes", "3", "--pods-per-node", "1", "--encap", "vxlan"]);
}

#[test]
fn block_size_change_as_the_seed_describes_on_etcd() {
    block_size_procedure(&["--nodes", "3", "--pods-per-node", "1", "--encap", "vxlan", "--datastore", "etcd"]);
}

/// A HostEndpoint on a node's underlay interface, with no policy: the node accepts only
/// Calico's failsafe ports from elsewhere — but the cluster's own VXLAN traffic still passes,
/// so every pod pair keeps working; deleting it opens the node again.
#[test]
fn host_endpoint_on_the_underlay_keeps_the_pod_network() {
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1", "--encap", "vxlan"]);
    // Listeners on node-1 (its own namespace): a failsafe port and another.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for port in [22u16, 9999] {
        let stop = stop.clone();
        let l = in_ns(&lab.ns("node-1"), move || TcpListener::bind(("0.0.0.0", port)).unwrap());
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = l.accept();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    let reach = |port: u16| {
        in_ns(&lab.ns("node-2"), move || {
            TcpStream::connect_timeout(
                &(std::net::Ipv4Addr::new(10, 99, 0, 11), port).into(),
                Duration::from_millis(500),
            )
            .is_ok()
        })
    };
    assert!(reach(22) && reach(9999));
    let file = lab.dir.path().join("hep.yaml");
    std::fs::write(
        &file,
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: node-1-eth0, labels: {role: node}}\n\
         spec: {node: node-1, interfaceName: eth0, expectedIPs: [10.99.0.11]}\n",
    )
    .unwrap();
    lab.gingham(&["apply", "-f", file.to_str().unwrap()]);
    wait_for("the host endpoint to close node-1", Duration::from_secs(5), || !reach(9999));
    assert!(reach(22), "failsafe port");
    let out = lab.cmd(&["lab", "check"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("all 2 pod pairs: ping ok, tcp ok"), "VXLAN between nodes passes the host endpoint: {out}");
    lab.gingham(&["delete", "-f", file.to_str().unwrap()]);
    wait_for("node-1 to open again", Duration::from_secs(5), || reach(9999));
    stop.store(true, Ordering::Relaxed);
}
