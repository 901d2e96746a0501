//! Health and metrics over plain HTTP: /liveness, /readiness (200 once the first full sync is in
//! the kernel), /metrics (Prometheus text format).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::{BUCKETS_MS, Metrics};

pub fn render_metrics(m: &Metrics) -> String {
    let mut s = String::new();
    let g = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    g(
        &mut s,
        "gingham_ready",
        "1 once the first full sync is in the kernel.",
        "gauge",
        u64::from(m.ready.load(Ordering::Relaxed)),
    );
    g(&mut s, "gingham_syncs_total", "Completed dataplane syncs.", "counter", m.syncs.load(Ordering::Relaxed));
    g(
        &mut s,
        "gingham_sync_errors_total",
        "Dataplane syncs that failed.",
        "counter",
        m.sync_errors.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_datastore_errors_total",
        "Datastore watch or read errors.",
        "counter",
        m.datastore_errors.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_routes_programmed",
        "Routes gingham keeps in the kernel.",
        "gauge",
        m.routes_programmed.load(Ordering::Relaxed),
    );
    g(&mut s, "gingham_endpoints", "Workload endpoints on this node.", "gauge", m.endpoints.load(Ordering::Relaxed));
    g(
        &mut s,
        "gingham_orphaned_endpoints",
        "Endpoints whose host interface is gone, waiting for their grace period.",
        "gauge",
        m.orphans_pending.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_orphaned_endpoints_released_total",
        "Endpoints released because their host interface was gone for longer than the grace period.",
        "counter",
        m.orphans_released.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_pending_dels",
        "CNI DELs done locally while the datastore was unreachable, their records to clean up.",
        "gauge",
        m.pending_dels.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_datastore_lists_total",
        "Full listings of a datastore prefix: one per prefix at start, more only after compaction.",
        "counter",
        m.datastore_lists.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_cache_decode_errors_total",
        "Stored resources that did not decode (each an error for that resource alone).",
        "counter",
        m.cache_decode_errors.load(Ordering::Relaxed),
    );
    g(&mut s, "gingham_pod_mtu", "MTU given to pods.", "gauge", u64::from(m.pod_mtu.load(Ordering::Relaxed)));
    let _ = writeln!(
        s,
        "# HELP gingham_sync_seconds Duration of a full dataplane sync.\n# TYPE gingham_sync_seconds histogram"
    );
    let mut cumulative = 0;
    for (i, b) in BUCKETS_MS.iter().enumerate() {
        cumulative += m.sync_buckets[i].load(Ordering::Relaxed);
        let le = if b.is_infinite() { "+Inf".to_string() } else { format!("{}", b / 1e3) };
        let _ = writeln!(s, "gingham_sync_seconds_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(
        s,
        "gingham_sync_seconds_sum {}\ngingham_sync_seconds_count {cumulative}",
        m.sync_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    s
}

/// Requests served at once; a probe that does not send its request line in time is dropped.
const MAX_CONNECTIONS: usize = 64;
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of descriptors (EMFILE) and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = [0u8; 1024];
            let n =
                tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf)).await.ok().and_then(Result::ok).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/liveness" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readiness" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "text/plain", "ready\n".to_string())
                }
                "/readiness" => {
                    let why = metrics.last_error.lock().map(|e| e.clone()).unwrap_or_default();
                    ("503 Service Unavailable", "text/plain", format!("not ready: first sync not done {why}\n"))
                }
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", render_metrics(&metrics)),
                _ => ("404 Not Found", "text/plain", "try /liveness, /readiness or /metrics\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// Bind the health port (errors are the caller's to report).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
