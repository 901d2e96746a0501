//! The node agent (`gingham node run`): registers its Node, holds the datastore connection and
//! this node's IPAM state, and serves the CNI plugin over a unix socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gingham_api::Kind;
use gingham_api::network::NodeSpec;
use gingham_cni::proto::{Message, Request, Response};
use gingham_cni::spec::{CniError, code};
use gingham_ipam::IpamClient;
use gingham_kernel::Netlink;
use gingham_store::resources::ResourceError;
use gingham_store::{Datastore, ResourceStore, StoreError};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

pub mod annotations;
pub mod bgp;
pub mod cache;
pub mod detect;
pub mod endpoints;
pub mod health;
pub mod metrics;
pub mod model;
pub mod socket;
pub mod steps;
pub mod sync;

use endpoints::EndpointService;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("socket {path}: {message}")]
    Socket { path: String, message: String },
    #[error("registering node {node}: {message}")]
    Register { node: String, message: String },
    #[error(transparent)]
    Kernel(#[from] gingham_kernel::KernelError),
}

pub struct AgentConfig {
    pub node: String,
    pub socket: PathBuf,
    pub store: Arc<dyn Datastore>,
    /// How to find this node's address (and so its underlay interface).
    pub address: detect::Autodetect,
    /// Where to serve /liveness, /readiness and /metrics (None: not served).
    pub health: Option<std::net::SocketAddr>,
    /// Program routes, VXLAN and NAT (off: the endpoint service alone).
    pub routing: bool,
    /// How long an endpoint whose interface is gone stays before its addresses are released.
    pub orphan_grace: Duration,
    /// Speak BGP (with routing), reading BGPPeer passwords from this directory.
    pub bgp: Option<PathBuf>,
    /// Route (and advertise) each node's Kubernetes podCIDRs: pods get their addresses from
    /// host-local with `usePodCidr` (Calico's USE_POD_CIDR).
    pub use_pod_cidr: bool,
}

