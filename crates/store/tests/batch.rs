//! ResourceStore::write_batch: one transaction when the backend allows it, validated chunks in
//! order beyond its limit, and an exact account of what was written when a chunk fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use gingham_api::{Kind, parse_documents};
use gingham_store::embedded::EmbeddedStore;
use gingham_store::resources::{BatchOp, WriteMode};
use gingham_store::{Datastore, Listing, ResourceStore, Result, Revision, StoreError, TxnOp, Watch};

/// A real embedded store whose transactions hold two ops, and whose `fail_at`-th transaction
/// fails as a lost connection would.
struct SmallTxns {
    inner: EmbeddedStore,
    txns: AtomicUsize,
    fail_at: usize,
}

#[async_trait]
impl Datastore for SmallTxns {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn get(&self, key: &str) -> Result<Option<gingham_store::KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Listing> {
        self.inner.list(prefix).await
    }
    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.inner.create(key, value).await
    }
    async fn update(&self, key: &str, value: &[u8], revision: Revision) -> Result<Revision> {
        self.inner.update(key, value, revision).await
    }
    async fn delete(&self, key: &str, revision: Option<Revision>) -> Result<Revision> {
        self.inner.delete(key, revision).await
    }
    async fn txn(&self, ops: &[TxnOp]) -> Result<Vec<Revision>> {
        assert!(ops.len() <= 2, "a chunk larger than the backend's limit");
        if self.txns.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(StoreError::Unavailable("connection lost".into()));
        }
        self.inner.txn(ops).await
    }
    fn max_txn_ops(&self) -> usize {
        2
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        self.inner.watch(prefix, from).await
    }
    async fn revision(&self) -> Result<Revision> {
        self.inner.revision().await
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
}

fn sets(n: usize) -> Vec<BatchOp> {
    let text: Vec<String> = (0..n)
        .map(|i| format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: s{i}}}\nspec: {{nets: [10.0.{i}.0/24]}}\n"))
        .collect();
    parse_documents("t.yaml", &text.join("---\n"))
        .unwrap()
        .into_iter()
        .map(|d| BatchOp::Write(d.object, WriteMode::Create))
        .collect()
}

#[tokio::test]
async fn chunks_in_order_and_an_exact_account_of_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Arc::new(SmallTxns {
        inner: EmbeddedStore::open(dir.path().join("s.db")).unwrap(),
        txns: AtomicUsize::new(0),
        fail_at: 3,
    });
    let rs = ResourceStore::new(ds.clone());
    let err = rs.write_batch(&sets(7)).await.unwrap_err();
    assert_eq!(err.written, 4, "two whole chunks of two went in before the third failed");
    assert!(matches!(err.error, gingham_store::resources::ResourceError::Store(StoreError::Unavailable(_))));
    let stored: Vec<String> =
        rs.list(Kind::GlobalNetworkSet, None).await.unwrap().iter().map(|o| o.name().to_string()).collect();
    assert_eq!(stored, ["s0", "s1", "s2", "s3"]);
    // Checked before anything is written: an existing one (Create) fails the whole batch.
    let before = ds.txns.load(Ordering::SeqCst);
    let err = rs.write_batch(&sets(7)).await.unwrap_err();
    assert_eq!((err.written, err.op), (0, Some(0)));
    assert_eq!(ds.txns.load(Ordering::SeqCst), before, "no transaction was attempted");
    // Within the limit's chunks everything lands, with each object's revision.
    let ds2 = Arc::new(SmallTxns {
        inner: EmbeddedStore::open(dir.path().join("t.db")).unwrap(),
        txns: AtomicUsize::new(0),
        fail_at: 0,
    });
    let out = ResourceStore::new(ds2.clone()).write_batch(&sets(5)).await.unwrap();
    assert_eq!(out.len(), 5);
    assert!(out.iter().all(|o| o.metadata.resource_version.is_some() && o.metadata.uid.is_some()));
    assert_eq!(ds2.txns.load(Ordering::SeqCst), 3);
}
