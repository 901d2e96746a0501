//! Which Kubernetes object holds which key, and the value ↔ object conversions (pure: no I/O).
//!
//! Calico's KDD layout: projectcalico.org/v3 resources are `crd.projectcalico.org/v1` objects
//! with the same spec; IPAM blocks, affinities and handles are IPAMBlock, BlockAffinity and
//! IPAMHandle objects whose names are derived from the key (CIDR `.`/`:`/`/` → `-`,
//! `<host>-<cidr name>`, the lower-cased handle id) and whose spec carries what the name loses;
//! Namespaces and Kubernetes NetworkPolicies are the API's own objects. A Calico Node is a
//! Kubernetes Node: its BGP and tunnel fields are the Node's `projectcalico.org/*` annotations.
//! A workload endpoint is a Pod (`pods`), a `ksa.` profile a ServiceAccount, the controllers'
//! lease a Lease. Other keys (Calico's v2 IPAM config, other profiles) are not kept here.

use gingham_api::Kind;
use serde_json::{Map, Value, json};

use crate::{KeyValue, Revision, StoreError};

pub const CRD_API: &str = "/apis/crd.projectcalico.org/v1";
const CRD_VERSION: &str = "crd.projectcalico.org/v1";
const BLOCKS: &str = "/calico/ipam/v2/assignment/";
const AFFINITIES: &str = "/calico/ipam/v2/host/";
const HANDLES: &str = "/calico/ipam/v2/handle/";

/// How one family of keys is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// A gingham resource of this kind: metadata + spec, apiVersion/kind translated.
    Resource(Kind),
    /// `/calico/ipam/v2/assignment/ipv<N>/block/<cidr>` → IPAMBlock (spec = the block).
    Block,
    /// `/calico/ipam/v2/host/<node>/ipv<N>/block/<cidr>` → BlockAffinity.
    Affinity,
    /// `/calico/ipam/v2/handle/<id>` → IPAMHandle.
    Handle,
    /// A Calico Node → the Kubernetes Node's annotations and labels (see `merge_node`).
    Node,
    /// A WorkloadEndpoint → its Pod (see `pods`).
    Pod,
    /// The controllers' lease → a coordination.k8s.io Lease in kube-system.
    Lease,
    /// A `ksa.<namespace>.<name>` Profile ← a ServiceAccount (read only).
    ServiceAccount,
}

/// The controllers' lease key and the Lease object that holds it.
const LEASE_KEY_PREFIX: &str = "/calico/gingham/v1/controllers/";
const LEASE_NAMESPACE: &str = "kube-system";
const LEASE_NAME: &str = "gingham-kube-controllers";
const LEASE_RECORD: &str = "gingham.projectcalico.org/lease";

/// Calico's Node annotations: (annotation, path of the field in the Calico Node's spec).
const NODE_ANNOTATIONS: &[(&str, &[&str])] = &[
    ("projectcalico.org/IPv4Address", &["bgp", "ipv4Address"]),
    ("projectcalico.org/IPv6Address", &["bgp", "ipv6Address"]),
    ("projectcalico.org/IPv4IPIPTunnelAddr", &["bgp", "ipv4IPIPTunnelAddr"]),
    ("projectcalico.org/ASNumber", &["bgp", "asNumber"]),
    ("projectcalico.org/RouteReflectorClusterID", &["bgp", "routeReflectorClusterID"]),
    ("projectcalico.org/IPv4VXLANTunnelAddr", &["ipv4VXLANTunnelAddr"]),
    ("projectcalico.org/VXLANTunnelMACAddr", &["vxlanTunnelMACAddr"]),
    ("projectcalico.org/IPv6VXLANTunnelAddr", &["ipv6VXLANTunnelAddr"]),
    ("projectcalico.org/VXLANTunnelMACAddrV6", &["vxlanTunnelMACAddrV6"]),
    ("projectcalico.org/IPv4WireguardInterfaceAddr", &["wireguard", "interfaceIPv4Address"]),
    ("projectcalico.org/IPv6WireguardInterfaceAddr", &["wireguard", "interfaceIPv6Address"]),
];
/// The rest of a Calico Node's spec that has no annotation of Calico's (e.g. interfaceName).
const NODE_REST_ANNOTATION: &str = "gingham.projectcalico.org/node-spec";
/// The label keys written through this datastore (the Node's other labels are Kubernetes').
const NODE_LABELS_ANNOTATION: &str = "gingham.projectcalico.org/labels";

