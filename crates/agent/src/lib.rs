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
}

/// Make sure this node's Node resource exists (others select on its labels).
async fn register(resources: &ResourceStore, node: &str) -> Result<(), AgentError> {
    let err = |m: String| AgentError::Register { node: node.into(), message: m };
    if resources.get(Kind::Node, None, node).await.map_err(|e| err(e.to_string()))?.is_some() {
        return Ok(());
    }
    let value = serde_json::to_value(Object {
        api_version: Kind::Node.api_version().into(),
        kind: Kind::Node.kind_name().into(),
        metadata: ObjectMeta { name: node.into(), ..Default::default() },
        spec: serde_json::json!({}),
        status: None,
    })
    .map_err(|e| err(e.to_string()))?;
    let obj = Kind::Node
        .normalize(&value)
        .map_err(|e| err(e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;
    match resources.create(obj).await {
        Ok(_) | Err(gingham_store::resources::ResourceError::Store(StoreError::AlreadyExists { .. })) => Ok(()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Serve until `shutdown` resolves. Removes a stale socket file first and its own on exit.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let resources = ResourceStore::new(config.store.clone());
    register(&resources, &config.node).await?;
    let service = Arc::new(EndpointService {
        node: config.node.clone(),
        ipam: IpamClient::new(config.store.clone()),
        resources,
        host: Netlink::current()?,
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
