//! Test support: a real etcd server (the distribution's etcd-server) on a free loopback port, in a
//! temporary data directory, stopped and removed on drop (`kube`: a real Kubernetes API server on
//! top of one). Used by tests and the benchmarks.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub mod kube;

use crate::etcd::{EtcdConfig, EtcdStore};
use crate::{Datastore, KeyValue, Listing, Result, Revision, TxnOp, Watch};

/// What keeps a test's backend alive (dropped: the store's files or the etcd server go).
#[allow(dead_code)] // held for Drop
pub enum Backend {
    Embedded(tempfile::TempDir),
    Etcd(EtcdServer),
}

/// A fresh datastore of `kind` ("embedded" or "etcd": a real etcd server, its data on tmpfs
/// when there is one), for tests that run on both backends.
pub async fn open_backend(kind: &str) -> (Arc<dyn Datastore>, Backend) {
    if kind == "embedded" {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let s = crate::embedded::EmbeddedStore::open(dir.path().join("s.db")).expect("a new embedded store");
        (Arc::new(s), Backend::Embedded(dir))
    } else {
        let base = if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") };
        let server = EtcdServer::start_in(base).expect("etcd-server must be installed");
        let s = server.connect().await.expect("the test etcd answers");
        (Arc::new(s), Backend::Etcd(server))
    }
}

/// Apply every document of `yaml` (a test fixture) as `gingham apply` would.
pub async fn apply_yaml(ds: &Arc<dyn Datastore>, yaml: &str) {
    let rs = crate::ResourceStore::new(ds.clone());
    for d in gingham_api::parse_documents("test", yaml).expect("the fixture parses") {
        rs.apply(d.object).await.expect("the fixture applies");
    }
}

/// A Datastore that counts the reads and writes passing through it (for tests and benchmarks
/// that claim "one write per allocation").
pub struct CountingStore {
    inner: Arc<dyn Datastore>,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn Datastore>) -> Self {
        CountingStore { inner, reads: AtomicU64::new(0), writes: AtomicU64::new(0) }
    }
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
    fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl Datastore for CountingStore {
    fn describe(&self) -> String {
        format!("counting {}", self.inner.describe())
    }
    fn capabilities(&self) -> crate::Capabilities {
        self.inner.capabilities()
    }
    fn max_txn_ops(&self) -> usize {
        self.inner.max_txn_ops()
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.read();
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Listing> {
        self.read();
        self.inner.list(prefix).await
    }
    async fn list_keys(&self, prefix: &str) -> Result<Listing> {
        self.read();
        self.inner.list_keys(prefix).await
    }
    async fn create(&self, key: &str, value: &[u8]) -> Result<Revision> {
        self.write();
        self.inner.create(key, value).await
    }
    async fn update(&self, key: &str, value: &[u8], revision: Revision) -> Result<Revision> {
        self.write();
        self.inner.update(key, value, revision).await
    }
    async fn delete(&self, key: &str, revision: Option<Revision>) -> Result<Revision> {
        self.write();
        self.inner.delete(key, revision).await
    }
    async fn txn(&self, ops: &[TxnOp]) -> Result<Vec<Revision>> {
        self.write();
        self.inner.txn(ops).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        self.inner.watch(prefix, from).await
    }
    async fn revision(&self) -> Result<Revision> {
        self.read();
        self.inner.revision().await
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
    async fn workload_annotations(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        self.read();
        self.inner.workload_annotations(namespace, name).await
    }
}

pub struct EtcdServer {
    child: Child,
    dir: tempfile::TempDir,
    pub config: EtcdConfig,
    client_port: u16,
    peer_url: String,
}

/// Client-side TLS material written by [`write_test_certificates`].
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(cmd: &mut Command) -> std::io::Result<()> {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr))))
    }
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI).
pub fn write_test_certificates(dir: &Path) -> std::io::Result<TlsFiles> {
    write_certificates(dir, &["127.0.0.1"])
}