/// The Kubernetes Node `node` with the Calico Node `value` merged in: the Calico annotations
/// set or removed to match its spec, its labels added, and labels this datastore set before
/// but `value` no longer has removed. Nothing else of the Node changes.
pub fn merge_node(node: &Value, value: &Value) -> Result<Value, String> {
    let mut node = node.clone();
    let spec = value.get("spec").cloned().unwrap_or(json!({}));
    let mut rest = spec.clone();
    let meta = node.get_mut("metadata").and_then(Value::as_object_mut).ok_or("the Node has no metadata")?;
    let mut annotations = meta.get("annotations").and_then(Value::as_object).cloned().unwrap_or_default();
    for (annotation, path) in NODE_ANNOTATIONS {
        let field = path.iter().try_fold(&spec, |v, p| v.get(p));
        match field.filter(|f| !f.is_null()) {
            Some(Value::String(s)) => annotations.insert((*annotation).into(), json!(s)),
            Some(Value::Number(n)) => annotations.insert((*annotation).into(), json!(n.to_string())),
            Some(other) => return Err(format!("spec.{}: {other} is not a string or number", path.join("."))),
            None => annotations.remove(*annotation),
        };
        remove_path(&mut rest, path);
    }
    // Derived from the Node itself on every read.
    for derived in ["orchRefs", "addresses"] {
        remove_path(&mut rest, &[derived]);
    }
    match rest.as_object().filter(|r| !r.is_empty()) {
        Some(r) => annotations.insert(NODE_REST_ANNOTATION.into(), json!(Value::Object(r.clone()).to_string())),
        None => annotations.remove(NODE_REST_ANNOTATION),
    };
    let mut labels = meta.get("labels").and_then(Value::as_object).cloned().unwrap_or_default();
    let before: Vec<String> = annotations
        .get(NODE_LABELS_ANNOTATION)
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let given = value.pointer("/metadata/labels").and_then(Value::as_object).cloned().unwrap_or_default();
    for k in before.iter().filter(|k| !given.contains_key(*k)) {
        labels.remove(k);
    }
    // Ours: what we set before, and what this write sets or changes. A label given as the Node
    // already has it (read back, then written with the rest) stays the kubelet's.
    let mut ours: Vec<&String> =
        given.iter().filter(|(k, v)| before.contains(k) || labels.get(*k) != Some(v)).map(|(k, _)| k).collect();
    ours.sort();
    labels.extend(given.clone());
    match ours.is_empty() {
        true => annotations.remove(NODE_LABELS_ANNOTATION),
        false => annotations.insert(NODE_LABELS_ANNOTATION.into(), json!(json!(ours).to_string())),
    };
    meta.insert("labels".into(), Value::Object(labels));
    meta.insert("annotations".into(), Value::Object(annotations));
    Ok(node)
}

fn remove_path(v: &mut Value, path: &[&str]) {
    match path {
        [last] => {
            if let Some(o) = v.as_object_mut() {
                o.remove(*last);
            }
        }
        [first, tail @ ..] => {
            if let Some(inner) = v.get_mut(*first) {
                remove_path(inner, tail);
                if inner.as_object().is_some_and(|o| o.is_empty()) {
                    v.as_object_mut().map(|o| o.remove(*first));
                }
            }
        }
        [] => {}
    }
}

/// The Calico Node a Kubernetes Node is.
fn node_value(obj: &Value) -> Value {
    let meta = obj.get("metadata").cloned().unwrap_or_default();
    let name = meta.get("name").cloned().unwrap_or_default();
    let annotations = meta.get("annotations").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut spec: Value = annotations
        .get(NODE_REST_ANNOTATION)
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .filter(Value::is_object)
        .unwrap_or(json!({}));
    for (annotation, path) in NODE_ANNOTATIONS {
        let Some(text) = annotations.get(*annotation).and_then(Value::as_str) else { continue };
        let field = if *annotation == "projectcalico.org/ASNumber" {
            text.parse::<u64>().map(|n| json!(n)).unwrap_or(json!(text))
        } else {
            json!(text)
        };
        match path {
            [f] => spec[*f] = field,
            [outer, f] => {
                if !spec[*outer].is_object() {
                    spec[*outer] = json!({});
                }
                spec[*outer][*f] = field;
            }
            _ => {}
        }
    }
    spec["orchRefs"] = json!([{"nodeName": name, "orchestrator": "k8s"}]);
    let addresses: Vec<Value> = obj
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| matches!(a.get("type").and_then(Value::as_str), Some("InternalIP" | "ExternalIP")))
        .map(|a| json!({"address": a.get("address"), "type": a.get("type")}))
        .collect();
    if !addresses.is_empty() {
        spec["addresses"] = json!(addresses);
    }
    let mut m = Map::new();
    m.insert("name".into(), name);
    for field in ["labels", "uid", "creationTimestamp"] {
        if let Some(x) = meta.get(field).filter(|x| !x.is_null()) {
            m.insert(field.into(), x.clone());
        }
    }
    let mut node =
        json!({"apiVersion": Kind::Node.api_version(), "kind": Kind::Node.kind_name(), "metadata": m, "spec": spec});
    // Kubernetes' podCIDRs (podCIDR alone on old API servers), as Calico's status.podCIDRs.
    let pod_cidrs = match obj.pointer("/spec/podCIDRs").and_then(Value::as_array) {
        Some(list) => list.clone(),
        None => obj.pointer("/spec/podCIDR").filter(|c| c.is_string()).cloned().into_iter().collect(),
    };
    if !pod_cidrs.is_empty() {
        node["status"] = json!({"podCIDRs": pod_cidrs});
    }
    node
}

