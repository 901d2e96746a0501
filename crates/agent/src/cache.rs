//! The agent's typed picture of the cluster: pools, Nodes, IPAM blocks and workload endpoints,
//! decoded once as they arrive (list at revision R, then watch from R+1 — see `sync.rs`) and
//! kept compact, so that 150,000 endpoints fit in a few tens of MiB. Pure: datastore events in,
//! [`Change`]s out; consumers look the changed item up here. A re-list (after compaction or a
//! broken watch) is diffed against what is held, so even then only real changes go out.
//!
//! A stored resource that does not decode is an error for that resource alone: counted, logged
//! once, and its last good version (if any) kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use gingham_api::Kind;
use gingham_api::network::{BGPConfigurationSpec, BGPFilterSpec, BGPPeerSpec, NodeSpec};
use gingham_ipam::block::AllocationBlock;
use gingham_ipam::pools::Pool;
use gingham_store::{Event, KeyValue};
use ipnet::IpNet;
use serde::Deserialize;

/// A shared string (block owners and borrowers).
pub type Sym = Arc<str>;

/// An interned string's number: label keys and values, namespaces, node and profile names
/// repeat across thousands of endpoints, and a number is 4 bytes where a pointer is 16.
pub type Id = u32;

#[derive(Default)]
struct Interner {
    ids: HashMap<Sym, Id>,
    strings: Vec<Sym>,
}

/// Interned lists (a workload's label set, its profiles), each stored once.
struct Lists<T> {
    ids: HashMap<Arc<[T]>, Id>,
    lists: Vec<Arc<[T]>>,
}

impl<T> Default for Lists<T> {
    fn default() -> Self {
        Lists { ids: HashMap::new(), lists: Vec::new() }
    }
}

impl<T: std::hash::Hash + Eq> Lists<T> {
    fn id(&mut self, v: Vec<T>) -> Id {
        if let Some(i) = self.ids.get(v.as_slice()) {
            return *i;
        }
        let a: Arc<[T]> = v.into();
        let i = self.lists.len() as Id;
        self.lists.push(a.clone());
        self.ids.insert(a, i);
        i
    }
    fn get(&self, id: Id) -> &[T] {
        self.lists.get(id as usize).map_or(&[], |l| l)
    }
}

impl Interner {
    fn sym(&mut self, s: &str) -> Sym {
        let id = self.id(s);
        self.strings[id as usize].clone()
    }
    fn id(&mut self, s: &str) -> Id {
        if let Some(i) = self.ids.get(s) {
            return *i;
        }
        let x: Sym = Arc::from(s);
        let i = self.strings.len() as Id;
        self.strings.push(x.clone());
        self.ids.insert(x, i);
        i
    }
    fn name(&self, id: Id) -> &str {
        self.strings.get(id as usize).map_or("", |s| s)
    }
}

/// The keys the agent follows.
pub const RESOURCES_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
pub const BLOCKS_PREFIX: &str = "/calico/ipam/v2/assignment/";
/// Everything the agent follows; it is in sync once each was listed.
pub const FOLLOWED: [&str; 4] = [RESOURCES_PREFIX, BLOCKS_PREFIX, KNP_PREFIX, NAMESPACES_PREFIX];

#[derive(Clone, Debug, PartialEq)]
pub struct NodeRec {
    pub labels: BTreeMap<String, String>,
    pub spec: NodeSpec,
    /// Kubernetes' podCIDRs for the node (Calico Node `status.podCIDRs`).
    pub pod_cidrs: Vec<IpNet>,
}

/// A Calico Node's `status.podCIDRs` (what the Kubernetes datastore reads from Node.spec);
/// entries that are not CIDRs are skipped.
pub fn pod_cidrs_of(obj: &gingham_api::Object) -> Vec<IpNet> {
    let list = obj.status.as_ref().and_then(|s| s.get("podCIDRs")).and_then(|v| v.as_array());
    list.into_iter().flatten().filter_map(|c| c.as_str()?.parse::<IpNet>().ok()).map(|c| c.trunc()).collect()
}

