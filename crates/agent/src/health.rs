//! Health and metrics over plain HTTP: /liveness, /readiness (200 once the first full sync is in
//! the kernel), /metrics (Prometheus text format).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use gingham_bgp::fsm::State;
use gingham_bgp::packet::{Attrs, Nlri};
use gingham_bgp::rib::NextHop;
use gingham_bgp::tasks::{Command, PeerStatus};

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
    g(
        &mut s,
        "gingham_policy_digest",
        "Digest of the policy resources (keys and revisions) this node enforces.",
        "gauge",
        m.policy_digest.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_policy_errors",
        "Policy resources that do not compile here (each enforced closed until fixed).",
        "gauge",
        m.policy_errors.load(Ordering::Relaxed),
    );
    g(
        &mut s,
        "gingham_policy_repairs_total",
        "Times the policy table was found changed by someone else and restored.",
        "counter",
        m.policy_repairs.load(Ordering::Relaxed),
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
            // The request line, however the client's writes were split (bounded in size and time).
            let mut buf = [0u8; 1024];
            let mut n = 0;
            let _ = tokio::time::timeout(READ_TIMEOUT, async {
                while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            })
            .await;
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let sessions = bgp_sessions(&metrics).await;
            let (status, ctype, body) = match path {
                "/liveness" => ("200 OK", "text/plain", "ok\n".to_string()),
                // Like calico-node's -bird-ready: every configured session must be up.
                "/readiness" if metrics.ready.load(Ordering::Relaxed) => match not_established(&sessions) {
                    None => ("200 OK", "text/plain", "ready\n".to_string()),
                    Some(down) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: BGP not established with {down}\n"),
                    ),
                },
                "/readiness" => {
                    let why = metrics.last_error.lock().map(|e| e.clone()).unwrap_or_default();
                    ("503 Service Unavailable", "text/plain", format!("not ready: first sync not done {why}\n"))
                }
                "/metrics" => {
                    let mut m = render_metrics(&metrics);
                    m.push_str(&render_bgp_metrics(sessions.as_deref().unwrap_or_default()));
                    ("200 OK", "text/plain; version=0.0.4", m)
                }
                "/bgp/status" => ("200 OK", "application/json", bgp_status_json(sessions.as_deref()).to_string()),
                "/bgp/routes" => ("200 OK", "application/json", bgp_routes_json(&metrics).await.to_string()),
                "/bgp/peer-routes" => ("200 OK", "application/json", bgp_peer_routes_json(&metrics).await.to_string()),
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

/// Ask the speaker something and wait up to 2 s (None: no speaker, or no answer).
async fn ask_speaker<T>(metrics: &Metrics, question: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
    let cmd = metrics.bgp.lock().ok()?.clone()?;
    let (tx, rx) = oneshot::channel();
    cmd.send(question(tx)).ok()?;
    tokio::time::timeout(std::time::Duration::from_secs(2), rx).await.ok()?.ok()
}

/// The speaker's sessions (None: this agent does not speak BGP).
async fn bgp_sessions(metrics: &Metrics) -> Option<Vec<PeerStatus>> {
    ask_speaker(metrics, Command::Status).await
}

fn not_established(sessions: &Option<Vec<PeerStatus>>) -> Option<String> {
    let down: Vec<String> = sessions
        .iter()
        .flatten()
        .filter(|p| p.state != State::Established)
        .map(|p| {
            format!(
                "{} ({}{})",
                p.address,
                p.state.name(),
                p.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            )
        })
        .collect();
    (!down.is_empty()).then(|| down.join(", "))
}

fn render_bgp_metrics(sessions: &[PeerStatus]) -> String {
    let mut s = String::new();
    if sessions.is_empty() {
        return s;
    }
    for (name, help, f) in [
        (
            "gingham_bgp_session_established",
            "1 when the BGP session is Established",
            (|p: &PeerStatus| (p.state == State::Established) as u64) as fn(&PeerStatus) -> u64,
        ),
        ("gingham_bgp_prefixes_received", "Prefixes the peer sent that we kept", |p: &PeerStatus| p.received as u64),
        ("gingham_bgp_prefixes_advertised", "Prefixes we sent the peer", |p: &PeerStatus| p.advertised as u64),
        ("gingham_bgp_session_flaps_total", "Times the session went down", |p: &PeerStatus| p.flaps),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in sessions {
            let _ = writeln!(s, "{name}{{peer=\"{}\",address=\"{}\"}} {}", p.name, p.address, f(p));
        }
    }
    s
}

/// The Loc-RIB for `gingham node status --routes`.
async fn bgp_routes_json(metrics: &Metrics) -> serde_json::Value {
    let Some(routes) = ask_speaker(metrics, Command::Routes).await else { return serde_json::json!([]) };
    let list: Vec<serde_json::Value> = routes
        .iter()
        .take(10_000)
        .map(|(prefix, from, a)| {
            serde_json::json!({"prefix": prefix.to_string(), "from": from, "as_path": as_path_text(a), "attributes": attrs_text(a)})
        })
        .collect();
    serde_json::Value::Array(list)
}

/// How many routes per peer and direction `/bgp/peer-routes` lists.
const PEER_ROUTES_LIMIT: usize = 10_000;

/// Per peer, routes received and advertised, for `gingham node status --routes`.
async fn bgp_peer_routes_json(metrics: &Metrics) -> serde_json::Value {
    let question = |reply| Command::PeerRoutes { limit: PEER_ROUTES_LIMIT, reply };
    let Some(peers) = ask_speaker(metrics, question).await else { return serde_json::json!([]) };
    let hop = |h: &NextHop| match h {
        NextHop::Address(a) => a.to_string(),
        NextHop::Local => "self".to_string(),
    };
    let nlri =
        |n: &Nlri| if n.path_id == 0 { n.prefix.to_string() } else { format!("{} (path {})", n.prefix, n.path_id) };
    let list: Vec<serde_json::Value> = peers
        .iter()
        .map(|p| {
            let received: Vec<serde_json::Value> = p
                .received
                .iter()
                .map(|(n, h, a, stale)| {
                    let mut attrs = attrs_text(a);
                    if *stale {
                        attrs.push_str(", stale");
                    }
                    serde_json::json!({"prefix": nlri(n), "next_hop": hop(h), "as_path": as_path_text(a), "attributes": attrs})
                })
                .collect();
            let advertised: Vec<serde_json::Value> = p
                .advertised
                .iter()
                .map(|(n, o)| {
                    serde_json::json!({"prefix": nlri(n), "next_hop": hop(&o.next_hop), "as_path": as_path_text(&o.attrs), "attributes": attrs_text(&o.attrs)})
                })
                .collect();
            serde_json::json!({"name": p.name, "address": p.address.to_string(), "received": received, "advertised": advertised})
        })
        .collect();
    serde_json::Value::Array(list)
}

fn as_path_text(a: &Attrs) -> String {
    let path: Vec<String> = a.as_path.iter().flat_map(|s| s.asns.iter().map(|n| n.to_string())).collect();
    path.join(" ")
}

fn attrs_text(a: &Attrs) -> String {
    let mut attrs = vec![format!("origin {:?}", a.origin)];
    if let Some(l) = a.local_pref {
        attrs.push(format!("local-pref {l}"));
    }
    if let Some(m) = a.med {
        attrs.push(format!("med {m}"));
    }
    if let Some(o) = a.originator_id {
        attrs.push(format!("originator {o}"));
    }
    if !a.cluster_list.is_empty() {
        attrs.push(format!(
            "cluster-list {}",
            a.cluster_list.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
        ));
    }
    for c in &a.communities {
        attrs.push(format!("community {}:{}", c >> 16, c & 0xffff));
    }
    for l in &a.large_communities {
        attrs.push(format!("large-community {}:{}:{}", l[0], l[1], l[2]));
    }
    attrs.join(", ")
}

/// What `gingham node status` shows.
pub fn bgp_status_json(sessions: Option<&[PeerStatus]>) -> serde_json::Value {
    let Some(sessions) = sessions else { return serde_json::json!({"running": false}) };
    let since = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let peers: Vec<serde_json::Value> = sessions
        .iter()
        .map(|p| {
            let n = p.negotiated.as_ref();
            serde_json::json!({
                "name": p.name,
                "address": p.address.to_string(),
                "state": p.state.name(),
                "since": since(p.since),
                "info": p.last_error,
                "received": p.received,
                "advertised": p.advertised,
                "flaps": p.flaps,
                "negotiated": n.map(|n| serde_json::json!({
                    "remote_as": n.remote_as,
                    "remote_id": n.remote_id.to_string(),
                    "hold_time": n.hold_time,
                    "keepalive": n.keepalive,
                    "families": n.families.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
                    "four_octet_as": n.codec.four_octet_as,
                    "add_path_rx": n.codec.add_path_rx.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
                    "add_path_tx": n.codec.add_path_tx.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
                    "route_refresh": n.route_refresh,
                    "graceful_restart": n.peer_graceful_restart.as_ref().map(|g| g.time),
                })),
            })
        })
        .collect();
    serde_json::json!({"running": true, "peers": peers})
}

/// Bind the health port (errors are the caller's to report).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
