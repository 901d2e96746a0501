//! The Datastore trait and its two backends: an embedded SQLite revision log (several processes
//! on one machine) and etcd v3 (clusters). Revisions are etcd's: one global counter, each key
//! carrying the revision of its last change, compare-and-swap on that revision, and watches that
//! resume from a revision or say that it was compacted.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub mod config;
pub mod embedded;
pub mod etcd;
pub mod kubernetes;
mod notify;
pub mod resources;
pub mod testing;

pub use config::{DatastoreConfig, connect, connect_with};
pub use resources::ResourceStore;

pub type Revision = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change to this key (the resourceVersion).
    pub mod_revision: Revision,
    /// Revision at which the key was created.
    pub create_revision: Revision,
}

/// A list result and the store revision it was read at (watch from `revision + 1`).
#[derive(Clone, Debug)]
pub struct Listing {
    pub items: Vec<KeyValue>,
    pub revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// What must hold for one key for a transaction to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this revision.
    At(Revision),
    /// The key must exist (any revision).
    Exists,
    /// No condition.
    Any,
}

/// One step of a transaction: a write, or a guard that writes nothing but must hold for the
/// writes to commit (what the writer decided from cached reads is still true).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        condition: Condition,
    },
    Delete {
        key: String,
        condition: Condition,
    },
    /// `condition` must hold for `key`; nothing is written.
    Check {
        key: String,
        condition: Condition,
    },
    /// No key under `prefix` was created or modified after revision `since`; nothing is written.
    /// Deletions are not seen (etcd cannot compare what is gone): guard each listed key with
    /// `Check` as well.
    Unchanged {
        prefix: String,
        since: Revision,
    },
}

impl TxnOp {
    /// The key (for `Unchanged`, the prefix).
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } | TxnOp::Check { key, .. } => key,
            TxnOp::Unchanged { prefix, .. } => prefix,
        }
    }
    /// The condition on the key (`Unchanged` has none on a single key).
    pub fn condition(&self) -> Condition {
        match self {
            TxnOp::Put { condition, .. } | TxnOp::Delete { condition, .. } | TxnOp::Check { condition, .. } => {
                *condition
            }
            TxnOp::Unchanged { .. } => Condition::Any,
        }
    }
}

/// The error for an `Unchanged` guard on `prefix` that saw a change at revision `newest`.
pub(crate) fn unchanged_error(prefix: &str, since: Revision, newest: Revision) -> Option<StoreError> {
    (newest > since).then(|| StoreError::Conflict { key: prefix.into(), expected: since, actual: newest })
}

/// The error for `key` whose state (`current` revision, None if absent) fails `condition`.
pub(crate) fn condition_error(key: &str, condition: Condition, current: Option<Revision>) -> Option<StoreError> {
    match (condition, current) {
        (Condition::Absent, Some(_)) => Some(StoreError::AlreadyExists { key: key.into() }),
        (Condition::At(_) | Condition::Exists, None) => Some(StoreError::NotFound { key: key.into() }),
        (Condition::At(expected), Some(actual)) if expected != actual => {
            Some(StoreError::Conflict { key: key.into(), expected, actual })
        }
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{key} already exists")]
    AlreadyExists { key: String },
    #[error("{key} does not exist")]
    NotFound { key: String },
    #[error("{key} was changed by someone else (expected revision {expected}, now {actual})")]
    Conflict { key: String, expected: Revision, actual: Revision },
    /// The watch (or read) asked for history that compaction removed: re-list, then watch again.
    #[error("revision {requested} is compacted (history starts after {compacted}); re-list and watch again")]
    Compacted { requested: Revision, compacted: Revision },
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    #[error("datastore error: {0}")]
    Backend(String),
}

impl StoreError {
    /// The key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            StoreError::AlreadyExists { key } | StoreError::NotFound { key } | StoreError::Conflict { key, .. } => {
                Some(key)
            }
            _ => None,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stream of ordered events. Ends with an error (e.g. `Compacted`) when the caller must re-list.
pub struct Watch {
    rx: mpsc::Receiver<Result<Event>>,
    _task: Option<tokio::task::JoinHandle<()>>,
}

impl Watch {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Event>>, task: tokio::task::JoinHandle<()>) -> Self {
        Watch { rx, _task: Some(task) }
    }

    /// The next event; `None` when the watch has ended.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        self.rx.recv().await
    }

    /// The next event, or `None` if nothing arrives within `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<Result<Event>> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = self._task.take() {
            t.abort();
        }
    }
}

