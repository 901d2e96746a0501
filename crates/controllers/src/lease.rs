//! One active controller at a time: a lease record written with compare-and-swap. The holder
//! renews it well within its duration; another instance takes it over only once it has seen
//! the record unchanged for a whole duration on its own clock (no trust in the other host's
//! clock, as Kubernetes' leader election).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gingham_store::{Datastore, Revision, StoreError};
use serde::{Deserialize, Serialize};

pub const LEASE_KEY: &str = "/calico/gingham/v1/controllers/lease";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    pub holder: String,
    pub duration_ms: u64,
    /// When the holder last renewed (for people; takeover goes by the revision).
    pub renewed_unix_ms: u64,
}

pub struct Lease {
    identity: String,
    duration: Duration,
    /// Our record's revision while we hold it.
    held: Option<Revision>,
    /// Another holder's record as last seen, and since when (our clock).
    seen: Option<(Revision, Instant)>,
}

impl Lease {
    pub fn new(identity: &str, duration: Duration) -> Lease {
        Lease { identity: identity.into(), duration, held: None, seen: None }
    }

    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    fn record(&self) -> Vec<u8> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let r = LeaseRecord {
            holder: self.identity.clone(),
            duration_ms: self.duration.as_millis() as u64,
            renewed_unix_ms: now.as_millis() as u64,
        };
        serde_json::to_vec(&r).unwrap_or_default()
    }

    /// Take the lease if it is free or expired, renew it if ours. Whether we hold it now.
    pub async fn try_hold(&mut self, ds: &dyn Datastore) -> Result<bool, StoreError> {
        let Some(kv) = ds.get(LEASE_KEY).await? else {
            self.held = match ds.create(LEASE_KEY, &self.record()).await {
                Ok(r) => Some(r),
                Err(StoreError::AlreadyExists { .. }) => None,
                Err(e) => return Err(e),
            };
            return Ok(self.is_held());
        };
        let theirs: Option<LeaseRecord> = serde_json::from_slice(&kv.value).ok();
        let ours = self.held == Some(kv.mod_revision);
        let expired = match self.seen {
            Some((rev, since)) if rev == kv.mod_revision => {
                let d = theirs.as_ref().map_or(self.duration, |r| Duration::from_millis(r.duration_ms));
                since.elapsed() >= d
            }
            _ => {
                self.seen = Some((kv.mod_revision, Instant::now()));
                false
            }
        };
        // An unreadable record is somebody's: it expires like any other.
        if !ours && !expired {
            self.held = None;
            return Ok(false);
        }
        self.held = match ds.update(LEASE_KEY, &self.record(), kv.mod_revision).await {
            Ok(r) => Some(r),
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        if self.held.is_some() {
            self.seen = None;
        }
        Ok(self.is_held())
    }

    /// Give the lease up (on a clean stop) so another instance need not wait for it to expire.
    pub async fn release(&mut self, ds: &dyn Datastore) {
        if let Some(r) = self.held.take() {
            let _ = ds.delete(LEASE_KEY, Some(r)).await;
        }
    }
}
