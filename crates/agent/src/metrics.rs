//! The agent's counters, reported at /metrics, and its readiness.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Counters the health endpoint reports.
#[derive(Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    /// ClusterInformation `default` says `datastoreReady: false` (a migration or upgrade holds
    /// the datastore): the CNI plugin's requests are refused until it says true again.
    pub datastore_held: AtomicBool,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub datastore_errors: AtomicU64,
    pub routes_programmed: AtomicU64,
    /// `gingham_policy::load::digest` of the policy resources programmed here.
    pub policy_digest: AtomicU64,
    /// Policy resources (and FelixConfiguration) that did not compile here.
    pub policy_errors: AtomicU64,
    /// Times the policy table was found changed by someone else and restored.
    pub policy_repairs: AtomicU64,
    pub endpoints: AtomicU64,
    /// Sync latency histogram: counts per bucket (upper bounds in ms below), and the sum in µs.
    pub sync_buckets: [AtomicU64; 8],
    pub sync_sum_us: AtomicU64,
    pub pod_mtu: AtomicU32,
    /// Endpoints whose interface is gone, waiting for their grace period; and those released.
    pub orphans_pending: AtomicU64,
    pub orphans_released: AtomicU64,
    /// DELs completed locally while the datastore was unreachable, waiting for it.
    pub pending_dels: AtomicU64,
    /// Full listings of a datastore prefix (one per prefix at start; more only after compaction).
    pub datastore_lists: AtomicU64,
    /// Stored resources that did not decode (each an error for that resource alone).
    pub cache_decode_errors: AtomicU64,
    /// Times the kernel dropped route/link events (each followed by a full check).
    pub kernel_overruns: AtomicU64,
    pub last_error: std::sync::Mutex<String>,
    /// The BGP speaker, for readiness, per-session metrics and `node status`.
    pub bgp: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<gingham_bgp::tasks::Command>>>,
}

pub const BUCKETS_MS: [f64; 8] = [1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, f64::INFINITY];

impl Metrics {
    /// Keep the latest error for /readiness and say it on stderr once (not on every retry).
    pub fn record_error(&self, e: String) {
        if let Ok(mut l) = self.last_error.lock() {
            if *l != e {
                eprintln!("gingham node agent: {e}");
                *l = e;
            }
        }
    }

    pub fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let i = BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(BUCKETS_MS.len() - 1);
        self.sync_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sync_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}