/// What routing needs of an IPAM block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRec {
    pub cidr: IpNet,
    /// The node it is affine to.
    pub node: Option<Sym>,
    /// Addresses allocated to another node than the owner: (address, borrower).
    pub borrowed: Vec<(IpAddr, Sym)>,
}

/// An endpoint's addresses; nearly always one IPv4 address (or one of each family), kept inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ips {
    None,
    V4(std::net::Ipv4Addr),
    Dual(std::net::Ipv4Addr, std::net::Ipv6Addr),
    Many(Box<[IpNet]>),
}

impl Ips {
    fn from(v: Vec<IpNet>) -> Ips {
        let host = |n: &IpNet| n.prefix_len() == n.max_prefix_len();
        match v.as_slice() {
            [] => Ips::None,
            [IpNet::V4(a)] if host(&v[0]) => Ips::V4(a.addr()),
            [IpNet::V4(a), IpNet::V6(b)] if host(&v[0]) && host(&v[1]) => Ips::Dual(a.addr(), b.addr()),
            _ => Ips::Many(v.into_boxed_slice()),
        }
    }
    pub fn to_vec(&self) -> Vec<IpNet> {
        match self {
            Ips::None => vec![],
            Ips::V4(a) => vec![IpNet::from(IpAddr::V4(*a))],
            Ips::Dual(a, b) => vec![IpNet::from(IpAddr::V4(*a)), IpNet::from(IpAddr::V6(*b))],
            Ips::Many(v) => v.to_vec(),
        }
    }
}

/// A 128-bit hash of an endpoint's `namespace/name`: endpoints are found by it, so 150,000 of
/// them do not keep 150,000 names (only this node's own keep theirs). Two names sharing one is
/// as likely as a random 128-bit collision.
pub type EndpointKey = [u64; 2];

pub fn endpoint_key(key: &str) -> EndpointKey {
    use std::hash::{Hash, Hasher};
    let h = |salt: u8| {
        let mut s = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut s);
        key.hash(&mut s);
        s.finish()
    };
    [h(1), h(2)]
}

/// Endpoints in a slab, indexed by key hash; freed slots are reused.
#[derive(Default)]
pub struct Endpoints {
    index: HashMap<EndpointKey, u32>,
    slots: Vec<Option<Endpoint>>,
    free: Vec<u32>,
}

impl Endpoints {
    pub fn get(&self, k: &EndpointKey) -> Option<&Endpoint> {
        self.slots.get(*self.index.get(k)? as usize)?.as_ref()
    }
    fn insert(&mut self, k: EndpointKey, e: Endpoint) {
        if let Some(i) = self.index.get(&k) {
            self.slots[*i as usize] = Some(e);
            return;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(e);
                i
            }
            None => {
                self.slots.push(Some(e));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(k, i);
    }
    fn remove(&mut self, k: &EndpointKey) -> Option<Endpoint> {
        let i = self.index.remove(k)?;
        self.free.push(i);
        self.slots[i as usize].take()
    }
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
    pub fn keys(&self) -> impl Iterator<Item = &EndpointKey> {
        self.index.keys()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.slots.iter().flatten()
    }
    /// Give back what growth over-allocated (after a listing).
    fn shrink(&mut self) {
        self.index.shrink_to_fit();
        self.slots.shrink_to_fit();
    }
}

/// What only this node's own endpoints carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPart {
    /// `namespace/name`.
    pub key: String,
    pub interface: Option<String>,
    pub container_id: Option<String>,
    pub network: Option<String>,
    pub gone_since: Option<String>,
    pub revision: i64,
}

/// A workload endpoint, compact (every endpoint in the cluster is held: policy selects on them).
/// Strings are interned — resolve them with [`Cache::name`] — and so are whole label and
/// profile lists, which pods of one workload share: [`Cache::labels`], [`Cache::profiles`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub namespace: Id,
    pub node: Id,
    pub labels: Id,
    pub profiles: Id,
    pub ports: Id,
    pub ips: Ips,
    pub local: Option<Box<LocalPart>>,
}

