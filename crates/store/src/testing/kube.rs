//! Test support: a real Kubernetes API server (kube-apiserver built from the published
//! k8s.io/kubernetes module by scripts/kube-build.sh), backed by a real etcd, on loopback, with
//! self-made certificates and a static admin token. Stopped, and its files removed, on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{EtcdServer, TlsFiles, free_port, write_certificates};

/// The admin's bearer token (member of system:masters).
pub const ADMIN_TOKEN: &str = "gingham-test-admin-token";

/// Where kube-apiserver and kubectl are: `GINGHAM_KUBE_BIN_DIR`, else what scripts/kube-build.sh
/// prints (it builds them the first time on a machine, then answers from its cache).
pub fn kube_bin_dir() -> std::io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GINGHAM_KUBE_BIN_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kube-build.sh");
    let out = Command::new(&script).stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("{} failed ({})", script.display(), out.status)));
    }
    let dir = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    Ok(PathBuf::from(dir))
}

pub struct KubeApiServer {
    child: Child,
    _etcd: EtcdServer,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// A kubeconfig for the admin (token + the test CA).
    pub kubeconfig: PathBuf,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
}

impl KubeApiServer {
    /// Start etcd and kube-apiserver and wait (at most 90 s) until the server is ready.
    pub fn start() -> std::io::Result<KubeApiServer> {
        let bin = kube_bin_dir()?;
        let base = if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") };
        let etcd = EtcdServer::start_in(base)?;
        let dir = tempfile::Builder::new().prefix("gingham-kube-").tempdir()?;
        let files = write_apiserver_files(dir.path(), "127.0.0.1", &[(ADMIN_TOKEN, "admin", "system:masters")])?;
        let port = free_port()?;
        let url = format!("https://127.0.0.1:{port}");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("kubeconfig"), kubeconfig(&url, &files.tls.ca, ADMIN_TOKEN))?;
        let log = std::fs::File::create(p("kube-apiserver.log"))?;
        let child = apiserver_command(&bin, &files, &etcd.config.endpoints.join(","), "127.0.0.1", port)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::other(format!("cannot start {}/kube-apiserver: {e}", bin.display())))?;
        let ca = files.tls.ca;
        let mut server = KubeApiServer { child, _etcd: etcd, kubeconfig: p("kubeconfig"), ca, dir, bin, url };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if server.child.try_wait()?.is_some() {
                return Err(std::io::Error::other(format!("kube-apiserver exited: {}", server.log_tail())));
            }
            if server.kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|o| o.status.success()) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "kube-apiserver not ready within 90 s: {}",
                    server.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Run kubectl against this server as the admin (at most 60 s).
    pub fn kubectl(&self, args: &[&str]) -> std::io::Result<Output> {
        self.kubectl_with_input(args, None)
    }

    /// The same, with `input` on kubectl's standard input (for `-f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&[u8]>) -> std::io::Result<Output> {
        run_kubectl(&self.bin, &self.kubeconfig, args, input)
    }

    /// kubectl that must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
        assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply --server-side` of `yaml`, which must succeed; then wait (at most 60 s) for
    /// any CRDs to be Established.
    pub fn apply(&self, yaml: &str) {
        let out = self
            .kubectl_with_input(
                &["apply", "--server-side", "--field-manager=gingham-test", "-f", "-"],
                Some(yaml.as_bytes()),
            )
            .unwrap_or_else(|e| panic!("kubectl apply: {e}"));
        assert!(out.status.success(), "kubectl apply refused:\n{}", String::from_utf8_lossy(&out.stderr));
        if yaml.contains("kind: CustomResourceDefinition") {
            self.kubectl_ok(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]);
        }
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("kube-apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// kubectl from `bin` with `kubeconfig` (at most 60 s; killed after), `input` on its stdin.
pub fn run_kubectl(bin: &Path, kubeconfig: &Path, args: &[&str], input: Option<&[u8]>) -> std::io::Result<Output> {
    // Its discovery cache beside the kubeconfig (removed with it), not shared in $HOME.
    let mut child = Command::new(bin.join("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cache-dir={}", kubeconfig.with_file_name("kubectl-cache").display()))
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        std::io::Write::write_all(&mut stdin, data)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!("kubectl {args:?} did not finish within 60 s")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output()
}

/// What a kube-apiserver needs on disk: its certificates, a service-account key pair, a token
/// file.
pub struct ApiServerFiles {
    pub tls: TlsFiles,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub tokens: PathBuf,
    pub cert_dir: PathBuf,
}

/// Write them into `dir`: a server certificate for `ip`, and static bearer tokens
/// (token, user, groups separated by commas).
pub fn write_apiserver_files(dir: &Path, ip: &str, tokens: &[(&str, &str, &str)]) -> std::io::Result<ApiServerFiles> {
    let tls = write_certificates(dir, &[ip])?;
    let p = |n: &str| dir.join(n);
    super::run(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"])
            .arg(p("sa.key")),
    )?;
    super::run(Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(p("sa.key")).arg("-out").arg(p("sa.pub")))?;
    let lines: String = tokens.iter().map(|(t, user, groups)| format!("{t},{user},{user},\"{groups}\"\n")).collect();
    std::fs::write(p("tokens.csv"), lines)?;
    Ok(ApiServerFiles { tls, sa_key: p("sa.key"), sa_pub: p("sa.pub"), tokens: p("tokens.csv"), cert_dir: p("certs") })
}

/// kube-apiserver on `ip:port`, its data in etcd at `etcd`, bearer tokens from the token file,
/// RBAC, privileged pods allowed (as every cluster running a CNI plugin's DaemonSet).
pub fn apiserver_command(bin: &Path, f: &ApiServerFiles, etcd: &str, ip: &str, port: u16) -> Command {
    let mut c = Command::new(bin.join("kube-apiserver"));
    c.arg(format!("--etcd-servers={etcd}"))
        .arg(format!("--bind-address={ip}"))
        .arg(format!("--advertise-address={ip}"))
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", f.cert_dir.display()))
        .arg(format!("--tls-cert-file={}", f.tls.server_cert.display()))
        .arg(format!("--tls-private-key-file={}", f.tls.server_key.display()))
        .arg(format!("--client-ca-file={}", f.tls.ca.display()))
        .arg(format!("--token-auth-file={}", f.tokens.display()))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", f.sa_pub.display()))
        .arg(format!("--service-account-signing-key-file={}", f.sa_key.display()))
        .args(["--service-cluster-ip-range=10.96.0.0/16", "--authorization-mode=RBAC", "--allow-privileged=true"])
        // Fewer moving parts on a 2-core machine; neither matters to what runs on it.
        .args(["--enable-priority-and-fairness=false", "--profiling=false"]);
    c
}

/// A kubeconfig for `url` (its CA file) with a bearer token.
pub fn kubeconfig(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n    \
         certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n\
         - name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
        ca = ca.display()
    )
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
