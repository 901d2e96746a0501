//! The etcd v3 backend: transactions for create-if-absent and compare-and-swap on mod_revision,
//! prefix watches from a revision that report compaction.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use crate::{Condition, Datastore, Event, KeyValue, Listing, Result, Revision, StoreError, Watch, prefix_end};

/// How to reach etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca_cert_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// Objects per list request.
const LIST_PAGE: i64 = 1000;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

fn err(e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            StoreError::Unavailable(format!("etcd: {e}"))
        }
        etcd_client::Error::GRpcStatus(s)
            // A status with a source was made here, by the client's transport (a broken
            // connection, its own request timeout), not sent by etcd: the server is away or slow.
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
                || std::error::Error::source(&s).is_some() =>
        {
            StoreError::Unavailable(format!("etcd: {}", s.message()))
        }
        e => StoreError::Backend(format!("etcd: {e}")),
    }
}

fn read(path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| StoreError::Unavailable(format!("cannot read etcd {what} {path}: {e}")))
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
        create_revision: k.create_revision(),
    }
}

impl EtcdStore {
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given (ETCD_ENDPOINTS)".into()));
        }
        let mut opts =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(30));
        let tls_wanted = config.ca_cert_file.is_some()
            || config.cert_file.is_some()
            || config.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls_wanted {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca_cert_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            }
            match (&config.cert_file, &config.key_file) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(read(c, "client certificate")?, read(k, "client key")?))
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Unavailable(
                        "ETCD_CERT_FILE and ETCD_KEY_FILE must be given together".into(),
                    ));
                }
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&config.endpoints, Some(opts)).await.map_err(err)?;
        let store = EtcdStore { client, endpoints: config.endpoints.clone() };
        // Fail now, with a clear message, rather than on the first request.
        store.revision().await?;
        Ok(store)
    }

    /// Read the key (for a failed transaction) and turn it into NotFound or Conflict.
    fn explain(key: &str, expected: Revision, resp: &etcd_client::TxnResponse) -> StoreError {
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|k| k.mod_revision())),
            _ => None,
        });
        match current.flatten() {
            None => StoreError::NotFound { key: key.into() },
            Some(actual) => StoreError::Conflict { key: key.into(), expected, actual },
        }
    }

    fn revision_of(resp: &etcd_client::TxnResponse) -> Revision {
        resp.header().map(|h| h.revision()).unwrap_or_default()
    }
}