/// Which item changed (look it up in the cache for its new value; absent means deleted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    Pool(String),
    Node(String),
    Block(IpNet),
    Endpoint(EndpointKey),
    BgpConfig(String),
    BgpPeer(String),
    BgpFilter(String),
    /// ClusterInformation `default` (its datastoreReady).
    ClusterInfo,
    /// A policy-kind resource (policies, profiles, namespaces, network sets), by datastore key.
    /// Its revision is part of its value, so a rewrite with the same content still counts.
    PolicyObject(String),
}

pub use gingham_policy::load::KINDS as POLICY_KINDS;

/// Prefixes outside projectcalico.org the agent follows too (Kubernetes kinds).
pub const KNP_PREFIX: &str = "/calico/resources/v3/networking.k8s.io/networkpolicies/";
pub const NAMESPACES_PREFIX: &str = "/calico/resources/v3/core/namespaces/";

/// A policy-kind key's kind, namespace and name.
pub fn policy_key_parts(key: &str) -> Option<(Kind, Option<&str>, &str)> {
    for k in POLICY_KINDS {
        if let Some(rest) = key.strip_prefix(k.prefix(None).as_str()) {
            return Some(match (k.namespaced(), rest.split_once('/')) {
                (true, Some((ns, name))) => (k, Some(ns), name),
                _ => (k, None, rest),
            });
        }
    }
    None
}

#[derive(Deserialize)]
struct WepDoc {
    #[serde(default)]
    metadata: WepMeta,
    #[serde(default)]
    spec: WepSpec,
}

