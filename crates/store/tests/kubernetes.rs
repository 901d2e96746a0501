//! The Kubernetes datastore against a real kube-apiserver (on a real etcd): the conformance
//! checks that apply to a backend without transactions, a global revision or arbitrary keys
//! (see `Capabilities`), on the objects Calico's KDD layout puts each key in.
//!
//! Not applicable here, and so not run: `transactions_are_all_or_nothing` and
//! `guards_commit_only_while_they_hold` (no multi-key transactions), create_revision checks (the
//! API keeps none), explicit compaction (the API server compacts on its own; a watch from before
//! its history is still checked to end with `Compacted`).

use std::sync::Arc;
use std::time::Duration;

use gingham_store::kubernetes::{KubeConfig, KubeStore};
use gingham_store::testing::kube::KubeApiServer;
use gingham_store::{Datastore, Event, StoreError, TxnOp};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const SETS: &str = "/calico/resources/v3/projectcalico.org/globalnetworksets/";

fn set(nets: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
        "metadata": {"name": "ignored", "labels": {"role": "db"}}, "spec": {"nets": nets}}))
    .unwrap()
}

fn spec(value: &[u8]) -> Value {
    serde_json::from_slice::<Value>(value).unwrap()["spec"].clone()
}

fn install_crds(k: &KubeApiServer) {
    let docs: Vec<Value> = gingham_manifests::render(&Default::default())
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    let yaml = gingham_manifests::to_yaml(&docs).unwrap();
    let out = k.kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(yaml.as_bytes())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    k.kubectl_ok(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_datastore_conformance() {
    let k = KubeApiServer::start().expect("kube-apiserver starts (scripts/kube-build.sh builds it)");
    install_crds(&k);
    let ds: Arc<dyn Datastore> =
        Arc::new(KubeStore::connect(&KubeConfig { kubeconfig: Some(k.kubeconfig.clone()) }).await.unwrap());
    let caps = ds.capabilities();
    assert!(!caps.transactions && !caps.global_revision && !caps.any_key && !caps.create_revision);
    assert!(ds.describe().starts_with("kubernetes https://127.0.0.1:"));

    create_get_and_exists(ds.as_ref()).await;
    compare_and_swap(ds.as_ref()).await;
    delete_at_revision(ds.as_ref()).await;
    list_across_types(ds.as_ref()).await;
    watch_from_revision(ds.as_ref()).await;
    watch_from_now(ds.as_ref()).await;
    history_older_than_the_server_has_is_compacted(ds.as_ref()).await;
    one_write_transactions_only(ds.as_ref()).await;
    concurrent_cas_loses_nothing(ds.clone()).await;
    calico_nodes_are_kubernetes_nodes(&k, ds.as_ref()).await;
    workload_endpoints_are_pods(&k, ds.as_ref()).await;
    objects_written_with_kubectl_are_read(&k, ds).await;
}

async fn calico_nodes_are_kubernetes_nodes(k: &KubeApiServer, ds: &dyn Datastore) {
    let key = "/calico/resources/v3/projectcalico.org/nodes/n1";
    let calico = |ip: &str| {
        serde_json::to_vec(&json!({"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"bgp": {"ipv4Address": ip}}}))
        .unwrap()
    };
    assert_eq!(ds.get(key).await.unwrap(), None);
    let e = ds.update(key, &calico("10.0.0.1/24"), 1).await.unwrap_err().to_string();
    assert!(e.contains("no Kubernetes Node \"n1\""), "{e}");
    let node = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}"#;
    let out = k.kubectl_with_input(&["create", "-f", "-"], Some(node.as_bytes())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kv = ds.get(key).await.unwrap().expect("a Kubernetes Node is a Calico Node");
    assert_eq!(spec(&kv.value)["orchRefs"][0]["orchestrator"], "k8s");
    let mut w = ds.watch("/calico/resources/v3/projectcalico.org/nodes/", kv.mod_revision + 1).await.unwrap();
    let r = ds.update(key, &calico("10.0.0.1/24"), kv.mod_revision).await.unwrap();
    assert!(matches!(ds.update(key, &calico("10.0.0.2/24"), kv.mod_revision).await, Err(StoreError::Conflict { .. })));
    let ev = w.next_timeout(WAIT).await.expect("the Node's change").unwrap();
    assert!(
        matches!(&ev, Event::Put(kv) if kv.mod_revision == r && spec(&kv.value)["bgp"]["ipv4Address"] == "10.0.0.1/24")
    );
    let ann =
        k.kubectl_ok(&["get", "node", "n1", "-o", "jsonpath={.metadata.annotations.projectcalico\\.org/IPv4Address}"]);
    assert_eq!(ann, "10.0.0.1/24");
    assert!(ds.delete(key, None).await.unwrap_err().to_string().contains("kubectl delete node n1"));
}

async fn create_get_and_exists(ds: &dyn Datastore) {
    let key = format!("{SETS}a");
    let rev = ds.create(&key, &set(&["10.0.0.0/8"])).await.unwrap();
    let kv = ds.get(&key).await.unwrap().unwrap();
    assert_eq!((kv.key.as_str(), kv.mod_revision), (key.as_str(), rev));
    let v: Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(v["apiVersion"], "projectcalico.org/v3");
    assert_eq!(v["metadata"]["name"], "a", "the name comes from the key");
    assert_eq!(v["metadata"]["labels"]["role"], "db");
    assert_eq!(v["spec"]["nets"][0], "10.0.0.0/8");
    assert_eq!(ds.create(&key, &set(&[])).await, Err(StoreError::AlreadyExists { key: key.clone() }));
    assert_eq!(spec(&ds.get(&key).await.unwrap().unwrap().value)["nets"][0], "10.0.0.0/8");
    assert_eq!(ds.get(&format!("{SETS}missing")).await.unwrap(), None);
    // Keys this layout has no object for: absent to readers, refused to writers by name.
    let config = "/calico/ipam/v2/config";
    assert_eq!(ds.get(config).await.unwrap(), None);
    let e = ds.create(config, b"{}").await.unwrap_err().to_string();
    assert!(e.contains(config) && e.contains("not kept in the Kubernetes datastore"), "{e}");
    let e = ds.create(&format!("{SETS}b"), b"not json").await.unwrap_err().to_string();
    assert!(e.contains("globalnetworksets/b") && e.contains("not JSON"), "{e}");
}

async fn compare_and_swap(ds: &dyn Datastore) {
    let key = format!("{SETS}cas");
    let r1 = ds.create(&key, &set(&["10.1.0.0/16"])).await.unwrap();
    let r2 = ds.update(&key, &set(&["10.2.0.0/16"]), r1).await.unwrap();
    assert!(r2 > r1);
    match ds.update(&key, &set(&["10.3.0.0/16"]), r1).await {
        Err(StoreError::Conflict { expected, actual, .. }) => assert_eq!((expected, actual), (r1, r2)),
        other => panic!("a stale update must conflict, got {other:?}"),
    }
    let kv = ds.get(&key).await.unwrap().unwrap();
    assert_eq!((spec(&kv.value)["nets"][0].as_str(), kv.mod_revision), (Some("10.2.0.0/16"), r2));
    let none = format!("{SETS}none");
    assert_eq!(ds.update(&none, &set(&[]), r1).await, Err(StoreError::NotFound { key: none }));
}

async fn delete_at_revision(ds: &dyn Datastore) {
    let key = format!("{SETS}d");
    let r1 = ds.create(&key, &set(&[])).await.unwrap();
    let r2 = ds.update(&key, &set(&["10.9.0.0/16"]), r1).await.unwrap();
    assert!(matches!(ds.delete(&key, Some(r1)).await, Err(StoreError::Conflict { .. })));
    assert!(ds.get(&key).await.unwrap().is_some(), "a conflicting delete deletes nothing");
    ds.delete(&key, Some(r2)).await.unwrap();
    assert_eq!(ds.get(&key).await.unwrap(), None);
    assert_eq!(ds.delete(&key, None).await, Err(StoreError::NotFound { key: key.clone() }));
    ds.create(&key, &set(&[])).await.unwrap();
}

async fn list_across_types(ds: &dyn Datastore) {
    let keys = [
        "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26",
        "/calico/ipam/v2/handle/k8s-pod-network.ABC",
        "/calico/ipam/v2/host/node-1/ipv4/block/10.65.0.0-26",
        "/calico/ipam/v2/host/node-2/ipv4/block/10.65.0.64-26",
    ];
    ds.create(
        keys[0],
        br#"{"cidr":"10.65.0.0/26","affinity":"host:node-1","allocations":[null],"unallocated":[0],"attributes":[]}"#,
    )
    .await
    .unwrap();
    ds.create(keys[1], br#"{"block":{"10.65.0.0/26":1},"deleted":false}"#).await.unwrap();
    ds.create(keys[2], br#"{"state":"confirmed","deleted":false}"#).await.unwrap();
    ds.create(keys[3], br#"{"state":"pending","deleted":false}"#).await.unwrap();
    let l = ds.list("/calico/ipam/v2/").await.unwrap();
    let got: Vec<&str> = l.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got, keys, "every type under the prefix, in key order");
    assert!(l.revision >= l.items.iter().map(|kv| kv.mod_revision).max().unwrap());
    let mine = ds.list("/calico/ipam/v2/host/node-1/").await.unwrap();
    assert_eq!(mine.items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), [keys[2]]);
    assert_eq!(
        serde_json::from_slice::<Value>(&mine.items[0].value).unwrap(),
        json!({"state": "confirmed", "deleted": false})
    );
    // Handles keep their case through the lower-cased object name.
    assert_eq!(ds.get(keys[1]).await.unwrap().unwrap().key, keys[1]);
    let all = ds.list("/calico/").await.unwrap();
    assert!(all.items.iter().any(|kv| kv.key.starts_with(SETS)) && all.items.iter().any(|kv| kv.key == keys[0]));
    assert!(ds.list("/elsewhere/").await.unwrap().items.is_empty());
}

async fn watch_from_revision(ds: &dyn Datastore) {
    let prefix = "/calico/resources/v3/projectcalico.org/networksets/w/";
    let start = ds.revision().await.unwrap() + 1;
    let key = format!("{prefix}x");
    let value = |n: &str| {
        serde_json::to_vec(&json!({"apiVersion": "projectcalico.org/v3", "kind": "NetworkSet",
            "metadata": {"name": "x", "namespace": "w"}, "spec": {"nets": [n]}}))
        .unwrap()
    };
    // Namespaced objects need their namespace.
    ds.create(
        "/calico/resources/v3/core/namespaces/w",
        br#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"w"}}"#,
    )
    .await
    .unwrap();
    let r1 = ds.create(&key, &value("10.0.0.1/32")).await.unwrap();
    ds.create(&format!("{SETS}other"), &set(&[])).await.unwrap();
    let r2 = ds.update(&key, &value("10.0.0.2/32"), r1).await.unwrap();
    ds.delete(&key, None).await.unwrap();
    let mut w = ds.watch(prefix, start).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(w.next_timeout(WAIT).await.expect("an event").unwrap());
    }
    assert!(
        matches!(&got[0], Event::Put(kv) if kv.key == key && kv.mod_revision == r1 && spec(&kv.value)["nets"][0] == "10.0.0.1/32")
    );
    assert!(matches!(&got[1], Event::Put(kv) if kv.mod_revision == r2 && spec(&kv.value)["nets"][0] == "10.0.0.2/32"));
    assert!(matches!(&got[2], Event::Delete { key: k, revision } if *k == key && *revision > r2), "{:?}", got[2]);
    // Then live events, only of the prefix.
    ds.create(&format!("{SETS}other2"), &set(&[])).await.unwrap();
    let r4 = ds.create(&format!("{prefix}y"), &value("10.0.0.4/32")).await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("a live event").unwrap();
    assert_eq!((ev.key(), ev.revision()), (format!("{prefix}y").as_str(), r4));
    assert!(w.next_timeout(Duration::from_millis(300)).await.is_none(), "no event from other prefixes");
}

async fn watch_from_now(ds: &dyn Datastore) {
    let mut w = ds.watch("/calico/ipam/v2/", 0).await.unwrap();
    let key = "/calico/ipam/v2/handle/fresh";
    let r = ds.create(key, br#"{"block":{},"deleted":false}"#).await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("an event").unwrap();
    assert_eq!((ev.key(), ev.revision()), (key, r), "only what happened after the watch began");
}

async fn history_older_than_the_server_has_is_compacted(ds: &dyn Datastore) {
    let mut w = ds.watch(SETS, 1).await.unwrap();
    match w.next_timeout(WAIT).await.expect("the watch must say it cannot start there") {
        Err(StoreError::Compacted { requested, .. }) => assert_eq!(requested, 1),
        other => panic!("expected Compacted, got {other:?}"),
    }
}

async fn one_write_transactions_only(ds: &dyn Datastore) {
    let key = format!("{SETS}t");
    let put = |k: &str, c| TxnOp::Put { key: k.into(), value: set(&[]), condition: c };
    let revs = ds.txn(&[put(&key, gingham_store::Condition::Absent)]).await.unwrap();
    assert_eq!(ds.get(&key).await.unwrap().unwrap().mod_revision, revs[0]);
    let e = ds
        .txn(&[
            put(&format!("{SETS}t2"), gingham_store::Condition::Absent),
            put(&format!("{SETS}t3"), gingham_store::Condition::Absent),
        ])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no multi-key transactions"), "{e}");
    assert_eq!(ds.get(&format!("{SETS}t2")).await.unwrap(), None, "nothing of a refused transaction is written");
    assert_eq!(ds.max_txn_ops(), 1);
}

/// Writers incrementing one counter (a handle's count) by compare-and-swap: no lost update.
async fn concurrent_cas_loses_nothing(ds: Arc<dyn Datastore>) {
    let key = "/calico/ipam/v2/handle/counter";
    let count = |v: &[u8]| serde_json::from_slice::<Value>(v).unwrap()["block"]["n"].as_u64().unwrap();
    ds.create(key, br#"{"block":{"n":0},"deleted":false}"#).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let ds = ds.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let kv = ds.get(key).await.unwrap().unwrap();
                    let next = json!({"block": {"n": count(&kv.value) + 1}, "deleted": false});
                    match ds.update(key, &serde_json::to_vec(&next).unwrap(), kv.mod_revision).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&ds.get(key).await.unwrap().unwrap().value), 40);
}

async fn workload_endpoints_are_pods(k: &KubeApiServer, ds: &dyn Datastore) {
    k.kubectl_ok(&["create", "namespace", "p"]);
    for sa in ["default", "web-sa"] {
        k.kubectl_ok(&["create", "serviceaccount", sa, "-n", "p"]);
    }
    let pod = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "p", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "serviceAccountName": "web-sa", "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "busybox", "ports": [{"name": "http", "containerPort": 8080}]}]}}"#;
    let out = k.kubectl_with_input(&["create", "-f", "-"], Some(pod.as_bytes())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A service account's labels reach endpoints through its ksa. profile.
    k.kubectl_ok(&["label", "serviceaccount", "web-sa", "-n", "p", "team=blue"]);
    let ksa = ds
        .get("/calico/resources/v3/projectcalico.org/profiles/ksa.p.web-sa")
        .await
        .unwrap()
        .expect("the ksa. profile");
    assert_eq!(
        serde_json::from_slice::<Value>(&ksa.value).unwrap()["spec"]["labelsToApply"],
        json!({"pcsa.projectcalico.org/name": "web-sa", "pcsa.team": "blue"})
    );
    let profiles = ds.list("/calico/resources/v3/projectcalico.org/profiles/").await.unwrap();
    assert!(profiles.items.iter().any(|kv| kv.key.ends_with("/ksa.p.default")), "every service account");
    let prefix = "/calico/resources/v3/projectcalico.org/workloadendpoints/p/";
    assert!(ds.list(prefix).await.unwrap().items.is_empty(), "a Pod without addresses is no endpoint");
    let mut w = ds.watch(prefix, 0).await.unwrap();
    let key = format!("{prefix}n1-k8s-web--1-eth0");
    let wep = serde_json::to_vec(&json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": "n1-k8s-web--1-eth0", "namespace": "p"},
        "spec": {"node": "n1", "pod": "web-1", "endpoint": "eth0", "ipNetworks": ["10.65.0.7/32"],
                 "interfaceName": "cali0123456789a", "containerID": "c0ffee"}}))
    .unwrap();
    let r1 = ds.create(&key, &wep).await.unwrap();
    assert_eq!(ds.create(&key, &wep).await, Err(StoreError::AlreadyExists { key: key.clone() }));
    let v: Value = serde_json::from_slice(&ds.get(&key).await.unwrap().unwrap().value).unwrap();
    assert_eq!(v["metadata"]["labels"]["app"], "web");
    assert_eq!(v["metadata"]["labels"]["projectcalico.org/serviceaccount"], "web-sa");
    assert_eq!(v["spec"]["ipNetworks"], json!(["10.65.0.7/32"]));
    assert_eq!(v["spec"]["interfaceName"], "cali0123456789a");
    assert_eq!(v["spec"]["ports"][0]["name"], "http");
    let ann = k.kubectl_ok(&[
        "get",
        "pod",
        "web-1",
        "-n",
        "p",
        "-o",
        "jsonpath={.metadata.annotations.cni\\.projectcalico\\.org/podIPs}",
    ]);
    assert_eq!(ann, "10.65.0.7/32", "Calico's plugin annotations");
    let ev = w.next_timeout(WAIT).await.expect("the endpoint appears").unwrap();
    assert!(matches!(&ev, Event::Put(kv) if kv.key == key && kv.mod_revision == r1));
    // The Pod's labels are the endpoint's, live.
    k.kubectl_ok(&["label", "pod", "web-1", "-n", "p", "tier=front"]);
    let ev = w.next_timeout(WAIT).await.expect("the relabelled endpoint").unwrap();
    let Event::Put(kv) = ev else { panic!("{ev:?}") };
    assert_eq!(serde_json::from_slice::<Value>(&kv.value).unwrap()["metadata"]["labels"]["tier"], "front");
    assert!(matches!(ds.delete(&key, Some(r1)).await, Err(StoreError::Conflict { .. })), "the Pod changed since r1");
    ds.delete(&key, Some(kv.mod_revision)).await.unwrap();
    let ev = w.next_timeout(WAIT).await.expect("the endpoint goes").unwrap();
    assert!(matches!(&ev, Event::Delete { key: k, .. } if *k == key), "{ev:?}");
    assert_eq!(ds.get(&key).await.unwrap(), None);
    k.kubectl_ok(&["get", "pod", "web-1", "-n", "p"]);
    let e = ds.create(&format!("{prefix}n1-k8s-nope-eth0"), &wep).await.unwrap_err().to_string();
    assert!(e.contains("no Kubernetes Pod \"p/nope\""), "{e}");
}

/// What a cluster that ran Calico holds (written with kubectl in Calico's CRD form) reads as
/// the projectcalico.org/v3 resource.
async fn objects_written_with_kubectl_are_read(k: &KubeApiServer, ds: Arc<dyn Datastore>) {
    let pool = "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
                cidr: 172.20.0.0/16\n  ipipMode: Always\n  natOutgoing: true\n  nodeSelector: all()\n";
    let out = k.kubectl_with_input(&["apply", "-f", "-"], Some(pool.as_bytes())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rs = gingham_store::ResourceStore::new(ds);
    let got = rs.get(gingham_api::Kind::IPPool, None, "default-ipv4-ippool").await.unwrap().expect("the pool");
    let v = serde_json::to_value(&got).unwrap();
    assert_eq!((v["spec"]["cidr"].as_str(), v["spec"]["ipipMode"].as_str()), (Some("172.20.0.0/16"), Some("Always")));
    let rv = k.kubectl_ok(&["get", "ippool", "default-ipv4-ippool", "-o", "jsonpath={.metadata.resourceVersion}"]);
    assert_eq!(v["metadata"]["resourceVersion"].as_str(), Some(rv.trim()));
}

/// Point 7 of the Kubernetes issue: the agent's credentials are a service-account token file the
/// kubelet rotates (at 80% of its life, never less than 10 minutes), and the store reads that
/// file again (kube-rs: at least once a minute), so a token rotated while the old one still holds
/// is in use before the old one stops working. (The CNI plugin holds no token: it asks the agent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_service_account_token_is_used() {
    let k = KubeApiServer::start().expect("kube-apiserver starts (scripts/kube-build.sh builds it)");
    k.kubectl_ok(&["create", "serviceaccount", "agent", "-n", "default"]);
    k.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "agent",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:agent",
    ]);
    // Tokens bound to a Secret: deleting the Secret revokes its token at once.
    let token = |secret: &str| {
        k.kubectl_ok(&["create", "secret", "generic", secret, "-n", "default"]);
        let bound = format!("--bound-object-name={secret}");
        k.kubectl_ok(&[
            "create",
            "token",
            "agent",
            "-n",
            "default",
            "--bound-object-kind=Secret",
            &bound,
            "--duration=10m",
        ])
        .trim()
        .to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    // As the kubelet does: the new token appears whole (written aside, renamed into place).
    let install = |t: &str| {
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, t).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    let first = token("first");
    install(&first);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: u\n  user:\n    tokenFile: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\n",
            k.url,
            k.ca.display(),
            file.display()
        ),
    )
    .unwrap();
    let ds = KubeStore::connect(&KubeConfig { kubeconfig: Some(kubeconfig) }).await.unwrap();
    let nodes = "/calico/resources/v3/projectcalico.org/nodes/";
    ds.list(nodes).await.expect("the first token works");
    install(&token("second"));
    // The file is read again within a minute; the first token still holds meanwhile.
    tokio::time::sleep(Duration::from_secs(55)).await;
    ds.list(nodes).await.expect("the first token still holds");
    k.kubectl_ok(&["delete", "secret", "first", "-n", "default"]);
    let revoked = |t: &str| k.kubectl(&["--token", t, "get", "nodes"]).is_ok_and(|o| !o.status.success());
    let deadline = std::time::Instant::now() + WAIT;
    while !revoked(&first) {
        assert!(std::time::Instant::now() < deadline, "the first token was not revoked with its Secret");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ds.list(nodes).await.expect("the store uses the rotated token");
}