#[async_trait]
impl Datastore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client.clone().get(key, None).await.map_err(err)?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let mut items = Vec::new();
        let revision = self.list_pages(prefix, LIST_PAGE as usize, &mut |page| items.extend(page)).await?;
        Ok(Listing { items, revision })
    }

    async fn list_pages(
        &self,
        prefix: &str,
        page: usize,
        visit: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        // Page through the range at one revision: a consistent snapshot, and no response larger
        // than the gRPC message limit (4 MiB) however many objects a kind has.
        let end = prefix_end(prefix);
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut limit = page.clamp(1, LIST_PAGE as usize) as i64;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = match self.client.clone().get(start.clone(), Some(opts)).await {
                Ok(r) => r,
                // Large values (IPAM blocks are several KiB): a page over the 4 MiB gRPC message
                // limit is asked for again in halves.
                Err(e) if limit > 1 && e.to_string().contains("message length too large") => {
                    limit /= 2;
                    continue;
                }
                Err(e) => return Err(err(e)),
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            let next = match resp.kvs().last() {
                Some(last) if resp.more() => {
                    let mut k = last.key().to_vec();
                    k.push(0);
                    Some(k)
                }
                _ => None,
            };
            visit(resp.kvs().iter().map(kv).collect());
            match next {
                Some(k) => start = k,
                None => break,
            }
        }
        Ok(revision)
    }

    async fn list_keys(&self, prefix: &str) -> Result<Listing> {
        // Keys alone fit one response for any realistic prefix (a million keys of 100 bytes).
        let opts = GetOptions::new().with_range(prefix_end(prefix)).with_keys_only();
        let resp = self.client.clone().get(prefix, Some(opts)).await.map_err(err)?;
        Ok(Listing {
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            items: resp.kvs().iter().map(kv).collect(),
        })
    }

    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        let txn =
            Txn::new().when([Compare::version(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(key, value, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(err)?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists { key: key.into() });
        }
        Ok(Self::revision_of(&resp))
    }

    async fn update(&self, key: &str, value: &[u8], revision: Revision) -> Result<Revision> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(err)?;
        if !resp.succeeded() {
            return Err(Self::explain(key, revision, &resp));
        }
        Ok(Self::revision_of(&resp))
    }

    async fn delete(&self, key: &str, revision: Option<Revision>) -> Result<Revision> {
        // Without a revision, still require existence so a missing key reports NotFound.
        let cmp = match revision {
            Some(r) => Compare::mod_revision(key, CompareOp::Equal, r),
            None => Compare::version(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new().when([cmp]).and_then([TxnOp::delete(key, None)]).or_else([TxnOp::get(key, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(err)?;
        if !resp.succeeded() {
            return Err(Self::explain(key, revision.unwrap_or_default(), &resp));
        }
        Ok(Self::revision_of(&resp))
    }

    fn max_txn_ops(&self) -> usize {
        // etcd's --max-txn-ops default.
        128
    }

    async fn txn(&self, ops: &[crate::TxnOp]) -> Result<Vec<Revision>> {
        let mut compares = Vec::new();
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for op in ops {
            let key = op.key();
            if let crate::TxnOp::Unchanged { prefix, since } = op {
                // Every key in the range compares; an empty range holds (its revision is 0).
                let end = prefix_end(prefix);
                compares
                    .push(Compare::mod_revision(prefix.as_str(), CompareOp::Less, since + 1).with_range(end.clone()));
                // On failure, the newest key in the range says when it changed.
                let newest = GetOptions::new()
                    .with_range(end)
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1)
                    .with_keys_only();
                reads.push(TxnOp::get(prefix.as_str(), Some(newest)));
                continue;
            }
            match op.condition() {
                Condition::Absent => compares.push(Compare::version(key, CompareOp::Equal, 0)),
                Condition::At(r) => compares.push(Compare::mod_revision(key, CompareOp::Equal, r)),
                Condition::Exists => compares.push(Compare::version(key, CompareOp::Greater, 0)),
                Condition::Any => {}
            }
            match op {
                crate::TxnOp::Put { key, value, .. } => writes.push(TxnOp::put(key.as_str(), value.clone(), None)),
                crate::TxnOp::Delete { key, .. } => writes.push(TxnOp::delete(key.as_str(), None)),
                crate::TxnOp::Check { .. } | crate::TxnOp::Unchanged { .. } => {}
            }
            reads.push(TxnOp::get(key, None));
        }
        let resp =
            self.client.clone().txn(Txn::new().when(compares).and_then(writes).or_else(reads)).await.map_err(err)?;
        if resp.succeeded() {
            return Ok(vec![Self::revision_of(&resp); ops.len()]);
        }
        // Work out which condition failed from the reads etcd ran instead.
        for (op, r) in ops.iter().zip(resp.op_responses()) {
            let current = match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|k| k.mod_revision()),
                _ => None,
            };
            let failed = match op {
                crate::TxnOp::Unchanged { prefix, since } => {
                    crate::unchanged_error(prefix, *since, current.unwrap_or_default())
                }
                _ => crate::condition_error(op.key(), op.condition(), current),
            };
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Err(StoreError::Backend("etcd transaction failed with no failing condition (raced; retry)".into()))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        let mut opts = WatchOptions::new().with_range(prefix_end(prefix));
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let mut stream = self.client.clone().watch(prefix, Some(opts)).await.map_err(err)?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        let _ = tx.send(Err(StoreError::Unavailable("etcd closed the watch".into()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(err(e))).await;
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted { requested: from, compacted: msg.compact_revision() }))
                        .await;
                    return;
                }
                if msg.canceled() {
                    let _ = tx
                        .send(Err(StoreError::Backend(format!("etcd cancelled the watch: {}", msg.cancel_reason()))))
                        .await;
                    return;
                }
                for ev in msg.events() {
                    let Some(k) = ev.kv() else { continue };
                    let event = match ev.event_type() {
                        EventType::Put => Event::Put(kv(k)),
                        EventType::Delete => Event::Delete {
                            key: String::from_utf8_lossy(k.key()).into_owned(),
                            revision: k.mod_revision(),
                        },
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch::new(rx, task))
    }

    async fn revision(&self) -> Result<Revision> {
        let resp = self.client.clone().get("/calico/", Some(GetOptions::new().with_count_only())).await.map_err(err)?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.client.clone().compact(revision, None).await.map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_or_absent_servers_are_unavailable_and_refusals_are_not() {
        let status = |s| err(etcd_client::Error::GRpcStatus(s));
        // The client's transport ends a call as Cancelled (its timeout) or Unknown (a broken
        // pipe), with the cause as the source: the caller waits on it.
        for code in [tonic::Code::Unknown, tonic::Code::Cancelled] {
            let mut local = tonic::Status::new(code, "transport error");
            local.set_source(std::sync::Arc::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)));
            assert!(matches!(status(local), StoreError::Unavailable(_)), "{code:?}");
        }
        assert!(matches!(status(tonic::Status::cancelled("sent by the server")), StoreError::Backend(_)));
        assert!(matches!(status(tonic::Status::unavailable("no leader")), StoreError::Unavailable(_)));
        assert!(matches!(status(tonic::Status::deadline_exceeded("slow")), StoreError::Unavailable(_)));
        assert!(matches!(status(tonic::Status::permission_denied("no")), StoreError::Backend(_)));
        assert!(matches!(status(tonic::Status::invalid_argument("bad")), StoreError::Backend(_)));
    }
}
