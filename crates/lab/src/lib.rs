//! `gingham lab`: a cluster on one machine. An underlay namespace holds a bridge (two, routed,
//! for CrossSubnet); each node is a namespace with an `eth0` on the underlay and its own
//! `gingham node run`; pods are namespaces wired by the real CNI plugin, as a runtime would.
//! Everything the lab makes is recorded in its state file and removed by `down`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gingham_kernel::{Netlink, Route, in_netns, netns, open_netns};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::json;

const NETWORK: &str = "k8s-pod-network";
const CHECK_PORT: u16 = 7777;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Kernel(#[from] gingham_kernel::KernelError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

mod kube;

fn msg(m: impl Into<String>) -> LabError {
    LabError::Msg(m.into())
}

pub type Result<T> = std::result::Result<T, LabError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encap {
    Vxlan,
    VxlanCrosssubnet,
    None,
    Ipip,
}

impl Encap {
    pub fn parse(s: &str) -> Result<Encap> {
        Ok(match s {
            "vxlan" => Encap::Vxlan,
            "vxlan-crosssubnet" => Encap::VxlanCrosssubnet,
            "none" => Encap::None,
            "ipip" => Encap::Ipip,
            other => return Err(msg(format!("--encap {other}: use vxlan, vxlan-crosssubnet, none or ipip"))),
        })
    }
    fn pool_modes(self) -> (&'static str, &'static str) {
        match self {
            Encap::Vxlan => ("Never", "Always"),
            Encap::VxlanCrosssubnet => ("Never", "CrossSubnet"),
            Encap::None => ("Never", "Never"),
            Encap::Ipip => ("Always", "Never"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: IpNet,
    pub socket: PathBuf,
    pub agent_pid: Option<i32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    /// `namespace/name`
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub dir: PathBuf,
    pub encap: Encap,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Environment every gingham command needs to reach the lab's datastore.
    pub env: BTreeMap<String, String>,
    pub etcd_pid: Option<i32>,
    /// kube-apiserver (`--datastore kubernetes`), and where it and kubectl are.
    #[serde(default)]
    pub kube_pid: Option<i32>,
    #[serde(default)]
    pub kube_bin: Option<PathBuf>,
    /// The ToR router's FRR daemons (`--tor`), and the directory they run in (outside `dir`:
    /// FRR drops to user frr, who must reach it).
    #[serde(default)]
    pub tor_pids: Vec<i32>,
    /// `gingham controllers run`, in this (the host's) namespace.
    #[serde(default)]
    pub controllers_pid: Option<i32>,
    #[serde(default)]
    pub tor_dir: Option<PathBuf>,
    pub namespaces: Vec<String>,
    /// Prefix of every namespace name (several labs can coexist with different prefixes).
    pub prefix: String,
    /// Files and directories the lab created under `dir`, relative to it, in creation order:
    /// `down` removes exactly these (and the store's own -wal/-shm companions).
    #[serde(default)]
    pub files: Vec<String>,
    /// Whether `up` created `dir` itself (then `down` removes it once it is empty).
    #[serde(default)]
    pub created_dir: bool,
    /// Pods addressed by host-local on their Node's podCIDR (`--ipam host-local`).
    #[serde(default)]
    pub host_local: bool,
}

/// The file that marks a directory as a lab's.
pub const STATE_FILE: &str = "state.json";

pub fn default_dir() -> PathBuf {
    std::env::var_os("GINGHAM_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/run/gingham-lab"))
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

impl State {
    pub fn underlay(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    pub fn load(dir: &Path) -> Result<State> {
        let path = state_path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(msg(format!("no lab at {}: run `gingham lab up` first", dir.display())));
            }
            Err(e) => return Err(msg(format!("{}: {e}", path.display()))),
        };
        serde_json::from_str(&text).map_err(|e| {
            msg(format!(
                "{} is not a readable lab state ({e}); nothing was changed: stop the lab's agents and remove its namespaces by hand",
                path.display()
            ))
        })
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| msg(e.to_string()))?;
        gingham_files::write_atomic(&state_path(&self.dir), &text, 0o644).map_err(|e| msg(e.to_string()))
    }

    /// Record a file or directory the lab is about to create, before creating it.
    fn record(&mut self, rel: &str) -> Result<PathBuf> {
        if !self.files.iter().any(|f| f == rel) {
            self.files.push(rel.to_string());
            self.save()?;
        }
        Ok(self.dir.join(rel))
    }

    /// Create a new log file (refusing anything already there, symlinks included).
    fn new_log(&mut self, rel: &str) -> Result<std::fs::File> {
        let path = self.record(rel)?;
        gingham_files::create_exclusive(&path, 0o644).map_err(|e| msg(e.to_string()))
    }

    pub fn pod(&self, name: &str) -> Result<&PodState> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| msg(format!("no pod {name} in the lab (see `gingham lab status`)")))
    }
}

fn ns_path(ns: &str) -> PathBuf {
    netns::path(ns)
}

/// A command that runs inside network namespace `ns`.
fn in_ns_command(ns: &str, program: &Path) -> Result<Command> {
    Ok(netns::command(&open_netns(&ns_path(ns))?, program)?)
}

fn add_ns(state: &mut State, ns: &str) -> Result<Netlink> {
    netns::add(ns)?;
    state.namespaces.push(ns.to_string());
    state.save()?;
    Ok(Netlink::in_namespace(&ns_path(ns))?)
}

/// `net.ipv4.ip_forward=1` inside `ns`.
fn forward(ns: &str) -> Result<()> {
    Ok(gingham_kernel::sysctl::write_in(
        &ns_path(ns),
        vec![(vec!["net".into(), "ipv4".into(), "ip_forward".into()], "1".into())],
    )?)
}

/// The index of a link that must exist.
async fn index(nl: &Netlink, name: &str) -> Result<u32> {
    nl.link(name).await?.map(|l| l.index).ok_or_else(|| msg(format!("interface {name} is missing")))
}