/// One Kubernetes resource holding one family of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// Every key of this family starts with it.
    pub key_prefix: String,
    /// `/api/v1` or `/apis/<group>/<version>`.
    pub api: &'static str,
    pub api_version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub codec: Codec,
}

/// Where one key lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub namespace: Option<String>,
    pub name: String,
}

impl ResourceType {
    /// The collection's path (of one namespace, or of all).
    pub fn collection(&self, namespace: Option<&str>) -> String {
        let namespace = if self.codec == Codec::Lease { Some(LEASE_NAMESPACE) } else { namespace };
        match namespace {
            Some(ns) if self.namespaced => format!("{}/namespaces/{ns}/{}", self.api, self.plural),
            _ => format!("{}/{}", self.api, self.plural),
        }
    }

    /// One object's path.
    pub fn item(&self, at: &Location) -> String {
        format!("{}/{}", self.collection(at.namespace.as_deref()), at.name)
    }

    /// The object that holds `key` (which starts with this type's prefix).
    pub fn locate(&self, key: &str) -> Result<Location, StoreError> {
        let rest = &key[self.key_prefix.len()..];
        let bad = |why: &str| StoreError::Backend(format!("{key}: {why}"));
        match self.codec {
            Codec::ServiceAccount => match rest.strip_prefix("ksa.").and_then(|r| r.split_once('.')) {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => {
                    Ok(Location { namespace: Some(ns.into()), name: sa.into() })
                }
                _ => Err(bad("only ksa.<namespace>.<service account> profiles exist here (from ServiceAccounts)")),
            },
            Codec::Lease if rest == "lease" => {
                Ok(Location { namespace: Some(LEASE_NAMESPACE.into()), name: LEASE_NAME.into() })
            }
            Codec::Lease => Err(bad("the controllers have one lease, .../controllers/lease")),
            Codec::Pod => {
                let parsed = rest.split_once('/').and_then(|(ns, n)| Some((ns, super::pods::parse_endpoint_name(n)?)));
                match parsed {
                    Some((ns, [_, orch, pod, endpoint]))
                        if !ns.is_empty() && orch == "k8s" && endpoint == super::pods::ENDPOINT =>
                    {
                        Ok(Location { namespace: Some(ns.into()), name: pod })
                    }
                    _ => Err(bad("not a Kubernetes pod's endpoint (<namespace>/<node>-k8s-<pod>-eth0)")),
                }
            }
            Codec::Resource(_) if self.namespaced => match rest.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(Location { namespace: Some(ns.into()), name: name.into() })
                }
                _ => Err(bad("expected <namespace>/<name> after the kind")),
            },
            Codec::Resource(_) | Codec::Node if !rest.is_empty() && !rest.contains('/') => {
                Ok(Location { namespace: None, name: rest.into() })
            }
            Codec::Resource(_) | Codec::Node => Err(bad("expected a name after the kind")),
            Codec::Block => {
                let (_, cidr) = block_key_parts(rest).ok_or_else(|| bad("not an IPAM block key"))?;
                Ok(Location { namespace: None, name: cidr_name(&cidr) })
            }
            Codec::Affinity => {
                let (host, _, cidr) = affinity_key_parts(rest).ok_or_else(|| bad("not a block affinity key"))?;
                Ok(Location { namespace: None, name: affinity_name(host, &cidr) })
            }
            Codec::Handle if !rest.is_empty() => Ok(Location { namespace: None, name: rest.to_ascii_lowercase() }),
            Codec::Handle => Err(bad("expected a handle id")),
        }
    }

    /// The Kubernetes object for `key` holding `value` (no resourceVersion: the caller adds the
    /// one it expects).
    pub fn to_object(&self, key: &str, value: &[u8]) -> Result<Value, StoreError> {
        let at = self.locate(key)?;
        let bad =
            |why: String| StoreError::Backend(format!("{key}: the value cannot be stored as a {}: {why}", self.kind));
        let v: Value = serde_json::from_slice(value).map_err(|e| bad(format!("not JSON ({e})")))?;
        let mut meta = Map::new();
        meta.insert("name".into(), json!(at.name));
        if let Some(ns) = &at.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        let spec = match self.codec {
            Codec::Node | Codec::Pod => {
                return Err(bad(
                    "written by merging into its Kubernetes object (merge_node, pods::merge_endpoint)".into()
                ));
            }
            Codec::ServiceAccount => {
                return Err(bad("it is the ServiceAccount's: change the ServiceAccount's labels instead".into()));
            }
            Codec::Resource(_) => {
                let given = v.get("metadata").and_then(Value::as_object);
                for field in ["labels", "annotations"] {
                    if let Some(x) = given.and_then(|m| m.get(field)).filter(|x| !x.is_null()) {
                        meta.insert(field.into(), x.clone());
                    }
                }
                v.get("spec").cloned()
            }
            Codec::Block => Some(v),
            Codec::Lease => {
                // Kubernetes' own fields, for kubectl and other tools; gingham's record as written.
                meta.insert("annotations".into(), json!({LEASE_RECORD: v.to_string()}));
                let secs = v.get("durationMs").and_then(Value::as_u64).unwrap_or(15_000).div_ceil(1000);
                Some(json!({"holderIdentity": v.get("holder"), "leaseDurationSeconds": secs}))
            }
            Codec::Affinity => {
                let rest = &key[self.key_prefix.len()..];
                let (host, version, cidr) =
                    affinity_key_parts(rest).ok_or_else(|| bad("not an affinity key".into()))?;
                let deleted = v.get("deleted").and_then(Value::as_bool).unwrap_or(false);
                let state = v.get("state").and_then(Value::as_str).unwrap_or("confirmed");
                // Calico labels affinities so that one host's can be listed by selector.
                meta.insert(
                    "labels".into(),
                    json!({"projectcalico.org/affinity-type": "host", "projectcalico.org/ip-version": version}),
                );
                Some(
                    json!({"node": host, "cidr": cidr, "type": "host", "state": state, "deleted": deleted.to_string()}),
                )
            }
            Codec::Handle => {
                let id = &key[self.key_prefix.len()..];
                let mut spec = v.as_object().cloned().ok_or_else(|| bad("not an object".into()))?;
                spec.insert("handleID".into(), json!(id));
                Some(Value::Object(spec))
            }
        };
        let mut obj = json!({"apiVersion": self.api_version, "kind": self.kind, "metadata": meta});
        if let Some(spec) = spec.filter(|s| !s.is_null()) {
            obj["spec"] = spec;
        }
        Ok(obj)
    }

    /// The key and value an object of this type holds (a Pod may hold none: see
    /// `pods::endpoint_of`).
    pub fn from_object(&self, obj: &Value) -> Result<Option<KeyValue>, StoreError> {
        let meta = obj.get("metadata").and_then(Value::as_object);
        let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
        let bad = |why: &str| StoreError::Backend(format!("{} {name:?} from the API server: {why}", self.kind));
        let rv = meta.and_then(|m| m.get("resourceVersion")).and_then(Value::as_str).unwrap_or_default();
        let mod_revision =
            parse_resource_version(rv).ok_or_else(|| bad(&format!("resourceVersion {rv:?} is not a number")))?;
        let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
        let spec_str = |f: &str| spec.get(f).and_then(Value::as_str).map(str::to_string);
        let (key, value) = match self.codec {
            Codec::ServiceAccount => {
                let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or_default();
                let mut labels = Map::new();
                labels.insert("pcsa.projectcalico.org/name".into(), json!(name));
                for (k, v) in meta.and_then(|m| m.get("labels")).and_then(Value::as_object).into_iter().flatten() {
                    labels.insert(format!("pcsa.{k}"), v.clone());
                }
                let profile = format!("ksa.{ns}.{name}");
                let v = json!({"apiVersion": Kind::Profile.api_version(), "kind": Kind::Profile.kind_name(),
                    "metadata": {"name": profile, "uid": meta.and_then(|m| m.get("uid"))},
                    "spec": {"labelsToApply": labels}});
                (format!("{}{profile}", self.key_prefix), v)
            }
            Codec::Lease => {
                let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str);
                if (ns, name) != (Some(LEASE_NAMESPACE), LEASE_NAME) {
                    return Ok(None);
                }
                let record = meta
                    .and_then(|m| m.get("annotations"))
                    .and_then(|a| a.get(LEASE_RECORD))
                    .and_then(Value::as_str)
                    .and_then(|r| serde_json::from_str::<Value>(r).ok());
                // Written by another tool: what Kubernetes' fields say.
                let record = record.unwrap_or_else(|| {
                    json!({"holder": spec.get("holderIdentity"), "durationMs": spec.get("leaseDurationSeconds").and_then(Value::as_u64).unwrap_or(15) * 1000, "renewedUnixMs": 0})
                });
                (format!("{LEASE_KEY_PREFIX}lease"), record)
            }
            Codec::Pod => match super::pods::endpoint_of(obj) {
                Some(kv) => kv,
                None => return Ok(None),
            },
            Codec::Node => (format!("{}{name}", self.key_prefix), node_value(obj)),
            Codec::Resource(kind) => {
                let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str);
                let mut m = Map::new();
                m.insert("name".into(), json!(name));
                if let Some(ns) = ns.filter(|_| self.namespaced) {
                    m.insert("namespace".into(), json!(ns));
                }
                for field in ["labels", "annotations", "uid", "creationTimestamp"] {
                    if let Some(x) = meta.and_then(|md| md.get(field)).filter(|x| !x.is_null()) {
                        m.insert(field.into(), x.clone());
                    }
                }
                let mut v = json!({"apiVersion": kind.api_version(), "kind": kind.kind_name(), "metadata": m});
                // A Namespace's spec and status are the API server's business, not gingham's.
                if kind != Kind::Namespace && !spec.is_null() {
                    v["spec"] = spec;
                }
                let key = match ns.filter(|_| self.namespaced) {
                    Some(ns) => format!("{}{ns}/{name}", self.key_prefix),
                    None => format!("{}{name}", self.key_prefix),
                };
                (key, v)
            }
            Codec::Block => {
                let cidr = spec_str("cidr").ok_or_else(|| bad("spec.cidr is missing"))?;
                let version = if cidr.contains(':') { 6 } else { 4 };
                (format!("{}ipv{version}/block/{}", self.key_prefix, cidr.replace('/', "-")), spec)
            }
            Codec::Affinity => {
                let node = spec_str("node").ok_or_else(|| bad("spec.node is missing"))?;
                let cidr = spec_str("cidr").ok_or_else(|| bad("spec.cidr is missing"))?;
                let version = if cidr.contains(':') { 6 } else { 4 };
                let deleted = spec.get("deleted").is_some_and(|d| d == "true" || d == true);
                let state = spec_str("state").unwrap_or_else(|| "confirmed".into());
                let key = format!("{}{node}/ipv{version}/block/{}", self.key_prefix, cidr.replace('/', "-"));
                (key, json!({"state": state, "deleted": deleted}))
            }
            Codec::Handle => {
                let id = spec_str("handleID").unwrap_or_else(|| name.to_string());
                let mut v = spec.as_object().cloned().unwrap_or_default();
                v.remove("handleID");
                (format!("{}{id}", self.key_prefix), Value::Object(v))
            }
        };
        let value = serde_json::to_vec(&value).map_err(|e| bad(&e.to_string()))?;
        // The API has no creation revision: 0 says "unknown" (see Capabilities).
        Ok(Some(KeyValue { key, value, mod_revision, create_revision: 0 }))
    }
}

