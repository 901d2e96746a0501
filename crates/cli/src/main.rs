//! `gingham`: the calicoctl-style command line.

mod cni;
mod controllers;
mod ipam;
mod output;
mod policy;
mod resources;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gingham_store::config::{DatastoreConfig, Settings};
use gingham_store::{ResourceStore, connect};

use crate::output::Format;

#[derive(Parser)]
#[command(
    name = "gingham",
    version,
    about = "gingham: Calico-compatible Kubernetes networking — resource and cluster management"
)]
struct Cli {
    #[command(flatten)]
    datastore: DatastoreFlags,
    #[command(subcommand)]
    command: Command,
}

/// Datastore selection (flags beat the config file, which beats the environment).
#[derive(Args)]
struct DatastoreFlags {
    /// calicoctl-style config file (kind CalicoAPIConfig).
    #[arg(short = 'c', long = "config", env = "GINGHAM_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// embedded or etcdv3.
    #[arg(long, global = true)]
    datastore_type: Option<String>,
    /// Comma-separated etcd endpoints.
    #[arg(long, global = true)]
    etcd_endpoints: Option<String>,
    #[arg(long, global = true)]
    etcd_ca_cert_file: Option<String>,
    #[arg(long, global = true)]
    etcd_cert_file: Option<String>,
    #[arg(long, global = true)]
    etcd_key_file: Option<String>,
    /// The embedded store's file (default /var/lib/gingham/store.db).
    #[arg(long, global = true)]
    store_path: Option<String>,
    /// With the kubernetes datastore: the kubeconfig (default $KUBECONFIG, ~/.kube/config, then
    /// the pod's service account).
    #[arg(long, global = true)]
    kubeconfig: Option<String>,
}