/// Bring a link up, with an address if given.
async fn up_with(nl: &Netlink, name: &str, addr: Option<IpNet>) -> Result<u32> {
    let i = index(nl, name).await?;
    if let Some(a) = addr {
        nl.add_address(i, a).await?;
    }
    nl.set_up(i).await?;
    Ok(i)
}

fn net(s: &str) -> Result<IpNet> {
    s.parse().map_err(|e: ipnet::AddrParseError| msg(format!("{s}: {e}")))
}

/// Routes the lab itself adds carry RTPROT_BOOT, as `ip route add` would.
const LAB_PROTO: u8 = 3;

fn progress(quiet: bool, m: &str) {
    if !quiet {
        eprintln!("  {m}");
    }
}

pub struct UpOptions {
    pub prefix: String,
    pub nodes: usize,
    pub pods_per_node: usize,
    pub encap: Encap,
    pub etcd: bool,
    /// The Kubernetes API as the datastore (on the lab's etcd), the lab playing the kubelet.
    pub kubernetes: bool,
    pub quiet: bool,
    /// A route-reflector setup from the seeds instead of the node-to-node mesh.
    pub bgp_topology: Option<BgpTopology>,
    /// An FRR "top-of-rack" router on the underlay that every node peers with over eBGP.
    pub tor: bool,
    /// The Kubernetes e2e network-policy model instead of the default pods: namespaces x, y, z
    /// with pods a, b, c each ([`NETPOL_PODS`]).
    pub netpol_model: bool,
    /// Addresses from host-local on each Node's podCIDR (Kubernetes datastore only).
    pub host_local: bool,
}

/// What a pod gets besides its labels: fixed addresses, named ports, a service account.
#[derive(Clone, Debug, Default)]
pub struct PodExtras {
    pub ips: Vec<String>,
    /// (name, protocol, port)
    pub named_ports: Vec<(String, String, u16)>,
    pub service_account: Option<String>,
    /// Annotations of the Pod object (only a lab on the Kubernetes API has Pod objects).
    pub annotations: BTreeMap<String, String>,
}

/// The e2e model's pods in probe order, with their addresses and nodes (most pairs cross nodes).
pub const NETPOL_PODS: [(&str, &str, usize); 9] = [
    ("x/a", "172.20.1.1", 1),
    ("x/b", "172.20.1.2", 2),
    ("x/c", "172.20.1.3", 3),
    ("y/a", "172.20.2.1", 2),
    ("y/b", "172.20.2.2", 3),
    ("y/c", "172.20.2.3", 1),
    ("z/a", "172.20.3.1", 3),
    ("z/b", "172.20.3.2", 1),
    ("z/c", "172.20.3.3", 2),
];

fn netpol_resources(encap: Encap) -> String {
    let (ipip, vxlan) = encap.pool_modes();
    let mut y = format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: netpol-model\nspec:\n  cidr: 172.20.0.0/16\n  \
         blockSize: 24\n  ipipMode: {ipip}\n  vxlanMode: {vxlan}\n  natOutgoing: false\n  nodeSelector: '!all()'\n"
    );
    for n in ["x", "y", "z"] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: '{n}'\n  labels:\n    ns: '{n}'\n    \
             kubernetes.io/metadata.name: '{n}'\n"
        ));
    }
    y
}

/// The two route-reflector setups of ../shared/examples/seeds (bgppeer-rr-mode1.yaml,
/// bgppeer-rr-mode2.yaml, node-rr.yaml, bgpconfiguration-no-mesh.yaml), resources as there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BgpTopology {
    /// node-1 and node-2 reflect (label calico-rr, cluster 224.0.0.1); everyone else is a
    /// client of both.
    Rr1,
    /// Two AS groups: 64512 (node-1 reflects for node-2, node-3) and 64513 (node-4 reflects
    /// for node-5, node-6); the reflectors peer over eBGP.
    Rr2,
}

impl BgpTopology {
    pub fn parse(s: &str) -> Result<BgpTopology> {
        match s {
            "rr1" => Ok(BgpTopology::Rr1),
            "rr2" => Ok(BgpTopology::Rr2),
            other => Err(msg(format!("--bgp-topology {other}: use rr1 or rr2"))),
        }
    }

    /// The resources to apply before the agents start: the mesh off, each Node's labels,
    /// AS and cluster ID, the BGPPeers.
    pub fn resources(self, nodes: usize) -> Result<String> {
        let mut y = String::from(
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n\
             spec: {logSeverityScreen: Info, nodeToNodeMeshEnabled: false, asNumber: 64512}\n",
        );
        let node = |name: &str, labels: &str, bgp: &str| {
            format!(
                "---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec: {{bgp: {{{bgp}}}}}\n"
            )
        };
        let peer = |name: &str, nodes: &str, peers: &str| {
            format!(
                "---\napiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {{name: {name}}}\nspec: {{nodeSelector: \"{nodes}\", peerSelector: \"{peers}\"}}\n"
            )
        };
        match self {
            BgpTopology::Rr1 => {
                if nodes < 3 {
                    return Err(msg("--bgp-topology rr1 needs at least 3 nodes (2 reflectors and a client)"));
                }
                for i in 1..=nodes {
                    y.push_str(&if i <= 2 {
                        node(
                            &format!("node-{i}"),
                            "calico-rr: 'true'",
                            "asNumber: 64512, routeReflectorClusterID: 224.0.0.1",
                        )
                    } else {
                        node(&format!("node-{i}"), "", "asNumber: 64512")
                    });
                }
                y.push_str(&peer("rr-to-node", "!has(calico-rr)", "has(calico-rr)"));
                y.push_str(&peer("rr-to-rr", "has(calico-rr)", "has(calico-rr)"));
            }
            BgpTopology::Rr2 => {
                if nodes != 6 {
                    return Err(msg("--bgp-topology rr2 is the seeds' six-node setup: use --nodes 6"));
                }
                for i in 1..=6 {
                    let (asn, group) = if i <= 3 { (64512, "rr1") } else { (64513, "rr2") };
                    y.push_str(&if i == 1 || i == 4 {
                        node(
                            &format!("node-{i}"),
                            &format!("calico-group: {group}"),
                            &format!("asNumber: {asn}, routeReflectorClusterID: 224.0.0.1"),
                        )
                    } else {
                        node(&format!("node-{i}"), &format!("calico-rr: {group}"), &format!("asNumber: {asn}"))
                    });
                }
                y.push_str(&peer("rr1-to-node", "calico-rr == 'rr1'", "calico-group == 'rr1'"));
                y.push_str(&peer("rr2-to-node", "calico-rr == 'rr2'", "calico-group == 'rr2'"));
                y.push_str(&peer("rr1-to-rr2", "calico-group == 'rr1'", "calico-group == 'rr2'"));
            }
        }
        Ok(y)
    }
}