/// The same, the server certificate naming these IP addresses.
pub fn write_certificates(dir: &Path, server_ips: &[&str]) -> std::io::Result<TlsFiles> {
    let sans: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
    let sans = sans.join(",");
    let p = |n: &str| dir.join(n);
    let key = |name: &str| {
        run(Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"])
            .arg(p(name)))
    };
    key("ca.key")?;
    run(Command::new("openssl")
        .args(["req", "-x509", "-new", "-key"])
        .arg(p("ca.key"))
        .args(["-subj", "/CN=gingham-test-ca", "-days", "2", "-out"])
        .arg(p("ca.pem")))?;
    for (name, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth")] {
        key(&format!("{name}.key"))?;
        run(Command::new("openssl")
            .args(["req", "-new", "-key"])
            .arg(p(&format!("{name}.key")))
            .args(["-subj", &format!("/CN={name}"), "-out"])
            .arg(p(&format!("{name}.csr"))))?;
        std::fs::write(
            p(&format!("{name}.ext")),
            format!("subjectAltName={sans}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"),
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-in"])
            .arg(p(&format!("{name}.csr")))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .args(["-CAcreateserial", "-days", "2", "-extfile"])
            .arg(p(&format!("{name}.ext")))
            .arg("-out")
            .arg(p(&format!("{name}.pem"))))?;
    }
    Ok(TlsFiles {
        ca: p("ca.pem"),
        server_cert: p("server.pem"),
        server_key: p("server.key"),
        client_cert: p("client.pem"),
        client_key: p("client.key"),
    })
}

impl EtcdServer {
    /// Start a plain-HTTP etcd; `data_base` picks where the data dir lives (tmpfs makes fsync free).
    pub fn start_in(data_base: &Path) -> std::io::Result<EtcdServer> {
        Self::launch(data_base, None)
    }

    pub fn start() -> std::io::Result<EtcdServer> {
        Self::launch(Path::new("/tmp"), None)
    }

    /// Start etcd serving TLS with client-certificate authentication.
    pub fn start_tls(tls: &TlsFiles) -> std::io::Result<EtcdServer> {
        Self::launch(Path::new("/tmp"), Some(tls))
    }

    fn launch(data_base: &Path, tls: Option<&TlsFiles>) -> std::io::Result<EtcdServer> {
        let dir = tempfile::Builder::new().prefix("gingham-etcd-").tempdir_in(data_base)?;
        let (client, peer) = (free_port()?, free_port()?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Self::spawn(dir.path(), &client_url, &peer_url, tls)?;
        let config = EtcdConfig {
            endpoints: vec![client_url],
            ca_cert_file: tls.map(|t| t.ca.display().to_string()),
            cert_file: tls.map(|t| t.client_cert.display().to_string()),
            key_file: tls.map(|t| t.client_key.display().to_string()),
        };
        let mut server = EtcdServer { child, dir, config, client_port: client, peer_url };
        server.wait_listening()?;
        Ok(server)
    }

    fn spawn(dir: &Path, client_url: &str, peer_url: &str, tls: Option<&TlsFiles>) -> std::io::Result<Child> {
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=gingham-test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=gingham-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log"))?);
        if let Some(t) = tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        cmd.spawn().map_err(|e| {
            std::io::Error::other(format!("cannot start etcd (is the etcd-server package installed?): {e}"))
        })
    }

    fn wait_listening(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            if Instant::now() > deadline || self.child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!("etcd did not start: {log}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kill etcd (its clients see refused connections), keeping its data and ports.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start a killed etcd again on the same data and ports (plain HTTP only).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.child = Self::spawn(self.dir.path(), &self.config.endpoints[0], &self.peer_url, None)?;
        self.wait_listening()
    }

    /// Connect, retrying while etcd finishes starting (it accepts TCP before it serves).
    pub async fn connect(&self) -> crate::Result<EtcdStore> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match EtcdStore::connect(&self.config).await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
