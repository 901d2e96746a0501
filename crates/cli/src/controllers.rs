//! `gingham controllers run`: the cluster controllers under a lease, one pass per period (a
//! Node deletion wakes one at once); each pass that did something is logged.

use std::time::Duration;

use gingham_api::Kind;
use gingham_controllers::lease::Lease;
use gingham_controllers::{Controllers, Settings};
use gingham_ipam::IpamClient;
use gingham_store::resources::ResourceStore;

pub struct Options {
    pub identity: Option<String>,
    pub lease: Duration,
    pub period: Option<Duration>,
    pub leak_grace: Option<Duration>,
    pub block_grace: Option<Duration>,
    pub dry_run: bool,
    pub once: bool,
    /// Serve /metrics (Prometheus text) here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What /metrics reports.
#[derive(Default)]
struct Counters {
    leading: bool,
    candidates: usize,
    released: u64,
    would_release: usize,
    reclaimed: u64,
    nodes_cleaned: u64,
    pass_errors: u64,
}

impl Counters {
    fn render(&self) -> String {
        let mut s = String::new();
        for (name, help, kind, v) in [
            ("gingham_controllers_leading", "Whether this instance holds the lease.", "gauge", u64::from(self.leading)),
            (
                "gingham_ipam_gc_candidates",
                "Handles that look leaked now (waiting for the grace period).",
                "gauge",
                self.candidates as u64,
            ),
            ("gingham_ipam_gc_released_total", "Leaked handles released.", "counter", self.released),
            (
                "gingham_ipam_gc_would_release",
                "Handles a dry run would release in its last pass.",
                "gauge",
                self.would_release as u64,
            ),
            ("gingham_ipam_blocks_reclaimed_total", "Empty blocks released.", "counter", self.reclaimed),
            ("gingham_nodes_cleaned_total", "Deleted nodes whose traces were removed.", "counter", self.nodes_cleaned),
            ("gingham_controllers_pass_errors_total", "Passes that failed.", "counter", self.pass_errors),
        ] {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        s
    }
}

/// A minimal HTTP server for /metrics, on its own thread.
fn serve_metrics(
    addr: std::net::SocketAddr,
    counters: std::sync::Arc<std::sync::Mutex<Counters>>,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    println!("metrics on http://{}/metrics", listener.local_addr()?);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let body = counters.lock().map(|c| c.render()).unwrap_or_default();
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

fn duration(v: &str) -> anyhow::Result<Duration> {
    gingham_api::validate::parse_duration(v).ok_or_else(|| anyhow::anyhow!("{v:?} is not a duration (e.g. 90s, 15m)"))
}

pub fn parse_duration(v: &str) -> Result<Duration, String> {
    duration(v).map_err(|e| e.to_string())
}

/// The settings: Calico's defaults, then KubeControllersConfiguration `default`, then flags.
async fn settings(store: &ResourceStore, o: &Options) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    if let Some(obj) = store.get(Kind::KubeControllersConfiguration, None, "default").await? {
        let spec = obj.spec_as().map_err(|e| anyhow::anyhow!("KubeControllersConfiguration default: {e}"))?;
        s = s.with_config(&spec).map_err(|e| anyhow::anyhow!("KubeControllersConfiguration default: {e}"))?;
    }
    if let Some(p) = o.period {
        s.period = p;
    }
    if let Some(g) = o.leak_grace {
        s.leak_grace = (!g.is_zero()).then_some(g);
    }
    if let Some(g) = o.block_grace {
        s.block_grace = g;
    }
    s.dry_run = o.dry_run;
    Ok(s)
}

pub async fn run(store: ResourceStore, o: Options) -> anyhow::Result<()> {
    let ds = store.datastore().clone();
    let ipam = IpamClient::new(ds.clone());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let identity = o.identity.clone().unwrap_or_else(|| format!("{}-{}", host.trim(), std::process::id()));
    let mut lease = Lease::new(&identity, o.lease);
    let mut controllers = Controllers::default();
    let mut watch = ds.watch(&Kind::Node.prefix(None), ds.revision().await? + 1).await.ok();
    let counters = std::sync::Arc::new(std::sync::Mutex::new(Counters::default()));
    if let Some(addr) = o.metrics_listen {
        serve_metrics(addr, counters.clone())?;
    }
    let count = |f: &dyn Fn(&mut Counters)| {
        if let Ok(mut c) = counters.lock() {
            f(&mut c);
        }
    };
    let mut said: Option<bool> = None;
    let mut last_pass: Option<std::time::Instant> = None;
    let mut woken = false;
    loop {
        let s = settings(&store, &o).await?;
        let leading = match lease.try_hold(ds.as_ref()).await {
            Ok(held) => {
                if said != Some(held) {
                    println!(
                        "controllers {identity}: {}",
                        if held { "leading" } else { "standing by (another instance leads)" }
                    );
                    said = Some(held);
                }
                held
            }
            Err(e) => {
                eprintln!("controllers {identity}: the lease: {e}");
                false
            }
        };
        count(&|c| c.leading = leading);
        let due = woken || last_pass.is_none_or(|t| t.elapsed() >= s.period);
        if leading && due {
            last_pass = Some(std::time::Instant::now());
            woken = false;
            match controllers.pass(&ipam, &s).await {
                Ok(r) => {
                    count(&|c| {
                        c.candidates = r.leak_candidates;
                        if s.dry_run {
                            c.would_release = r.released_handles.len();
                        } else {
                            c.released += r.released_handles.len() as u64;
                            c.reclaimed += r.reclaimed_blocks.len() as u64;
                            c.nodes_cleaned += r.nodes_cleaned.len() as u64;
                        }
                    });
                    let verb = if s.dry_run { "would release" } else { "released" };
                    for n in &r.nodes_cleaned {
                        println!(
                            "node {n} is gone: {} its endpoints, addresses and blocks",
                            if s.dry_run { "would remove" } else { "removed" }
                        );
                    }
                    for (h, ips) in &r.released_handles {
                        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                        println!("ipam gc: {verb} leaked handle {h} ({})", ips.join(", "));
                    }
                    for b in &r.reclaimed_blocks {
                        println!("block reclaim: {verb} empty block {b}");
                    }
                    for b in &r.pool_blocks_released {
                        println!("pool gone: released block {b}");
                    }
                    if r != Default::default() {
                        println!(
                            "pass: {} leak candidates, {} handles {verb}, {} blocks, {} nodes",
                            r.leak_candidates,
                            r.released_handles.len(),
                            r.reclaimed_blocks.len(),
                            r.nodes_cleaned.len()
                        );
                    }
                }
                Err(e) => {
                    count(&|c| c.pass_errors += 1);
                    eprintln!("controllers {identity}: pass failed: {e} (retrying next period)")
                }
            }
        }
        if o.once {
            lease.release(ds.as_ref()).await;
            return Ok(());
        }
        // A renewal well within the lease; a Node event wakes a pass at once.
        let next_pass = last_pass.map_or(Duration::ZERO, |t| s.period.saturating_sub(t.elapsed()));
        let wait = next_pass.min(o.lease / 3).max(Duration::from_millis(50));
        let stop = tokio::signal::ctrl_c();
        let node_event = async {
            match watch.as_mut() {
                Some(w) => w.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            alive = node_event => {
                woken = true;
                if !alive {
                    watch = None;
                }
            }
            _ = stop => {
                lease.release(ds.as_ref()).await;
                println!("controllers {identity}: stopped");
                return Ok(());
            }
        }
    }
}
