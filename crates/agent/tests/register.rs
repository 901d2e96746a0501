//! The agent registers its Node even when etcd goes away between connect and registration
//! (a real etcd, killed and started again on the same data and port), and can be stopped while
//! it waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gingham_api::Kind;
use gingham_store::testing::EtcdServer;
use gingham_store::{Datastore, ResourceStore};

fn config(node: &str, socket: &std::path::Path, store: Arc<dyn Datastore>) -> gingham_agent::AgentConfig {
    gingham_agent::AgentConfig {
        node: node.into(),
        socket: socket.into(),
        store,
        address: gingham_agent::detect::Autodetect::FirstFound,
        health: None,
        routing: false,
        orphan_grace: Duration::from_secs(60),
        bgp: None,
        use_pod_cidr: false,
    }
}

/// A real etcd the client has connected to, then killed (its data and port kept).
async fn etcd_gone_after_connect() -> (EtcdServer, Arc<dyn Datastore>) {
    let mut etcd = EtcdServer::start().expect("etcd");
    let store: Arc<dyn Datastore> = Arc::new(etcd.connect().await.expect("connect"));
    etcd.kill();
    (etcd, store)
}

type Agent = tokio::task::JoinHandle<Result<(), gingham_agent::AgentError>>;

/// The agent on a task of its own, and the sender that tells it to stop.
fn start(node: &str, socket: &std::path::Path, store: Arc<dyn Datastore>) -> (tokio::sync::oneshot::Sender<()>, Agent) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(gingham_agent::run(config(node, socket, store), async {
        let _ = stopped.await;
    }));
    (stop, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_waits_for_a_datastore_that_went_away() {
    let (mut etcd, store) = etcd_gone_after_connect().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let node = format!("register-test-{}", std::process::id());
    let (stop, agent) = start(&node, &socket, store.clone());
    // etcd is away for longer than a few retries; the agent must still be waiting, not gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!agent.is_finished(), "the agent gave up while etcd was away: {:?}", agent.await);
    assert!(!socket.exists(), "the agent serves before its Node is registered");
    etcd.restart().expect("etcd restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the agent did not register after etcd came back");
        assert!(!agent.is_finished(), "the agent ended: {:?}", agent.await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resources = ResourceStore::new(store);
    assert!(resources.get(Kind::Node, None, &node).await.unwrap().is_some(), "Node {node} was not written");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent).await.expect("agent stops").unwrap().unwrap();
    assert!(!socket.exists(), "the agent removes its socket on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waiting_for_its_datastore_stops_when_told() {
    let (_etcd, store) = etcd_gone_after_connect().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let node = format!("register-stop-test-{}", std::process::id());
    let (stop, agent) = start(&node, &socket, store);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!agent.is_finished(), "the agent gave up while etcd was away: {:?}", agent.await);
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), agent).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "told to stop while waiting, the agent must end cleanly: {ended:?}");
    assert!(!socket.exists(), "it never served");
}