/// Build the lab (tearing down a stale one first).
pub async fn up(dir: &Path, exe: &Path, o: &UpOptions) -> Result<State> {
    if state_path(dir).exists() {
        progress(o.quiet, "removing the previous lab");
        down(dir)?;
    }
    // The underlay of an unrecorded lab with this prefix.
    let _ = netns::delete(&format!("{}-underlay", o.prefix));
    let created_dir = match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(msg(format!(
                    "{} is not empty and holds no lab ({STATE_FILE}): choose another --dir",
                    dir.display()
                )));
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            gingham_files::ensure_dir(dir, 0o755).map_err(|e| msg(e.to_string()))?;
            true
        }
        Err(e) => return Err(msg(format!("{}: {e}", dir.display()))),
    };
    if o.host_local && !o.kubernetes {
        return Err(msg(
            "host-local IPAM takes its subnets from Kubernetes Nodes' podCIDRs: use --datastore kubernetes",
        ));
    }
    let mut state = State {
        dir: dir.to_path_buf(),
        encap: o.encap,
        nodes: vec![],
        pods: vec![],
        env: BTreeMap::new(),
        etcd_pid: None,
        kube_pid: None,
        kube_bin: None,
        tor_pids: vec![],
        controllers_pid: None,
        tor_dir: None,
        namespaces: vec![],
        prefix: o.prefix.clone(),
        files: vec![],
        created_dir,
        host_local: o.host_local,
    };
    state.save()?;
    if !o.etcd && !o.kubernetes {
        let store = state.record("store.db")?;
        state.env.insert("DATASTORE_TYPE".into(), "embedded".into());
        state.env.insert("GINGHAM_STORE_PATH".into(), store.display().to_string());
    }
    state.save()?;

    let underlay_ns = state.underlay();
    progress(o.quiet, &format!("underlay: namespace {underlay_ns}, bridge br0 10.99.0.1/24"));
    let underlay = add_ns(&mut state, &underlay_ns)?;
    let cross = o.encap == Encap::VxlanCrosssubnet;
    let br0 = underlay.add_bridge("br0").await?;
    up_with(&underlay, "br0", Some(net("10.99.0.1/24")?)).await?;
    up_with(&underlay, "lo", None).await?;
    let br1 = if cross {
        // A second subnet behind the underlay acting as a router.
        let br1 = underlay.add_bridge("br1").await?;
        up_with(&underlay, "br1", Some(net("10.99.1.1/24")?)).await?;
        forward(&underlay_ns)?;
        Some(br1)
    } else {
        None
    };

    if o.etcd || o.kubernetes {
        // etcd lives on the underlay (10.99.0.1), where every node reaches it as in a real
        // cluster; a veth from this namespace into the underlay lets the CLI reach it too.
        progress(o.quiet, "etcd on the underlay at 10.99.0.1:2379");
        let host_end = format!("{}-host", state.prefix);
        let host = Netlink::current()?;
        host.add_veth(&host_end, "uplink", &open_netns(&ns_path(&underlay_ns))?, 1500, None).await?;
        up_with(&host, &host_end, Some(net("10.99.0.254/24")?)).await?;
        let uplink = up_with(&underlay, "uplink", None).await?;
        underlay.set_master(uplink, br0).await?;
        let ep = "http://10.99.0.1:2379".to_string();
        let log = state.new_log("etcd.log")?;
        let data = state.record("etcd")?;
        let mut cmd = in_ns_command(&underlay_ns, Path::new("/usr/bin/etcd"))?;
        cmd.arg("--name=lab")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={ep}"))
            .arg(format!("--advertise-client-urls={ep}"))
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=lab=http://127.0.0.1:2380")
            .arg("--log-level=error")
            .arg("--logger=zap")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| msg(format!("cannot start etcd (install etcd-server): {e}")))?;
        state.etcd_pid = Some(child.id() as i32);
        state.env.insert("DATASTORE_TYPE".into(), "etcdv3".into());
        state.env.insert("ETCD_ENDPOINTS".into(), ep.clone());
        state.save()?;
        if o.kubernetes {
            kube::start(&mut state, &underlay_ns, &ep, o.quiet)?;
        }
    }
    let store = connect(&state).await?;

    let (ipip, vxlan) = o.encap.pool_modes();
    let pool = format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: default-ipv4-ippool}}\nspec: {{cidr: 172.20.0.0/16, blockSize: 26, ipipMode: {ipip}, vxlanMode: {vxlan}, natOutgoing: true}}\n"
    );
    apply(&store, &pool).await?;
    if let Some(t) = o.bgp_topology {
        progress(o.quiet, &format!("BGP: route reflectors as in the seeds ({t:?}), node-to-node mesh off"));
        apply(&store, &t.resources(o.nodes)?).await?;
    }
    if o.tor {
        progress(o.quiet, &format!("ToR: FRR in namespace {}-tor, eth0 {TOR_IP}/24, AS {TOR_AS}", state.prefix));
        tor(&mut state, &underlay, br0).await?;
        let peer = format!(
            "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {{name: tor}}\nspec: {{peerIP: {TOR_IP}, asNumber: {TOR_AS}}}\n"
        );
        apply(&store, &peer).await?;
    }
    for i in 1..=o.nodes {
        let name = format!("node-{i}");
        let ns = format!("{}-{name}", state.prefix);
        let subnet = if cross && i % 2 == 0 { 1 } else { 0 };
        let ip: IpNet =
            format!("10.99.{subnet}.{}/24", 10 + i).parse().map_err(|e: ipnet::AddrParseError| msg(e.to_string()))?;
        progress(o.quiet, &format!("{name}: namespace {ns}, eth0 {ip}, agent"));
        let node_nl = add_ns(&mut state, &ns)?;
        let port = name.clone();
        underlay.add_veth(&port, "eth0", &open_netns(&ns_path(&ns))?, 1500, None).await?;
        let port_index = up_with(&underlay, &port, None).await?;
        underlay.set_master(port_index, if subnet == 1 { br1.unwrap_or(br0) } else { br0 }).await?;
        let eth0 = up_with(&node_nl, "eth0", Some(ip)).await?;
        let lo = up_with(&node_nl, "lo", None).await?;
        forward(&ns)?;
        // Proxy ARP answers for 169.254.1.1 only if it is routed out of another device; a real
        // node has its default route for that. Lab nodes have no default route on purpose.
        node_nl.replace_route(&Route::device(net("169.254.1.1/32")?, lo, LAB_PROTO)).await?;
        if cross {
            let gw: IpAddr = if subnet == 1 { [10, 99, 1, 1] } else { [10, 99, 0, 1] }.into();
            let mut r = Route::via(net("10.99.0.0/16")?, gw, eth0, LAB_PROTO);
            r.scope_link = false;
            node_nl.replace_route(&r).await?;
        }
        let socket = state.record(&format!("{name}.sock"))?;
        state.record(&format!("{name}.sock.pending-dels.json"))?;
        // Install the CNI configuration as `gingham cni install` would (MTU 0: the agent's).
        let mut conf = gingham_cni::conflist(NETWORK, "1.0.0", 0, &name, &socket.display().to_string());
        for d in [name.clone(), format!("{name}/net.d")] {
            let p = state.record(&d)?;
            gingham_files::ensure_dir(&p, 0o755).map_err(|e| msg(e.to_string()))?;
        }
        let pod_cidr = format!("172.20.{}.0/24", 100 + i);
        if o.host_local {
            let data = state.record(&format!("{name}/host-local"))?;
            conf["plugins"][0]["ipam"] =
                json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]], "dataDir": data});
        }
        let path = state.record(&format!("{name}/net.d/10-gingham.conflist"))?;
        let text = serde_json::to_vec_pretty(&conf).map_err(|e| msg(e.to_string()))?;
        gingham_files::write_atomic(&path, &text, 0o644).map_err(|e| msg(e.to_string()))?;
        let log = state.new_log(&format!("{name}.log"))?;
        let mut env = state.env.clone();
        if o.kubernetes {
            let pod_cidr = o.host_local.then_some(pod_cidr.as_str());
            kube::register_node(&state, &name, &ip.addr().to_string(), pod_cidr).await?;
            env.insert("KUBECONFIG".into(), kube::kubeconfig_of(&state, "node").display().to_string());
        }
        if o.host_local {
            env.insert("USE_POD_CIDR".into(), "true".into());
        }
        let mut cmd = in_ns_command(&ns, exe)?;
        cmd.args(["node", "run", "--nodename", &name, "--ip", &ip.to_string(), "--socket"])
            .arg(&socket)
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn()?;
        state.nodes.push(NodeState { name, netns: ns, ip, socket, agent_pid: Some(child.id() as i32) });
        state.save()?;
    }
    for n in &state.nodes {
        wait_ready(n, dir)?;
    }
    // The cluster controllers, as a cluster runs calico-kube-controllers.
    let log = state.new_log("controllers.log")?;
    let mut env = state.env.clone();
    if o.kubernetes {
        env.insert("KUBECONFIG".into(), kube::kubeconfig_of(&state, "controllers").display().to_string());
    }
    let child = std::process::Command::new(exe)
        .args(["controllers", "run", "--period", "10s"])
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    state.controllers_pid = Some(child.id() as i32);
    state.save()?;
    if o.netpol_model {
        if o.nodes < 3 {
            return Err(msg("--netpol-model needs 3 nodes"));
        }
        apply(&connect(&state).await?, &netpol_resources(o.encap)).await?;
        for (pod, ip, node) in NETPOL_PODS {
            progress(o.quiet, &format!("pod {pod} ({ip}) on node-{node} (CNI ADD)"));
            let name = pod.split_once('/').map_or(pod, |(_, p)| p);
            let labels = BTreeMap::from([("pod".to_string(), name.to_string())]);
            let named_ports = [80u16, 81]
                .iter()
                .flat_map(|p| ["tcp", "udp"].map(|proto| (format!("serve-{p}-{proto}"), proto.to_uppercase(), *p)))
                .collect();
            let extras = PodExtras { ips: vec![ip.into()], named_ports, ..Default::default() };
            pod_add(&mut state, exe, &format!("node-{node}"), pod, &labels, &extras).await?;
        }
    }
    for n in state.nodes.clone() {
        for j in 1..=o.pods_per_node {
            let pod = format!("default/pod-{}-{j}", n.name.trim_start_matches("node-"));
            progress(o.quiet, &format!("pod {pod} on {} (CNI ADD)", n.name));
            pod_add(&mut state, exe, &n.name, &pod, &BTreeMap::new(), &PodExtras::default()).await?;
        }
    }
    progress(o.quiet, "waiting for every node's routes");
    converge(&state, Duration::from_secs(15)).await?;
    Ok(state)
}