#[derive(Args, Clone)]
pub struct FileArgs {
    /// File, directory or - for standard input (YAML or JSON, several documents allowed).
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Descend into subdirectories.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Namespace for namespaced resources that do not name one.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Create or replace resources from files.
    Apply(FileArgs),
    /// Create resources; fails if any exists (unless --skip-exists).
    Create {
        #[command(flatten)]
        files: FileArgs,
        #[arg(long)]
        skip_exists: bool,
    },
    /// Replace existing resources (compare-and-swap on resourceVersion when given).
    Replace(FileArgs),
    /// Delete resources by KIND NAME... or from files.
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        #[arg(short = 'R', long)]
        recursive: bool,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        skip_not_exists: bool,
    },
    /// Show resources.
    Get {
        kind: String,
        names: Vec<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum, default_value = "ps")]
        output: Format,
    },
    /// Change a resource with a JSON/YAML merge patch.
    Patch {
        kind: String,
        name: String,
        #[arg(short = 'p', long)]
        patch: String,
        /// merge (RFC 7386; "strategic" is taken as merge).
        #[arg(short = 't', long = "type", default_value = "merge")]
        patch_type: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Set (key=value) or remove (key- or --remove key) a label.
    Label {
        kind: String,
        name: String,
        label: String,
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        remove: bool,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Validate files without touching the datastore.
    Validate(FileArgs),
    /// The selector language.
    Selector {
        #[command(subcommand)]
        command: SelectorCommand,
    },
    /// Show which datastore the other commands use.
    Datastore,
    /// IP address management: usage, consistency, manual release.
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// Network policy as the agents compile it: trace a packet, show an endpoint's rules.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The node agent.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The cluster controllers (calico-kube-controllers for gingham's datastores).
    Controllers {
        #[command(subcommand)]
        command: ControllersCommand,
    },
    /// CNI plugin installation.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
    /// Print the manifests that install gingham on a cluster (`gingham manifests | kubectl apply -f -`).
    Manifests {
        /// Where the cluster keeps gingham's data: kubernetes (Calico's CRDs), etcdv3 or embedded
        /// (single-node clusters).
        #[arg(default_value = "kubernetes", value_parser = ["kubernetes", "etcdv3", "embedded"])]
        datastore_type: String,
        /// With etcdv3: the endpoints, comma-separated.
        #[arg(long, default_value = "http://127.0.0.1:2379")]
        etcd_endpoints: String,
        #[arg(long, default_value = "kube-system")]
        namespace: String,
        /// The image holding the gingham binary.
        #[arg(long, default_value = concat!("gingham:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// The pods' MTU (0: the agent's choice).
        #[arg(long, default_value_t = 0)]
        mtu: u32,
    },
    /// A multi-node cluster on this machine, in network namespaces.
    Lab {
        /// Where the lab keeps its state, store and logs.
        #[arg(long, env = "GINGHAM_LAB_DIR", default_value = "/var/run/gingham-lab")]
        dir: PathBuf,
        /// Prefix of the lab's namespace names (labs with different prefixes and dirs coexist).
        #[arg(long, env = "GINGHAM_LAB_PREFIX", default_value = "gl")]
        prefix: String,
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab (a stale one is removed first): underlay, nodes with agents, pods.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// vxlan, vxlan-crosssubnet, none or ipip.
        #[arg(long, default_value = "vxlan")]
        encap: String,
        /// embedded, etcd, or kubernetes (a real kube-apiserver on the lab's etcd; the lab plays
        /// the kubelet: Nodes, Pods and their IPs as API objects).
        #[arg(long, default_value = "embedded")]
        datastore: String,
        /// rr1 or rr2: the seeds' route-reflector setups instead of the node-to-node mesh
        /// (rr2: --nodes 6).
        #[arg(long)]
        bgp_topology: Option<String>,
        /// An FRR router on the underlay (10.99.0.253, AS 65100) that every node peers with
        /// over eBGP, as a top-of-rack switch.
        #[arg(long)]
        tor: bool,
        /// The Kubernetes e2e network-policy model: namespaces x, y, z (labels ns=<n>,
        /// kubernetes.io/metadata.name=<n>), pods a, b, c in each (label pod=<p>, named ports
        /// serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp) at 172.20.<1|2|3>.<1|2|3>,
        /// instead of the default pods.
        #[arg(long)]
        netpol_model: bool,
        /// calico-ipam (gingham's blocks) or host-local (--datastore kubernetes only): each Node
        /// gets a podCIDR 172.20.<100+i>.0/24, as the controller manager's --allocate-node-cidrs
        /// gives, pods get addresses from host-local with "usePodCidr", the agents route
        /// podCIDRs (USE_POD_CIDR).
        #[arg(long, default_value = "calico-ipam", value_parser = ["calico-ipam", "host-local"])]
        ipam: String,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Probe every pair of the --netpol-model pods on one port (1 s timeout each, in parallel):
    /// 9 lines `<source> <cells>`, `.` reached, `X` not, `-` the pod itself. Exits 0 whatever
    /// the matrix.
    Probe {
        /// TCP or UDP (UDP counts as reached when the echo returns).
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[arg(long)]
        port: u16,
    },
    /// Remove every namespace, device, process and file the lab made.
    Down,
    /// Nodes, pods with addresses, each node's routes.
    Status,
    /// Every pod pings and TCP-connects every other pod; exit 0 only if all pass.
    Check,
    /// The environment under which other gingham commands use the lab's datastore.
    Env,
    /// Add or delete a pod through the CNI plugin.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
    /// Run a command in a pod's network namespace: gingham lab exec NS/NAME -- CMD...
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ControllersCommand {
    /// Run them: node cleanup, IPAM garbage collection, empty-block reclaim. Several instances
    /// may run; one leads (a lease in the datastore), the others stand by.
    Run {
        /// This instance's name in the lease (default: hostname-pid).
        #[arg(long)]
        identity: Option<String>,
        /// How long the lease lasts unrenewed before a standby takes over.
        #[arg(long, default_value = "15s", value_parser = controllers::parse_duration)]
        lease: std::time::Duration,
        /// Between passes (default: KubeControllersConfiguration's reconcilerPeriod, else 60s).
        #[arg(long, value_parser = controllers::parse_duration)]
        period: Option<std::time::Duration>,
        /// How long an allocation must look leaked before it is released ("0": no GC;
        /// default: leakGracePeriod, else 15m).
        #[arg(long, value_parser = controllers::parse_duration)]
        leak_grace_period: Option<std::time::Duration>,
        /// How long a block must stay empty before it is reclaimed (default 15m).
        #[arg(long, value_parser = controllers::parse_duration)]
        block_grace_period: Option<std::time::Duration>,
        /// Report what would be released; release nothing.
        #[arg(long)]
        dry_run: bool,
        /// One pass, then exit (when leading).
        #[arg(long)]
        once: bool,
        /// Serve Prometheus metrics (leading, leak candidates, releases) at this address.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
    },
}

#[derive(Subcommand)]
enum PodCommand {
    Add {
        node: String,
        /// NAMESPACE/NAME
        pod: String,
        /// k=v,k2=v2
        #[arg(long, default_value = "")]
        labels: String,
        /// The pod's service account (label projectcalico.org/serviceaccount, profile ksa.<ns>.<sa>).
        #[arg(long)]
        service_account: Option<String>,
        /// A fixed address (it must lie in a pool), as Calico's `ipAddrs` annotation.
        #[arg(long)]
        ip: Vec<String>,
        /// An annotation on the Pod object, KEY=VALUE (a lab on --datastore kubernetes), e.g.
        /// cni.projectcalico.org/ipv4pools='["pool-b"]'.
        #[arg(long)]
        annotation: Vec<String>,
    },
    Del {
        pod: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Which policies and rules a packet from SRC to DST meets on each side, and the verdict.
    /// SRC and DST: NAMESPACE/POD (or endpoint name) or an address.
    Trace {
        src: String,
        dst: String,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "TCP")]
        protocol: String,
    },
    /// An endpoint's policies per direction in evaluation order, its profiles, and (on its own
    /// node) the programmed rules with packet counters.
    Show { endpoint: String },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// This node's BGP sessions, as `calicoctl node status` shows them.
    Status {
        /// The agent's health address (its --health-listen).
        #[arg(long, default_value = "127.0.0.1:9099")]
        health: std::net::SocketAddr,
        /// Also list the Loc-RIB: every prefix with its best path's source and attributes.
        #[arg(long)]
        routes: bool,
        /// Per session: negotiated capabilities, timers, counters and the last error.
        #[arg(long)]
        detail: bool,
    },
    /// Run the node agent: serves the CNI plugin on a unix socket.
    Run {
        /// This node's name (default: the host name).
        #[arg(long, env = "NODENAME")]
        nodename: Option<String>,
        #[arg(long, default_value = gingham_cni::proto::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// This node's address with prefix (e.g. 10.99.0.11/24); default: autodetect.
        #[arg(long, env = "IP")]
        ip: Option<String>,
        /// first-found, or interface=REGEX (e.g. interface=eth.*).
        #[arg(long, env = "IP_AUTODETECTION_METHOD", default_value = "first-found")]
        ip_autodetection_method: String,
        /// Where to serve /liveness, /readiness and /metrics.
        #[arg(long, default_value = "127.0.0.1:9099")]
        health_listen: std::net::SocketAddr,
        /// Serve the CNI plugin only: no routes, VXLAN or NAT (a node without an underlay).
        #[arg(long)]
        endpoints_only: bool,
        /// How long an endpoint whose host interface vanished without a CNI DEL keeps its
        /// addresses before the agent releases them, in seconds.
        #[arg(long, default_value_t = 60)]
        orphan_grace_seconds: u64,
        /// How nodes learn each other's routes (Calico's calico_backend): bird = BGP (node mesh,
        /// route reflectors, BGPPeers); vxlan = no BGP, routes calculated from the datastore.
        #[arg(long, env = "CALICO_NETWORKING_BACKEND", default_value = "bird", value_parser = ["bird", "vxlan"])]
        backend: String,
        /// Where BGPPeer passwords are read: a secretKeyRef {name, key} is the file DIR/name/key.
        #[arg(long, default_value = "/etc/gingham/bgp-secrets")]
        bgp_secrets: PathBuf,
        /// Route and advertise each node's Kubernetes podCIDR (pods addressed by host-local
        /// with `"subnet": "usePodCidr"` instead of gingham's IPAM), as Calico's USE_POD_CIDR.
        #[arg(long, env = "USE_POD_CIDR")]
        use_pod_cidr: bool,
    },
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy gingham and gingham-ipam into the CNI bin dir and write 10-gingham.conflist.
    Install {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "k8s-pod-network")]
        name: String,
        #[arg(long, default_value = "1.0.0")]
        cni_version: String,
        #[arg(long, env = "CNI_MTU", default_value_t = 1500)]
        mtu: u32,
        #[arg(long, env = "NODENAME", default_value = "")]
        nodename: String,
        #[arg(long, default_value = gingham_cni::proto::DEFAULT_SOCKET)]
        socket: String,
        /// A conflist template to install instead of gingham's own (Calico's install-cni
        /// CNI_NETWORK_CONFIG): __KUBERNETES_NODE_NAME__ and __CNI_MTU__ are filled in.
        #[arg(long, env = "CNI_NETWORK_CONFIG")]
        network_config: Option<String>,
    },
}

