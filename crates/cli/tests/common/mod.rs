//! What the CNI, hardening and podman tests share: a "node" network namespace running the agent
//! (`gingham node run`), pod namespaces the test creates, and the real `gingham` binary driven
//! the way a runtime drives it. Everything is removed on drop.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const G: &str = env!("CARGO_BIN_EXE_gingham");
pub static SEQ: AtomicUsize = AtomicUsize::new(0);

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[track_caller]
pub fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A node namespace with a running agent, a store, and the pod namespaces made so far.
pub struct Lab {
    pub tag: String,
    pub dir: tempfile::TempDir,
    pub node: String,
    pub agent: Option<Child>,
    pub agent_args: Vec<String>,
    pub pods: std::sync::Mutex<Vec<String>>,
}

impl Lab {
    pub fn new() -> Lab {
        Self::with_agent_args(&[])
    }

    /// A lab whose agent gets these extra `node run` arguments.
    pub fn with_agent_args(args: &[&str]) -> Lab {
        let tag = format!("gc{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = tempfile::tempdir().unwrap();
        let node = format!("{tag}-node");
        ok(&["ip", "netns", "add", &node]);
        let agent_args = args.iter().map(|a| a.to_string()).collect();
        let mut lab = Lab { tag, dir, node, agent: None, agent_args, pods: Default::default() };
        // Node plumbing a real host has: forwarding, and a route to the pods' gateway address
        // out of another device (proxy ARP answers only then; real nodes have a default route).
        ok(&["ip", "-n", &lab.node, "link", "set", "lo", "up"]);
        ok(&["ip", "netns", "exec", &lab.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ok(&["ip", "-n", &lab.node, "route", "add", "169.254.1.1/32", "dev", "lo"]);
        lab.gingham_stdin(&["apply", "-f", "-"], Some("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv4-ippool}\nspec: {cidr: 10.65.0.0/16, blockSize: 26}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv6-ippool}\nspec: {cidr: 'fd00:65::/112'}\n"));
        lab.start_agent();
        lab
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn start_agent(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        // Under umask 000: the agent must set its socket's mode itself.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node, "sh", "-c", "umask 000; exec \"$0\" \"$@\"", G])
            .args(["node", "run", "--endpoints-only", "--nodename", "node-1", "--socket"])
            .arg(self.socket())
            .args(&self.agent_args)
            .env("GINGHAM_STORE_PATH", self.store())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent did not start: {}",
                std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The gingham CLI against this lab's store, whatever its outcome.
    pub fn run_gingham(&self, args: &[&str]) -> Output {
        Command::new(G).args(args).env("GINGHAM_STORE_PATH", self.store()).output().unwrap()
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The gingham CLI against this lab's store.
    pub fn gingham(&self, args: &[&str]) -> String {
        self.gingham_stdin(args, None)
    }

    pub fn gingham_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut c = Command::new(G)
            .args(args)
            .env("GINGHAM_STORE_PATH", self.store())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(s) = stdin {
            c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "gingham {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `gingham cni install` into the lab's own directory; returns the binaries' directory.
    pub fn install_cni(&self) -> PathBuf {
        let bin = self.dir.path().join("bin");
        let conf = self.dir.path().join("net.d");
        self.gingham(&["cni", "install", "--bin-dir", bin.to_str().unwrap(), "--conf-dir", conf.to_str().unwrap()]);
        bin
    }

    pub fn pod_ns(&self, name: &str) -> String {
        let ns = format!("{}-{name}", self.tag);
        ok(&["ip", "netns", "add", &ns]);
        self.pods.lock().unwrap().push(ns.clone());
        ns
    }

    pub fn conf(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "name": "k8s-pod-network", "type": "gingham", "mtu": 1450,
                "agent_socket": self.socket(), "ipam": { "type": "gingham-ipam" } })
    }

    /// Run the plugin in the node namespace (where a runtime would run it).
    pub fn plugin(
        &self,
        exe: &str,
        cmd: &str,
        cid: &str,
        netns: &str,
        pod: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> (i32, Value) {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node, exe])
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            if v.is_empty() {
                c.env_remove(k)
            } else {
                c.env(k, v)
            };
        }
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let out = if o.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&o.stdout).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&o.stdout) }))
        };
        (o.status.code().unwrap_or(-1), out)
    }

    pub fn cni(&self, cmd: &str, cid: &str, netns: &str, pod: &str, conf: &Value) -> (i32, Value) {
        self.plugin(G, cmd, cid, netns, pod, conf, &[])
    }

    pub fn node_links(&self) -> String {
        ok(&["ip", "-n", &self.node, "-o", "link"])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agent();
        for ns in self.pods.lock().unwrap().iter() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.node]);
    }
}

pub fn addr_of(result: &Value, i: usize) -> String {
    result["ips"][i]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
}

/// Run `f` on a thread inside network namespace `ns` (a name under /run/netns).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Poll `cond` every 50 ms for up to `within`; true as soon as it holds.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP GET inside a namespace: (status line, body).
pub fn http_get(ns: &str, port: u16, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.0\r\n\r\n");
    in_ns(ns, move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        out
    })
}
