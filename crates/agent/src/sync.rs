//! Following the datastore: list a prefix once at revision R (in pages, so a large cluster never
//! sits in memory whole), then watch from R+1. A watch that breaks resumes from the last
//! revision seen; only when that history is gone (`Compacted`) is the prefix listed again — the
//! cache diffs a re-list, so either way only real changes go downstream. While the datastore
//! is unreachable nothing is lost: the agent keeps what it has and retries with backoff.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gingham_store::{Datastore, StoreError};
use tokio::sync::Notify;

use crate::cache::{Cache, Change};

/// Keys per list page.
pub const PAGE: usize = 1000;

/// What the followers have seen, waiting for the model: the cache itself (decoded as pages and
/// events arrive, so a listing never queues up in memory) and the changes not yet taken.
pub struct Picture {
    pub cache: Cache,
    pub changes: BTreeSet<Change>,
    /// Prefixes listed completely at least once.
    pub synced: HashSet<&'static str>,
    /// The latest datastore trouble, until it clears.
    pub trouble: Option<String>,
    pub troubles: u64,
    pub lists: u64,
}

pub struct Shared {
    state: Mutex<Picture>,
    /// Rung after every change to the picture.
    pub wake: Notify,
}

impl Shared {
    pub fn new(cache: Cache) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(Picture {
                cache,
                changes: BTreeSet::new(),
                synced: HashSet::new(),
                trouble: None,
                troubles: 0,
                lists: 0,
            }),
            wake: Notify::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Picture> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Picture)) {
        f(&mut self.lock());
        self.wake.notify_one();
    }
}

/// Follow `prefix` for ever into `shared`.
pub async fn follow(store: Arc<dyn Datastore>, prefix: &'static str, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    let trouble = |e: &StoreError| {
        shared.update(|p| {
            p.trouble = Some(format!("{prefix}: {e}"));
            p.troubles += 1;
        })
    };
    let fine = || {
        if shared.lock().trouble.is_some() {
            shared.update(|p| p.trouble = None);
        }
    };
    'relist: loop {
        shared.update(|p| {
            p.lists += 1;
            p.cache.relist_start(prefix);
        });
        let mut visit = |page: Vec<gingham_store::KeyValue>| {
            shared.update(|p| {
                let c = p.cache.relist_page(prefix, &page);
                p.changes.extend(c);
            })
        };
        let mut rev = match store.list_pages(prefix, PAGE, &mut visit).await {
            Ok(r) => r,
            Err(e) => {
                trouble(&e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue 'relist;
            }
        };
        shared.update(|p| {
            let c = p.cache.relist_end(prefix);
            p.changes.extend(c);
            p.synced.insert(prefix);
        });
        fine();
        backoff = Duration::from_millis(200);
        loop {
            let mut watch = match store.watch(prefix, rev + 1).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => continue 'relist,
                Err(e) => {
                    trouble(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            loop {
                match watch.next().await {
                    Some(Ok(ev)) => {
                        rev = rev.max(ev.revision());
                        backoff = Duration::from_millis(200);
                        shared.update(|p| {
                            if let Some(c) = p.cache.apply(&ev) {
                                p.changes.insert(c);
                            }
                            p.trouble = None;
                        });
                    }
                    // The history we would resume from is gone: list again.
                    Some(Err(StoreError::Compacted { .. })) => continue 'relist,
                    Some(Err(e)) => {
                        trouble(&e);
                        break;
                    }
                    None => {
                        trouble(&StoreError::Unavailable("the watch ended".into()));
                        break;
                    }
                }
            }
            // Resume from the last revision seen, after a pause.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