/// resourceVersion as a revision: every API server on etcd (and kine) hands out etcd's.
pub fn parse_resource_version(rv: &str) -> Option<Revision> {
    rv.parse().ok().filter(|r: &Revision| *r >= 0)
}

/// `ipv4/block/10.0.0.0-26` → (4, `10.0.0.0/26`).
fn block_key_parts(rest: &str) -> Option<(u8, String)> {
    let (v, cidr) = rest.split_once("/block/")?;
    let version = match v {
        "ipv4" => 4,
        "ipv6" => 6,
        _ => return None,
    };
    let (net, len) = cidr.rsplit_once('-')?;
    (!net.is_empty() && len.parse::<u8>().is_ok()).then(|| (version, format!("{net}/{len}")))
}

/// `<host>/ipv4/block/10.0.0.0-26` → (host, "4", `10.0.0.0/26`).
fn affinity_key_parts(rest: &str) -> Option<(&str, &'static str, String)> {
    let (host, tail) = rest.split_once('/')?;
    let (version, cidr) = block_key_parts(tail)?;
    (!host.is_empty()).then_some((host, if version == 4 { "4" } else { "6" }, cidr))
}

/// Calico's object name for a CIDR: `10.0.0.0/26` → `10-0-0-0-26`.
fn cidr_name(cidr: &str) -> String {
    cidr.replace(['.', ':', '/'], "-")
}