#[derive(Deserialize, Default)]
struct WepMeta {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WepSpec {
    node: Option<String>,
    #[serde(default)]
    ip_networks: Vec<String>,
    #[serde(default)]
    profiles: Vec<String>,
    interface_name: Option<String>,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
    #[serde(default)]
    ports: Vec<gingham_api::policy::EndpointPort>,
}

fn decode_spec<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, String> {
    let obj: gingham_api::Object = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
    obj.spec_as().map_err(|e| format!("spec: {e}"))
}

/// What a key is.
enum Item {
    Pool(String),
    Node(String),
    Endpoint(String),
    BgpConfig(String),
    BgpPeer(String),
    BgpFilter(String),
    Block(IpNet),
    ClusterInfo,
    PolicyObject,
    Other,
}

fn classify(key: &str) -> Item {
    if policy_key_parts(key).is_some() {
        return Item::PolicyObject;
    }
    if let Some(rest) = key.strip_prefix(RESOURCES_PREFIX) {
        let Some((plural, name)) = rest.split_once('/') else { return Item::Other };
        return match plural {
            p if p == Kind::IPPool.plural() => Item::Pool(name.into()),
            p if p == Kind::Node.plural() => Item::Node(name.into()),
            p if p == Kind::WorkloadEndpoint.plural() => Item::Endpoint(name.into()),
            p if p == Kind::BGPConfiguration.plural() => Item::BgpConfig(name.into()),
            p if p == Kind::BGPPeer.plural() => Item::BgpPeer(name.into()),
            p if p == Kind::BGPFilter.plural() => Item::BgpFilter(name.into()),
            p if p == Kind::ClusterInformation.plural() && name == "default" => Item::ClusterInfo,
            _ => Item::Other,
        };
    }
    if let Some(rest) = key.strip_prefix(BLOCKS_PREFIX) {
        if let Some(cidr) = rest.rsplit('/').next().and_then(gingham_ipam::model::parse_segment) {
            return Item::Block(cidr);
        }
    }
    Item::Other
}

/// What a listing under way has seen.
#[derive(Default)]
struct Seen {
    keys: HashSet<String>,
    endpoints: HashSet<EndpointKey>,
}

/// The typed picture of the cluster; see the module documentation.
pub struct Cache {
    me: String,
    syms: Interner,
    label_sets: Lists<(Id, Id)>,
    profile_sets: Lists<Id>,
    pub pools: BTreeMap<String, Pool>,
    pub nodes: HashMap<String, NodeRec>,
    pub blocks: HashMap<IpNet, BlockRec>,
    pub endpoints: Endpoints,
    pub bgp_configs: BTreeMap<String, BGPConfigurationSpec>,
    pub bgp_peers: BTreeMap<String, BGPPeerSpec>,
    pub bgp_filters: BTreeMap<String, BGPFilterSpec>,
    /// ClusterInformation `default`'s datastoreReady (None: no such resource, or not set).
    pub datastore_ready: Option<bool>,
    /// Policy-kind resources as stored, by key (few next to endpoints; compiled by the engine).
    pub policy_objects: BTreeMap<String, (i64, gingham_api::Object)>,
    port_sets: Lists<(Id, u8, u16)>,
    /// Keys whose stored value did not decode, with the error (logged once).
    pub bad: HashMap<String, String>,
    pub decode_errors: u64,
    /// Keys seen by the listings under way, per prefix.
    listing: HashMap<String, Seen>,
    /// Route and advertise nodes' podCIDRs (host-local IPAM; Calico's USE_POD_CIDR).
    pub use_pod_cidr: bool,
}

impl Cache {
    pub fn new(me: &str) -> Cache {
        Cache {
            me: me.into(),
            syms: Interner::default(),
            label_sets: Lists::default(),
            profile_sets: Lists::default(),
            pools: BTreeMap::new(),
            nodes: HashMap::new(),
            blocks: HashMap::new(),
            endpoints: Endpoints::default(),
            bgp_configs: BTreeMap::new(),
            bgp_peers: BTreeMap::new(),
            bgp_filters: BTreeMap::new(),
            datastore_ready: None,
            policy_objects: BTreeMap::new(),
            port_sets: Lists::default(),
            bad: HashMap::new(),
            decode_errors: 0,
            listing: HashMap::new(),
            use_pod_cidr: false,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The string behind an interned id.
    pub fn name(&self, id: Id) -> &str {
        self.syms.name(id)
    }

    /// An endpoint's labels (interned key, value pairs).
    pub fn labels(&self, e: &Endpoint) -> &[(Id, Id)] {
        self.label_sets.get(e.labels)
    }

    pub fn profiles(&self, e: &Endpoint) -> &[Id] {
        self.profile_sets.get(e.profiles)
    }

    /// An endpoint's named ports: (name, protocol number, port).
    pub fn ports(&self, e: &Endpoint) -> &[(Id, u8, u16)] {
        self.port_sets.get(e.ports)
    }

    /// This node's endpoints.
    pub fn local_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.local.is_some())
    }

    /// Apply one watch event; returns what changed (nothing if the value is the same).
    pub fn apply(&mut self, ev: &Event) -> Option<Change> {
        match ev {
            Event::Put(kv) => self.put(kv),
            Event::Delete { key, .. } => self.delete(key),
        }
    }

    fn delete(&mut self, key: &str) -> Option<Change> {
        self.bad.remove(key);
        match classify(key) {
            Item::Pool(n) => self.pools.remove(&n).map(|_| Change::Pool(n)),
            Item::Node(n) => self.nodes.remove(&n).map(|_| Change::Node(n)),
            Item::Endpoint(k) => {
                let h = endpoint_key(&k);
                self.endpoints.remove(&h).map(|_| Change::Endpoint(h))
            }
            Item::Block(c) => self.blocks.remove(&c).map(|_| Change::Block(c)),
            Item::BgpConfig(n) => self.bgp_configs.remove(&n).map(|_| Change::BgpConfig(n)),
            Item::BgpPeer(n) => self.bgp_peers.remove(&n).map(|_| Change::BgpPeer(n)),
            Item::BgpFilter(n) => self.bgp_filters.remove(&n).map(|_| Change::BgpFilter(n)),
            Item::ClusterInfo => self.datastore_ready.take().map(|_| Change::ClusterInfo),
            Item::PolicyObject => self.policy_objects.remove(key).map(|_| Change::PolicyObject(key.into())),
            Item::Other => None,
        }
    }