/// What the ToR's directory holds: our configuration and FRR's sockets, pid files and logs.
const TOR_FILES: &[&str] = &[
    "zebra.conf",
    "bgpd.conf",
    "zebra.pid",
    "bgpd.pid",
    "zserv.api",
    "zebra.vty",
    "bgpd.vty",
    "zebra.log",
    "bgpd.log",
];

/// The ToR router of `--tor`.
pub const TOR_IP: &str = "10.99.0.253";
pub const TOR_AS: u32 = 65100;

/// FRR (zebra and bgpd) in a namespace of its own on the underlay bridge, taking eBGP
/// sessions from any address of the lab's underlay (no per-node configuration).
async fn tor(state: &mut State, underlay: &Netlink, br0: u32) -> Result<()> {
    let ns = format!("{}-tor", state.prefix);
    let nl = add_ns(state, &ns)?;
    underlay.add_veth("tor", "eth0", &open_netns(&ns_path(&ns))?, 1500, None).await?;
    let port = up_with(underlay, "tor", None).await?;
    underlay.set_master(port, br0).await?;
    up_with(&nl, "eth0", Some(net(&format!("{TOR_IP}/24"))?)).await?;
    up_with(&nl, "lo", None).await?;
    let dir = PathBuf::from(format!("/run/gingham-lab-tor-{}", state.prefix));
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        _ => return Err(msg(format!("{} exists: another lab's ToR? (`gingham lab down` removes it)", dir.display()))),
    }
    gingham_files::ensure_dir(&dir, 0o755).map_err(|e| msg(e.to_string()))?;
    state.tor_dir = Some(dir.clone());
    state.save()?;
    for (name, text) in [
        ("zebra.conf", "hostname tor\n".to_string()),
        (
            "bgpd.conf",
            format!(
                "hostname tor\nrouter bgp {TOR_AS}\n bgp router-id {TOR_IP}\n no bgp ebgp-requires-policy\n \
                 neighbor nodes peer-group\n neighbor nodes remote-as external\n \
                 bgp listen range 10.99.0.0/16 peer-group nodes\n address-family ipv4 unicast\n  \
                 neighbor nodes activate\n exit-address-family\n"
            ),
        ),
    ] {
        gingham_files::write_atomic(&dir.join(name), text.as_bytes(), 0o644).map_err(|e| msg(e.to_string()))?;
    }
    // FRR's daemons drop to user frr, and write their sockets, pid files and logs here.
    let frr = nix::unistd::User::from_name("frr")
        .ok()
        .flatten()
        .ok_or_else(|| msg("no user frr: install frr (scripts/install-deps.sh)"))?;
    nix::unistd::chown(&dir, Some(frr.uid), Some(frr.gid)).map_err(|e| msg(format!("{}: {e}", dir.display())))?;
    let daemon = |name: &str, extra: &[String]| -> Result<std::process::Child> {
        let mut cmd = in_ns_command(&ns, Path::new(&format!("/usr/lib/frr/{name}")))?;
        cmd.args(["-P", "0", "-f"])
            .arg(dir.join(format!("{name}.conf")))
            .arg("-i")
            .arg(dir.join(format!("{name}.pid")))
            .arg("-z")
            .arg(dir.join("zserv.api"))
            .arg("--vty_socket")
            .arg(&dir)
            .arg("--log")
            .arg(format!("file:{}", dir.join(format!("{name}.log")).display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        cmd.spawn().map_err(|e| msg(format!("cannot start FRR's {name} (install frr): {e}")))
    };
    let zebra = daemon("zebra", &[])?;
    state.tor_pids.push(zebra.id() as i32);
    state.save()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("zserv.api").exists() {
        if Instant::now() > deadline {
            return Err(msg(format!("FRR's zebra did not start (see {}/zebra.log)", dir.display())));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bgpd = daemon("bgpd", &["-l".into(), TOR_IP.into(), "-p".into(), "179".into()])?;
    state.tor_pids.push(bgpd.id() as i32);
    state.save()?;
    Ok(())
}

async fn connect(state: &State) -> Result<std::sync::Arc<dyn gingham_store::Datastore>> {
    use gingham_store::config::{DatastoreConfig, Settings};
    let env = Settings::from_env(|k| state.env.get(k).cloned());
    let cfg = DatastoreConfig::resolve(Settings::default(), None, env).map_err(msg)?;
    for _ in 0..100 {
        if let Ok(s) = gingham_store::connect(&cfg).await {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gingham_store::connect(&cfg).await.map_err(|e| msg(e.to_string()))
}

async fn apply(store: &std::sync::Arc<dyn gingham_store::Datastore>, yaml: &str) -> Result<()> {
    let rs = gingham_store::ResourceStore::new(store.clone());
    for d in gingham_api::parse_documents("lab", yaml).map_err(|e| msg(format!("{e:?}")))? {
        rs.apply(d.object).await.map_err(|e| msg(e.to_string()))?;
    }
    Ok(())
}

/// The last `n` lines of a log.
pub(crate) fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait until a node's agent answers /readiness.
fn wait_ready(n: &NodeState, dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = in_netns(&ns_path(&n.netns), || {
            let Ok(mut s) =
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 9099)), Duration::from_millis(200))
            else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.write_all(b"GET /readiness HTTP/1.0\r\n\r\n");
            let mut buf = [0u8; 64];
            let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).contains(" 200 ")
        })?;
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join(format!("{}.log", n.name))).unwrap_or_default();
            // The agent's trouble is often its datastore's: etcd's own log says why.
            let etcd = std::fs::read_to_string(dir.join("etcd.log")).map(|l| tail(&l, 20)).unwrap_or_default();
            let etcd = if etcd.is_empty() { String::new() } else { format!("\netcd's log (last lines):\n{etcd}") };
            return Err(msg(format!("the agent of {} did not become ready; its log:\n{log}{etcd}", n.name)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until every node has a route (calculated, or learned over BGP) for every other node's
/// blocks (podCIDRs, with host-local).
pub async fn converge(state: &State, timeout: Duration) -> Result<()> {
    let store = connect(state).await?;
    let ipam = gingham_ipam::IpamClient::new(store.clone());
    let resources = gingham_store::resources::ResourceStore::new(store);
    let deadline = Instant::now() + timeout;
    loop {
        let mut owned: Vec<(IpNet, String)> = Vec::new();
        for (b, _) in ipam.all_blocks(true).await.map_err(|e| msg(e.to_string()))? {
            if let Some(owner) = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")) {
                owned.push((b.cidr, owner.to_string()));
            }
        }
        if state.host_local {
            for node in resources.list(gingham_api::Kind::Node, None).await.map_err(|e| msg(e.to_string()))? {
                let cidrs = node.status.as_ref().and_then(|s| s["podCIDRs"].as_array().cloned()).unwrap_or_default();
                for c in cidrs.iter().filter_map(|c| c.as_str()?.parse::<IpNet>().ok()) {
                    owned.push((c, node.metadata.name.clone()));
                }
            }
        }
        let mut missing = Vec::new();
        for n in &state.nodes {
            let nl = Netlink::in_namespace(&ns_path(&n.netns))?;
            let routes = nl.routes(true).await?;
            for (cidr, owner) in &owned {
                if *owner != n.name
                    && !routes.iter().any(|r| {
                        r.dst == *cidr
                            && [gingham_dataplane::routes::CALC_PROTO, gingham_dataplane::routes::BGP_PROTO]
                                .contains(&r.protocol)
                    })
                {
                    missing.push(format!("{}: {cidr}", n.name));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(msg(format!("routes still missing after {timeout:?}: {}", missing.join(", "))));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn plugin(
    state: &State,
    exe: &Path,
    node: &NodeState,
    cmd: &str,
    pod: &PodState,
    labels: &BTreeMap<String, String>,
    extras: &PodExtras,
) -> Result<serde_json::Value> {
    let (ns, name) = pod.name.split_once('/').unwrap_or(("default", &pod.name));
    // The node's installed conflist, first plugin, as a runtime hands it over.
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conflist_path(&state.dir, &node.name))?)
            .map_err(|e| msg(e.to_string()))?;
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let ports: Vec<serde_json::Value> =
        extras.named_ports.iter().map(|(n, p, port)| json!({"name": n, "protocol": p, "port": port})).collect();
    conf["runtimeConfig"] = json!({ "labels": labels, "ips": extras.ips, "namedPorts": ports });
    if let Some(sa) = &extras.service_account {
        conf["runtimeConfig"]["serviceAccount"] = json!(sa);
    }
    let mut c = in_ns_command(&node.netns, exe)?;
    c.env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", ns_path(&pod.netns))
        .env("CNI_IFNAME", "eth0")
        // As the kubelet passes them (IgnoreUnknown: IPAM delegates such as host-local refuse
        // arguments they do not know otherwise).
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={}",
                pod.container_id
            ),
        )
        .env("CNI_PATH", CNI_PATH)
        .envs(&state.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(msg(format!("CNI {cmd} for {}: {}", pod.name, String::from_utf8_lossy(&out.stdout).trim())));
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
}

/// Where the lab's runtime finds other CNI plugins (host-local): the distribution's.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Where a node's CNI configuration is installed.
pub fn conflist_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(node).join("net.d").join("10-gingham.conflist")
}

fn pod_netns_name(prefix: &str, pod: &str) -> String {
    format!("{prefix}-pod-{}", pod.replace('/', "-"))
}

/// Create a pod on `node` through the CNI plugin.
pub async fn pod_add(
    state: &mut State,
    exe: &Path,
    node: &str,
    pod: &str,
    labels: &BTreeMap<String, String>,
    extras: &PodExtras,
) -> Result<PodState> {
    if !pod.contains('/') {
        return Err(msg(format!("pod {pod:?}: write NAMESPACE/NAME")));
    }
    if state.pods.iter().any(|p| p.name == pod) {
        return Err(msg(format!("pod {pod} already exists")));
    }
    if state.kube_bin.is_none() && !extras.annotations.is_empty() {
        return Err(msg("pod annotations need a lab on the Kubernetes API (--datastore kubernetes)"));
    }
    let n = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .cloned()
        .ok_or_else(|| msg(format!("no node {node} in the lab")))?;
    let netns = pod_netns_name(&state.prefix, pod);
    let pod_nl = add_ns(state, &netns)?;
    let mut p = PodState {
        name: pod.into(),
        node: node.into(),
        netns,
        container_id: format!("lab-{}", pod.replace('/', "-")),
        ips: vec![],
    };
    if state.kube_bin.is_some() {
        kube::create_pod(state, pod, node, labels, extras).await?;
    }
    let result = plugin(state, exe, &n, "ADD", &p, labels, extras)?;
    p.ips = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .collect();
    up_with(&pod_nl, "lo", None).await?;
    if state.kube_bin.is_some() {
        kube::set_pod_ips(state, pod, &p.ips).await?;
    }
    state.pods.push(p.clone());
    state.save()?;
    Ok(p)
}

pub fn pod_del(state: &mut State, exe: &Path, pod: &str) -> Result<()> {
    let p = state.pod(pod)?.clone();
    let n = state
        .nodes
        .iter()
        .find(|n| n.name == p.node)
        .cloned()
        .ok_or_else(|| msg(format!("node {} is gone", p.node)))?;
    plugin(state, exe, &n, "DEL", &p, &BTreeMap::new(), &PodExtras::default())?;
    if state.kube_bin.is_some() {
        kube::delete_pod(state, pod)?;
    }
    netns::delete(&p.netns)?;
    state.namespaces.retain(|n| *n != p.netns);
    state.pods.retain(|x| x.name != pod);
    state.save()
}

/// Whether `pid` is still the process the lab started (a PID can be reused once it exits).
fn is_lab_process(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let argv0 = c.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(argv0);
            ["gingham", "etcd", "frr/zebra", "frr/bgpd", "kube-apiserver"].iter().any(|p| name.ends_with(p))
        })
        .unwrap_or(false)
}

/// Remove everything the lab made — its agents, etcd, namespaces (their devices and nftables
/// tables go with them) and the files it recorded — and nothing else. A directory without a
/// readable lab state is refused, never emptied.
pub fn down(dir: &Path) -> Result<()> {
    let state = State::load(dir)?;
    let pids: Vec<i32> = state
        .nodes
        .iter()
        .filter_map(|n| n.agent_pid)
        .chain(state.etcd_pid)
        .chain(state.kube_pid)
        .chain(state.tor_pids.iter().copied())
        .chain(state.controllers_pid)
        .filter(|p| is_lab_process(*p))
        .collect();
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| is_lab_process(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| is_lab_process(**p)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), nix::sys::signal::Signal::SIGKILL);
    }
    for ns in state.namespaces.iter().rev() {
        let _ = netns::delete(ns);
    }
    if let Some(tor) = &state.tor_dir {
        // Our configuration, and what FRR made there for us; then the directory, if empty.
        for f in TOR_FILES {
            let p = tor.join(f);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Err(e) = std::fs::remove_dir(tor) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("note: {}: {e}; left in place", tor.display());
            }
        }
    }
    let mut left = Vec::new();
    for rel in state.files.iter().rev() {
        let path = dir.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let removed = if meta.file_type().is_dir() {
            // etcd's data directory is etcd's to fill, kube/ the API server's files: the lab made
            // them and takes them back whole.
            if rel == "etcd" || rel == "kube" || rel.ends_with("/host-local") {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_dir(&path)
            }
        } else {
            let r = std::fs::remove_file(&path);
            if rel.ends_with(".db") {
                for companion in ["-wal", "-shm"] {
                    let c = dir.join(format!("{rel}{companion}"));
                    if std::fs::symlink_metadata(&c).is_ok_and(|m| m.file_type().is_file()) {
                        let _ = std::fs::remove_file(c);
                    }
                }
            }
            r
        };
        match removed {
            Ok(()) => {}
            // Someone put files of their own in it: theirs stays, and so does the directory.
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                eprintln!("note: {} holds files the lab did not make; left in place", path.display())
            }
            Err(e) => left.push(format!("{}: {e}", path.display())),
        }
    }
    std::fs::remove_file(state_path(dir))?;
    if state.created_dir {
        // Only if nothing of anyone else's is in it.
        let _ = std::fs::remove_dir(dir);
    }
    if !left.is_empty() {
        return Err(msg(format!("the lab is down, but these were left: {}", left.join("; "))));
    }
    Ok(())
}

