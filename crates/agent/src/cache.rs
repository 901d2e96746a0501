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
use gingham_api::network::NodeSpec;
use gingham_ipam::block::AllocationBlock;
use gingham_ipam::pools::Pool;
use gingham_store::{Event, KeyValue};
use ipnet::IpNet;
use serde::Deserialize;

/// An interned string: label keys and values, namespaces, node and profile names repeat across
/// thousands of endpoints.
pub type Sym = Arc<str>;

#[derive(Default)]
struct Interner(HashSet<Sym>);

impl Interner {
    fn get(&mut self, s: &str) -> Sym {
        if let Some(x) = self.0.get(s) {
            return x.clone();
        }
        let x: Sym = Arc::from(s);
        self.0.insert(x.clone());
        x
    }
}

/// The keys the agent follows.
pub const RESOURCES_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
pub const BLOCKS_PREFIX: &str = "/calico/ipam/v2/assignment/";

#[derive(Clone, Debug, PartialEq)]
pub struct NodeRec {
    pub labels: BTreeMap<String, String>,
    pub spec: NodeSpec,
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

/// An endpoint's addresses; nearly always one (two with dual stack), kept inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ips {
    None,
    One(IpNet),
    Two(IpNet, IpNet),
    Many(Box<[IpNet]>),
}

impl Ips {
    fn from(v: Vec<IpNet>) -> Ips {
        match v.as_slice() {
            [] => Ips::None,
            [a] => Ips::One(*a),
            [a, b] => Ips::Two(*a, *b),
            _ => Ips::Many(v.into_boxed_slice()),
        }
    }
    pub fn to_vec(&self) -> Vec<IpNet> {
        match self {
            Ips::None => vec![],
            Ips::One(a) => vec![*a],
            Ips::Two(a, b) => vec![*a, *b],
            Ips::Many(v) => v.to_vec(),
        }
    }
}

/// What only this node's own endpoints carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPart {
    pub interface: Option<String>,
    pub container_id: Option<String>,
    pub network: Option<String>,
    pub gone_since: Option<String>,
    pub revision: i64,
}

/// A workload endpoint, compact (every endpoint in the cluster is held: policy selects on them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub namespace: Sym,
    pub node: Sym,
    pub ips: Ips,
    pub labels: Box<[(Sym, Sym)]>,
    pub profiles: Box<[Sym]>,
    pub local: Option<Box<LocalPart>>,
}

/// Which item changed (look it up in the cache for its new value; absent means deleted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    Pool(String),
    Node(String),
    Block(IpNet),
    /// `namespace/name`.
    Endpoint(String),
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
}

/// What a key is.
enum Item {
    Pool(String),
    Node(String),
    Endpoint(String),
    Block(IpNet),
    Other,
}