    fn put(&mut self, kv: &KeyValue) -> Option<Change> {
        let item = classify(&kv.key);
        let result = match &item {
            Item::Pool(n) => self.decode_pool(n, kv).map(|p| {
                (self.pools.get(n) != Some(&p)).then(|| {
                    self.pools.insert(n.clone(), p);
                    Change::Pool(n.clone())
                })
            }),
            Item::Node(n) => self.decode_node(kv).map(|r| {
                (self.nodes.get(n) != Some(&r)).then(|| {
                    self.nodes.insert(n.clone(), r);
                    Change::Node(n.clone())
                })
            }),
            Item::Endpoint(k) => self.decode_endpoint(k, kv).map(|e| {
                let h = endpoint_key(k);
                (self.endpoints.get(&h) != Some(&e)).then(|| {
                    self.endpoints.insert(h, e);
                    Change::Endpoint(h)
                })
            }),
            Item::Block(c) => self.decode_block(*c, kv).map(|b| {
                (self.blocks.get(c) != Some(&b)).then(|| {
                    self.blocks.insert(*c, b);
                    Change::Block(*c)
                })
            }),
            Item::BgpConfig(n) => decode_spec(kv).map(|c: BGPConfigurationSpec| {
                (self.bgp_configs.get(n) != Some(&c)).then(|| {
                    self.bgp_configs.insert(n.clone(), c);
                    Change::BgpConfig(n.clone())
                })
            }),
            Item::BgpPeer(n) => decode_spec(kv).map(|c: BGPPeerSpec| {
                (self.bgp_peers.get(n) != Some(&c)).then(|| {
                    self.bgp_peers.insert(n.clone(), c);
                    Change::BgpPeer(n.clone())
                })
            }),
            Item::BgpFilter(n) => decode_spec(kv).map(|c: BGPFilterSpec| {
                (self.bgp_filters.get(n) != Some(&c)).then(|| {
                    self.bgp_filters.insert(n.clone(), c);
                    Change::BgpFilter(n.clone())
                })
            }),
            Item::ClusterInfo => decode_spec(kv).map(|c: gingham_api::network::ClusterInformationSpec| {
                (self.datastore_ready != c.datastore_ready).then(|| {
                    self.datastore_ready = c.datastore_ready;
                    Change::ClusterInfo
                })
            }),
            Item::PolicyObject => {
                serde_json::from_slice::<gingham_api::Object>(&kv.value).map_err(|e| e.to_string()).map(|o| {
                    let v = (kv.mod_revision, o);
                    (self.policy_objects.get(&kv.key) != Some(&v)).then(|| {
                        self.policy_objects.insert(kv.key.clone(), v);
                        Change::PolicyObject(kv.key.clone())
                    })
                })
            }
            Item::Other => return None,
        };
        match result {
            Ok(change) => {
                self.bad.remove(&kv.key);
                change
            }
            Err(e) => {
                self.decode_errors += 1;
                if self.bad.get(&kv.key) != Some(&e) {
                    eprintln!(
                        "gingham node agent: ignoring the stored value of {}: {e} (its last good value, if any, stays in use)",
                        kv.key
                    );
                    self.bad.insert(kv.key.clone(), e);
                }
                None
            }
        }
    }

    fn decode_pool(&self, name: &str, kv: &KeyValue) -> Result<Pool, String> {
        let obj: gingham_api::Object = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
        let spec = obj.spec_as().map_err(|e| format!("spec: {e}"))?;
        Pool::from_spec(name, spec).ok_or_else(|| "spec.cidr: not a CIDR".to_string())
    }

