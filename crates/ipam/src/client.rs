//! The IPAM client: auto-assign, assign a given IP, release by handle or by address, on any
//! Datastore. Every change to a block is one transaction that also updates the handle index, so
//! an allocation from a block this node already owns is exactly one datastore write; conflicts
//! (another writer got there first) re-read and retry.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gingham_api::Kind;
use gingham_api::network::{IPAMConfigSpec, IPPoolSpec};
use gingham_store::resources::{now_rfc3339, parse_rfc3339};
use gingham_store::{Condition, Datastore, ResourceStore, Revision, StoreError, TxnOp};
use ipnet::IpNet;

use crate::IpamError;
use crate::block::{AllocationBlock, host_affinity};
use crate::model::*;
use crate::pools::{Pool, Use, select};

/// Conflicting writers retry this many times before giving up.
const MAX_ATTEMPTS: usize = 100;

/// An auto-assign request (reference §3.3).
#[derive(Clone, Debug, Default)]
pub struct AutoAssign {
    pub num_v4: usize,
    pub num_v6: usize,
    pub handle: String,
    /// Secondary attributes: node, namespace, pod, timestamp (workloads) or node, type (tunnels).
    pub attrs: BTreeMap<String, String>,
    pub node: String,
    /// Pools by name or CIDR; empty = every pool that selects this node and namespace.
    pub pools_v4: Vec<String>,
    pub pools_v6: Vec<String>,
    pub namespace_labels: Option<BTreeMap<String, String>>,
    pub tunnel: bool,
    /// Caller's block limit (0 = none); the lower of this and maxBlocksPerHost applies.
    pub max_blocks: u32,
}

/// Addresses handed out, each with its block's prefix length (e.g. 10.65.0.5/26).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assigned {
    pub v4: Vec<IpNet>,
    pub v6: Vec<IpNet>,
}

/// Checks a release must pass (so a stale caller cannot free an address someone reused).
#[derive(Clone, Debug, Default)]
pub struct ReleaseGuard {
    pub handle: Option<String>,
    pub sequence_number: Option<u64>,
}

/// What one block write does, besides changing the block itself.
struct BlockChange<T> {
    out: T,
    /// Change in the number of addresses each handle holds in this block.
    handles: BTreeMap<String, isize>,
    /// Other writes that belong to the same transaction.
    also: Vec<TxnOp>,
}

/// IPAM settings in force (the IPAMConfiguration `default`, or Calico's defaults).
#[derive(Clone, Debug)]
pub struct Settings {
    pub strict_affinity: bool,
    pub auto_allocate_blocks: bool,
    pub max_blocks_per_host: u32,
    /// ipCooldownSeconds: a released address waits this long before it is handed out again.
    pub ip_cooldown_secs: u64,
}

/// IPPools, IPReservations and IPAMConfiguration all live under this prefix.
const IP_RESOURCES_PREFIX: &str = "/calico/resources/v3/projectcalico.org/ip";

#[derive(Clone, Debug, Default)]
struct IpConfig {
    pools: Vec<Pool>,
    reserved: Vec<IpNet>,
    /// None until filled: the IPAMConfiguration, else Calico's config key.
    config: Option<IPAMConfigSpec>,
}

fn settings_of(spec: &IPAMConfigSpec) -> Settings {
    Settings {
        strict_affinity: spec.strict_affinity.unwrap_or(false),
        auto_allocate_blocks: spec.auto_allocate_blocks.unwrap_or(true),
        max_blocks_per_host: spec.max_blocks_per_host.unwrap_or(0).max(0) as u32,
        ip_cooldown_secs: spec.ip_cooldown_seconds.unwrap_or(0).clamp(0, crate::block::MAX_COOLDOWN_SECS as i64) as u64,
    }
}

/// Addresses auto-assignment passes over: reserved ones, and ones still cooling down.
struct Skip<'a> {
    reserved: Vec<IpNet>,
    cooldown_secs: u64,
    /// What the choice of pools rests on (see `Decided`): part of every write.
    guards: &'a [TxnOp],
}

/// Where Calico's IPAM reads its configuration (reference: IPAMConfig).
pub const CONFIG_KEY: &str = "/calico/ipam/v2/config";

/// Calico's IPAMConfig as stored there (its field names, as Calico writes them).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct V2Config {
    strict_affinity: bool,
    auto_allocate_blocks: bool,
    #[serde(rename = "maxBlocksPerHost", default)]
    max_blocks_per_host: i64,
}

impl V2Config {
    fn from_spec(s: &IPAMConfigSpec) -> V2Config {
        V2Config {
            strict_affinity: s.strict_affinity.unwrap_or(false),
            auto_allocate_blocks: s.auto_allocate_blocks.unwrap_or(true),
            max_blocks_per_host: s.max_blocks_per_host.unwrap_or(0),
        }
    }

    /// The settings Calico's config key holds (Calico's defaults if absent or unreadable).
    fn read(kv: Option<&gingham_store::KeyValue>) -> IPAMConfigSpec {
        kv.and_then(|kv| serde_json::from_slice::<V2Config>(&kv.value).ok())
            .map(V2Config::into_spec)
            .unwrap_or_default()
    }

    fn into_spec(self) -> IPAMConfigSpec {
        IPAMConfigSpec {
            strict_affinity: Some(self.strict_affinity),
            auto_allocate_blocks: Some(self.auto_allocate_blocks),
            max_blocks_per_host: Some(self.max_blocks_per_host),
            ..Default::default()
        }
    }
}

pub struct IpamClient {
    ds: Arc<dyn Datastore>,
    resources: ResourceStore,
    blocks: Mutex<HashMap<IpNet, (AllocationBlock, Revision)>>,
    handles: Mutex<HashMap<String, (IpamHandle, Revision)>>,
    node_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pools, reservations and IPAMConfiguration as last parsed, with their revisions.
    config_cache: Mutex<Option<(Vec<(String, Revision)>, IpConfig)>>,
    /// Calico's own config key as last read, and when.
    calico_config_cache: Mutex<Option<(std::time::Instant, IPAMConfigSpec)>>,
    /// What auto-assignment decides from, kept without re-reading: every write it makes carries
    /// the guards that fail if any of it changed (then it is read again and the request retried).
    assign_cache: Mutex<Option<Arc<Decided>>>,
    /// The store commits several keys at once (false: the Kubernetes datastore, where writes
    /// follow Calico's KDD order one key at a time and nothing is decided from a cache).
    transactions: bool,
    /// Each node's labels and the guard on its Node (for pools' nodeSelectors).
    node_cache: Mutex<HashMap<String, (BTreeMap<String, String>, TxnOp)>>,
    /// Each node's blocks as last listed (re-listed before any claim).
    affinities: Mutex<HashMap<(String, bool), Vec<IpNet>>>,
    /// (node, family) whose orphaned blocks this client has looked for.
    orphans_swept: Mutex<std::collections::HashSet<(String, bool)>>,
    /// How long another node's empty block must have been claimed before this node may take it.
    pub reclaim_after: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The configuration an assignment was decided from, and the guards on it.
struct Decided {
    config: IpConfig,
    guards: Vec<TxnOp>,
}

/// Whether `e` is one of `guards` failing: what the cached configuration rests on changed.
fn guard_failed(e: &StoreError, guards: &[TxnOp]) -> bool {
    is_condition_failure(e).is_some_and(|k| guards.iter().any(|g| g.key() == k))
}

/// Up to this many pools, reservations and configurations, each is guarded by its own Check.
const MAX_GUARDED_KEYS: usize = 64;

/// How often auto-assignment starts again when its configuration changed under it.
const CONFIG_ATTEMPTS: usize = 10;

fn is_condition_failure(e: &StoreError) -> Option<&str> {
    match e {
        StoreError::Conflict { key, .. } | StoreError::AlreadyExists { key } | StoreError::NotFound { key } => {
            Some(key)
        }
        _ => None,
    }
}

/// A new block owned by `node`, and the transaction that claims it: the confirmed affinity and
/// the block written together (the block must not exist yet).
fn claim_ops(node: &str, cidr: IpNet) -> (AllocationBlock, [TxnOp; 2]) {
    let block = AllocationBlock::new(cidr, Some(host_affinity(node)), Some(now_rfc3339()), seq_now());
    let ops = [
        TxnOp::Put {
            key: affinity_key(node, &cidr),
            value: serde_json::to_vec(&BlockAffinity::confirmed()).unwrap_or_default(),
            condition: Condition::Any,
        },
        TxnOp::Put {
            key: block_key(&cidr),
            value: serde_json::to_vec(&block).unwrap_or_default(),
            condition: Condition::Absent,
        },
    ];
    (block, ops)
}

fn seq_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
}