/// Calico's BlockAffinity name: `<host>-<cidr name>`, cut and suffixed with a hash when it would
/// pass Kubernetes' 253-character limit.
fn affinity_name(host: &str, cidr: &str) -> String {
    let name = format!("{host}-{}", cidr_name(cidr));
    if name.len() <= 253 {
        return name;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // Cut at a character boundary: a host name from another writer need not be ASCII.
    let mut cut = 253 - 12;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{}", &name[..cut], &hex[..11])
}

/// Every family of keys this datastore keeps, longest prefix first.
pub fn resource_types() -> Vec<ResourceType> {
    let mut types: Vec<ResourceType> = Kind::ALL
        .into_iter()
        .filter_map(|kind| {
            let (api, api_version, plural, kind_name) = match kind {
                // Service accounts' profiles (namespaces are followed as Namespaces themselves).
                Kind::Profile => {
                    return Some(ResourceType {
                        key_prefix: kind.prefix(None),
                        api: "/api/v1",
                        api_version: "v1",
                        plural: "serviceaccounts",
                        kind: "ServiceAccount",
                        namespaced: true,
                        codec: Codec::ServiceAccount,
                    });
                }
                Kind::WorkloadEndpoint => {
                    return Some(ResourceType {
                        key_prefix: kind.prefix(None),
                        api: "/api/v1",
                        api_version: "v1",
                        plural: "pods",
                        kind: "Pod",
                        namespaced: true,
                        codec: Codec::Pod,
                    });
                }
                Kind::Node => {
                    return Some(ResourceType {
                        key_prefix: kind.prefix(None),
                        api: "/api/v1",
                        api_version: "v1",
                        plural: "nodes",
                        kind: "Node",
                        namespaced: false,
                        codec: Codec::Node,
                    });
                }
                Kind::Namespace => ("/api/v1", "v1", "namespaces", "Namespace"),
                Kind::KubernetesNetworkPolicy => {
                    ("/apis/networking.k8s.io/v1", "networking.k8s.io/v1", "networkpolicies", "NetworkPolicy")
                }
                Kind::IPAMConfiguration => (CRD_API, CRD_VERSION, "ipamconfigs", "IPAMConfig"),
                k => (CRD_API, CRD_VERSION, k.plural(), k.kind_name()),
            };
            Some(ResourceType {
                key_prefix: kind.prefix(None),
                api,
                api_version,
                plural,
                kind: kind_name,
                namespaced: kind.namespaced(),
                codec: Codec::Resource(kind),
            })
        })
        .collect();
    types.push(ResourceType {
        key_prefix: LEASE_KEY_PREFIX.into(),
        api: "/apis/coordination.k8s.io/v1",
        api_version: "coordination.k8s.io/v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        codec: Codec::Lease,
    });
    for (prefix, plural, kind, codec) in [
        (BLOCKS, "ipamblocks", "IPAMBlock", Codec::Block),
        (AFFINITIES, "blockaffinities", "BlockAffinity", Codec::Affinity),
        (HANDLES, "ipamhandles", "IPAMHandle", Codec::Handle),
    ] {
        types.push(ResourceType {
            key_prefix: prefix.into(),
            api: CRD_API,
            api_version: CRD_VERSION,
            plural,
            kind,
            namespaced: false,
            codec,
        });
    }
    types.sort_by_key(|t| std::cmp::Reverse(t.key_prefix.len()));
    types
}

/// The type holding `key`, if any.
pub fn type_of<'a>(types: &'a [ResourceType], key: &str) -> Option<&'a ResourceType> {
    types.iter().find(|t| key.starts_with(&t.key_prefix))
}