/// What a backend can do beyond get/list/create/update/delete/watch of the keys it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `txn` commits several ops, guards included, atomically; false: one unguarded write only
    /// (`max_txn_ops` is 1).
    pub transactions: bool,
    /// One revision counter for the whole store: `revision()` and revisions of different keys
    /// can be compared.
    pub global_revision: bool,
    /// `create_revision` is known (false: it is 0).
    pub create_revision: bool,
    /// Any key can be stored (false: only the keys the backend's layout places).
    pub any_key: bool,
}

impl Capabilities {
    pub const ALL: Capabilities =
        Capabilities { transactions: true, global_revision: true, create_revision: true, any_key: true };
}

#[async_trait]
pub trait Datastore: Send + Sync {
    /// Which backend this is, for messages ("embedded /var/lib/gingham/store.db", "etcd …").
    fn describe(&self) -> String;
    /// What it can do (the embedded store and etcd: everything).
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Listing>;
    /// The same, handed to `visit` a page (of at most `page` keys) at a time, all read at one
    /// revision, which is returned: a large prefix never sits in memory whole. (Pages come in
    /// key order, except on the Kubernetes API: there, one resource type after another.)
    async fn list_pages(
        &self,
        prefix: &str,
        page: usize,
        visit: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        let listing = self.list(prefix).await?;
        let mut items = listing.items;
        while !items.is_empty() {
            let rest = items.split_off(page.max(1).min(items.len()));
            visit(std::mem::replace(&mut items, rest));
        }
        Ok(listing.revision)
    }
    /// The keys under `prefix` with their revisions, values left empty: for when only which
    /// keys exist, and at which revision, matters (no value is read or copied).
    async fn list_keys(&self, prefix: &str) -> Result<Listing> {
        let mut listing = self.list(prefix).await?;
        listing.items.iter_mut().for_each(|kv| kv.value = Vec::new());
        Ok(listing)
    }
    /// Fails with `AlreadyExists` if the key is present.
    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision>;
    /// Compare-and-swap: writes only if the key's revision is still `revision`.
    async fn update(&self, key: &str, value: &[u8], revision: Revision) -> Result<Revision>;
    /// Deletes the key (only at `revision`, if given); returns the deletion's revision.
    async fn delete(&self, key: &str, revision: Option<Revision>) -> Result<Revision>;
    /// Apply every op or none: all conditions are checked, then all writes commit together.
    /// Returns the revision each op left its key at (etcd: one revision for all; embedded: one
    /// log row each). Fails with the error of the first op whose condition does not hold. Keys
    /// must be distinct.
    async fn txn(&self, ops: &[TxnOp]) -> Result<Vec<Revision>>;
    /// The most ops one `txn` may carry (etcd refuses more than its `--max-txn-ops`, 128 by
    /// default); larger batches are written in chunks of this size.
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }
    /// Events for keys under `prefix` with revision ≥ `from` (0 = from now on), in order.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch>;
    /// The store's current revision.
    async fn revision(&self) -> Result<Revision>;
    /// Drop history before `revision`.
    async fn compact(&self, revision: Revision) -> Result<()>;
    /// The annotations the orchestrator keeps on a workload (a Kubernetes Pod's), where this
    /// backend is the orchestrator's own store; None elsewhere, or if there is no such Pod.
    async fn workload_annotations(
        &self,
        _namespace: &str,
        _name: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        Ok(None)
    }
}

/// The exclusive upper bound of keys starting with `prefix`.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // empty prefix: everything (etcd's convention)
}
