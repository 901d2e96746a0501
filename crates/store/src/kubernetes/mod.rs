//! The Kubernetes API as a datastore (Calico's KDD mode): each key is one object (see
//! `mapping`), its revision the object's resourceVersion, compare-and-swap the API's own
//! resourceVersion precondition, and watches the API's watches (bookmarks followed, 410 Gone
//! reported as `Compacted`). What the API cannot do, this backend says in its `Capabilities`:
//! no multi-key transactions, no guards, no creation revision, only the keys `mapping` places.
//! A Calico Node is its Kubernetes Node's annotations, a workload endpoint its Pod's: written
//! by merging into that object, which is never created or deleted here.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use http::{Method, Request};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Capabilities, Condition, Datastore, Event, KeyValue, Listing, Result, Revision, StoreError, TxnOp, Watch};

pub mod mapping;
pub mod pods;

use mapping::{ResourceType, parse_resource_version, resource_types, type_of, types_under};

/// How to reach the API server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeConfig {
    /// A kubeconfig file; `None`: $KUBECONFIG, ~/.kube/config, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

pub struct KubeStore {
    client: kube::Client,
    server: String,
    types: Vec<ResourceType>,
}

/// The longest a watch request stays open before it is renewed from its last revision.
const WATCH_SECONDS: u64 = 300;