/// The types with keys under `prefix`, and for each the namespace the prefix narrows it to.
pub fn types_under<'a>(types: &'a [ResourceType], prefix: &str) -> Vec<(&'a ResourceType, Option<String>)> {
    types
        .iter()
        .filter_map(|t| {
            if t.key_prefix.starts_with(prefix) {
                Some((t, None))
            } else if prefix.starts_with(&t.key_prefix) {
                let rest = &prefix[t.key_prefix.len()..];
                let ns = match (t.codec, t.namespaced, rest.split_once('/')) {
                    (Codec::Resource(_) | Codec::Pod, true, Some((ns, _))) if !ns.is_empty() => Some(ns.to_string()),
                    _ => None,
                };
                Some((t, ns))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(key: &str) -> ResourceType {
        type_of(&resource_types(), key).cloned().unwrap_or_else(|| panic!("{key} has no type"))
    }

    #[test]
    fn resources_round_trip_through_calicos_crds() {
        let key = "/calico/resources/v3/projectcalico.org/networkpolicies/ns1/allow";
        let t = ty(key);
        assert_eq!((t.plural, t.kind, t.namespaced), ("networkpolicies", "NetworkPolicy", true));
        let value = br#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy","metadata":{"name":"allow","namespace":"ns1","labels":{"a":"b"},"resourceVersion":"9"},"spec":{"selector":"all()"}}"#;
        let mut obj = t.to_object(key, value).unwrap();
        assert_eq!(obj["apiVersion"], "crd.projectcalico.org/v1");
        assert_eq!(obj["metadata"], json!({"name": "allow", "namespace": "ns1", "labels": {"a": "b"}}));
        assert_eq!(
            t.item(&t.locate(key).unwrap()),
            "/apis/crd.projectcalico.org/v1/namespaces/ns1/networkpolicies/allow"
        );
        obj["metadata"]["resourceVersion"] = json!("42");
        obj["metadata"]["uid"] = json!("u-1");
        let kv = t.from_object(&obj).unwrap().unwrap();
        assert_eq!((kv.key.as_str(), kv.mod_revision), (key, 42));
        let v: Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(v["apiVersion"], "projectcalico.org/v3");
        assert_eq!(v["metadata"]["uid"], "u-1");
        assert_eq!(v["spec"]["selector"], "all()");
        // The v3 IPAMConfiguration lives in Calico's IPAMConfig CRD.
        let t = ty("/calico/resources/v3/projectcalico.org/ipamconfigurations/default");
        assert_eq!((t.plural, t.kind), ("ipamconfigs", "IPAMConfig"));
    }

    #[test]
    fn ipam_objects_carry_what_their_names_lose() {
        let key = "/calico/ipam/v2/host/node-1/ipv6/block/fd00::40-122";
        let t = ty(key);
        let mut obj = t.to_object(key, br#"{"state":"pending","deleted":false}"#).unwrap();
        assert_eq!(obj["metadata"]["name"], "node-1-fd00--40-122");
        assert_eq!(
            obj["spec"],
            json!({"node": "node-1", "cidr": "fd00::40/122", "type": "host", "state": "pending", "deleted": "false"})
        );
        obj["metadata"]["resourceVersion"] = json!("7");
        let kv = t.from_object(&obj).unwrap().unwrap();
        assert_eq!(kv.key, key);
        assert_eq!(serde_json::from_slice::<Value>(&kv.value).unwrap(), json!({"state": "pending", "deleted": false}));

        let key = "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26";
        let t = ty(key);
        let mut obj = t.to_object(key, br#"{"cidr":"10.65.0.0/26","affinity":"host:n","allocations":[null]}"#).unwrap();
        assert_eq!(obj["metadata"]["name"], "10-65-0-0-26");
        obj["metadata"]["resourceVersion"] = json!("8");
        assert_eq!(t.from_object(&obj).unwrap().unwrap().key, key);

        let key = "/calico/ipam/v2/handle/k8s-pod-network.ABC";
        let t = ty(key);
        let mut obj = t.to_object(key, br#"{"block":{"10.65.0.0/26":1},"deleted":false}"#).unwrap();
        assert_eq!(
            (obj["metadata"]["name"].as_str(), obj["spec"]["handleID"].as_str()),
            (Some("k8s-pod-network.abc"), Some("k8s-pod-network.ABC"))
        );
        obj["metadata"]["resourceVersion"] = json!("9");
        let kv = t.from_object(&obj).unwrap().unwrap();
        assert_eq!(kv.key, key);
        assert_eq!(
            serde_json::from_slice::<Value>(&kv.value).unwrap(),
            json!({"block": {"10.65.0.0/26": 1}, "deleted": false})
        );
    }

    #[test]
    fn a_calico_node_is_a_kubernetes_nodes_annotations() {
        let k8s = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "resourceVersion": "5", "labels": {"kubernetes.io/hostname": "n1"},
                         "annotations": {"other": "x"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": "n1"}]}});
        let calico = json!({"metadata": {"name": "n1", "labels": {"calico-rr": ""}},
            "spec": {"bgp": {"ipv4Address": "10.0.0.1/24", "asNumber": 64512, "routeReflectorClusterID": "224.0.0.1"},
                     "vxlanTunnelMACAddr": "66:00:00:00:00:01", "interfaceName": "eth0",
                     "orchRefs": [{"nodeName": "n1", "orchestrator": "k8s"}]}});
        let merged = merge_node(&k8s, &calico).unwrap();
        let a = &merged["metadata"]["annotations"];
        assert_eq!(
            (a["projectcalico.org/IPv4Address"].as_str(), a["projectcalico.org/ASNumber"].as_str()),
            (Some("10.0.0.1/24"), Some("64512"))
        );
        assert_eq!(a["other"], "x", "other annotations stay");
        assert_eq!(merged["metadata"]["labels"], json!({"kubernetes.io/hostname": "n1", "calico-rr": ""}));
        assert_eq!(merged["status"], k8s["status"], "nothing but metadata changes");
        let t = ResourceType {
            codec: Codec::Node,
            ..resource_types().into_iter().find(|t| t.codec == Codec::Node).unwrap()
        };
        let kv = t.from_object(&merged).unwrap().unwrap();
        assert_eq!(kv.key, "/calico/resources/v3/projectcalico.org/nodes/n1");
        let back: Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(back["spec"]["bgp"], calico["spec"]["bgp"]);
        assert_eq!(back["spec"]["interfaceName"], "eth0");
        assert_eq!(back["status"]["podCIDRs"], json!(["10.244.1.0/24", "fd00:1::/64"]), "Kubernetes' podCIDRs read");
        assert_eq!(merged["spec"], k8s["spec"], "and never written");
        assert_eq!(back["spec"]["addresses"], json!([{"address": "10.0.0.1", "type": "InternalIP"}]));
        // Written back as read (the kubelet's label with it), the kubelet's label stays its own.
        let read_back = json!({"metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "calico-rr": ""}}, "spec": {}});
        let owned = merge_node(&merged, &read_back).unwrap();
        assert_eq!(owned["metadata"]["annotations"][NODE_LABELS_ANNOTATION], r#"["calico-rr"]"#);
        // A later write without the label and without BGP removes exactly what it had set.
        let again = merge_node(&merged, &json!({"metadata": {"name": "n1"}, "spec": {}})).unwrap();
        assert_eq!(again["metadata"]["labels"], json!({"kubernetes.io/hostname": "n1"}));
        assert_eq!(again["metadata"]["annotations"], json!({"other": "x"}));
        assert!(
            merge_node(&k8s, &json!({"spec": {"bgp": {"ipv4Address": ["x"]}}}))
                .unwrap_err()
                .contains("spec.bgp.ipv4Address")
        );
    }

    #[test]
    fn service_accounts_are_ksa_profiles() {
        let key = "/calico/resources/v3/projectcalico.org/profiles/ksa.ns1.web.sa";
        let t = ty(key);
        assert_eq!(t.item(&t.locate(key).unwrap()), "/api/v1/namespaces/ns1/serviceaccounts/web.sa");
        let sa = json!({"metadata": {"name": "web.sa", "namespace": "ns1", "resourceVersion": "3", "labels": {"team": "a"}}});
        let kv = t.from_object(&sa).unwrap().unwrap();
        assert_eq!(kv.key, key);
        let v: Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(v["spec"]["labelsToApply"], json!({"pcsa.projectcalico.org/name": "web.sa", "pcsa.team": "a"}));
        assert!(t.to_object(key, b"{}").unwrap_err().to_string().contains("ServiceAccount's labels"));
    }

    #[test]
    fn the_controllers_lease_is_a_kubernetes_lease() {
        let key = "/calico/gingham/v1/controllers/lease";
        let t = ty(key);
        assert_eq!(
            t.item(&t.locate(key).unwrap()),
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/gingham-kube-controllers"
        );
        let record = json!({"holder": "a-1", "durationMs": 15000, "renewedUnixMs": 5});
        let mut obj = t.to_object(key, record.to_string().as_bytes()).unwrap();
        assert_eq!(obj["spec"], json!({"holderIdentity": "a-1", "leaseDurationSeconds": 15}));
        obj["metadata"]["resourceVersion"] = json!("4");
        let kv = t.from_object(&obj).unwrap().unwrap();
        assert_eq!((kv.key.as_str(), serde_json::from_slice::<Value>(&kv.value).unwrap()), (key, record));
        obj["metadata"]["name"] = json!("kube-scheduler");
        assert!(t.from_object(&obj).unwrap().is_none(), "other leases are not ours");
        assert_eq!(t.collection(None), "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases");
    }

    #[test]
    fn long_affinity_names_are_cut_and_hashed() {
        let host = "h".repeat(260);
        let n = affinity_name(&host, "10.0.0.0/26");
        assert_eq!(n.len(), 253);
        assert_ne!(n, affinity_name(&format!("{host}x"), "10.0.0.0/26"));
        assert!(affinity_name(&"é".repeat(200), "10.0.0.0/26").len() <= 253, "cut between characters");
    }

    #[test]
    fn prefixes_pick_types_and_namespaces() {
        let types = resource_types();
        let under = |p: &str| -> Vec<(&str, Option<String>)> {
            types_under(&types, p).into_iter().map(|(t, ns)| (t.plural, ns)).collect()
        };
        assert_eq!(under("/calico/ipam/v2/host/node-1/"), [("blockaffinities", None)]);
        assert_eq!(
            under("/calico/resources/v3/projectcalico.org/networkpolicies/ns1/"),
            [("networkpolicies", Some("ns1".into()))]
        );
        let all = under("/calico/");
        assert!(all.iter().any(|(p, _)| *p == "ipamhandles") && all.iter().any(|(p, _)| *p == "namespaces"));
        assert!(under("/elsewhere/").is_empty());
        assert!(
            ty("/calico/resources/v3/projectcalico.org/profiles/kns.a")
                .locate("/calico/resources/v3/projectcalico.org/profiles/kns.a")
                .is_err(),
            "only service accounts' profiles"
        );
        assert!(
            ty("/calico/resources/v3/projectcalico.org/ippools/p")
                .locate("/calico/resources/v3/projectcalico.org/ippools/a/b")
                .is_err()
        );
    }
}