    fn decode_node(&self, kv: &KeyValue) -> Result<NodeRec, String> {
        let obj: gingham_api::Object = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
        let spec = obj.spec_as().map_err(|e| format!("spec: {e}"))?;
        Ok(NodeRec { pod_cidrs: pod_cidrs_of(&obj), labels: obj.metadata.labels, spec })
    }

    fn decode_block(&mut self, cidr: IpNet, kv: &KeyValue) -> Result<BlockRec, String> {
        let b = AllocationBlock::decode(&kv.value)?;
        if b.cidr != cidr {
            return Err(format!("holds block {} under the key of {cidr}", b.cidr));
        }
        let owner = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")).map(|n| self.syms.sym(n));
        let mut borrowed = Vec::new();
        for o in 0..b.size() as u32 {
            if let Some(n) = b.attribute(o).and_then(|a| a.secondary.as_ref()?.get("node")) {
                if owner.as_deref() != Some(n.as_str()) {
                    borrowed.push((b.ip(o), self.syms.sym(n)));
                }
            }
        }
        Ok(BlockRec { cidr, node: owner, borrowed })
    }

    fn decode_endpoint(&mut self, key: &str, kv: &KeyValue) -> Result<Endpoint, String> {
        let doc: WepDoc = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
        let namespace = key.split('/').next().unwrap_or_default();
        let ips = doc
            .spec
            .ip_networks
            .iter()
            .map(|n| n.parse::<IpNet>().map_err(|_| format!("spec.ipNetworks: {n:?} is not a CIDR")))
            .collect::<Result<Vec<_>, _>>()?;
        let node = doc.spec.node.unwrap_or_default();
        let local = (node == self.me).then(|| {
            Box::new(LocalPart {
                key: key.to_string(),
                interface: doc.spec.interface_name,
                container_id: doc.spec.container_id,
                network: doc.metadata.annotations.get(crate::endpoints::NETWORK_ANNOTATION).cloned(),
                gone_since: doc.metadata.annotations.get(crate::endpoints::INTERFACE_GONE_ANNOTATION).cloned(),
                revision: kv.mod_revision,
            })
        });
        let labels: Vec<(Id, Id)> =
            doc.metadata.labels.iter().map(|(k, v)| (self.syms.id(k), self.syms.id(v))).collect();
        let profiles: Vec<Id> = doc.spec.profiles.iter().map(|p| self.syms.id(p)).collect();
        let ports: Vec<(Id, u8, u16)> = doc
            .spec
            .ports
            .iter()
            .filter_map(|p| Some((self.syms.id(&p.name), p.protocol.number(), u16::try_from(p.port).ok()?)))
            .collect();
        Ok(Endpoint {
            namespace: self.syms.id(namespace),
            node: self.syms.id(&node),
            labels: self.label_sets.id(labels),
            profiles: self.profile_sets.id(profiles),
            ports: self.port_sets.id(ports),
            ips: Ips::from(ips),
            local,
        })
    }

    /// A fresh listing of `prefix` replaces what is held under it: items in `listed` are put,
    /// held items under the prefix that the listing lacks are deleted. Only differences count.
    pub fn relist(&mut self, prefix: &str, listed: &[KeyValue]) -> Vec<Change> {
        self.relist_start(prefix);
        let mut changes = self.relist_page(prefix, listed);
        changes.extend(self.relist_end(prefix));
        changes
    }

    /// The same, a page at a time (as `sync.rs` delivers them).
    pub fn relist_start(&mut self, prefix: &str) {
        self.listing.insert(prefix.to_string(), Seen::default());
    }

    pub fn relist_page(&mut self, prefix: &str, page: &[KeyValue]) -> Vec<Change> {
        let wep = Kind::WorkloadEndpoint.prefix(None);
        if let Some(seen) = self.listing.get_mut(prefix) {
            for kv in page {
                // Endpoints are remembered by hash (a listing of 150,000 keeps no names).
                match kv.key.strip_prefix(&wep) {
                    Some(k) => seen.endpoints.insert(endpoint_key(k)),
                    None => seen.keys.insert(kv.key.clone()),
                };
            }
        }
        page.iter().filter_map(|kv| self.put(kv)).collect()
    }