/// One cell of the check matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub ping: bool,
    pub tcp: bool,
}

/// Every pod pings and TCP-connects every other pod.
pub fn check(state: &State) -> Result<Vec<(String, String, Cell)>> {
    // A listener in every pod (created inside its namespace, served from here).
    let mut listeners = Vec::new();
    for p in &state.pods {
        let l = in_netns(&ns_path(&p.netns), || TcpListener::bind(("0.0.0.0", CHECK_PORT)))??;
        l.set_nonblocking(true)?;
        listeners.push(l);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(b"ok\n");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        })
        .collect();
    let mut jobs = Vec::new();
    for src in &state.pods {
        for dst in state.pods.iter().filter(|d| d.name != src.name) {
            let Some(ip) = dst.ips.iter().find_map(|i| i.parse::<Ipv4Addr>().ok()) else { continue };
            let (src_ns, label_src, label_dst) = (src.netns.clone(), src.name.clone(), dst.name.clone());
            jobs.push(std::thread::spawn(move || {
                let ping = open_netns(&ns_path(&src_ns))
                    .ok()
                    .and_then(|f| netns::command(&f, "ping").ok())
                    .and_then(|mut c| {
                        c.args(["-c", "1", "-W", "2", &ip.to_string()])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .ok()
                    })
                    .is_some_and(|s| s.success());
                let tcp = in_netns(&ns_path(&src_ns), move || {
                    TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), CHECK_PORT), Duration::from_secs(2))
                        .is_ok_and(|mut s| {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut b = [0u8; 3];
                            std::io::Read::read_exact(&mut s, &mut b).is_ok() && &b == b"ok\n"
                        })
                })
                .unwrap_or(false);
                (label_src, label_dst, Cell { ping, tcp })
            }));
        }
    }
    let results = jobs.into_iter().filter_map(|j| j.join().ok()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in acceptors {
        let _ = a.join();
    }
    Ok(results)
}