#[derive(Subcommand)]
enum IpamCommand {
    /// Addresses per pool (and block), who holds an address, or the IPAM settings.
    Show {
        #[arg(long)]
        show_blocks: bool,
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        #[arg(long)]
        show_configuration: bool,
    },
    /// Find leaked addresses, endpoints without allocations, stale handles and affinities.
    Check {
        /// Also write the findings as JSON (for `ipam release --from-report`).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Release one address regardless of who holds it, or the leaked addresses of a report.
    Release {
        #[arg(long, required_unless_present = "from_report", conflicts_with = "from_report")]
        ip: Option<std::net::IpAddr>,
        /// A report of `ipam check -o`: each leaked address is released only if it is still
        /// leaked now, by the same allocation (handle and sequence number).
        #[arg(long)]
        from_report: Option<PathBuf>,
    },
    /// Import the addresses the host-local IPAM plugin (Flannel's) handed out on this node,
    /// so its running pods keep them (Calico's `calico-ipam -upgrade`).
    Upgrade {
        /// The CNI network name: host-local keeps it under <data-dir>/<network>.
        #[arg(long, default_value = "k8s-pod-network")]
        network: String,
        #[arg(long, default_value = "/var/lib/cni/networks")]
        data_dir: PathBuf,
        /// This node's name (as the agent's --nodename).
        #[arg(long)]
        nodename: String,
    },
    /// Split a pool into N (a power of two) smaller pools with its settings.
    Split {
        n: u32,
        #[arg(long, required_unless_present = "cidr")]
        name: Option<String>,
        #[arg(long)]
        cidr: Option<ipnet::IpNet>,
    },
}

#[derive(Subcommand)]
enum SelectorCommand {
    /// Evaluate a selector against labels: prints true or false.
    Eval {
        selector: String,
        /// Labels as a JSON object of strings.
        #[arg(long, default_value = "{}")]
        labels: String,
    },
}

impl DatastoreFlags {
    fn resolve(&self) -> anyhow::Result<DatastoreConfig> {
        let flags = Settings {
            datastore_type: self.datastore_type.clone(),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_ca_cert_file: self.etcd_ca_cert_file.clone(),
            etcd_cert_file: self.etcd_cert_file.clone(),
            etcd_key_file: self.etcd_key_file.clone(),
            store_path: self.store_path.clone(),
            kubeconfig: self.kubeconfig.clone(),
        };
        DatastoreConfig::resolve(flags, self.config.as_deref(), Settings::from_env(|k| std::env::var(k).ok()))
            .map_err(anyhow::Error::msg)
    }