    pub fn relist_end(&mut self, prefix: &str) -> Vec<Change> {
        let seen = self.listing.remove(prefix).unwrap_or_default();
        let gone: Vec<String> = self.held_keys(prefix).into_iter().filter(|k| !seen.keys.contains(k)).collect();
        let mut changes: Vec<Change> = gone.iter().filter_map(|k| self.delete(k)).collect();
        let wep = Kind::WorkloadEndpoint.prefix(None);
        if wep.starts_with(prefix) || prefix.starts_with(&wep) {
            let stale: Vec<EndpointKey> =
                self.endpoints.keys().filter(|h| !seen.endpoints.contains(*h)).copied().collect();
            for h in stale {
                self.endpoints.remove(&h);
                changes.push(Change::Endpoint(h));
            }
        }
        self.endpoints.shrink();
        changes
    }

    fn held_keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        if RESOURCES_PREFIX.starts_with(prefix) || prefix.starts_with(RESOURCES_PREFIX) {
            out.extend(self.pools.keys().map(|n| Kind::IPPool.key(None, n)));
            out.extend(self.nodes.keys().map(|n| Kind::Node.key(None, n)));
            out.extend(self.bgp_configs.keys().map(|n| Kind::BGPConfiguration.key(None, n)));
            out.extend(self.bgp_peers.keys().map(|n| Kind::BGPPeer.key(None, n)));
            out.extend(self.bgp_filters.keys().map(|n| Kind::BGPFilter.key(None, n)));
        }
        out.extend(self.policy_objects.keys().cloned());
        if BLOCKS_PREFIX.starts_with(prefix) || prefix.starts_with(BLOCKS_PREFIX) {
            out.extend(self.blocks.keys().map(gingham_ipam::model::block_key));
        }
        out.retain(|k| k.starts_with(prefix));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: serde_json::Value, rev: i64) -> KeyValue {
        KeyValue { key: key.into(), value: value.to_string().into_bytes(), mod_revision: rev, create_revision: rev }
    }

