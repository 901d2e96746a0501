//! Following the datastore: list a prefix once at revision R (in pages, so a large cluster never
//! sits in memory whole), then watch from R+1. A watch that breaks resumes from the last
//! revision seen; only when that history is gone (`Compacted`) is the prefix listed again — the
//! cache diffs a re-list, so either way only real changes go downstream. While the datastore
//! is unreachable nothing is lost: the agent keeps what it has and retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use gingham_store::{Datastore, Event, KeyValue, Revision, StoreError};
use tokio::sync::mpsc::UnboundedSender;

/// Keys per list page.
pub const PAGE: usize = 500;

#[derive(Debug)]
pub enum Feed {
    /// A listing of `prefix` begins: the pages that follow replace what is held under it.
    ListStart(&'static str),
    Page(&'static str, Vec<KeyValue>),
    /// The listing is complete, at this revision.
    ListEnd(&'static str, Revision),
    Event(Event),
    /// The datastore could not be read (the agent keeps serving from what it has).
    Trouble(String),
    /// Reachable again after trouble.
    Recovered,
}

/// Follow `prefix` for ever, sending what it finds to `tx`. Returns when `tx` is closed.
pub async fn follow(store: Arc<dyn Datastore>, prefix: &'static str, tx: UnboundedSender<Feed>) {
    let mut backoff = Duration::from_millis(200);
    let mut troubled = false;
    let trouble = |tx: &UnboundedSender<Feed>, e: &StoreError, troubled: &mut bool| {
        *troubled = true;
        tx.send(Feed::Trouble(format!("{prefix}: {e}"))).is_ok()
    };
    'relist: loop {
        if tx.send(Feed::ListStart(prefix)).is_err() {
            return;
        }
        let sender = tx.clone();
        let mut visit = |page| {
            let _ = sender.send(Feed::Page(prefix, page));
        };
        let mut rev = match store.list_pages(prefix, PAGE, &mut visit).await {
            Ok(r) => r,
            Err(e) => {
                if !trouble(&tx, &e, &mut troubled) {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue 'relist;
            }
        };
        if tx.send(Feed::ListEnd(prefix, rev)).is_err() {
            return;
        }
        if std::mem::take(&mut troubled) && tx.send(Feed::Recovered).is_err() {
            return;
        }
        backoff = Duration::from_millis(200);
        loop {
            let mut watch = match store.watch(prefix, rev + 1).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => continue 'relist,
                Err(e) => {
                    if !trouble(&tx, &e, &mut troubled) {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            loop {
                match watch.next().await {
                    Some(Ok(ev)) => {
                        rev = rev.max(ev.revision());
                        if std::mem::take(&mut troubled) && tx.send(Feed::Recovered).is_err() {
                            return;
                        }
                        backoff = Duration::from_millis(200);
                        if tx.send(Feed::Event(ev)).is_err() {
                            return;
                        }
                    }
                    // The history we would resume from is gone: list again.
                    Some(Err(StoreError::Compacted { .. })) => continue 'relist,
                    Some(Err(e)) => {
                        if !trouble(&tx, &e, &mut troubled) {
                            return;
                        }
                        break;
                    }
                    None => {
                        let e = StoreError::Unavailable("the watch ended".into());
                        if !trouble(&tx, &e, &mut troubled) {
                            return;
                        }
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