/// Make sure this node's Node resource exists with its address (others route to it and select
/// on its labels). A datastore that is slow or away for a while (etcd still electing itself, a
/// node booting before its datastore) is waited for, as at connect; any other error ends the agent.
async fn register(resources: &ResourceStore, node: &str, address: Option<ipnet::IpNet>) -> Result<(), AgentError> {
    let mut pause = Duration::from_millis(200);
    loop {
        match register_once(resources, node, address).await {
            Err(ResourceError::Store(StoreError::Unavailable(m))) => {
                eprintln!("gingham node agent: registering node {node}: waiting for the datastore: {m}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            r => return r.map_err(|e| AgentError::Register { node: node.into(), message: e.to_string() }),
        }
    }
}

async fn register_once(
    resources: &ResourceStore,
    node: &str,
    address: Option<ipnet::IpNet>,
) -> Result<(), ResourceError> {
    resources
        .modify(Kind::Node, None, node, true, |_, spec: &mut NodeSpec| {
            let Some(a) = address.map(|a| a.to_string()) else { return false };
            let bgp = spec.bgp.get_or_insert_with(Default::default);
            if bgp.ipv4_address.as_deref() == Some(a.as_str()) {
                return false;
            }
            bgp.ipv4_address = Some(a);
            true
        })
        .await
        .map(|_| ())
}

/// Serve until `shutdown` resolves. Removes a stale socket file first and its own on exit.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    gingham_kernel::memory::keep_large_allocations_mapped();
    let resources = ResourceStore::new(config.store.clone());
    let host = Netlink::current()?;
    let metrics = Arc::new(metrics::Metrics::default());
    let detected = if config.routing {
        let (iface, addr) = detect::detect_address(&host, &config.address)
            .await
            .map_err(|m| AgentError::Register { node: config.node.clone(), message: m })?;
        Some((iface, addr))
    } else {
        None
    };
    tokio::pin!(shutdown);
    // Told to stop while still waiting for the datastore: nothing was started yet.
    tokio::select! {
        r = register(&resources, &config.node, detected.as_ref().map(|(_, a)| *a)) => r?,
        _ = &mut shutdown => return Ok(()),
    }
    let net = match detected {
        Some((iface, addr)) => {
            let node_ip = detect::ipv4(&addr).ok_or_else(|| AgentError::Register {
                node: config.node.clone(),
                message: format!("{addr} is not IPv4"),
            })?;
            let link = host.link(&iface).await?.ok_or_else(|| AgentError::Register {
                node: config.node.clone(),
                message: format!("interface {iface} vanished"),
            })?;
            let nft = gingham_kernel::nft::Nft::current()?;
            Some(model::Network::new(host.clone(), nft, iface, link.index, node_ip, link.mtu))
        }
        None => None,
    };
    // The model: the datastore followed (list once, then watch) into the cache, the
    // calculation, and the managers.
    let tunnels = Arc::new(tokio::sync::Notify::new());
    let sweep = Arc::new(tokio::sync::Notify::new());
    let routing = net.is_some();
    let (mut model, locals, shared) = model::Model::new(
        &config.node,
        net,
        gingham_dataplane::workloads::WorkloadManager::new(host.clone()),
        metrics.clone(),
        tunnels.clone(),
        sweep.clone(),
        config.use_pod_cidr,
    );
    if let (true, Some(secrets)) = (routing, config.bgp.clone()) {
        let keys = gingham_bgp::tasks::SocketHooks {
            md5: Arc::new(gingham_kernel::tcp::set_md5_key),
            ttl_security: Arc::new(gingham_kernel::tcp::set_ttl_security),
        };
        model.with_bgp(bgp::Runner::new(Some(secrets), Some(keys)));
    }
    let programmed = model.programmed();
    for prefix in cache::FOLLOWED {
        tokio::spawn(sync::follow(config.store.clone(), prefix, shared.clone()));
    }
    let kernel = gingham_kernel::route_and_link_events().ok();
    tokio::spawn(model.run(kernel));
    if routing {
        tunnels.notify_one();
        tokio::spawn(model::maintain_tunnels(
            IpamClient::new(config.store.clone()),
            config.node.clone(),
            tunnels,
            metrics.clone(),
        ));
    }
    if let Some(addr) = config.health {
        let listener = health::bind(addr)
            .await
            .map_err(|e| AgentError::Socket { path: addr.to_string(), message: e.to_string() })?;
        tokio::spawn(health::serve(listener, metrics.clone()));
    }
    let mut service = EndpointService::new(
        config.node.clone(),
        IpamClient::new(config.store.clone()),
        resources,
        host,
        metrics.clone(),
        locals,
        programmed,
    );
    service.load_pending(pending_dels_path(&config.socket));
    let service = Arc::new(service);
    let s = service.clone();
    tokio::spawn(async move { s.sweep_teardowns().await });
    tokio::spawn(service.clone().sweep_orphans(config.orphan_grace, sweep));
    let path = config.socket.clone();
    let listener =
        socket::bind(&path).map_err(|m| AgentError::Socket { path: path.display().to_string(), message: m })?;
    let slots = Arc::new(tokio::sync::Semaphore::new(socket::MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let svc = service.clone();
                    tokio::spawn(async move { handle(svc, stream).await; drop(permit); });
                }
                // Out of descriptors or similar: wait instead of spinning on accept().
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
    socket::remove(&path);
    Ok(())
}

/// Where the agent keeps the DELs it completed locally while the datastore was away.
pub fn pending_dels_path(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".pending-dels.json");
    socket.with_file_name(name)
}

async fn handle(svc: Arc<EndpointService>, mut stream: UnixStream) {
    let resp = match socket::read_request(&stream).await {
        Err(e) => Response {
            result: None,
            error: Some(CniError::new(code::DECODE_FAILURE, "unreadable request").details(e.to_string())),
            ..Default::default()
        },
        Ok((msg, fds)) => {
            let (mut resp, steps) = steps::recorded(dispatch(&svc, msg, fds, &stream)).await;
            resp.steps = steps;
            resp
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = stream.write_all(&out).await;
}

/// Whether the plugin that sent this request has given up on it.
fn caller_gave_up(deadline_ms: u64, stream: &UnixStream) -> bool {
    gingham_cni::proto::now_ms() > deadline_ms || socket::peer_gone(stream)
}

fn gave_up() -> CniError {
    CniError::new(code::TRY_AGAIN_LATER, "the plugin gave up waiting for this request; nothing was left in place")
}

async fn dispatch(svc: &EndpointService, msg: Message, fds: Vec<std::fs::File>, stream: &UnixStream) -> Response {
    let done = |r: Result<(), CniError>| Response { error: r.err(), ..Default::default() };
    let with = |r: Result<gingham_cni::spec::CniResult, CniError>| match r {
        Ok(res) => Response { result: Some(res), ..Default::default() },
        Err(e) => Response { error: Some(e), ..Default::default() },
    };
    if caller_gave_up(msg.deadline_ms, stream) {
        return done(Err(gave_up()));
    }
    // As Calico's plugin: while the datastore is held, nothing that writes to it goes ahead
    // (the runtime retries; nothing is lost).
    if svc.metrics.datastore_held.load(std::sync::atomic::Ordering::Relaxed)
        && !matches!(msg.request, Request::Check { .. } | Request::PodCidrs)
    {
        return done(Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the datastore is not ready: ClusterInformation default has datastoreReady: false (a migration or \
             upgrade holds it); try again once it is true",
        )));
    }
    let netns = || {
        fds.into_iter().next().ok_or_else(|| {
            CniError::new(code::INVALID_ENV, "the plugin did not pass the pod's network namespace with the request")
        })
    };
    match msg.request {
        Request::Add(ep) => {
            let ns = match netns() {
                Ok(ns) => ns,
                Err(e) => return done(Err(e)),
            };
            let r = svc.add(&ep, ns).await;
            // An ADD the caller no longer waits for is taken back: the runtime has already
            // reported it failed and will not DEL what it never saw.
            if r.is_ok() && caller_gave_up(msg.deadline_ms, stream) {
                let _ = svc.del(&ep).await;
                return done(Err(gave_up()));
            }
            with(r)
        }
        Request::Del(ep) => done(svc.del(&ep).await),
        Request::Check { endpoint, prev } => match netns() {
            Ok(ns) => done(svc.check(&endpoint, prev.as_ref(), ns).await),
            Err(e) => done(Err(e)),
        },
        Request::IpamAdd(ep) => {
            let r = svc.ipam_add(&ep).await;
            if r.is_ok() && caller_gave_up(msg.deadline_ms, stream) {
                let _ = svc.ipam_del(&ep).await;
                return done(Err(gave_up()));
            }
            with(r)
        }
        Request::IpamDel(ep) => done(svc.ipam_del(&ep).await),
        Request::Gc { network, valid } => done(svc.gc(&network, &valid).await),
        Request::PodCidrs => match svc.pod_cidrs().await {
            Ok(pod_cidrs) => Response { pod_cidrs, ..Default::default() },
            Err(e) => done(Err(e)),
        },
        Request::Status => {
            // Ready when the datastore answers and some pool exists to allocate from.
            match tokio::time::timeout(Duration::from_secs(5), svc.ipam.pools()).await {
                Ok(Ok(p)) if p.iter().any(|p| !p.disabled()) => done(Ok(())),
                Ok(Ok(_)) => {
                    done(Err(CniError::new(code::LIMITED_CONNECTIVITY, "no enabled IPPool: pods cannot get addresses")))
                }
                Ok(Err(e)) => {
                    done(Err(CniError::new(code::PLUGIN_NOT_AVAILABLE, "the datastore is not reachable")
                        .details(e.to_string())))
                }
                Err(_) => done(Err(CniError::new(code::PLUGIN_NOT_AVAILABLE, "the datastore did not answer in 5 s"))),
            }
        }
    }
}