    fn wep(node: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": "w", "namespace": "ns1", "labels": {"app": "web"}, "annotations": {"gingham.dev/network": "net"}},
            "spec": {"node": node, "ipNetworks": [ip], "profiles": ["kns.ns1"], "interfaceName": "cali1", "containerID": "c1"}})
    }

    #[test]
    fn events_become_typed_changes_and_only_real_ones_count() {
        let mut c = Cache::new("n1");
        let key = "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/n1-k8s-w-eth0";
        let h = endpoint_key("ns1/n1-k8s-w-eth0");
        let put = |v, rev| Event::Put(kv(key, v, rev));
        assert_eq!(c.apply(&put(wep("n1", "10.0.0.1/32"), 5)), Some(Change::Endpoint(h)));
        let e = c.endpoints.get(&h).unwrap();
        assert_eq!((e.ips.to_vec(), c.name(e.namespace)), (vec!["10.0.0.1/32".parse().unwrap()], "ns1"));
        assert_eq!(e.ips, Ips::V4("10.0.0.1".parse().unwrap()), "one IPv4 address is kept inline");
        let local = e.local.as_ref().unwrap();
        assert_eq!(
            (local.key.as_str(), local.interface.as_deref(), local.network.as_deref(), local.revision),
            ("ns1/n1-k8s-w-eth0", Some("cali1"), Some("net"), 5)
        );
        // The same content again: nothing changed.
        assert_eq!(c.apply(&put(wep("n1", "10.0.0.1/32"), 5)), None);
        // A remote endpoint carries no local part, and shares the interned label set.
        let other = "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/n2-k8s-x-eth0";
        c.apply(&Event::Put(kv(other, wep("n2", "10.0.1.1/32"), 6)));
        let o = c.endpoints.get(&endpoint_key("ns1/n2-k8s-x-eth0")).unwrap();
        assert!(o.local.is_none());
        assert_eq!(c.local_endpoints().count(), 1);
        let mine = c.endpoints.get(&h).unwrap();
        assert_eq!(mine.labels, o.labels, "one label set for both");
        let (k, v) = c.labels(mine)[0];
        assert_eq!((c.name(k), c.name(v)), ("app", "web"));
        assert_eq!(c.profiles(mine).iter().map(|p| c.name(*p)).collect::<Vec<_>>(), ["kns.ns1"]);
        // A malformed value is that resource's error: counted, last good value kept.
        assert_eq!(c.apply(&put(wep("n1", "not-an-ip"), 7)), None);
        assert_eq!(c.decode_errors, 1);
        assert!(c.bad[key].contains("spec.ipNetworks"));
        assert_eq!(c.endpoints.get(&h).unwrap().ips.to_vec(), vec!["10.0.0.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(c.apply(&Event::Delete { key: key.into(), revision: 8 }), Some(Change::Endpoint(h)));
        assert!(c.bad.is_empty());
        // A re-list without the remote endpoint removes it (by hash); the freed slot is reused.
        let changes = c.relist(RESOURCES_PREFIX, &[]);
        assert_eq!(changes, vec![Change::Endpoint(endpoint_key("ns1/n2-k8s-x-eth0"))]);
        assert!(c.endpoints.is_empty());
        c.apply(&put(wep("n1", "10.0.0.2/32"), 9));
        assert_eq!(c.endpoints.len(), 1);
    }

    #[test]
    fn blocks_pools_nodes_and_relists_diff() {
        let mut c = Cache::new("n1");
        let block = serde_json::json!({"cidr": "10.0.0.0/30", "affinity": "host:n2", "allocations": [0, null, 1, null],
            "unallocated": [1, 3], "attributes": [{"handle_id": "h", "secondary": {"node": "n2"}}, {"handle_id": "h2", "secondary": {"node": "n3"}}],
            "deleted": false});
        let bkey = "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-30";
        assert_eq!(
            c.apply(&Event::Put(kv(bkey, block.clone(), 3))),
            Some(Change::Block("10.0.0.0/30".parse().unwrap()))
        );
        let b = &c.blocks[&"10.0.0.0/30".parse().unwrap()];
        assert_eq!(b.node.as_deref(), Some("n2"));
        assert_eq!(
            b.borrowed.iter().map(|(ip, n)| (ip.to_string(), n.to_string())).collect::<Vec<_>>(),
            [("10.0.0.2".to_string(), "n3".to_string())]
        );
        let pool = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p"},
            "spec": {"cidr": "10.0.0.0/16", "vxlanMode": "Always"}});
        let pkey = "/calico/resources/v3/projectcalico.org/ippools/p";
        assert_eq!(c.apply(&Event::Put(kv(pkey, pool.clone(), 4))), Some(Change::Pool("p".into())));
        let bad = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p"},
            "spec": {"cidr": "10.0.0.0/16", "vxlanMode": "Sometimes"}});
        assert_eq!(c.apply(&Event::Put(kv(pkey, bad, 5))), None, "an unknown mode is an error, never Never");
        assert!(c.bad[pkey].contains("\"Sometimes\" is not one of Never, Always, CrossSubnet"), "{:?}", c.bad);
        assert_eq!(c.pools["p"].spec.vxlan(), gingham_api::enums::EncapMode::Always);
        // A re-list where the block is gone and the pool unchanged: one change.
        let changes = c.relist(RESOURCES_PREFIX, &[kv(pkey, pool, 9)]);
        assert!(changes.is_empty(), "{changes:?}");
        let changes = c.relist(BLOCKS_PREFIX, &[]);
        assert_eq!(changes, vec![Change::Block("10.0.0.0/30".parse().unwrap())]);
        assert!(c.blocks.is_empty() && c.pools.len() == 1);
    }
}