/// Wait until every node's agent enforces the policy resources the datastore holds now (its
/// published digest of their keys and revisions matches the store's).
pub async fn wait_policy(state: &State, timeout: Duration) -> Result<()> {
    let store = connect(state).await?;
    let mut items = Vec::new();
    for k in gingham_policy::load::KINDS {
        let l = store.list(&k.prefix(None)).await.map_err(|e| msg(e.to_string()))?;
        items.extend(l.items.into_iter().map(|kv| (kv.key, kv.mod_revision)));
    }
    let want = gingham_policy::load::digest(items.iter().map(|(k, r)| (k.as_str(), *r)));
    let line = format!("gingham_policy_digest {want}\n");
    let deadline = Instant::now() + timeout;
    for n in &state.nodes {
        loop {
            let metrics = in_netns(&ns_path(&n.netns), || {
                let Ok(mut s) =
                    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 9099)), Duration::from_millis(200))
                else {
                    return String::new();
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut body);
                body
            })?;
            if metrics.contains(&line) {
                break;
            }
            if Instant::now() > deadline {
                return Err(msg(format!("{} does not enforce the stored policy yet (digest {want})", n.name)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// The e2e probe: every model pod to every other on one port, in parallel, 1 s each; 9 lines
/// `<source> <9 cells>` (`.` reached, `X` not, `-` itself). Listeners (TCP accept, UDP echo)
/// run in every pod for the probe's duration.
pub fn probe(state: &State, udp: bool, port: u16) -> Result<String> {
    let mut pods: Vec<(&str, String)> = Vec::new();
    for (name, _, _) in NETPOL_PODS {
        pods.push((name, state.pod(name)?.netns.clone()));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut servers = Vec::new();
    for (_, ns) in &pods {
        let stop = stop.clone();
        if udp {
            let sock = in_netns(&ns_path(ns), move || std::net::UdpSocket::bind(("0.0.0.0", port)))??;
            sock.set_read_timeout(Some(Duration::from_millis(20)))?;
            servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }));
        } else {
            let l = in_netns(&ns_path(ns), move || TcpListener::bind(("0.0.0.0", port)))??;
            l.set_nonblocking(true)?;
            servers.push(std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if l.accept().is_err() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }));
        }
    }
    let mut jobs = Vec::new();
    for (i, (_, src_ns)) in pods.iter().enumerate() {
        for j in 0..pods.len() {
            if i == j {
                continue;
            }
            let ip: Ipv4Addr = NETPOL_PODS[j].1.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
            let ns = src_ns.clone();
            jobs.push(std::thread::spawn(move || {
                let to = SocketAddr::new(IpAddr::V4(ip), port);
                let ok = in_netns(&ns_path(&ns), move || {
                    if udp {
                        let Ok(s) = std::net::UdpSocket::bind(("0.0.0.0", 0)) else { return false };
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 8];
                        s.send_to(b"probe", to).is_ok()
                            && s.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == b"probe")
                    } else {
                        TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok()
                    }
                })
                .unwrap_or(false);
                (i, j, ok)
            }));
        }
    }
    let mut grid = [['-'; 9]; 9];
    for j in jobs {
        if let Ok((a, b, ok)) = j.join() {
            grid[a][b] = if ok { '.' } else { 'X' };
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    let mut out = String::new();
    for (i, (name, _)) in pods.iter().enumerate() {
        out.push_str(&format!("{name} {}\n", grid[i].iter().collect::<String>()));
    }
    Ok(out)
}

/// The check matrix as a table: rows are sources, columns destinations.
pub fn render_matrix(state: &State, cells: &[(String, String, Cell)]) -> String {
    let names: Vec<&str> = state.pods.iter().map(|p| p.name.as_str()).collect();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(8);
    let mut out = format!("{:<w$}", "from \\ to");
    for n in &names {
        out.push_str(&format!("  {n:<w$}"));
    }
    out.push('\n');
    for s in &names {
        out.push_str(&format!("{s:<w$}"));
        for d in &names {
            let cell = if s == d {
                "-".to_string()
            } else {
                match cells.iter().find(|(a, b, _)| a == s && b == d) {
                    Some((_, _, c)) if c.ping && c.tcp => "ok".into(),
                    Some((_, _, c)) => {
                        format!("{}{}", if c.ping { "" } else { "ping✗ " }, if c.tcp { "" } else { "tcp✗" })
                            .trim()
                            .to_string()
                    }
                    None => "?".into(),
                }
            };
            out.push_str(&format!("  {cell:<w$}"));
        }
        out.push('\n');
    }
    out
}

/// Nodes, pods with addresses, and each node's gingham routes.
pub async fn status(state: &State) -> Result<String> {
    let mut out = format!(
        "lab {} ({:?}), datastore: {}\n\nNODES\n",
        state.dir.display(),
        state.encap,
        state.env.get("DATASTORE_TYPE").cloned().unwrap_or_default()
    );
    for n in &state.nodes {
        let alive = n.agent_pid.is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok());
        out.push_str(&format!(
            "  {:<10} {:<16} agent {}\n",
            n.name,
            n.ip.to_string(),
            if alive { "running" } else { "NOT RUNNING" }
        ));
    }
    out.push_str("\nPODS\n");
    for p in &state.pods {
        out.push_str(&format!("  {:<22} {:<10} {}\n", p.name, p.node, p.ips.join(", ")));
    }
    for n in &state.nodes {
        out.push_str(&format!("\nROUTES on {}\n", n.name));
        let nl = Netlink::in_namespace(&ns_path(&n.netns))?;
        let names: BTreeMap<u32, String> = nl.links().await?.into_iter().map(|l| (l.index, l.name)).collect();
        for r in nl.routes(true).await? {
            let dev = r.oif.and_then(|i| names.get(&i)).cloned().unwrap_or_default();
            if r.protocol != gingham_dataplane::routes::CALC_PROTO
                && !dev.starts_with("cali")
                && !dev.starts_with("vxlan")
            {
                continue;
            }
            let mut line = if r.blackhole { format!("blackhole {}", r.dst) } else { r.dst.to_string() };
            if let Some(gw) = r.gateway {
                line.push_str(&format!(" via {gw}"));
            }
            if !r.blackhole {
                line.push_str(&format!(" dev {dev}"));
            }
            line.push_str(&format!(" proto {}", r.protocol));
            if r.scope_link {
                line.push_str(" scope link");
            }
            if r.onlink {
                line.push_str(" onlink");
            }
            out.push_str(&format!("  {line}\n"));
        }
    }
    Ok(out)
}

/// Run a command inside a pod's namespace, passing its exit status through.
pub fn exec(state: &State, pod: &str, cmd: &[String]) -> Result<i32> {
    let p = state.pod(pod)?;
    let (program, args) = cmd.split_first().ok_or_else(|| msg("give a command after --"))?;
    let path = which(program).unwrap_or_else(|| PathBuf::from(program));
    let status = in_ns_command(&p.netns, &path)?.args(args).status()?;
    Ok(status.code().unwrap_or(1))
}

fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH")?.to_string_lossy().split(':').map(|d| Path::new(d).join(program)).find(|p| p.exists())
}
