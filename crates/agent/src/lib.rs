//! The node agent (`gingham node run`): registers its Node, holds the datastore connection and
//! this node's IPAM state, and serves the CNI plugin over a unix socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gingham_api::{Kind, Object, ObjectMeta};
use gingham_cni::proto::{Request, Response};
use gingham_cni::spec::{CniError, code};
use gingham_ipam::IpamClient;
use gingham_kernel::Netlink;
use gingham_store::{Datastore, ResourceStore, StoreError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub mod endpoints;
pub mod health;
pub mod routing;

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
    pub address: routing::Autodetect,
    /// Where to serve /liveness, /readiness and /metrics (None: not served).
    pub health: Option<std::net::SocketAddr>,
    /// Program routes, VXLAN and NAT (off: the endpoint service alone).
    pub routing: bool,
}

/// Make sure this node's Node resource exists with its address (others route to it and select
/// on its labels).
async fn register(resources: &ResourceStore, node: &str, address: Option<ipnet::IpNet>) -> Result<(), AgentError> {
    let err = |m: String| AgentError::Register { node: node.into(), message: m };
    for _ in 0..10 {
        let current = resources.get(Kind::Node, None, node).await.map_err(|e| err(e.to_string()))?;
        let mut value = match &current {
            Some(o) => serde_json::to_value(o).map_err(|e| err(e.to_string()))?,
            None => serde_json::to_value(Object {
                api_version: Kind::Node.api_version().into(),
                kind: Kind::Node.kind_name().into(),
                metadata: ObjectMeta { name: node.into(), ..Default::default() },
                spec: serde_json::json!({}),
                status: None,
            })
            .map_err(|e| err(e.to_string()))?,
        };
        if let Some(a) = address {
            if value.pointer("/spec/bgp/ipv4Address").and_then(|v| v.as_str()) == Some(a.to_string().as_str()) {
                return Ok(());
            }
            if value["spec"].get("bgp").is_none() {
                value["spec"]["bgp"] = serde_json::json!({});
            }
            value["spec"]["bgp"]["ipv4Address"] = serde_json::json!(a.to_string());
        } else if current.is_some() {
            return Ok(());
        }
        let mut obj = Kind::Node
            .normalize(&value)
            .map_err(|e| err(e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;
        let result = match &current {
            None => resources.create(obj).await.map(|_| ()),
            Some(c) => {
                obj.metadata.resource_version = c.metadata.resource_version.clone();
                resources.update(obj).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(gingham_store::resources::ResourceError::Store(
                StoreError::AlreadyExists { .. } | StoreError::Conflict { .. },
            )) => continue,
            Err(e) => return Err(err(e.to_string())),
        }
    }
    Err(err("too many conflicting writers".into()))
}

/// Serve until `shutdown` resolves. Removes a stale socket file first and its own on exit.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let resources = ResourceStore::new(config.store.clone());
    let host = Netlink::current()?;
    let metrics = Arc::new(routing::Metrics::default());
    let detected = if config.routing {
        let (iface, addr) = routing::detect_address(&host, &config.address)
            .await
            .map_err(|m| AgentError::Register { node: config.node.clone(), message: m })?;
        Some((iface, addr))
    } else {
        None
    };
    register(&resources, &config.node, detected.as_ref().map(|(_, a)| *a)).await?;
    if let Some((iface, addr)) = detected {
        let node_ip = routing::ipv4(&addr).ok_or_else(|| AgentError::Register {
            node: config.node.clone(),
            message: format!("{addr} is not IPv4"),
        })?;
        let underlay_mtu = host.link(&iface).await?.map(|l| l.mtu).unwrap_or(1500);
        let r = Arc::new(routing::Routing {
            node: config.node.clone(),
            store: config.store.clone(),
            ipam: IpamClient::new(config.store.clone()),
            dataplane: gingham_dataplane::apply::Dataplane::new(host.clone(), iface, node_ip),
            underlay_mtu,
            metrics: metrics.clone(),
        });
        tokio::spawn(r.run());
    }
    if let Some(addr) = config.health {
        let listener = health::bind(addr)
            .await
            .map_err(|e| AgentError::Socket { path: addr.to_string(), message: e.to_string() })?;
        tokio::spawn(health::serve(listener, metrics.clone()));
    }
    let service = Arc::new(EndpointService {
        node: config.node.clone(),
        ipam: IpamClient::new(config.store.clone()),
        resources,
        host,
        metrics,
    });
    let path = config.socket.clone();
    let sock_err = |m: String| AgentError::Socket { path: path.display().to_string(), message: m };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| sock_err(e.to_string()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| sock_err(e.to_string()))?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let svc = service.clone();
                tokio::spawn(async move { let _ = handle(svc, stream).await; });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(svc: Arc<EndpointService>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response {
            result: None,
            error: Some(CniError::new(code::DECODE_FAILURE, "unreadable request").details(e.to_string())),
        },
        Ok(req) => dispatch(&svc, req).await,
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

async fn dispatch(svc: &EndpointService, req: Request) -> Response {
    let done = |r: Result<(), CniError>| Response { result: None, error: r.err() };
    let with = |r: Result<gingham_cni::spec::CniResult, CniError>| match r {
        Ok(res) => Response { result: Some(res), error: None },
        Err(e) => Response { result: None, error: Some(e) },
    };
    match req {
        Request::Add(ep) => with(svc.add(&ep).await),
        Request::Del(ep) => done(svc.del(&ep).await),
        Request::Check { endpoint, prev } => done(svc.check(&endpoint, prev.as_ref()).await),
        Request::IpamAdd(ep) => with(svc.ipam_add(&ep).await),
        Request::IpamDel(ep) => done(svc.ipam_del(&ep).await),
        Request::Gc { network, valid } => done(svc.gc(&network, &valid).await),
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