impl KubeStore {
    pub async fn connect(config: &KubeConfig) -> Result<KubeStore> {
        let unavailable = |e: String| StoreError::Unavailable(format!("Kubernetes API: {e}"));
        let cfg = match &config.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| unavailable(format!("kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| unavailable(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| unavailable(e.to_string()))?,
        };
        let server = cfg.cluster_url.to_string();
        let client = kube::Client::try_from(cfg).map_err(|e| unavailable(e.to_string()))?;
        Ok(KubeStore { client, server, types: resource_types() })
    }

    /// Create a Kubernetes object as it is (`api` e.g. `/api/v1`, `plural` e.g. `pods`): for
    /// what plays the kubelet or the cluster's users — the lab, benchmarks — not for gingham's
    /// own keys. Returns its resourceVersion.
    pub async fn create_object(&self, api: &str, plural: &str, object: &Value) -> Result<Revision> {
        let ns = object.pointer("/metadata/namespace").and_then(Value::as_str);
        let path = match ns {
            Some(ns) => format!("{api}/namespaces/{ns}/{plural}"),
            None => format!("{api}/{plural}"),
        };
        let created = self.call(Method::POST, &path, Some(object)).await.map_err(|e| api_error(e, &path))?;
        revision_of(&created, &path)
    }

    /// Merge-patch an object (`path` e.g. `/api/v1/namespaces/ns/pods/p/status`): the same
    /// audience as `create_object`. Returns its resourceVersion.
    pub async fn patch_object(&self, path: &str, patch: &Value) -> Result<Revision> {
        let patched = self.call(Method::PATCH, path, Some(patch)).await.map_err(|e| api_error(e, path))?;
        revision_of(&patched, path)
    }

    fn type_of(&self, key: &str) -> Result<&ResourceType> {
        type_of(&self.types, key).ok_or_else(|| {
            StoreError::Backend(format!(
                "{key}: not kept in the Kubernetes datastore (Calico's layout has no object for it)"
            ))
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, kube::Error> {
        let mut req = Request::builder().method(method.clone()).uri(path);
        if body.is_some() {
            let kind = if method == Method::PATCH { "application/merge-patch+json" } else { "application/json" };
            req = req.header("Content-Type", kind);
        }
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
        let req = req.body(body).map_err(kube::Error::HttpError)?;
        self.client.request::<Value>(req).await
    }

    /// The object's current revision (for a conflict's report), if it exists.
    async fn current(&self, key: &str) -> Option<Revision> {
        self.get(key).await.ok().flatten().map(|kv| kv.mod_revision)
    }

    /// List one type (one namespace of it, if given), at `at` exactly when given.
    /// `visit` gets each page (at most `page` objects, converted) as it arrives.
    async fn list_type(
        &self,
        t: &ResourceType,
        ns: Option<&str>,
        at: Option<Revision>,
        page: usize,
        visit: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        let mut continue_token = String::new();
        let mut revision = None;
        loop {
            let query = {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("limit", &page.clamp(1, 500).to_string());
                match (at.or(revision), continue_token.is_empty()) {
                    (_, false) => {
                        q.append_pair("continue", &continue_token);
                    }
                    (Some(rv), true) => {
                        q.append_pair("resourceVersion", &rv.to_string()).append_pair("resourceVersionMatch", "Exact");
                    }
                    (None, true) => {}
                }
                q.finish()
            };
            let path = format!("{}?{query}", t.collection(ns));
            let list = self.call(Method::GET, &path, None).await.map_err(|e| api_error(e, &t.key_prefix))?;
            let rv = list.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or_default();
            let rv = parse_resource_version(rv)
                .ok_or_else(|| StoreError::Backend(format!("{path}: list resourceVersion {rv:?} is not a number")))?;
            revision.get_or_insert(rv);
            let mut items = Vec::new();
            for obj in list.get("items").and_then(Value::as_array).into_iter().flatten() {
                items.extend(t.from_object(obj)?);
            }
            continue_token = list.pointer("/metadata/continue").and_then(Value::as_str).unwrap_or_default().to_string();
            drop(list);
            visit(items);
            if continue_token.is_empty() {
                return Ok(revision.unwrap_or_default());
            }
        }
    }

    /// The Kubernetes object a merged key (a Calico Node, a workload endpoint) is written into,
    /// its revision, and whether it holds the key now; None if there is no such object.
    async fn merge_target(&self, t: &ResourceType, key: &str) -> Result<Option<(Value, Revision, bool)>> {
        let obj = match self.call(Method::GET, &t.item(&t.locate(key)?), None).await {
            Ok(o) => o,
            Err(e) => {
                return match api_error(e, key) {
                    StoreError::NotFound { .. } => Ok(None),
                    e => Err(e),
                };
            }
        };
        let current = revision_of(&obj, key)?;
        // A Node always is a Calico Node; a Pod is an endpoint once it has addresses.
        let exists = t.from_object(&obj)?.is_some_and(|kv| kv.key == key);
        Ok(Some((obj, current, exists)))
    }

    /// A Calico Node or workload endpoint is merged into its Kubernetes object,
    /// compare-and-swap on that object's resourceVersion.
    async fn write_merged(&self, t: &ResourceType, key: &str, value: &[u8], condition: Condition) -> Result<Revision> {
        let given: Value = serde_json::from_slice(value)
            .map_err(|e| StoreError::Backend(format!("{key}: the value is not JSON ({e})")))?;
        let Some((obj, current, exists)) = self.merge_target(t, key).await? else {
            // The kubelet registers Nodes and creates Pods before gingham sees them.
            let at = t.locate(key)?;
            let name = at.namespace.map_or(at.name.clone(), |ns| format!("{ns}/{}", at.name));
            return Err(StoreError::Backend(format!(
                "{key}: there is no Kubernetes {} {name:?}; in the Kubernetes datastore this is that object's \
                 annotations, so it must exist first",
                t.kind
            )));
        };
        match condition {
            Condition::Absent if exists => return Err(StoreError::AlreadyExists { key: key.into() }),
            Condition::At(_) | Condition::Exists if !exists => return Err(StoreError::NotFound { key: key.into() }),
            Condition::At(expected) if expected != current => {
                return Err(StoreError::Conflict { key: key.into(), expected, actual: current });
            }
            _ => {}
        }
        let merged = match t.codec {
            mapping::Codec::Pod => pods::merge_endpoint(&obj, &given),
            _ => mapping::merge_node(&obj, &given),
        }
        .map_err(|e| StoreError::Backend(format!("{key}: {e}")))?;
        self.put_merged(t, key, &merged, current).await
    }

    async fn put_merged(&self, t: &ResourceType, key: &str, obj: &Value, current: Revision) -> Result<Revision> {
        match self.call(Method::PUT, &t.item(&t.locate(key)?), Some(obj)).await {
            Ok(written) => revision_of(&written, key),
            Err(e) => Err(match api_error(e, key) {
                StoreError::Conflict { .. } => StoreError::Conflict {
                    key: key.into(),
                    expected: current,
                    actual: self.current(key).await.unwrap_or(current),
                },
                e => e,
            }),
        }
    }

    async fn write(&self, key: &str, value: &[u8], condition: Condition) -> Result<Revision> {
        let t = self.type_of(key)?;
        if matches!(t.codec, mapping::Codec::Node | mapping::Codec::Pod) {
            return self.write_merged(t, key, value, condition).await;
        }
        let at = t.locate(key)?;
        let mut obj = t.to_object(key, value)?;
        let result = match condition {
            Condition::Absent => self.call(Method::POST, &t.collection(at.namespace.as_deref()), Some(&obj)).await,
            Condition::At(rev) => {
                obj["metadata"]["resourceVersion"] = json!(rev.to_string());
                self.call(Method::PUT, &t.item(&at), Some(&obj)).await
            }
            Condition::Exists | Condition::Any => {
                // Unconditional: replace at whatever revision is current, or create.
                match self.get(key).await? {
                    Some(kv) => {
                        obj["metadata"]["resourceVersion"] = json!(kv.mod_revision.to_string());
                        self.call(Method::PUT, &t.item(&at), Some(&obj)).await
                    }
                    None if condition == Condition::Any => {
                        self.call(Method::POST, &t.collection(at.namespace.as_deref()), Some(&obj)).await
                    }
                    None => return Err(StoreError::NotFound { key: key.into() }),
                }
            }
        };
        match result {
            Ok(written) => revision_of(&written, key),
            Err(e) => Err(match (api_error(e, key), condition) {
                (StoreError::Conflict { .. }, Condition::At(expected)) => match self.current(key).await {
                    Some(actual) => StoreError::Conflict { key: key.into(), expected, actual },
                    None => StoreError::NotFound { key: key.into() },
                },
                (e, _) => e,
            }),
        }
    }
}

fn revision_of(obj: &Value, key: &str) -> Result<Revision> {
    let rv = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or_default();
    parse_resource_version(rv)
        .ok_or_else(|| StoreError::Backend(format!("{key}: resourceVersion {rv:?} is not a number")))
}

/// The API's answer as a StoreError about `key`.
fn api_error(e: kube::Error, key: &str) -> StoreError {
    match e {
        kube::Error::Api(s) => match (s.code, s.reason.as_str()) {
            (404, _) => StoreError::NotFound { key: key.into() },
            (409, "AlreadyExists") => StoreError::AlreadyExists { key: key.into() },
            (409, _) => StoreError::Conflict { key: key.into(), expected: 0, actual: 0 },
            (410, _) => StoreError::Compacted { requested: 0, compacted: 0 },
            (401 | 403, _) => StoreError::Unavailable(format!("{key}: the API server refused: {}", s.message)),
            _ => StoreError::Backend(format!("{key}: the API server said {} {}: {}", s.code, s.reason, s.message)),
        },
        other => StoreError::Unavailable(format!("{key}: Kubernetes API: {other}")),
    }
}

#[async_trait]
impl Datastore for KubeStore {
    fn describe(&self) -> String {
        format!("kubernetes {}", self.server)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { transactions: false, global_revision: false, create_revision: false, any_key: false }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let Some(t) = type_of(&self.types, key) else { return Ok(None) };
        let Ok(at) = t.locate(key) else { return Ok(None) };
        match self.call(Method::GET, &t.item(&at), None).await {
            Ok(obj) => {
                // Names are derived (lower-cased handles, endpoints): the object must be this key's.
                Ok(t.from_object(&obj)?.filter(|kv| kv.key == key))
            }
            Err(e) => match api_error(e, key) {
                StoreError::NotFound { .. } => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Each type under `prefix` is listed; all at the revision of the first (resourceVersionMatch
    /// Exact), so the listing is one snapshot and a watch from `revision + 1` misses nothing.
    async fn list(&self, prefix: &str) -> Result<Listing> {
        let mut items = Vec::new();
        let revision = self.list_pages(prefix, 500, &mut |page| items.extend(page)).await?;
        items.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing { items, revision })
    }

    /// Type by type, page by page as the API serves them (not in key order across types).
    async fn list_pages(
        &self,
        prefix: &str,
        page: usize,
        visit: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        let mut at: Option<Revision> = None;
        for (t, ns) in types_under(&self.types, prefix) {
            let mut under = |kvs: Vec<KeyValue>| {
                let kvs: Vec<KeyValue> = kvs.into_iter().filter(|kv| kv.key.starts_with(prefix)).collect();
                if !kvs.is_empty() {
                    visit(kvs);
                }
            };
            let rv = self.list_type(t, ns.as_deref(), at, page, &mut under).await?;
            at.get_or_insert(rv);
        }
        match at {
            Some(r) => Ok(r),
            None => self.revision().await,
        }
    }

    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.write(key, value, Condition::Absent).await
    }

    async fn update(&self, key: &str, value: &[u8], revision: Revision) -> Result<Revision> {
        self.write(key, value, Condition::At(revision)).await
    }

    /// Returns the revision the object had when it was deleted (the API reports no revision
    /// for the deletion itself; the watch's Delete event carries it).
    async fn delete(&self, key: &str, revision: Option<Revision>) -> Result<Revision> {
        let t = self.type_of(key)?;
        let at = t.locate(key)?;
        if t.codec == mapping::Codec::Pod {
            // The endpoint goes; the Pod (the kubelet's) stays, without the plugin's annotations.
            let Some((obj, current, true)) = self.merge_target(t, key).await? else {
                return Err(StoreError::NotFound { key: key.into() });
            };
            if let Some(expected) = revision.filter(|r| *r != current) {
                return Err(StoreError::Conflict { key: key.into(), expected, actual: current });
            }
            return self.put_merged(t, key, &pods::clear_endpoint(&obj), current).await;
        }
        if t.codec == mapping::Codec::Node {
            return Err(match self.current(key).await {
                None => StoreError::NotFound { key: key.into() },
                Some(_) => StoreError::Backend(format!(
                    "{key}: in the Kubernetes datastore a Calico Node goes with its Kubernetes Node \
                     (kubectl delete node {})",
                    at.name
                )),
            });
        }
        let rev = match revision {
            Some(r) => r,
            None => self.current(key).await.ok_or_else(|| StoreError::NotFound { key: key.into() })?,
        };
        let body =
            json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": rev.to_string()}});
        match self.call(Method::DELETE, &t.item(&at), Some(&body)).await {
            Ok(_) => Ok(rev),
            Err(e) => Err(match api_error(e, key) {
                StoreError::Conflict { .. } => match self.current(key).await {
                    Some(actual) => StoreError::Conflict { key: key.into(), expected: rev, actual },
                    None => StoreError::NotFound { key: key.into() },
                },
                e => e,
            }),
        }
    }

    /// One write, unguarded: all the API can do atomically.
    async fn txn(&self, ops: &[TxnOp]) -> Result<Vec<Revision>> {
        match ops {
            [] => Ok(Vec::new()),
            [TxnOp::Put { key, value, condition }] => Ok(vec![self.write(key, value, *condition).await?]),
            [TxnOp::Delete { key, condition }] => {
                let rev = match condition {
                    Condition::At(r) => Some(*r),
                    Condition::Absent => {
                        return Err(StoreError::Backend(format!("{key}: delete with condition Absent")));
                    }
                    Condition::Exists | Condition::Any => None,
                };
                match self.delete(key, rev).await {
                    Err(StoreError::NotFound { .. }) if *condition == Condition::Any => Ok(vec![0]),
                    r => Ok(vec![r?]),
                }
            }
            _ => Err(StoreError::Backend(format!(
                "the Kubernetes datastore has no multi-key transactions or guards ({} ops asked for, starting at {})",
                ops.len(),
                ops[0].key()
            ))),
        }
    }

    fn max_txn_ops(&self) -> usize {
        1
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        let types: Vec<(ResourceType, Option<String>)> =
            types_under(&self.types, prefix).into_iter().map(|(t, ns)| (t.clone(), ns)).collect();
        // The API's resourceVersion means "after this one"; ours means "from this one". ("0"
        // would mean "the current state, replayed as additions": never asked for.)
        let after = if from > 0 { (from - 1).max(1) } else { self.revision().await? };
        let (tx, rx) = mpsc::channel(1024);
        let client = self.client.clone();
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for (t, ns) in types {
                set.spawn(watch_type(client.clone(), t, ns, prefix.clone(), after, from, tx.clone()));
            }
            drop(tx);
            while set.join_next().await.is_some() {}
        });
        Ok(Watch::new(rx, task))
    }

    /// The revision of a fresh list of IP pools (one small read; every revision the API hands
    /// out is the same counter on an etcd-backed server).
    async fn revision(&self) -> Result<Revision> {
        let t = self.type_of("/calico/resources/v3/projectcalico.org/ippools/x")?;
        let list = self
            .call(Method::GET, &format!("{}?limit=1", t.collection(None)), None)
            .await
            .map_err(|e| api_error(e, &t.key_prefix))?;
        revision_of(&list, &t.key_prefix)
    }

    /// The API server compacts its own history.
    async fn compact(&self, _revision: Revision) -> Result<()> {
        Ok(())
    }

    async fn workload_annotations(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        match self.call(Method::GET, &path, None).await {
            Ok(pod) => Ok(Some(
                pod.pointer("/metadata/annotations")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect(),
            )),
            Err(e) => match api_error(e, &path) {
                StoreError::NotFound { .. } => Ok(None),
                e => Err(e),
            },
        }
    }
}

/// One type's watch, renewed from its last revision until the receiver goes away; 410 Gone
/// (history compacted, or older than the server's watch cache) ends it with `Compacted`.
async fn watch_type(
    client: kube::Client,
    t: ResourceType,
    ns: Option<String>,
    prefix: String,
    mut after: Revision,
    requested: Revision,
    tx: mpsc::Sender<Result<Event>>,
) {
    loop {
        let path = format!(
            "{}?watch=1&allowWatchBookmarks=true&resourceVersion={after}&timeoutSeconds={WATCH_SECONDS}",
            t.collection(ns.as_deref())
        );
        let req = match Request::builder().method(Method::GET).uri(&path).body(Vec::new()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(StoreError::Backend(format!("{path}: {e}")))).await;
                return;
            }
        };
        let stream = match client.request_events::<Value>(req).await {
            Ok(s) => s,
            // The server answered, and no: history gone, or refused (RBAC) — the caller's to see.
            Err(e @ kube::Error::Api(_)) => {
                let e = match api_error(e, &t.key_prefix) {
                    StoreError::Compacted { .. } => StoreError::Compacted { requested, compacted: 0 },
                    e => e,
                };
                let _ = tx.send(Err(e)).await;
                return;
            }
            // No answer (connection trouble): again shortly, from the same revision.
            Err(_) if !tx.is_closed() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(_) => return,
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(ev) => ev,
                Err(_) => break, // connection dropped: renew from `after`
            };
            let (obj, deleted) = match event {
                kube::core::WatchEvent::Added(o) | kube::core::WatchEvent::Modified(o) => (o, false),
                kube::core::WatchEvent::Deleted(o) => (o, true),
                kube::core::WatchEvent::Bookmark(b) => {
                    if let Some(r) = parse_resource_version(&b.metadata.resource_version) {
                        after = r;
                    }
                    continue;
                }
                kube::core::WatchEvent::Error(s) if s.code == 410 => {
                    let _ = tx.send(Err(StoreError::Compacted { requested, compacted: 0 })).await;
                    return;
                }
                kube::core::WatchEvent::Error(s) => {
                    let _ = tx.send(Err(StoreError::Backend(format!("watch {path}: {} {}", s.code, s.message)))).await;
                    return;
                }
            };
            let ev = match (t.from_object(&obj), deleted) {
                (Ok(Some(kv)), false) => Event::Put(kv),
                (Ok(Some(kv)), true) => Event::Delete { key: kv.key, revision: kv.mod_revision },
                // A Pod that no longer is an endpoint (addresses gone, finished): its endpoint goes.
                (Ok(None), _) => match (pods::endpoint_key(&obj), revision_of(&obj, &t.key_prefix)) {
                    (Some(key), Ok(revision)) => Event::Delete { key, revision },
                    _ => continue,
                },
                (Err(e), _) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            after = ev.revision();
            if !ev.key().starts_with(&prefix) {
                continue;
            }
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}