    /// Open the datastore for writing: an embedded store that does not exist yet is created
    /// (and said so).
    async fn open(&self) -> anyhow::Result<ResourceStore> {
        let cfg = self.resolve()?;
        let new = matches!(&cfg, DatastoreConfig::Embedded { path } if !path.exists());
        let ds = connect(&cfg).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        if new {
            eprintln!("note: created a new {}", ds.describe());
        }
        Ok(ResourceStore::new(ds))
    }

    /// Open the datastore for reading: a missing embedded store is an error, never a new one.
    async fn open_existing(&self) -> anyhow::Result<ResourceStore> {
        let cfg = self.resolve()?;
        let ds = gingham_store::connect_with(&cfg, gingham_store::embedded::OpenMode::MustExist)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(ResourceStore::new(ds))
    }
}

fn selector_eval(selector: &str, labels: &str) -> anyhow::Result<bool> {
    let labels: std::collections::BTreeMap<String, String> =
        serde_json::from_str(labels).map_err(|e| anyhow::anyhow!("--labels must be a JSON object of strings: {e}"))?;
    let sel = gingham_api::Selector::parse(selector)
        .map_err(|e| anyhow::anyhow!("invalid selector: {e}\n{}", e.pointer(selector)))?;
    Ok(sel.matches(&labels))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ds = &cli.datastore;
    match cli.command {
        Command::Selector { command: SelectorCommand::Eval { selector, labels } } => {
            println!("{}", selector_eval(&selector, &labels)?);
            Ok(())
        }
        Command::Validate(f) => resources::validate(&f),
        Command::Policy { command } => {
            let store = ds.open_existing().await?;
            match command {
                PolicyCommand::Trace { src, dst, port, protocol } => {
                    policy::trace_cmd(store.datastore(), &src, &dst, port, &protocol).await
                }
                PolicyCommand::Show { endpoint } => policy::show_cmd(store.datastore(), &endpoint).await,
            }
        }
        Command::Controllers {
            command:
                ControllersCommand::Run {
                    identity,
                    lease,
                    period,
                    leak_grace_period,
                    block_grace_period,
                    dry_run,
                    once,
                    metrics_listen,
                },
        } => {
            let store = ds.open_existing().await?;
            let o = controllers::Options {
                identity,
                lease,
                period,
                leak_grace: leak_grace_period,
                block_grace: block_grace_period,
                dry_run,
                once,
                metrics_listen,
            };
            controllers::run(store, o).await
        }
        Command::Ipam { command } => {
            let store = match command {
                IpamCommand::Release { .. } => ds.open().await?,
                _ => ds.open_existing().await?,
            };
            let client = gingham_ipam::IpamClient::new(store.datastore().clone());
            match command {
                IpamCommand::Show { show_blocks, ip, show_configuration } => {
                    ipam::show(&client, show_blocks, ip, show_configuration).await
                }
                IpamCommand::Check { output } => ipam::run_check(&client, output.as_deref()).await,
                IpamCommand::Release { ip: Some(ip), .. } => ipam::release(&client, ip).await,
                IpamCommand::Release { from_report: Some(f), .. } => ipam::release_from_report(&client, &f).await,
                IpamCommand::Release { .. } => anyhow::bail!("give --ip or --from-report"),
                IpamCommand::Split { n, name, cidr } => ipam::split(&client, n, name.as_deref(), cidr).await,
                IpamCommand::Upgrade { network, data_dir, nodename } => {
                    ipam::upgrade(&client, &data_dir, &network, &nodename).await
                }
            }
        }
        Command::Node { command: NodeCommand::Status { health, routes, detail } } => {
            status::run(health, routes, detail).map_err(anyhow::Error::msg)
        }
        Command::Node {
            command:
                NodeCommand::Run {
                    nodename,
                    socket,
                    ip,
                    ip_autodetection_method,
                    health_listen,
                    endpoints_only,
                    orphan_grace_seconds,
                    backend,
                    bgp_secrets,
                    use_pod_cidr,
                },
        } => {
            use gingham_agent::detect::Autodetect;
            let address = match (ip, ip_autodetection_method.as_str()) {
                (Some(ip), _) => Autodetect::Given(
                    ip.parse()
                        .map_err(|_| anyhow::anyhow!("--ip {ip}: not an address with prefix, e.g. 10.99.0.11/24"))?,
                ),
                (None, "first-found") => Autodetect::FirstFound,
                (None, m) => match m.strip_prefix("interface=") {
                    Some(re) => Autodetect::Interface(re.to_string()),
                    None => anyhow::bail!("--ip-autodetection-method {m}: use first-found or interface=REGEX"),
                },
            };
            let node = match nodename {
                Some(n) => n,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string(),
            };
            // A node may start before its datastore is reachable: wait for it (a bad
            // configuration still fails at once).
            let cfg = ds.resolve()?;
            let store = loop {
                match connect(&cfg).await {
                    Ok(s) => break s,
                    Err(e) => {
                        eprintln!("gingham node agent: waiting for the datastore: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            };
            eprintln!("gingham node agent: node {node}, {}, listening on {}", store.describe(), socket.display());
            let shutdown = async {
                let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return std::future::pending::<()>().await,
                };
                tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
            };
            let config = gingham_agent::AgentConfig {
                node,
                socket,
                store,
                address,
                health: Some(health_listen),
                routing: !endpoints_only,
                orphan_grace: std::time::Duration::from_secs(orphan_grace_seconds),
                bgp: (backend == "bird").then_some(bgp_secrets),
                use_pod_cidr,
            };
            gingham_agent::run(config, shutdown).await?;
            Ok(())
        }
        Command::Manifests { datastore_type, etcd_endpoints, namespace, image, mtu } => {
            let datastore = match datastore_type.as_str() {
                "etcdv3" => gingham_manifests::Datastore::Etcd { endpoints: etcd_endpoints },
                "embedded" => gingham_manifests::Datastore::Embedded,
                _ => gingham_manifests::Datastore::Kubernetes,
            };
            let o = gingham_manifests::Options { datastore, namespace, image, mtu, ..Default::default() };
            print!("{}", gingham_manifests::to_yaml(&gingham_manifests::render(&o)).map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Command::Cni {
            command: CniCommand::Install { conf_dir, bin_dir, name, cni_version, mtu, nodename, socket, network_config },
        } => {
            let conf = match network_config.filter(|t| !t.trim().is_empty()) {
                Some(template) => cni::from_template(&template, &nodename, mtu)?,
                None => gingham_cni::conflist(&name, &cni_version, mtu, &nodename, &socket),
            };
            for p in cni::install(&conf_dir, &bin_dir, &conf)? {
                println!("installed {}", p.display());
            }
            Ok(())
        }
        Command::Lab { dir, prefix, command } => lab(&dir, &prefix, command).await,
        Command::Datastore => {
            if let DatastoreConfig::Embedded { path } = ds.resolve()? {
                if !path.exists() {
                    println!("embedded store {}", path.display());
                    eprintln!("(it does not exist yet: the first write creates it)");
                    return Ok(());
                }
            }
            let store = ds.open_existing().await?;
            println!("{}", store.datastore().describe());
            Ok(())
        }
        Command::Apply(f) => resources::apply(&ds.open().await?, &f, resources::Mode::Apply).await,
        Command::Create { files, skip_exists } => {
            resources::apply(&ds.open().await?, &files, resources::Mode::Create { skip_exists }).await
        }
        Command::Replace(f) => resources::apply(&ds.open().await?, &f, resources::Mode::Replace).await,
        Command::Delete { kind, names, files, recursive, namespace, skip_not_exists } => {
            let store = ds.open().await?;
            if files.is_empty() {
                let Some(kind) = kind else { anyhow::bail!("give KIND NAME... or -f FILE") };
                resources::delete_named(&store, &kind, &names, namespace.as_deref(), skip_not_exists).await
            } else {
                resources::delete_files(&store, &FileArgs { files, recursive, namespace }, skip_not_exists).await
            }
        }
        Command::Get { kind, names, namespace, all_namespaces, output } => {
            resources::get(&ds.open_existing().await?, &kind, &names, namespace.as_deref(), all_namespaces, output)
                .await
        }
        Command::Patch { kind, name, patch, patch_type, namespace } => {
            if !matches!(patch_type.as_str(), "merge" | "strategic") {
                anyhow::bail!(
                    "--type {patch_type}: only merge (and strategic, applied as merge) patches are supported"
                );
            }
            resources::patch(&ds.open().await?, &kind, &name, namespace.as_deref(), &patch).await
        }
        Command::Label { kind, name, label, overwrite, remove, namespace } => {
            resources::label(&ds.open().await?, &kind, &name, namespace.as_deref(), &label, overwrite, remove).await
        }
    }
}

async fn lab(dir: &std::path::Path, prefix: &str, command: LabCommand) -> anyhow::Result<()> {
    use gingham_lab as l;
    let exe = std::env::current_exe()?;
    match command {
        LabCommand::Up { nodes, pods_per_node, encap, datastore, bgp_topology, tor, netpol_model, ipam, quiet } => {
            let pods_per_node = if netpol_model { 0 } else { pods_per_node };
            let (etcd, kubernetes) = match datastore.as_str() {
                "embedded" => (false, false),
                "etcd" => (true, false),
                "kubernetes" => (false, true),
                other => anyhow::bail!("--datastore {other}: use embedded, etcd or kubernetes"),
            };
            let opts = l::UpOptions {
                prefix: prefix.to_string(),
                nodes,
                pods_per_node,
                encap: l::Encap::parse(&encap)?,
                etcd,
                kubernetes,
                quiet,
                bgp_topology: bgp_topology.as_deref().map(l::BgpTopology::parse).transpose()?,
                tor,
                netpol_model,
                host_local: ipam == "host-local",
            };
            if !quiet {
                eprintln!("building a {nodes}-node lab ({encap}, {datastore} datastore) in {}", dir.display());
            }
            let started = std::time::Instant::now();
            let state = match l::up(dir, &exe, &opts).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = l::down(dir);
                    return Err(e.into());
                }
            };
            println!(
                "lab up in {:.1}s: {} nodes, {} pods. Next: gingham lab check | status | down; eval \"$(gingham lab env)\"",
                started.elapsed().as_secs_f64(),
                state.nodes.len(),
                state.pods.len()
            );
            Ok(())
        }
        LabCommand::Down => {
            l::down(dir)?;
            println!("lab removed");
            Ok(())
        }
        LabCommand::Status => {
            print!("{}", l::status(&l::State::load(dir)?).await?);
            Ok(())
        }
        LabCommand::Check => {
            let state = l::State::load(dir)?;
            let cells = l::check(&state)?;
            print!("{}", l::render_matrix(&state, &cells));
            let failed = cells.iter().filter(|(_, _, c)| !(c.ping && c.tcp)).count();
            if failed > 0 || cells.is_empty() {
                anyhow::bail!("{failed} of {} pod pairs failed", cells.len());
            }
            println!("all {} pod pairs: ping ok, tcp ok", cells.len());
            Ok(())
        }
        LabCommand::Env => {
            let state = l::State::load(dir)?;
            for (k, v) in &state.env {
                println!("export {k}={v}");
            }
            println!("export GINGHAM_LAB_DIR={}", dir.display());
            Ok(())
        }
        LabCommand::Probe { protocol, port } => {
            let udp = match protocol.to_ascii_uppercase().as_str() {
                "TCP" => false,
                "UDP" => true,
                other => anyhow::bail!("--protocol {other}: TCP or UDP"),
            };
            let state = l::State::load(dir)?;
            l::wait_policy(&state, std::time::Duration::from_secs(10)).await?;
            print!("{}", l::probe(&state, udp, port)?);
            Ok(())
        }
        LabCommand::Pod { command: PodCommand::Add { node, pod, labels, service_account, ip, annotation } } => {
            let mut state = l::State::load(dir)?;
            let labels = labels
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("--labels {kv}: write k=v"))
                })
                .collect::<anyhow::Result<_>>()?;
            let annotations = annotation
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("--annotation {kv}: write KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            let extras = l::PodExtras { service_account, ips: ip, annotations, ..Default::default() };
            let p = l::pod_add(&mut state, &exe, &node, &pod, &labels, &extras).await?;
            println!("pod {} on {}: {}", p.name, p.node, p.ips.join(", "));
            Ok(())
        }
        LabCommand::Pod { command: PodCommand::Del { pod } } => {
            let mut state = l::State::load(dir)?;
            l::pod_del(&mut state, &exe, &pod)?;
            println!("pod {pod} deleted");
            Ok(())
        }
        LabCommand::Exec { pod, command } => {
            let code = l::exec(&l::State::load(dir)?, &pod, &command)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // Invoked by a container runtime: act as a CNI plugin (IPAM plugin under the name *-ipam).
    // Any CNI_* variable means a runtime called: without CNI_COMMAND that is a CNI error, not
    // CLI usage on stdout where the runtime expects JSON.
    let ipam_mode = std::env::args_os()
        .next()
        .is_some_and(|a| std::path::Path::new(&a).file_name().is_some_and(|n| n.to_string_lossy().ends_with("-ipam")));
    let cni_env = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]
        .iter()
        .any(|k| std::env::var_os(k).is_some());
    if ipam_mode || cni_env {
        return cni::main(ipam_mode);
    }
    let cli = Cli::parse();
    // The node agent serves many requests at once; the CLI needs one thread.
    let rt = if matches!(cli.command, Command::Node { .. }) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_eval_reports_position() {
        assert!(selector_eval("a == 'b'", r#"{"a":"b"}"#).unwrap());
        assert!(!selector_eval("has(x)", "{}").unwrap());
        let err = selector_eval("a = 'b'", "{}").unwrap_err().to_string();
        assert!(err.contains("position 2") && err.contains("\n  ^"), "{err}");
        assert!(selector_eval("all()", "[1]").unwrap_err().to_string().contains("--labels"));
    }
}
