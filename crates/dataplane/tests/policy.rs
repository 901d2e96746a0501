//! The policy manager against the real kernel: a node namespace with three workloads on veths
//! (Calico's layout: /32 routes, proxy ARP, 169.254.1.1 as gateway), policy from the engine,
//! and real TCP connections between the workloads deciding what the rules do.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gingham_dataplane::policy::{PolicyConfig, PolicyManager};
use gingham_kernel::nft::Nft;
use gingham_policy::engine::Item;
use gingham_policy::index::{ItemData, NamedPort};
use gingham_policy::{Engine, knp, rules};

struct Ns(String, PathBuf);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = gingham_kernel::netns::delete(&self.0);
    }
}

fn ns(name: &str) -> Ns {
    let n = format!("gpol-{}-{name}", std::process::id());
    let _ = gingham_kernel::netns::delete(&n);
    let p = gingham_kernel::netns::add(&n).unwrap();
    Ns(n, p)
}

fn run(ns: &Ns, args: &[&str]) {
    let f = File::open(&ns.1).unwrap();
    let out = gingham_kernel::netns::command(&f, args[0]).unwrap().args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Run `f` on a thread inside the namespace.
fn inside<T: Send + 'static>(ns: &Ns, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let file = File::open(&ns.1).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// Listeners on 80 and 81 until dropped.
struct Server(Arc<AtomicBool>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn serve(ns: &Ns, ip: &str) -> Server {
    serve_on(ns, ip, &[80, 81])
}

fn serve_on(ns: &Ns, ip: &str, ports: &[u16]) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    for &port in ports {
        let (stop, addr) = (stop.clone(), SocketAddr::new(ip.parse().unwrap(), port));
        let ready = inside(ns, move || {
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => drop(s),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        });
        ready.join().unwrap();
    }
    Server(stop)
}

fn reaches(from: &Ns, ip: &str, port: u16) -> bool {
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    inside(from, move || TcpStream::connect_timeout(&addr, Duration::from_millis(400)).is_ok()).join().unwrap()
}

/// A node namespace: forwarding on, and a default route (proxy ARP answers for 169.254.1.1
/// only when the node has a route to it, as hosts do).
fn node(name: &str) -> Ns {
    let node = ns(name);
    for cmd in [
        "ip link set lo up",
        "sysctl -qw net.ipv4.ip_forward=1",
        "ip link add up0 type veth peer name up1",
        "ip link set up0 up",
        "ip link set up1 up",
        "ip addr add 192.0.2.1/24 dev up0",
        "ip route add default via 192.0.2.2 dev up0",
    ] {
        run(&node, &cmd.split(' ').collect::<Vec<_>>());
    }
    node
}

struct Pod {
    ns: Ns,
    ip: &'static str,
    iface: String,
}

fn pod(node: &Ns, name: &str, ip: &'static str) -> Pod {
    let p = ns(name);
    let iface = format!("cali{name}{}", std::process::id() % 10000);
    run(node, &["ip", "link", "add", &iface, "type", "veth", "peer", "name", "eth0", "netns", &p.1.to_string_lossy()]);
    run(node, &["ip", "link", "set", &iface, "up"]);
    run(node, &["sysctl", "-qw", &format!("net.ipv4.conf.{iface}.proxy_arp=1")]);
    run(node, &["sysctl", "-qw", &format!("net.ipv4.neigh.{iface}.proxy_delay=0")]);
    run(node, &["ip", "route", "add", &format!("{ip}/32"), "dev", &iface]);
    run(&p, &["ip", "link", "set", "lo", "up"]);
    run(&p, &["ip", "link", "set", "eth0", "up"]);
    run(&p, &["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    run(&p, &["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    run(&p, &["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    Pod { ns: p, ip, iface }
}

fn endpoint(ns: &str, labels: &[(&str, &str)], ip: &str, iface: &str) -> Item {
    let mut l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.insert("projectcalico.org/namespace".into(), ns.into());
    l.insert("projectcalico.org/orchestrator".into(), "k8s".into());
    Item {
        data: ItemData {
            labels: l,
            profiles: vec![format!("kns.{ns}")],
            nets: vec![format!("{ip}/32").parse().unwrap()],
            ports: vec![NamedPort { name: "serve-81-tcp".into(), protocol: 6, port: 81 }],
        },
        local_interface: Some(iface.into()),
    }
}

fn knp(json: &str, ns: &str) -> rules::Policy {
    rules::network_policy(&knp::to_calico(&serde_json::from_str(json).unwrap()), ns).unwrap()
}

async fn program(m: &mut PolicyManager, e: &mut Engine) {
    let d = e.take_dirty();
    m.apply(e, &d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_real_connections() {
    let node = node("node");
    let (a, b, c) = (pod(&node, "a", "10.70.0.1"), pod(&node, "b", "10.70.0.2"), pod(&node, "c", "10.70.0.3"));
    let _servers: Vec<Server> = [&a, &b, &c].iter().map(|p| serve(&p.ns, p.ip)).collect();
    let nft = Nft::in_namespace_file(&File::open(&node.1).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft.clone(), PolicyConfig::default());
    let mut e = Engine::default();
    e.set_namespace("x", Some(&[("ns".to_string(), "x".to_string())].into()));
    e.set_item("wep/x/a", Some(endpoint("x", &[("pod", "a")], a.ip, &a.iface)));
    e.set_item("wep/x/b", Some(endpoint("x", &[("pod", "b")], b.ip, &b.iface)));
    program(&mut m, &mut e).await;

    // c has no policy programmed yet: its interface is not in the maps, so nothing gets out or in.
    assert!(!reaches(&c.ns, a.ip, 80), "an interface without policy sends nothing");
    assert!(!reaches(&a.ns, c.ip, 80), "an interface without policy receives nothing");
    if !reaches(&a.ns, b.ip, 80) {
        let l = nft.list_table(&gingham_dataplane::policy::table()).await.unwrap().unwrap();
        m.remove().await.unwrap();
        let without = reaches(&a.ns, b.ip, 80);
        panic!("no policy: the namespace profile allows (without the table: {without})\n{l}");
    }
    e.set_item("wep/x/c", Some(endpoint("x", &[("pod", "c")], c.ip, &c.iface)));
    program(&mut m, &mut e).await;
    assert!(m.is_programmed(&c.iface));
    assert!(reaches(&c.ns, a.ip, 80));

    // Default deny for b's ingress; its own connections out still work (replies by conntrack).
    e.set_policy("x/knp.default.deny", Some(knp(r#"{"podSelector":{"matchLabels":{"pod":"b"}}}"#, "x")));
    program(&mut m, &mut e).await;
    assert!(!reaches(&a.ns, b.ip, 80));
    assert!(reaches(&b.ns, a.ip, 80), "egress is not restricted and the reply returns");

    // Allow a → b on the named port serve-81-tcp only.
    e.set_policy(
        "x/knp.default.allow-a",
        Some(knp(
            r#"{"podSelector":{"matchLabels":{"pod":"b"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"a"}}}],"ports":[{"port":"serve-81-tcp"}]}]}"#,
            "x",
        )),
    );
    program(&mut m, &mut e).await;
    assert!(reaches(&a.ns, b.ip, 81), "allowed on the named port");
    assert!(!reaches(&a.ns, b.ip, 80), "other ports stay denied");
    assert!(!reaches(&c.ns, b.ip, 81), "other sources stay denied");

    // A label change is a set-element change: c becomes pod=a and is let in.
    e.set_item("wep/x/c", Some(endpoint("x", &[("pod", "a")], c.ip, &c.iface)));
    let d = e.take_dirty();
    assert!(d.policies.is_empty() && d.sets.len() == 1, "only the selector's set changes: {d:?}");
    m.apply(&e, &d).await.unwrap();
    assert!(reaches(&c.ns, b.ip, 81));

    // Calico order and Deny: a global policy before the Kubernetes ones denies a's egress to b.
    let gnp: gingham_api::policy::GlobalNetworkPolicySpec = serde_json::from_str(
        r#"{"order":10,"selector":"pod == 'a'","types":["Egress"],"egress":[
            {"action":"Deny","protocol":"TCP","destination":{"nets":["10.70.0.2/32"]}},{"action":"Allow"}]}"#,
    )
    .unwrap();
    e.set_policy("deny-a-to-b", Some(rules::global_network_policy(&gnp).unwrap()));
    program(&mut m, &mut e).await;
    assert!(!reaches(&a.ns, b.ip, 81), "denied by a's egress policy");
    assert!(reaches(&a.ns, c.ip, 80), "the rest of a's egress allowed");

    // Removing everything leaves no chain or set behind but the base.
    for p in ["deny-a-to-b", "x/knp.default.allow-a", "x/knp.default.deny"] {
        e.set_policy(p, None);
    }
    program(&mut m, &mut e).await;
    let listing = nft.list_table(&gingham_dataplane::policy::table()).await.unwrap().unwrap();
    assert!(!listing.contains("chain pi-") && !listing.contains("set s4-"), "{listing}");
    assert!(reaches(&a.ns, b.ip, 80));
    m.remove().await.unwrap();
}

/// Replicas share their policy chain: workloads with the same policies use one `si-` chain,
/// a label change onto an existing list makes no new chain, the last workload leaving a list
/// removes its chain, and a list left and taken up in one batch stays whole — all checked by
/// real connections as well as by the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_policy_chain() {
    let node = node("snode");
    let (a, b, c) = (pod(&node, "sa", "10.72.0.1"), pod(&node, "sb", "10.72.0.2"), pod(&node, "sc", "10.72.0.3"));
    let _servers: Vec<Server> = [&a, &b, &c].iter().map(|p| serve(&p.ns, p.ip)).collect();
    let nft = Nft::in_namespace_file(&File::open(&node.1).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft.clone(), PolicyConfig::default());
    let mut e = Engine::default();
    e.set_namespace("x", Some(&[("ns".to_string(), "x".to_string())].into()));
    let app = |p: &Pod, app: &str| endpoint("x", &[("app", app)], p.ip, &p.iface);
    e.set_item("wep/x/a", Some(app(&a, "web")));
    e.set_item("wep/x/b", Some(app(&b, "web")));
    e.set_item("wep/x/c", Some(app(&c, "client")));
    e.set_policy(
        "x/knp.default.web",
        Some(knp(
            r#"{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],"ports":[{"port":80}]}]}"#,
            "x",
        )),
    );
    program(&mut m, &mut e).await;
    let chains = |listing: &str, prefix: &str| -> BTreeSet<String> {
        listing
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain ")?.strip_suffix(" {"))
            .filter(|c| c.starts_with(prefix))
            .map(str::to_string)
            .collect()
    };
    let listing = || async { nft.list_table(&gingham_dataplane::policy::table()).await.unwrap().unwrap() };
    let l = listing().await;
    // web's list (a, b) and client's (c); one egress list for all three.
    assert_eq!(chains(&l, "si-").len(), 2, "{l}");
    assert_eq!(chains(&l, "so-").len(), 1, "{l}");
    assert!(reaches(&c.ns, a.ip, 80) && reaches(&c.ns, b.ip, 80), "client → web on 80");
    assert!(!reaches(&c.ns, a.ip, 81), "not on 81");
    assert!(!reaches(&a.ns, b.ip, 80), "web is not a client");

    // b becomes a client: it takes up client's chain; nothing new is made.
    let before = chains(&l, "si-");
    e.set_item("wep/x/b", Some(app(&b, "client")));
    program(&mut m, &mut e).await;
    let l = listing().await;
    assert_eq!(chains(&l, "si-"), before, "{l}");
    assert!(reaches(&b.ns, a.ip, 80) && reaches(&a.ns, b.ip, 81), "b is a client now, and open");

    // In one batch a (web's last member) becomes a client and c becomes web: the web chain is
    // left and taken up again, and must stay whole.
    e.set_item("wep/x/a", Some(app(&a, "client")));
    e.set_item("wep/x/c", Some(app(&c, "web")));
    program(&mut m, &mut e).await;
    let l = listing().await;
    assert_eq!(chains(&l, "si-"), before, "{l}");
    assert!(reaches(&a.ns, c.ip, 80) && reaches(&b.ns, c.ip, 80), "clients → web on 80");
    assert!(!reaches(&a.ns, c.ip, 81), "web's policy is whole: 81 stays closed");
    assert!(reaches(&c.ns, a.ip, 81), "a is open");

    // The last web member leaves: its chain goes.
    e.set_item("wep/x/c", None);
    program(&mut m, &mut e).await;
    let l = listing().await;
    assert_eq!(chains(&l, "si-").len(), 1, "{l}");
    assert!(reaches(&a.ns, b.ip, 81));
    m.remove().await.unwrap();
}

/// A denied flow stays denied while 100 policy changes land (each rewrites a policy chain of
/// the same endpoint and moves set elements): not one packet gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_window_while_policies_change() {
    let node = node("rnode");
    let (a, b) = (pod(&node, "ra", "10.71.0.1"), pod(&node, "rb", "10.71.0.2"));
    let nft = Nft::in_namespace_file(&File::open(&node.1).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft, PolicyConfig::default());
    let mut e = Engine::default();
    e.set_item("wep/x/a", Some(endpoint("x", &[("pod", "a")], a.ip, &a.iface)));
    e.set_item("wep/x/b", Some(endpoint("x", &[("pod", "b")], b.ip, &b.iface)));
    let allow_c = |port: u16| {
        knp(
            &format!(
                r#"{{"podSelector":{{"matchLabels":{{"pod":"b"}}}},"ingress":[{{"from":[{{"podSelector":{{"matchLabels":{{"pod":"c{port}"}}}}}}],"ports":[{{"port":{port},"protocol":"UDP"}}]}}]}}"#
            ),
            "x",
        )
    };
    e.set_policy("x/knp.default.allow-c", Some(allow_c(80)));
    program(&mut m, &mut e).await;

    // b counts what arrives on UDP 80; a sends to it every millisecond.
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (g, s) = (got.clone(), stop.clone());
    let ip_b = b.ip;
    let receiver = inside(&b.ns, move || {
        let sock = std::net::UdpSocket::bind((ip_b, 80)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 16];
        while !s.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                g.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let (s, sent) = (stop.clone(), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let sent2 = sent.clone();
    let sender = inside(&a.ns, move || {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        while !s.load(Ordering::Relaxed) {
            if sock.send_to(b"x", (ip_b, 80)).is_ok() {
                sent2.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    while sent.load(Ordering::Relaxed) < 10 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for i in 0..100u16 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        // Each change rewrites b's policy chain (another port, another selector set) and moves an
        // unrelated endpoint in and out of a set.
        e.set_policy("x/knp.default.allow-c", Some(allow_c(1000 + i)));
        let labels = [("pod", if i % 2 == 0 { "c1000" } else { "other" })];
        e.set_item("wep/x/c", Some(endpoint("x", &labels, "10.71.0.9", "calinowhere")));
        program(&mut m, &mut e).await;
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    receiver.join().unwrap();
    assert!(sent.load(Ordering::Relaxed) > 100, "the flow ran during the changes");
    assert_eq!(got.load(Ordering::Relaxed), 0, "a denied flow got packets through while policy changed");
    // And the policy really was the only thing in the way.
    e.set_policy("x/knp.default.allow-c", None);
    program(&mut m, &mut e).await;
    let ip_b = b.ip;
    let open = inside(&b.ns, move || {
        let sock = std::net::UdpSocket::bind((ip_b, 80)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        sock
    })
    .join()
    .unwrap();
    inside(&a.ns, move || std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap().send_to(b"x", (ip_b, 80)).unwrap())
        .join()
        .unwrap();
    let mut buf = [0u8; 4];
    assert!(open.recv(&mut buf).is_ok(), "without the policy the packet arrives");
    m.remove().await.unwrap();
}

/// Host endpoints guard the host's own traffic on their interface: nothing but failsafe ports
/// until policy allows, in both directions; FelixConfiguration moves the failsafe ports and
/// decides workload-to-host traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_endpoints_and_failsafe_ports() {
    let node = node("hnode");
    let peer = ns("hpeer");
    let iface = format!("hep{}", std::process::id() % 100000);
    run(
        &node,
        &["ip", "link", "add", &iface, "type", "veth", "peer", "name", "eth0", "netns", &peer.1.to_string_lossy()],
    );
    run(&node, &["ip", "addr", "add", "198.51.100.1/24", "dev", &iface]);
    run(&node, &["ip", "link", "set", &iface, "up"]);
    run(&peer, &["ip", "link", "set", "lo", "up"]);
    run(&peer, &["ip", "addr", "add", "198.51.100.2/24", "dev", "eth0"]);
    run(&peer, &["ip", "link", "set", "eth0", "up"]);
    run(&peer, &["ip", "route", "add", "10.72.0.0/16", "via", "198.51.100.1"]);
    let w = pod(&node, "hw", "10.72.0.1");
    let _host = serve_on(&node, "0.0.0.0", &[22, 8080, 9090]);
    let _remote = serve_on(&peer, "198.51.100.2", &[179, 8080]);
    let nft = Nft::in_namespace_file(&File::open(&node.1).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft.clone(), PolicyConfig::default());
    let mut e = Engine::for_node("hnode");
    e.set_item("wep/x/hw", Some(endpoint("x", &[("pod", "hw")], w.ip, &w.iface)));
    program(&mut m, &mut e).await;
    assert!(reaches(&peer, "198.51.100.1", 9090) && reaches(&node, "198.51.100.2", 8080), "no host endpoint yet");

    // The host endpoint alone: no policy, no profile — only failsafe ports, in and out.
    let hep = Item {
        data: ItemData {
            labels: [("role".to_string(), "node".to_string())].into(),
            profiles: vec![],
            nets: vec!["198.51.100.1/32".parse().unwrap()],
            ports: vec![],
        },
        local_interface: Some(iface.clone()),
    };
    e.set_item("hep/hnode-eth", Some(hep));
    program(&mut m, &mut e).await;
    assert!(!reaches(&peer, "198.51.100.1", 8080), "a host endpoint with no policy denies");
    assert!(reaches(&peer, "198.51.100.1", 22), "inbound failsafe tcp:22");
    assert!(!reaches(&node, "198.51.100.2", 8080), "outbound denied too");
    assert!(reaches(&node, "198.51.100.2", 179), "outbound failsafe tcp:179");
    assert!(reaches(&w.ns, "198.51.100.1", 8080), "workload to host is not host endpoint traffic");

    // Ingress allowed on 8080 by a global policy; egress still has nothing.
    let gnp: gingham_api::policy::GlobalNetworkPolicySpec = serde_json::from_str(
        r#"{"selector":"role == 'node'","types":["Ingress"],"ingress":[
            {"action":"Allow","protocol":"TCP","destination":{"ports":[8080]}}]}"#,
    )
    .unwrap();
    e.set_policy("host-8080", Some(rules::global_network_policy(&gnp).unwrap()));
    program(&mut m, &mut e).await;
    assert!(reaches(&peer, "198.51.100.1", 8080), "allowed by the host endpoint's policy");
    assert!(!reaches(&peer, "198.51.100.1", 9090), "other ports stay denied");
    assert!(!reaches(&node, "198.51.100.2", 8080), "egress has no policy");

    // FelixConfiguration: failsafe inbound is now tcp:9090 only; workloads may not reach the host.
    let felix: gingham_api::network::FelixConfigurationSpec = serde_json::from_str(
        r#"{"failsafeInboundHostPorts":[{"protocol":"TCP","port":9090}],"defaultEndpointToHostAction":"Drop"}"#,
    )
    .unwrap();
    m.set_config(PolicyConfig::from_felix(Some(&felix), None).unwrap());
    program(&mut m, &mut e).await;
    assert!(reaches(&peer, "198.51.100.1", 9090), "the configured failsafe port");
    assert!(!reaches(&peer, "198.51.100.1", 22), "tcp:22 is no longer failsafe");
    assert!(!reaches(&w.ns, "198.51.100.1", 8080), "defaultEndpointToHostAction Drop");
    assert!(reaches(&w.ns, "198.51.100.2", 8080), "forwarded workload traffic is not to the host");
    let bad: gingham_api::network::FelixConfigurationSpec =
        serde_json::from_str(r#"{"failsafeOutboundHostPorts":[{"protocol":"icmp","port":1}]}"#).unwrap();
    let err = PolicyConfig::from_felix(Some(&felix), Some(&bad)).unwrap_err();
    assert!(err.contains("spec.failsafeOutboundHostPorts[0].protocol"), "{err}");

    // An all-interfaces host endpoint takes the peer's interface too once the named one goes.
    e.set_item("hep/hnode-eth", None);
    let all = Item {
        data: ItemData { labels: [("role".to_string(), "node".to_string())].into(), ..Default::default() },
        local_interface: Some("*".into()),
    };
    e.set_item("hep/hnode-all", Some(all));
    program(&mut m, &mut e).await;
    assert!(reaches(&peer, "198.51.100.1", 8080) && !reaches(&peer, "198.51.100.1", 22));
    e.set_item("hep/hnode-all", None);
    program(&mut m, &mut e).await;
    assert!(reaches(&peer, "198.51.100.1", 22) && reaches(&node, "198.51.100.2", 8080), "no host endpoint left");
    m.remove().await.unwrap();
}

/// A table changed by someone else is noticed (and only then): another table's change, traffic
/// moving counters and our own changes are not drift; a flushed chain is, and the next apply
/// restores it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_changed_by_hand_is_noticed_and_restored() {
    let node = node("drift");
    let (a, b) = (pod(&node, "da", "10.70.3.1"), pod(&node, "db", "10.70.3.2"));
    let _servers: Vec<Server> = [&a, &b].iter().map(|p| serve(&p.ns, p.ip)).collect();
    let nft = Nft::in_namespace_file(&File::open(&node.1).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft.clone(), PolicyConfig::default());
    let mut e = Engine::default();
    e.set_namespace("x", Some(&[("ns".to_string(), "x".to_string())].into()));
    e.set_item("wep/x/a", Some(endpoint("x", &[("pod", "a")], a.ip, &a.iface)));
    e.set_item("wep/x/b", Some(endpoint("x", &[("pod", "b")], b.ip, &b.iface)));
    e.set_policy("x/knp.default.deny", Some(knp(r#"{"podSelector":{"matchLabels":{"pod":"b"}}}"#, "x")));
    program(&mut m, &mut e).await;
    assert!(!m.check_drift().await.unwrap(), "our own transaction is not drift");
    assert!(!reaches(&a.ns, b.ip, 80));
    let before = nft.list_table(&gingham_dataplane::policy::table()).await.unwrap().unwrap();

    // Someone else's table, and counters moved by traffic: not ours to repair.
    run(&node, &["nft", "add", "table", "inet", "someone-else"]);
    assert!(reaches(&b.ns, a.ip, 80));
    assert!(!m.check_drift().await.unwrap(), "another table's change is not drift");
    assert!(!m.check_drift().await.unwrap(), "nothing changed since");
    e.set_item("wep/x/a", Some(endpoint("x", &[("pod", "a"), ("v", "2")], a.ip, &a.iface)));
    program(&mut m, &mut e).await;
    assert!(!m.check_drift().await.unwrap(), "a change of ours is not drift");

    // By hand: the forward chain flushed opens b to everyone, until restored.
    run(&node, &["nft", "flush", "chain", "inet", "gingham", "forward"]);
    assert!(reaches(&a.ns, b.ip, 80), "the flush really opened the path");
    assert!(m.check_drift().await.unwrap(), "a flushed chain of ours is drift");
    assert!(!m.is_built());
    program(&mut m, &mut e).await;
    assert!(!reaches(&a.ns, b.ip, 80), "restored");
    let after = nft.list_table(&gingham_dataplane::policy::table()).await.unwrap().unwrap();
    let strip = |t: &str| t.lines().filter(|l| !l.contains("packets")).map(str::to_string).collect::<Vec<_>>();
    let forward =
        |t: &str| strip(t).into_iter().skip_while(|l| !l.contains("chain forward")).take(12).collect::<Vec<_>>();
    assert_eq!(forward(&after), forward(&before));
    // A deleted table too.
    run(&node, &["nft", "delete", "table", "inet", "gingham"]);
    assert!(m.check_drift().await.unwrap(), "a deleted table is drift");
    program(&mut m, &mut e).await;
    assert!(!m.check_drift().await.unwrap());
    run(&node, &["nft", "delete", "table", "inet", "someone-else"]);
    m.remove().await.unwrap();
}

/// Beside kube-proxy: a Service's DNAT (an nftables nat rule as kube-proxy's nftables mode
/// writes) happens before policy, so the backend's policy sees the client pod and the backend
/// pod, never the service address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_applies_to_service_traffic_after_dnat() {
    let node = node("svc");
    let (a, b, c) = (pod(&node, "sa", "10.70.4.1"), pod(&node, "sb", "10.70.4.2"), pod(&node, "sc", "10.70.4.3"));
    let _servers: Vec<Server> = [&b].iter().map(|p| serve(&p.ns, p.ip)).collect();
    // The Service 10.96.0.10:80 → b:80 (and :81 → b:81), as kube-proxy's nftables mode does.
    let kp = "table ip kube-proxy-test {\n chain nat-prerouting {\n  type nat hook prerouting priority dstnat;\n  \
              ip daddr 10.96.0.10 tcp dport 80 dnat to 10.70.4.2:80\n  ip daddr 10.96.0.10 tcp dport 81 dnat to 10.70.4.2:81\n }\n}\n";
    let rules = std::env::temp_dir().join(format!("gingham-kp-{}.nft", std::process::id()));
    std::fs::write(&rules, kp).unwrap();
    run(&node, &["nft", "-f", rules.to_str().unwrap()]);
    let _ = std::fs::remove_file(&rules);
    let nft = Nft::in_namespace_file(&File::open(&node.1).unwrap()).unwrap();
    let mut m = PolicyManager::new(nft.clone(), PolicyConfig::default());
    let mut e = Engine::default();
    e.set_namespace("x", Some(&[("ns".to_string(), "x".to_string())].into()));
    for (key, p, label) in [("wep/x/a", &a, "a"), ("wep/x/b", &b, "b"), ("wep/x/c", &c, "c")] {
        e.set_item(key, Some(endpoint("x", &[("pod", label)], p.ip, &p.iface)));
    }
    program(&mut m, &mut e).await;
    assert!(reaches(&a.ns, "10.96.0.10", 80), "the service works without policy");
    assert!(reaches(&c.ns, "10.96.0.10", 80));

    // The backend admits pod a on port 80 only; and a rule naming the service address
    // matches nothing (policy sees the backend's address).
    e.set_policy(
        "x/knp.default.backend",
        Some(knp(
            r#"{"podSelector":{"matchLabels":{"pod":"b"}},"ingress":[
                {"from":[{"podSelector":{"matchLabels":{"pod":"a"}}}],"ports":[{"port":80}]},
                {"from":[{"ipBlock":{"cidr":"10.70.4.3/32"}}],"ports":[{"port":81}]}]}"#,
            "x",
        )),
    );
    program(&mut m, &mut e).await;
    assert!(reaches(&a.ns, "10.96.0.10", 80), "a → service → b:80 is allowed");
    assert!(!reaches(&a.ns, "10.96.0.10", 81), "port 81 is not allowed for a");
    assert!(!reaches(&c.ns, "10.96.0.10", 80), "c is not allowed on 80 through the service");
    assert!(reaches(&c.ns, "10.96.0.10", 81), "c's own address is what the backend's policy sees");
    assert!(!reaches(&c.ns, b.ip, 80), "and directly, the same");

    // Egress: a may talk only to the service's address → denied (its egress sees b's address).
    let gnp: gingham_api::policy::GlobalNetworkPolicySpec = serde_json::from_str(
        r#"{"selector":"pod == 'a'","types":["Egress"],"egress":[{"action":"Allow","destination":{"nets":["10.96.0.10/32"]}}]}"#,
    )
    .unwrap();
    e.set_policy("a-to-service-address", Some(rules::global_network_policy(&gnp).unwrap()));
    program(&mut m, &mut e).await;
    assert!(!reaches(&a.ns, "10.96.0.10", 80), "egress policy sees the backend address, not the service's");
    m.remove().await.unwrap();
    run(&node, &["nft", "delete", "table", "ip", "kube-proxy-test"]);
}