impl IpamClient {
    pub fn new(ds: Arc<dyn Datastore>) -> Self {
        let transactions = ds.capabilities().transactions;
        IpamClient {
            resources: ResourceStore::new(ds.clone()),
            ds,
            blocks: Mutex::default(),
            handles: Mutex::default(),
            node_locks: Mutex::default(),
            affinities: Mutex::default(),
            orphans_swept: Mutex::default(),
            config_cache: Mutex::default(),
            calico_config_cache: Mutex::default(),
            assign_cache: Mutex::default(),
            transactions,
            node_cache: Mutex::default(),
            reclaim_after: Duration::from_secs(60),
        }
    }

    pub fn datastore(&self) -> &Arc<dyn Datastore> {
        &self.ds
    }

    pub fn resources(&self) -> &ResourceStore {
        &self.resources
    }

    /// One node's allocations are serialised inside this process (they contend for the same
    /// blocks); other processes and nodes are kept apart by the datastore's compare-and-swap.
    fn node_lock(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.node_locks).entry(node.to_string()).or_default().clone()
    }

    /// What every assignment needs — the IPPools, the IPReservations and the IPAMConfiguration —
    /// read in one listing (their keys share the prefix `…/projectcalico.org/ip`), parsed
    /// again only when one of them changed.
    async fn ip_config(&self) -> Result<IpConfig, IpamError> {
        let listing = self.ds.list(IP_RESOURCES_PREFIX).await?;
        let mut config = self.parse_ip_config(&listing);
        if config.config.is_none() {
            config.config = Some(self.calico_config().await?);
        }
        Ok(config)
    }

    /// The configuration auto-assignment decides from: cached, with the guards its writes carry
    /// — each listed key at its revision, nothing new under the prefix, and Calico's config key
    /// as read when no IPAMConfiguration exists.
    async fn decided(&self) -> Result<Arc<Decided>, IpamError> {
        if let Some(d) = lock(&self.assign_cache).as_ref() {
            return Ok(d.clone());
        }
        let listing = self.ds.list(IP_RESOURCES_PREFIX).await?;
        let mut config = self.parse_ip_config(&listing);
        // So many pools and reservations that a Check on each would crowd the transaction (etcd
        // takes 128 operations): listed again for every request, guarded against additions.
        let per_key = listing.items.len() <= MAX_GUARDED_KEYS && self.transactions;
        let mut guards: Vec<TxnOp> = listing
            .items
            .iter()
            .filter(|_| per_key)
            .map(|kv| TxnOp::Check { key: kv.key.clone(), condition: Condition::At(kv.mod_revision) })
            .collect();
        guards.push(TxnOp::Unchanged { prefix: IP_RESOURCES_PREFIX.into(), since: listing.revision });
        if config.config.is_none() {
            let kv = self.ds.get(CONFIG_KEY).await?;
            guards.push(TxnOp::Check {
                key: CONFIG_KEY.into(),
                condition: kv.as_ref().map_or(Condition::Absent, |kv| Condition::At(kv.mod_revision)),
            });
            config.config = Some(V2Config::read(kv.as_ref()));
        }
        let d = Arc::new(Decided { config, guards });
        if per_key {
            *lock(&self.assign_cache) = Some(d.clone());
        }
        Ok(d)
    }

    /// Forget what assignment decided from: it changed.
    fn forget_decided(&self) {
        *lock(&self.assign_cache) = None;
        lock(&self.node_cache).clear();
    }

    /// Parse a listing of the IP resources (again only when one of them changed); the Calico
    /// config fallback is left to the caller.
    fn parse_ip_config(&self, listing: &gingham_store::Listing) -> IpConfig {
        let revisions: Vec<(String, Revision)> =
            listing.items.iter().map(|kv| (kv.key.clone(), kv.mod_revision)).collect();
        let cached = lock(&self.config_cache).as_ref().filter(|(seen, _)| *seen == revisions).map(|(_, c)| c.clone());
        match cached {
            Some(c) => c,
            None => {
                let (pools_prefix, reservations_prefix) = (Kind::IPPool.prefix(None), Kind::IPReservation.prefix(None));
                let config_key = Kind::IPAMConfiguration.key(None, "default");
                let mut c = IpConfig::default();
                for kv in &listing.items {
                    let Ok(obj) = serde_json::from_slice::<gingham_api::Object>(&kv.value) else { continue };
                    if kv.key.starts_with(&pools_prefix) {
                        c.pools.extend(obj.spec_as::<IPPoolSpec>().ok().and_then(|s| Pool::from_spec(obj.name(), s)));
                    } else if kv.key.starts_with(&reservations_prefix) {
                        if let Ok(r) = obj.spec_as::<gingham_api::network::IPReservationSpec>() {
                            c.reserved.extend(r.nets());
                        }
                    } else if kv.key == config_key {
                        c.config = Some(obj.spec_as().unwrap_or_default());
                    }
                }
                *lock(&self.config_cache) = Some((revisions, c.clone()));
                c
            }
        }
    }

    /// Calico's `/calico/ipam/v2/config`, for when no IPAMConfiguration exists (re-read at most
    /// every 10 s: it is only a fallback).
    async fn calico_config(&self) -> Result<IPAMConfigSpec, IpamError> {
        if let Some((at, spec)) = lock(&self.calico_config_cache).as_ref() {
            if at.elapsed() < Duration::from_secs(10) {
                return Ok(spec.clone());
            }
        }
        let spec = V2Config::read(self.ds.get(CONFIG_KEY).await?.as_ref());
        *lock(&self.calico_config_cache) = Some((std::time::Instant::now(), spec.clone()));
        Ok(spec)
    }

    /// The IPPools, read on every call but parsed again only when one changed.
    pub async fn pools(&self) -> Result<Vec<Pool>, IpamError> {
        Ok(self.ip_config().await?.pools)
    }

    /// Every IPReservation's networks: never handed out by auto-assignment.
    pub async fn reservations(&self) -> Result<Vec<IpNet>, IpamError> {
        Ok(self.ip_config().await?.reserved)
    }

    /// The settings: the IPAMConfiguration `default` (the source of truth), else what a Calico
    /// tool left at `/calico/ipam/v2/config`, else Calico's defaults.
    pub async fn settings(&self) -> Result<Settings, IpamError> {
        Ok(settings_of(&self.ip_config().await?.config.unwrap_or_default()))
    }

    /// Mirror the IPAMConfiguration `default` to `/calico/ipam/v2/config`, where Calico's IPAM
    /// reads it, so a store shared with Calico's tools agrees. Whether it wrote. (The Kubernetes
    /// datastore keeps one IPAMConfig object for both: nothing to mirror.)
    pub async fn mirror_config(&self) -> Result<bool, IpamError> {
        if !self.ds.capabilities().any_key {
            return Ok(false);
        }
        let Some(obj) = self.resources.get(Kind::IPAMConfiguration, None, "default").await? else {
            return Ok(false);
        };
        let spec: IPAMConfigSpec = obj.spec_as().map_err(|e| IpamError::Corrupt {
            key: Kind::IPAMConfiguration.key(None, "default"),
            message: e.to_string(),
        })?;
        let want = V2Config::from_spec(&spec);
        let current = self.ds.get(CONFIG_KEY).await?;
        if let Some(kv) = &current {
            if serde_json::from_slice::<V2Config>(&kv.value).ok().as_ref() == Some(&want) {
                return Ok(false);
            }
        }
        let value = serde_json::to_vec(&want).unwrap_or_default();
        let condition = current.map_or(Condition::Absent, |kv| Condition::At(kv.mod_revision));
        match self.ds.txn(&[TxnOp::Put { key: CONFIG_KEY.into(), value, condition }]).await {
            Ok(_) => Ok(true),
            // Someone else wrote meanwhile: the next call compares again.
            Err(e) if is_condition_failure(&e).is_some() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A node's labels, and the guard that fails if its Node changes (cached until then).
    async fn node_labels(&self, node: &str) -> Result<(BTreeMap<String, String>, TxnOp), IpamError> {
        if let Some(c) = lock(&self.node_cache).get(node).filter(|_| self.transactions) {
            return Ok(c.clone());
        }
        let (labels, condition) = match self.resources.get(Kind::Node, None, node).await? {
            // The resourceVersion is the key's revision.
            Some(o) => {
                let rev = o.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or_default();
                (o.metadata.labels, Condition::At(rev))
            }
            None => (BTreeMap::new(), Condition::Absent),
        };
        let c = (labels, TxnOp::Check { key: Kind::Node.key(None, node), condition });
        lock(&self.node_cache).insert(node.to_string(), c.clone());
        Ok(c)
    }

    /// The block at `cidr` (from this client's cache unless `refresh`), or None if absent.
    async fn block(&self, cidr: IpNet, refresh: bool) -> Result<Option<(AllocationBlock, Revision)>, IpamError> {
        if !refresh {
            if let Some(b) = lock(&self.blocks).get(&cidr) {
                return Ok(Some(b.clone()));
            }
        }
        self.read_block(cidr).await
    }

    /// The block to modify: moved out of the cache (it goes back after a successful write).
    /// What was read is returned as read: another task may take the cached copy meanwhile.
    async fn take_block(&self, cidr: IpNet, refresh: bool) -> Result<Option<(AllocationBlock, Revision)>, IpamError> {
        if !refresh {
            if let Some(b) = lock(&self.blocks).remove(&cidr) {
                return Ok(Some(b));
            }
        }
        let read = self.refresh_block(cidr).await?;
        if read.is_some() {
            lock(&self.blocks).remove(&cidr);
        }
        Ok(read)
    }

    async fn read_block(&self, cidr: IpNet) -> Result<Option<(AllocationBlock, Revision)>, IpamError> {
        self.refresh_block(cidr).await
    }

    /// Bring the cached copy of the block at `cidr` up to date — parsed again only if it
    /// changed — and return it (None: no such block).
    async fn refresh_block(&self, cidr: IpNet) -> Result<Option<(AllocationBlock, Revision)>, IpamError> {
        let key = block_key(&cidr);
        let Some(kv) = self.ds.get(&key).await? else {
            lock(&self.blocks).remove(&cidr);
            return Ok(None);
        };
        if let Some(hit) = lock(&self.blocks).get(&cidr).filter(|(_, rev)| *rev == kv.mod_revision) {
            return Ok(Some(hit.clone()));
        }
        let b = AllocationBlock::decode(&kv.value).map_err(|message| IpamError::Corrupt { key, message })?;
        // Marked `deleted` by a Calico writer about to delete it (KDD): gone already.
        if b.deleted {
            lock(&self.blocks).remove(&cidr);
            return Ok(None);
        }
        lock(&self.blocks).insert(cidr, (b.clone(), kv.mod_revision));
        Ok(Some((b, kv.mod_revision)))
    }

    /// Free addresses in a cached block (None if not cached).
    fn cached_free(&self, cidr: &IpNet) -> Option<usize> {
        lock(&self.blocks).get(cidr).map(|(b, _)| b.free())
    }

    /// The handle's record: cached, or read when `read` (else assumed new).
    async fn handle_record(&self, handle: &str, read: bool) -> Result<(IpamHandle, Option<Revision>), IpamError> {
        if let Some((h, r)) = lock(&self.handles).get(handle) {
            return Ok((h.clone(), Some(*r)));
        }
        if !read {
            return Ok((IpamHandle::default(), None));
        }
        let key = handle_key(handle);
        match self.ds.get(&key).await? {
            Some(kv) => {
                let h: IpamHandle = serde_json::from_slice(&kv.value)
                    .map_err(|e| IpamError::Corrupt { key, message: e.to_string() })?;
                Ok((h, Some(kv.mod_revision)))
            }
            None => Ok((IpamHandle::default(), None)),
        }
    }

    /// `ops` (the block's write, writes that go with it, guards, then the handles' writes from
    /// `handles_at` on) one at a time, for a store without transactions, in Calico's KDD order:
    /// a handle gains addresses before its block hands them out and loses them after the block
    /// takes them back. A crash in between leaves a handle over-counted (`ipam check` reports
    /// it), never an address its handle does not know. If the block write fails, the handles
    /// written for it are put back. Guards are left out (nothing was decided from a cache).
    async fn write_block_in_order(
        &self,
        ops: &[TxnOp],
        handles_at: usize,
        old: &[Option<Vec<u8>>],
        allocating: bool,
    ) -> Result<Vec<Revision>, StoreError> {
        let mut revs = vec![0; ops.len()];
        let one = |op: &TxnOp| {
            let op = op.clone();
            async move { self.ds.txn(std::slice::from_ref(&op)).await.map(|r| r.first().copied().unwrap_or_default()) }
        };
        let handles = &ops[handles_at..];
        if allocating {
            for (i, op) in handles.iter().enumerate() {
                match one(op).await {
                    Ok(r) => revs[handles_at + i] = r,
                    Err(e) => {
                        self.put_back(&handles[..i], &revs[handles_at..handles_at + i], old).await;
                        return Err(e);
                    }
                }
            }
        }
        for (i, op) in ops[..handles_at].iter().enumerate() {
            if matches!(op, TxnOp::Check { .. } | TxnOp::Unchanged { .. }) {
                continue;
            }
            match one(op).await {
                Ok(r) => revs[i] = r,
                Err(e) => {
                    if i == 0 && allocating {
                        self.put_back(handles, &revs[handles_at..], old).await;
                    }
                    return Err(e);
                }
            }
        }
        if !allocating {
            for (i, op) in handles.iter().enumerate() {
                // The block no longer holds these addresses: a handle that cannot be written
                // now stays over-counted, which `ipam check` reports.
                if let Ok(r) = one(op).await {
                    revs[handles_at + i] = r;
                }
            }
        }
        Ok(revs)
    }

    /// Undo handle writes (`ops`, left at `revs`) whose block write did not happen.
    async fn put_back(&self, ops: &[TxnOp], revs: &[Revision], old: &[Option<Vec<u8>>]) {
        for ((op, rev), before) in ops.iter().zip(revs).zip(old) {
            let key = op.key().to_string();
            let undo = match before {
                Some(value) => TxnOp::Put { key, value: value.clone(), condition: Condition::At(*rev) },
                None => TxnOp::Delete { key, condition: Condition::At(*rev) },
            };
            let _ = self.ds.txn(&[undo]).await;
            if let Some(h) = op.key().strip_prefix(&handles_prefix()) {
                lock(&self.handles).remove(h);
            }
        }
    }

    /// Create `cidr`'s block claimed by `node`, with its affinity: one transaction, or on a
    /// store without transactions Calico's KDD order — the affinity `pending` (not yet the
    /// node's), the block, then the affinity `confirmed` — so a crash leaves a pending
    /// affinity or a block the node adopts on its next claim, never a block claimed twice.
    async fn create_claimed_block(
        &self,
        node: &str,
        cidr: IpNet,
        guards: &[TxnOp],
    ) -> Result<(AllocationBlock, Revision), StoreError> {
        let (block, ops) = claim_ops(node, cidr);
        if self.transactions {
            let ops: Vec<TxnOp> = ops.into_iter().chain(guards.iter().cloned()).collect();
            let revs = self.ds.txn(&ops).await?;
            return Ok((block, revs.get(1).copied().unwrap_or_default()));
        }
        let akey = affinity_key(node, &cidr);
        let value = |a: BlockAffinity| serde_json::to_vec(&a).unwrap_or_default();
        let arev = match self.ds.create(&akey, &value(BlockAffinity::pending())).await {
            Ok(r) => r,
            // Left by a claim that did not finish: ours to finish.
            Err(StoreError::AlreadyExists { .. }) => match self.ds.get(&akey).await? {
                Some(kv) => kv.mod_revision,
                None => return Err(StoreError::Conflict { key: akey, expected: 0, actual: 0 }),
            },
            Err(e) => return Err(e),
        };
        let brev = match self.ds.create(&block_key(&cidr), &serde_json::to_vec(&block).unwrap_or_default()).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.ds.delete(&akey, Some(arev)).await;
                return Err(e);
            }
        };
        self.ds.update(&akey, &value(BlockAffinity::confirmed()), arev).await?;
        Ok((block, brev))
    }

    /// Several writes: one transaction, or one after another in the order given (guards left
    /// out) on a store without transactions — callers order them so that a crash part-way
    /// leaves what the next claim adopts or `ipam check` reports.
    async fn commit(&self, ops: &[TxnOp]) -> Result<Vec<Revision>, StoreError> {
        if self.transactions {
            return self.ds.txn(ops).await;
        }
        let mut revs = Vec::with_capacity(ops.len());
        for op in ops {
            revs.push(match op {
                TxnOp::Check { .. } | TxnOp::Unchanged { .. } => 0,
                op => self.ds.txn(std::slice::from_ref(op)).await?.first().copied().unwrap_or_default(),
            });
        }
        Ok(revs)
    }

    /// Read-modify-write one block (and the handles it touches) in one transaction, retrying on
    /// conflicts. `change` returns None when there is nothing to do, and must not modify the
    /// block unless it returns Some. An empty block with no owner is deleted.
    async fn update_block<T>(
        &self,
        cidr: IpNet,
        guards: &[TxnOp],
        mut change: impl FnMut(&mut AllocationBlock) -> Result<Option<BlockChange<T>>, IpamError>,
    ) -> Result<Option<T>, IpamError> {
        let key = block_key(&cidr);
        for attempt in 0..MAX_ATTEMPTS {
            let Some((mut block, rev)) = self.take_block(cidr, attempt > 0).await? else {
                return Ok(None);
            };
            let c = match change(&mut block) {
                Ok(Some(c)) => c,
                // `change` leaves the block untouched when it declines or fails: keep it cached.
                other => {
                    lock(&self.blocks).insert(cidr, (block, rev));
                    return other.map(|_| None);
                }
            };
            let delete = block.is_empty() && block.affinity.is_none();
            let mut ops = vec![if delete {
                TxnOp::Delete { key: key.clone(), condition: Condition::At(rev) }
            } else {
                TxnOp::Put {
                    key: key.clone(),
                    value: serde_json::to_vec(&block).unwrap_or_default(),
                    condition: Condition::At(rev),
                }
            }];
            ops.extend(c.also.iter().cloned());
            ops.extend(guards.iter().cloned());
            let mut new_handles = Vec::new();
            // What each handle held before (None: new), to put back if the block write fails
            // on a store without transactions.
            let mut old_handles = Vec::new();
            let allocating = c.handles.values().any(|d| *d > 0);
            for (h, delta) in &c.handles {
                // A handle we have not seen is assumed new when it gains addresses (no read);
                // if it exists after all, the transaction says so and the retry reads it.
                let (mut rec, hrev) = self.handle_record(h, attempt > 0 || *delta < 0).await?;
                // Only a store without transactions can need it (and only then is it copied).
                let before = hrev.filter(|_| !self.transactions).map(|_| serde_json::to_vec(&rec).unwrap_or_default());
                if *delta >= 0 {
                    rec.add(&cidr, *delta as usize);
                } else {
                    rec.remove(&cidr, delta.unsigned_abs());
                }
                let hkey = handle_key(h);
                let op = match (rec.is_empty(), hrev) {
                    (true, Some(r)) => TxnOp::Delete { key: hkey, condition: Condition::At(r) },
                    (true, None) => continue,
                    (false, r) => TxnOp::Put {
                        key: hkey,
                        value: serde_json::to_vec(&rec).unwrap_or_default(),
                        condition: r.map_or(Condition::Absent, Condition::At),
                    },
                };
                new_handles.push((h.clone(), rec));
                old_handles.push(before);
                ops.push(op);
            }
            let written = if self.transactions {
                self.ds.txn(&ops).await
            } else {
                self.write_block_in_order(&ops, 1 + c.also.len() + guards.len(), &old_handles, allocating).await
            };
            match written {
                Ok(revs) => {
                    let mut blocks = lock(&self.blocks);
                    if delete {
                        blocks.remove(&cidr);
                    } else {
                        blocks.insert(cidr, (block, revs.first().copied().unwrap_or_default()));
                    }
                    drop(blocks);
                    let mut handles = lock(&self.handles);
                    for ((h, rec), r) in new_handles.into_iter().zip(revs.iter().skip(1 + c.also.len() + guards.len()))
                    {
                        if rec.is_empty() {
                            handles.remove(&h);
                        } else {
                            handles.insert(h, (rec, *r));
                        }
                    }
                    return Ok(Some(c.out));
                }
                Err(e) if guard_failed(&e, guards) => {
                    lock(&self.blocks).remove(&cidr);
                    return Err(IpamError::ConfigChanged);
                }
                Err(e) => match is_condition_failure(&e) {
                    Some(k) => {
                        if let Some(h) = k.strip_prefix(&handles_prefix()) {
                            lock(&self.handles).remove(h);
                        }
                    }
                    None => return Err(e.into()),
                },
            }
        }
        Err(IpamError::Contention { key })
    }

    /// Allocate up to `want` addresses from one block, if `eligible` accepts it.
    async fn take_from(
        &self,
        cidr: IpNet,
        want: usize,
        req: &AutoAssign,
        skip: &Skip<'_>,
        eligible: impl Fn(&AllocationBlock) -> bool,
    ) -> Result<Vec<IpNet>, IpamError> {
        let got = self
            .update_block(cidr, skip.guards, |b| {
                if !eligible(b) || b.free() == 0 {
                    return Ok(None);
                }
                let now = crate::block::unix_now();
                let cooling: std::collections::BTreeSet<IpAddr> = (skip.cooldown_secs > 0)
                    .then(|| {
                        b.unallocated
                            .iter()
                            .filter(|o| b.cooling(**o, skip.cooldown_secs, now))
                            .map(|o| b.ip(*o))
                            .collect()
                    })
                    .unwrap_or_default();
                let ords = b.allocate(want, &req.handle, &req.attrs, |ip| {
                    skip.reserved.iter().any(|n| n.contains(&ip)) || cooling.contains(&ip)
                });
                if ords.is_empty() {
                    return Ok(None);
                }
                let ips = ords
                    .iter()
                    .map(|o| IpNet::new(b.ip(*o), b.cidr.prefix_len()).unwrap_or(b.cidr))
                    .collect::<Vec<_>>();
                Ok(Some(BlockChange {
                    handles: [(req.handle.clone(), ips.len() as isize)].into(),
                    out: ips,
                    also: vec![],
                }))
            })
            .await?;
        Ok(got.unwrap_or_default())
    }

    /// Blocks this node holds (confirmed affinities), in address order.
    pub async fn affine_blocks(&self, node: &str, v4: bool) -> Result<Vec<IpNet>, IpamError> {
        let listing = self.ds.list(&node_affinities_prefix(node, v4)).await?;
        let mut out: Vec<IpNet> = listing
            .items
            .iter()
            .filter(|kv| {
                BlockAffinity::parse(&kv.value)
                    .is_some_and(|a| a.state == crate::model::AffinityState::Confirmed && !a.deleted)
            })
            .filter_map(|kv| parse_affinity_key(&kv.key).map(|(_, c)| c))
            .collect();
        out.sort();
        lock(&self.affinities).insert((node.to_string(), v4), out.clone());
        Ok(out)
    }

    /// Every block of one family with its revision.
    pub async fn all_blocks(&self, v4: bool) -> Result<Vec<(AllocationBlock, Revision)>, IpamError> {
        let listing = self.ds.list(&blocks_prefix(v4)).await?;
        listing
            .items
            .iter()
            .map(|kv| {
                let b = AllocationBlock::decode(&kv.value)
                    .map_err(|message| IpamError::Corrupt { key: kv.key.clone(), message })?;
                Ok((b, kv.mod_revision))
            })
            .filter(|r| !matches!(r, Ok((b, _)) if b.deleted))
            .collect()
    }

    /// A block that names `node` but lost its affinity record (a release or claim cut short):
    /// adopt it again. Needs every affinity key, so it runs once per node and family in this
    /// client's life (an agent start) and whenever no free block is left — not on every claim.
    async fn adopt_orphan(
        &self,
        pools: &[Pool],
        node: &str,
        known: &[IpNet],
        guards: &[TxnOp],
        taken: &std::collections::HashSet<IpNet>,
    ) -> Result<Option<IpNet>, IpamError> {
        let others: std::collections::HashSet<IpNet> = self
            .ds
            .list_keys(&all_affinities_prefix())
            .await?
            .items
            .iter()
            .filter_map(|kv| parse_affinity_key(&kv.key))
            .filter(|(n, _)| n != node)
            .map(|(_, c)| c)
            .collect();
        // Only blocks no other node has a record for can be such a block.
        for cidr in taken.iter().filter(|c| !known.contains(c) && !others.contains(c)) {
            let Some((b, _)) = self.read_block(*cidr).await? else { continue };
            if b.is_affine_to(node)
                && b.free() > 0
                && !known.contains(&b.cidr)
                && pools.iter().any(|p| p.cidr.contains(&b.cidr))
            {
                let mut ops = vec![TxnOp::Put {
                    key: affinity_key(node, &b.cidr),
                    value: serde_json::to_vec(&BlockAffinity::confirmed()).unwrap_or_default(),
                    condition: Condition::Any,
                }];
                ops.extend(guards.iter().cloned());
                return match self.commit(&ops).await {
                    Ok(_) => Ok(Some(b.cidr)),
                    Err(e) if guard_failed(&e, guards) => Err(IpamError::ConfigChanged),
                    Err(e) => Err(e.into()),
                };
            }
        }
        Ok(None)
    }

    /// Claim a block for `node`: an orphan of its own (see [`Self::adopt_orphan`]), a free block
    /// of the pools (searched from the node's own starting point), else another node's empty
    /// block whose claim is older than `reclaim_after`. Affinity and block are written in one
    /// transaction, so a crash never leaves a half-claimed block.
    async fn claim(
        &self,
        pools: &[Pool],
        node: &str,
        v4: bool,
        known: &[IpNet],
        guards: &[TxnOp],
        blocks: &gingham_store::Listing,
    ) -> Result<Option<IpNet>, IpamError> {
        let parse = |kv: &gingham_store::KeyValue| -> Result<(AllocationBlock, Revision), IpamError> {
            let b = AllocationBlock::decode(&kv.value)
                .map_err(|message| IpamError::Corrupt { key: kv.key.clone(), message })?;
            Ok((b, kv.mod_revision))
        };
        // Which blocks exist needs only keys (`blocks` is such a listing): values are read only
        // where they matter.
        let taken: std::collections::HashSet<IpNet> =
            blocks.items.iter().filter_map(|kv| parse_segment(kv.key.rsplit('/').next()?)).collect();
        // This client's first claim for the node looks for orphans first, later ones only last.
        let first_claim = lock(&self.orphans_swept).insert((node.to_string(), v4));
        if first_claim {
            if let Some(cidr) = self.adopt_orphan(pools, node, known, guards, &taken).await? {
                return Ok(Some(cidr));
            }
        }
        for pool in pools {
            for cidr in pool.blocks_for(node) {
                if taken.contains(&cidr) {
                    continue;
                }
                match self.create_claimed_block(node, cidr, guards).await {
                    Ok((block, rev)) => {
                        lock(&self.blocks).insert(cidr, (block, rev));
                        return Ok(Some(cidr));
                    }
                    Err(e) if guard_failed(&e, guards) => return Err(IpamError::ConfigChanged),
                    Err(StoreError::AlreadyExists { .. }) => continue, // another node took it just now
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !first_claim {
            if let Some(cidr) = self.adopt_orphan(pools, node, known, guards, &taken).await? {
                return Ok(Some(cidr));
            }
        }
        // No free block left: another node's empty one, old enough, is taken over (this needs
        // every block's content).
        let now = parse_rfc3339(&now_rfc3339()).unwrap_or_default();
        for kv in &self.ds.list(&blocks_prefix(v4)).await?.items {
            let (b, rev) = parse(kv)?;
            let in_pool = pools.iter().any(|p| p.cidr.contains(&b.cidr) && p.block_size == b.cidr.prefix_len());
            let old_enough = b
                .affinity_claim_time
                .as_deref()
                .and_then(parse_rfc3339)
                .is_none_or(|t| now - t >= self.reclaim_after.as_secs() as i64);
            if !in_pool || !b.is_empty() || b.is_affine_to(node) || !old_enough {
                continue;
            }
            let mut mine = b.clone();
            mine.affinity = Some(host_affinity(node));
            mine.affinity_claim_time = Some(now_rfc3339());
            mine.sequence_number += 1;
            let mut ops = vec![
                TxnOp::Put {
                    key: block_key(&b.cidr),
                    value: serde_json::to_vec(&mine).unwrap_or_default(),
                    condition: Condition::At(rev),
                },
                TxnOp::Put {
                    key: affinity_key(node, &b.cidr),
                    value: serde_json::to_vec(&BlockAffinity::confirmed()).unwrap_or_default(),
                    condition: Condition::Any,
                },
            ];
            if let Some(other) = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")) {
                ops.push(TxnOp::Delete { key: affinity_key(other, &b.cidr), condition: Condition::Any });
            }
            ops.extend(guards.iter().cloned());
            match self.commit(&ops).await {
                Ok(revs) => {
                    lock(&self.blocks).insert(b.cidr, (mine, revs.first().copied().unwrap_or_default()));
                    return Ok(Some(b.cidr));
                }
                Err(e) if guard_failed(&e, guards) => return Err(IpamError::ConfigChanged),
                Err(e) if is_condition_failure(&e).is_some() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Assign `want` addresses of one family into `got`; on an error, `got` holds what was
    /// taken so far, for the caller to give back.
    #[allow(clippy::too_many_arguments)]
    async fn assign_family(
        &self,
        req: &AutoAssign,
        v4: bool,
        want: usize,
        config: &IpConfig,
        settings: &Settings,
        labels: &BTreeMap<String, String>,
        guards: &[TxnOp],
        got: &mut Vec<IpNet>,
    ) -> Result<(), IpamError> {
        if want == 0 {
            return Ok(());
        }
        let (pools_all, reserved) = (&config.pools, &config.reserved);
        let requested = if v4 { &req.pools_v4 } else { &req.pools_v6 };
        let use_ = if req.tunnel { Use::Tunnel } else { Use::Workload };
        let pools = select(pools_all, v4, requested, &req.node, labels, req.namespace_labels.as_ref(), use_)?;
        let in_pools = |c: &IpNet| pools.iter().any(|p| p.cidr.contains(c));
        let skip = Skip {
            reserved: reserved.iter().filter(|n| n.addr().is_ipv4() == v4).copied().collect(),
            cooldown_secs: settings.ip_cooldown_secs,
            guards,
        };
        let cache_key = (req.node.clone(), v4);
        let cached = lock(&self.affinities).get(&cache_key).cloned();
        let mut affine = match cached {
            Some(a) => a,
            None => self.affine_blocks(&req.node, v4).await?,
        };
        // Cached blocks known to be full are skipped without a copy. Before claiming a new block,
        // the node's blocks are listed again, and those another process changed (it may have
        // freed addresses) read again: the keys of every block, with their revisions, say which.
        let mut blocks = None;
        for refresh in [false, true] {
            if refresh {
                affine = self.affine_blocks(&req.node, v4).await?;
                let listing = self.ds.list_keys(&blocks_prefix(v4)).await?;
                let revs: HashMap<&str, Revision> =
                    listing.items.iter().map(|kv| (kv.key.as_str(), kv.mod_revision)).collect();
                for cidr in affine.iter().filter(|c| in_pools(c)) {
                    let cached = lock(&self.blocks).get(cidr).map(|(_, r)| *r);
                    if cached.is_none() || revs.get(block_key(cidr).as_str()).copied() != cached {
                        self.refresh_block(*cidr).await?;
                    }
                }
                blocks = Some(listing);
            }
            for cidr in affine.iter().filter(|c| in_pools(c)) {
                if self.cached_free(cidr) == Some(0) {
                    continue;
                }
                let node = req.node.clone();
                got.extend(self.take_from(*cidr, want - got.len(), req, &skip, move |b| b.is_affine_to(&node)).await?);
                if got.len() == want {
                    return Ok(());
                }
            }
        }
        let limit = [settings.max_blocks_per_host, req.max_blocks].into_iter().filter(|l| *l > 0).min();
        let mut limit_hit = false;
        while got.len() < want && settings.auto_allocate_blocks {
            if limit.is_some_and(|l| affine.len() as u32 >= l) {
                limit_hit = true;
                break;
            }
            let listing = match blocks.take() {
                Some(l) => l,
                None => self.ds.list_keys(&blocks_prefix(v4)).await?,
            };
            let Some(cidr) = self.claim(&pools, &req.node, v4, &affine, guards, &listing).await? else {
                break;
            };
            affine.push(cidr);
            lock(&self.affinities).insert(cache_key.clone(), affine.clone());
            let node = req.node.clone();
            got.extend(self.take_from(cidr, want - got.len(), req, &skip, move |b| b.is_affine_to(&node)).await?);
        }
        if got.len() < want && !settings.strict_affinity {
            // Borrow from other nodes' blocks (no affinity is claimed).
            for (b, _) in self.all_blocks(v4).await? {
                if b.free() == 0 || b.is_affine_to(&req.node) || !in_pools(&b.cidr) {
                    continue;
                }
                got.extend(self.take_from(b.cidr, want - got.len(), req, &skip, |_| true).await?);
                if got.len() == want {
                    return Ok(());
                }
            }
        }
        if got.len() < want {
            let family = if v4 { "IPv4" } else { "IPv6" };
            return Err(match limit {
                Some(l) if limit_hit => IpamError::BlockLimit {
                    node: req.node.clone(),
                    limit: l,
                    family,
                    wanted: want,
                    got: got.len(),
                    strict: settings.strict_affinity,
                },
                _ => IpamError::Exhausted {
                    node: req.node.clone(),
                    family,
                    wanted: want,
                    got: got.len(),
                    pools: pools.iter().map(|p| format!("{} ({})", p.name, p.cidr)).collect(),
                },
            });
        }
        Ok(())
    }

    /// Hand out `num_v4` + `num_v6` addresses under `handle`. All or nothing.
    pub async fn auto_assign(&self, req: &AutoAssign) -> Result<Assigned, IpamError> {
        if req.handle.is_empty() {
            return Err(IpamError::InvalidRequest("a handle is required".into()));
        }
        let node_lock = self.node_lock(&req.node);
        let _guard = node_lock.lock().await;
        for _ in 0..CONFIG_ATTEMPTS {
            let cached = lock(&self.assign_cache).is_some();
            match self.assign_once(req).await {
                Err(IpamError::ConfigChanged) => self.forget_decided(),
                // A refusal decided from the cache is confirmed against a fresh read: the
                // configuration that would allow it may have come since, with no write to notice.
                Err(_) if cached => self.forget_decided(),
                other => return other,
            }
        }
        Err(IpamError::ConfigChanged)
    }

    /// One try at `auto_assign` from the cached configuration (no reads when the node's blocks
    /// have room); all or nothing.
    async fn assign_once(&self, req: &AutoAssign) -> Result<Assigned, IpamError> {
        let d = self.decided().await?;
        let settings = settings_of(d.config.config.as_ref().unwrap_or(&IPAMConfigSpec::default()));
        let mut guards = d.guards.clone();
        // The node's labels matter only to pools that select nodes.
        let labels = if d.config.pools.iter().any(Pool::selects_by_node_labels) {
            let (labels, guard) = self.node_labels(&req.node).await?;
            guards.push(guard);
            labels
        } else {
            BTreeMap::new()
        };
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        let mut done = self.assign_family(req, true, req.num_v4, &d.config, &settings, &labels, &guards, &mut v4).await;
        if done.is_ok() {
            done = self.assign_family(req, false, req.num_v6, &d.config, &settings, &labels, &guards, &mut v6).await;
        }
        if let Err(e) = done {
            // Nothing half-done: give back what this request took.
            let ips: Vec<IpAddr> = v4.iter().chain(&v6).map(|n| n.addr()).collect();
            if !ips.is_empty() {
                self.release_ips(&ips, &ReleaseGuard { handle: Some(req.handle.clone()), sequence_number: None })
                    .await?;
            }
            return Err(e);
        }
        Ok(Assigned { v4, v6 })
    }

    /// Assign one given address (it must lie in an enabled pool allowing this use).
    pub async fn assign_ip(
        &self,
        ip: IpAddr,
        handle: &str,
        attrs: &BTreeMap<String, String>,
        node: &str,
        tunnel: bool,
    ) -> Result<IpNet, IpamError> {
        let use_ok = |p: &Pool| {
            let want = if tunnel { "Tunnel" } else { "Workload" };
            p.spec.allowed_uses.as_ref().is_none_or(|u| u.is_empty() || u.iter().any(|x| x == want))
        };
        let pools = self.pools().await?;
        let Some(pool) = pools.iter().find(|p| !p.disabled() && p.cidr.contains(&ip) && use_ok(p)) else {
            return Err(IpamError::NotInPool { ip });
        };
        let cidr = pool.block_of(ip).ok_or(IpamError::NotInPool { ip })?;
        let settings = self.settings().await?;
        let node_lock = self.node_lock(node);
        let _guard = node_lock.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            if self.block(cidr, true).await?.is_none() {
                // Nobody owns this block yet: claim it for this node.
                match self.create_claimed_block(node, cidr, &[]).await {
                    Ok(_) | Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let result = self
                .update_block(cidr, &[], |b| {
                    if settings.strict_affinity && !b.is_affine_to(node) {
                        return Err(IpamError::StrictAffinity { ip, owner: b.affinity.clone().unwrap_or_default() });
                    }
                    let ord = b.ordinal(ip).ok_or(IpamError::NotInPool { ip })?;
                    if !b.allocate_ordinal(ord, handle, attrs) {
                        return Err(IpamError::AlreadyAllocated {
                            ip,
                            handle: b.handle_of(ord).unwrap_or_default().to_string(),
                        });
                    }
                    Ok(Some(BlockChange {
                        out: IpNet::new(ip, b.cidr.prefix_len()).unwrap_or(b.cidr),
                        handles: [(handle.to_string(), 1)].into(),
                        also: vec![],
                    }))
                })
                .await?;
            if let Some(n) = result {
                return Ok(n);
            }
        }
        Err(IpamError::Contention { key: block_key(&cidr) })
    }

    /// Assign exactly these addresses under `handle` (CNI `IP=`, runtimeConfig `ips`, Calico's
    /// `ipAddrs`). All or nothing: if one is taken or outside every enabled pool, the others are
    /// released again.
    pub async fn assign_ips(
        &self,
        ips: &[IpAddr],
        handle: &str,
        attrs: &BTreeMap<String, String>,
        node: &str,
    ) -> Result<Assigned, IpamError> {
        let mut got = Assigned::default();
        for ip in ips {
            match self.assign_ip(*ip, handle, attrs, node, false).await {
                Ok(n) if n.addr().is_ipv4() => got.v4.push(n),
                Ok(n) => got.v6.push(n),
                Err(e) => {
                    let done: Vec<IpAddr> = got.v4.iter().chain(&got.v6).map(|n| n.addr()).collect();
                    self.release_ips(&done, &ReleaseGuard { handle: Some(handle.to_string()), sequence_number: None })
                        .await?;
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// The nodes (secondary attribute `node`) of the addresses `handle` holds.
    pub async fn handle_nodes(&self, handle: &str) -> Result<Vec<String>, IpamError> {
        let (rec, _) = self.handle_record(handle, true).await?;
        let mut nodes = Vec::new();
        for cidr in rec.block.keys().filter_map(|c| c.parse::<IpNet>().ok()) {
            if let Some((b, _)) = self.block(cidr, true).await? {
                for o in b.ordinals_of(handle) {
                    if let Some(n) = b.attribute(o).and_then(|a| a.secondary.as_ref()?.get("node")) {
                        if !nodes.contains(n) {
                            nodes.push(n.clone());
                        }
                    }
                }
            }
        }
        Ok(nodes)
    }

    /// Release every address held by `handle`; returns them (empty if the handle is unknown).
    pub async fn release_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        let (rec, rev) = self.handle_record(handle, true).await?;
        lock(&self.handles).remove(handle);
        let mut released = Vec::new();
        for cidr in rec.block.keys().filter_map(|c| c.parse::<IpNet>().ok()) {
            let release = |b: &mut AllocationBlock| {
                let ords = b.ordinals_of(handle);
                if ords.is_empty() {
                    return Ok(None);
                }
                let ips: Vec<IpAddr> = ords.iter().map(|o| b.ip(*o)).collect();
                b.release(&ords);
                Ok(Some(BlockChange {
                    handles: [(handle.to_string(), -(ips.len() as isize))].into(),
                    out: ips,
                    also: vec![],
                }))
            };
            let mut ips = self.update_block(cidr, &[], release).await?;
            if ips.is_none() {
                // The handle says this block holds some of its addresses and the (cached) block
                // says not: only a fresh read may decide that there is nothing to release.
                self.refresh_block(cidr).await?;
                ips = self.update_block(cidr, &[], release).await?;
            }
            released.extend(ips.unwrap_or_default());
        }
        // A handle record that names blocks no longer holding it is removed too.
        if rev.is_some() {
            if let Some(kv) = self.ds.get(&handle_key(handle)).await? {
                let h: IpamHandle = serde_json::from_slice(&kv.value).unwrap_or_default();
                let mut stale = true;
                for cidr in h.block.keys().filter_map(|c| c.parse::<IpNet>().ok()) {
                    if self.block(cidr, true).await?.is_some_and(|(b, _)| !b.ordinals_of(handle).is_empty()) {
                        stale = false;
                    }
                }
                if stale {
                    match self.ds.delete(&handle_key(handle), Some(kv.mod_revision)).await {
                        Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(released)
    }

    /// The block holding `ip`: from the pools, else any existing block that contains it.
    async fn block_for_ip(&self, ip: IpAddr, pools: &[Pool]) -> Result<Option<IpNet>, IpamError> {
        if let Some(c) = pools.iter().find_map(|p| p.block_of(ip)) {
            if self.block(c, false).await?.is_some() {
                return Ok(Some(c));
            }
        }
        Ok(self.all_blocks(ip.is_ipv4()).await?.into_iter().map(|(b, _)| b.cidr).find(|c| c.contains(&ip)))
    }

    /// Release the given addresses. Returns, per address, whether it was allocated. With a
    /// guard, an address held by another handle or allocated at another sequence number is an
    /// error and nothing in its block is released.
    pub async fn release_ips(&self, ips: &[IpAddr], guard: &ReleaseGuard) -> Result<Vec<(IpAddr, bool)>, IpamError> {
        let pools = if ips.is_empty() { Vec::new() } else { self.pools().await? };
        let mut by_block: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
        let mut out = Vec::new();
        for ip in ips {
            match self.block_for_ip(*ip, &pools).await? {
                Some(c) => by_block.entry(c).or_default().push(*ip),
                None => out.push((*ip, false)),
            }
        }
        for (cidr, ips) in by_block {
            let result = self
                .update_block(cidr, &[], |b| {
                    let mut ords = Vec::new();
                    let mut report = Vec::new();
                    for ip in &ips {
                        let Some(ord) = b.ordinal(*ip).filter(|o| b.allocations[*o as usize].is_some()) else {
                            report.push((*ip, false));
                            continue;
                        };
                        if let Some(h) = &guard.handle {
                            if b.handle_of(ord) != Some(h.as_str()) {
                                return Err(IpamError::HandleMismatch {
                                    ip: *ip,
                                    expected: h.clone(),
                                    actual: b.handle_of(ord).unwrap_or_default().to_string(),
                                });
                            }
                        }
                        if let Some(seq) = guard.sequence_number {
                            let actual = b.sequence_number_for_allocation.get(&ord.to_string()).copied();
                            if actual != Some(seq) {
                                return Err(IpamError::SequenceMismatch { ip: *ip, expected: seq, actual });
                            }
                        }
                        ords.push(ord);
                        report.push((*ip, true));
                    }
                    if ords.is_empty() {
                        return Ok(None); // nothing allocated here: no write
                    }
                    let mut handles: BTreeMap<String, isize> = BTreeMap::new();
                    for r in b.release(&ords) {
                        if let Some(h) = r.handle {
                            *handles.entry(h).or_default() -= 1;
                        }
                    }
                    Ok(Some(BlockChange { out: report, handles, also: vec![] }))
                })
                .await?;
            out.extend(result.unwrap_or_else(|| ips.iter().map(|ip| (*ip, false)).collect()));
        }
        Ok(out)
    }

    /// Drop `node`'s affinity for `cidr` if the block is empty (node removal, pool no longer
    /// selecting it). Returns false if the block still has addresses in use.
    pub async fn release_affinity(&self, node: &str, cidr: IpNet) -> Result<bool, IpamError> {
        lock(&self.affinities).remove(&(node.to_string(), cidr.addr().is_ipv4()));
        for _ in 0..MAX_ATTEMPTS {
            let aff = TxnOp::Delete { key: affinity_key(node, &cidr), condition: Condition::Any };
            let Some((b, rev)) = self.block(cidr, true).await? else {
                self.ds.txn(&[aff]).await?;
                return Ok(true);
            };
            if !b.is_empty() {
                return Ok(false);
            }
            let ops = [TxnOp::Delete { key: block_key(&cidr), condition: Condition::At(rev) }, aff];
            match self.commit(&ops).await {
                Ok(_) => {
                    lock(&self.blocks).remove(&cidr);
                    return Ok(true);
                }
                Err(e) if is_condition_failure(&e).is_some() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention { key: block_key(&cidr) })
    }

    /// Calico's ReleasePoolAffinities for every block no IPPool contains any more (its pool was
    /// deleted): an empty block goes at once with its affinity; one still holding addresses
    /// loses its affinity and goes when its last address is released. Affinity records of
    /// such blocks without a block go too. Idempotent: a crash half-way is finished by the
    /// next call. Returns the blocks (cidr, deleted now).
    pub async fn release_blocks_outside_pools(&self) -> Result<Vec<(IpNet, bool)>, IpamError> {
        let pools = self.pools().await?;
        let inside = |c: &IpNet| pools.iter().any(|p| p.cidr.contains(c));
        let mut out = Vec::new();
        let mut blocks = std::collections::BTreeSet::new();
        for v4 in [true, false] {
            for (b, _) in self.all_blocks(v4).await? {
                blocks.insert(b.cidr);
                if inside(&b.cidr) || b.affinity.is_none() {
                    continue;
                }
                if let Some(empty) = self.unaffine_block(b.cidr).await? {
                    out.push((b.cidr, empty));
                }
            }
        }
        // Affinities naming a block that does not exist, outside every pool.
        for kv in self.ds.list(&all_affinities_prefix()).await?.items {
            if let Some((node, cidr)) = parse_affinity_key(&kv.key) {
                if !inside(&cidr) && !blocks.contains(&cidr) {
                    match self.ds.delete(&kv.key, Some(kv.mod_revision)).await {
                        Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    lock(&self.affinities).remove(&(node, cidr.addr().is_ipv4()));
                    out.push((cidr, true));
                }
            }
        }
        Ok(out)
    }

    /// Take a block from its node whatever it holds (Calico's releaseAffinity without
    /// requireEmpty): empty, it is deleted with its affinity; otherwise it stays without an
    /// owner, its addresses with their holders, and goes when the last is released. Returns
    /// whether it was deleted, or None if it had no owner.
    pub async fn unaffine_block(&self, cidr: IpNet) -> Result<Option<bool>, IpamError> {
        let r = self
            .update_block(cidr, &[], |b| {
                let Some(node) = b.affinity.as_deref().and_then(|a| a.strip_prefix("host:")).map(str::to_string) else {
                    return Ok(None);
                };
                b.affinity = None;
                let aff = TxnOp::Delete { key: affinity_key(&node, &cidr), condition: Condition::Any };
                Ok(Some(BlockChange { out: (node, b.is_empty()), handles: BTreeMap::new(), also: vec![aff] }))
            })
            .await?;
        Ok(r.map(|(node, empty)| {
            lock(&self.affinities).remove(&(node, cidr.addr().is_ipv4()));
            empty
        }))
    }

    /// Every node that has an affinity record (for finding nodes that are gone).
    pub async fn affinity_nodes(&self) -> Result<Vec<String>, IpamError> {
        let mut nodes: Vec<String> = self
            .ds
            .list(&all_affinities_prefix())
            .await?
            .items
            .iter()
            .filter_map(|kv| parse_affinity_key(&kv.key).map(|(n, _)| n))
            .collect();
        nodes.dedup();
        Ok(nodes)
    }

    /// Drop every affinity `node` holds: blocks as `unaffine_block` does, records without a
    /// block deleted. Returns how many records went.
    pub async fn release_affinities_of(&self, node: &str) -> Result<usize, IpamError> {
        let mut n = 0;
        for v4 in [true, false] {
            for kv in self.ds.list(&node_affinities_prefix(node, v4)).await?.items {
                let Some((_, cidr)) = parse_affinity_key(&kv.key) else { continue };
                let block = self.block(cidr, true).await?;
                if block.as_ref().is_some_and(|(b, _)| b.is_affine_to(node)) {
                    self.unaffine_block(cidr).await?;
                } else {
                    match self.ds.delete(&kv.key, Some(kv.mod_revision)).await {
                        Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                n += 1;
            }
            lock(&self.affinities).remove(&(node.to_string(), v4));
        }
        Ok(n)
    }

    /// Who holds `ip`: (handle, secondary attributes), or None if it is free.
    pub async fn holder(&self, ip: IpAddr) -> Result<Option<(String, BTreeMap<String, String>)>, IpamError> {
        let pools = self.pools().await?;
        let Some(cidr) = self.block_for_ip(ip, &pools).await? else {
            return Ok(None);
        };
        let Some((b, _)) = self.block(cidr, true).await? else {
            return Ok(None);
        };
        let Some(ord) = b.ordinal(ip) else {
            return Ok(None);
        };
        Ok(b.attribute(ord).map(|a| (a.handle_id.clone().unwrap_or_default(), a.secondary.clone().unwrap_or_default())))
    }

    /// The Node resource, for tunnel-address bookkeeping.
    pub(crate) async fn node(&self, node: &str) -> Result<Option<gingham_api::Object>, IpamError> {
        Ok(self.resources.get(Kind::Node, None, node).await?)
    }
}