fn classify(key: &str) -> Item {
    if let Some(rest) = key.strip_prefix(RESOURCES_PREFIX) {
        let Some((plural, name)) = rest.split_once('/') else { return Item::Other };
        return match plural {
            p if p == Kind::IPPool.plural() => Item::Pool(name.into()),
            p if p == Kind::Node.plural() => Item::Node(name.into()),
            p if p == Kind::WorkloadEndpoint.plural() => Item::Endpoint(name.into()),
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

/// The typed picture of the cluster; see the module documentation.
pub struct Cache {
    me: String,
    syms: Interner,
    pub pools: BTreeMap<String, Pool>,
    pub nodes: HashMap<String, NodeRec>,
    pub blocks: HashMap<IpNet, BlockRec>,
    pub endpoints: HashMap<Box<str>, Endpoint>,
    /// Keys whose stored value did not decode, with the error (logged once).
    pub bad: HashMap<String, String>,
    pub decode_errors: u64,
    /// Keys seen by the listings under way, per prefix.
    listing: HashMap<String, HashSet<String>>,
}

impl Cache {
    pub fn new(me: &str) -> Cache {
        Cache {
            me: me.into(),
            syms: Interner::default(),
            pools: BTreeMap::new(),
            nodes: HashMap::new(),
            blocks: HashMap::new(),
            endpoints: HashMap::new(),
            bad: HashMap::new(),
            decode_errors: 0,
            listing: HashMap::new(),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// This node's endpoints.
    pub fn local_endpoints(&self) -> impl Iterator<Item = (&str, &Endpoint)> {
        self.endpoints.iter().filter(|(_, e)| e.local.is_some()).map(|(k, e)| (&**k, e))
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
            Item::Endpoint(k) => self.endpoints.remove(k.as_str()).map(|_| Change::Endpoint(k)),
            Item::Block(c) => self.blocks.remove(&c).map(|_| Change::Block(c)),
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
            Item::Endpoint(k) => self.decode_endpoint(kv).map(|e| {
                (self.endpoints.get(k.as_str()) != Some(&e)).then(|| {
                    self.endpoints.insert(k.as_str().into(), e);
                    Change::Endpoint(k.clone())
                })
            }),
            Item::Block(c) => self.decode_block(*c, kv).map(|b| {
                (self.blocks.get(c) != Some(&b)).then(|| {
                    self.blocks.insert(*c, b);
                    Change::Block(*c)
                })
            }),
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
        Ok(NodeRec { labels: obj.metadata.labels, spec })
    }

    fn decode_block(&mut self, cidr: IpNet, kv: &KeyValue) -> Result<BlockRec, String> {
        let b = AllocationBlock::decode(&kv.value)?;
        if b.cidr != cidr {
            return Err(format!("holds block {} under the key of {cidr}", b.cidr));
        }
        let owner = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")).map(|n| self.syms.get(n));
        let mut borrowed = Vec::new();
        for o in 0..b.size() as u32 {
            if let Some(n) = b.attribute(o).and_then(|a| a.secondary.as_ref()?.get("node")) {
                if owner.as_deref() != Some(n.as_str()) {
                    borrowed.push((b.ip(o), self.syms.get(n)));
                }
            }
        }
        Ok(BlockRec { cidr, node: owner, borrowed })
    }

    fn decode_endpoint(&mut self, kv: &KeyValue) -> Result<Endpoint, String> {
        let doc: WepDoc = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
        let key = kv.key.strip_prefix(&Kind::WorkloadEndpoint.prefix(None)).unwrap_or_default();
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
                interface: doc.spec.interface_name,
                container_id: doc.spec.container_id,
                network: doc.metadata.annotations.get(crate::endpoints::NETWORK_ANNOTATION).cloned(),
                gone_since: doc.metadata.annotations.get(crate::endpoints::INTERFACE_GONE_ANNOTATION).cloned(),
                revision: kv.mod_revision,
            })
        });
        let labels: Vec<(Sym, Sym)> =
            doc.metadata.labels.iter().map(|(k, v)| (self.syms.get(k), self.syms.get(v))).collect();
        let profiles: Vec<Sym> = doc.spec.profiles.iter().map(|p| self.syms.get(p)).collect();
        Ok(Endpoint {
            namespace: self.syms.get(namespace),
            node: self.syms.get(&node),
            ips: Ips::from(ips),
            labels: labels.into_boxed_slice(),
            profiles: profiles.into_boxed_slice(),
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
        self.listing.insert(prefix.to_string(), HashSet::new());
    }

    pub fn relist_page(&mut self, prefix: &str, page: &[KeyValue]) -> Vec<Change> {
        if let Some(seen) = self.listing.get_mut(prefix) {
            seen.extend(page.iter().map(|kv| kv.key.clone()));
        }
        page.iter().filter_map(|kv| self.put(kv)).collect()
    }

    pub fn relist_end(&mut self, prefix: &str) -> Vec<Change> {
        let seen = self.listing.remove(prefix).unwrap_or_default();
        let gone: Vec<String> = self.held_keys(prefix).into_iter().filter(|k| !seen.contains(k)).collect();
        gone.iter().filter_map(|k| self.delete(k)).collect()
    }

    fn held_keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        if RESOURCES_PREFIX.starts_with(prefix) || prefix.starts_with(RESOURCES_PREFIX) {
            out.extend(self.pools.keys().map(|n| Kind::IPPool.key(None, n)));
            out.extend(self.nodes.keys().map(|n| Kind::Node.key(None, n)));
            let wep = Kind::WorkloadEndpoint.prefix(None);
            out.extend(self.endpoints.keys().map(|k| format!("{wep}{k}")));
        }
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
        let put = |v, rev| Event::Put(kv(key, v, rev));
        assert_eq!(c.apply(&put(wep("n1", "10.0.0.1/32"), 5)), Some(Change::Endpoint("ns1/n1-k8s-w-eth0".into())));
        let e = &c.endpoints["ns1/n1-k8s-w-eth0"];
        assert_eq!((e.ips.to_vec(), &*e.namespace), (vec!["10.0.0.1/32".parse().unwrap()], "ns1"));
        let local = e.local.as_ref().unwrap();
        assert_eq!(
            (local.interface.as_deref(), local.network.as_deref(), local.revision),
            (Some("cali1"), Some("net"), 5)
        );
        // The same content again: nothing changed (a revision alone is no change for remote ones).
        assert_eq!(c.apply(&put(wep("n1", "10.0.0.1/32"), 5)), None);
        // A remote endpoint carries no local part.
        let other = "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/n2-k8s-x-eth0";
        c.apply(&Event::Put(kv(other, wep("n2", "10.0.1.1/32"), 6)));
        assert!(c.endpoints["ns1/n2-k8s-x-eth0"].local.is_none());
        assert_eq!(c.local_endpoints().count(), 1);
        // Interned: both endpoints share one label string.
        assert!(Arc::ptr_eq(
            &c.endpoints["ns1/n1-k8s-w-eth0"].labels[0].1,
            &c.endpoints["ns1/n2-k8s-x-eth0"].labels[0].1
        ));
        // A malformed value is that resource's error: counted, last good value kept.
        assert_eq!(c.apply(&put(wep("n1", "not-an-ip"), 7)), None);
        assert_eq!(c.decode_errors, 1);
        assert!(c.bad[key].contains("spec.ipNetworks"));
        assert_eq!(c.endpoints["ns1/n1-k8s-w-eth0"].ips.to_vec(), vec!["10.0.0.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(
            c.apply(&Event::Delete { key: key.into(), revision: 8 }),
            Some(Change::Endpoint("ns1/n1-k8s-w-eth0".into()))
        );
        assert!(c.bad.is_empty());
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
