//! gingham driven by a real container runtime: Debian's podman (CNI backend, runc, a busybox
//! rootfs — nothing is pulled), inside a namespace the test creates. Containers get addresses,
//! reach each other, publish ports through the chained portmap plugin, take `--ip`/`--ip6`,
//! survive `podman restart`, and leave nothing behind when removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const G: &str = env!("CARGO_BIN_EXE_gingham");

#[track_caller]
fn ok(c: &mut Command) -> String {
    let o: Output = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(o.status.success(), "{c:?}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    ok(Command::new("ip").args(args))
}

struct Podman {
    ns: String,
    dir: tempfile::TempDir,
    agent: Option<Child>,
}

impl Podman {
    fn new() -> Podman {
        let ns = format!("gp{}", std::process::id());
        let p = Podman { ns: ns.clone(), dir: tempfile::tempdir().unwrap(), agent: None };
        ip(&["netns", "add", &ns]);
        // A host as podman sees one: an address, and a default route (proxy ARP for the pods'
        // gateway answers only for addresses routed out of another device).
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
        ip(&["-n", &ns, "addr", "add", "10.200.0.1/24", "dev", "up0"]);
        ip(&["-n", &ns, "link", "set", "up0", "up"]);
        ip(&["-n", &ns, "link", "set", "up1", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", "10.200.0.2", "dev", "up0", "onlink"]);
        ok(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]));
        ok(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]));
        let d = p.dir.path();
        for sub in ["bin", "net.d", "root", "runroot", "rootfs/bin", "rootfs/www"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", d.join("rootfs/bin/busybox")).expect("busybox-static must be installed");
        for c in ["sh", "ping", "wget", "httpd", "ip", "cat", "sleep", "true"] {
            std::os::unix::fs::symlink("busybox", d.join("rootfs/bin").join(c)).unwrap();
        }
        std::fs::write(d.join("rootfs/www/index.html"), "hello from gingham\n").unwrap();
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                d.join("bin").display(),
                d.join("net.d").display()
            ),
        )
        .unwrap();
        let yaml = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v4}\nspec: {cidr: 10.77.0.0/16}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v6}\nspec: {cidr: 'fd00:77::/112'}\n";
        std::fs::write(d.join("pools.yaml"), yaml).unwrap();
        p.gingham(&["apply", "-f", d.join("pools.yaml").to_str().unwrap()]);
        ok(Command::new(G)
            .args(["cni", "install", "--name", "gnet", "--nodename", "pmnode", "--conf-dir"])
            .arg(d.join("net.d"))
            .arg("--bin-dir")
            .arg(d.join("bin"))
            .arg("--socket")
            .arg(p.socket()));
        p
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn gingham(&self, args: &[&str]) -> String {
        ok(Command::new(G).args(args).env("GINGHAM_STORE_PATH", self.dir.path().join("store.db")))
    }

    fn start_agent(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                G,
                "node",
                "run",
                "--nodename",
                "pmnode",
                "--ip",
                "10.200.0.1/24",
                "--socket",
            ])
            .arg(self.socket())
            .args(["--health-listen", "127.0.0.1:9199"])
            .env("GINGHAM_STORE_PATH", self.dir.path().join("store.db"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "agent did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// podman in the test's network namespace (nsenter keeps the mount namespace, so podman's
    /// own netns bind mounts stay visible to its later invocations).
    fn podman(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .args(["podman", "--root"])
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"));
        c
    }

    /// `podman run` on the gingham network with the busybox rootfs: options, then `--`, then the
    /// command.
    fn run(&self, args: &[&str]) -> String {
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let rootfs = self.dir.path().join("rootfs");
        let mut c = self.podman(&["run", "--network", "gnet"]);
        c.args(&args[..split]).arg("--rootfs").arg(rootfs).args(args.get(split + 1..).unwrap_or_default());
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "podman run {args:?}: {}{}\nagent log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The pod address of a running container, read inside it.
    fn addr(&self, name: &str, v6: bool) -> String {
        let out = ok(&mut self.podman(&["exec", name, "ip", if v6 { "-6" } else { "-4" }, "addr", "show", "eth0"]));
        let key = if v6 { "inet6 " } else { "inet " };
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .map(|rest| rest.split('/').next().unwrap_or_default().to_string())
            .find(|a| !a.starts_with("fe80"))
            .unwrap_or_else(|| panic!("no address in {name}: {out}"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-af", "-t", "0"]).output();
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        // podman's tmpfs mounts (/dev/shm of containers) live under its root: unmount them before
        // the directory goes.
        let dir = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&dir)).collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn podman_runs_containers_on_gingham() {
    if Path::new("/usr/bin/podman").metadata().is_err() {
        panic!("podman must be installed (scripts/install-deps.sh installs it)");
    }
    let mut p = Podman::new();
    p.start_agent();
    // A server and a client: address, ping, TCP.
    p.run(&["-d", "--name", "web1", "--", "/bin/httpd", "-f", "-p", "80", "-h", "/www"]);
    let web = p.addr("web1", false);
    assert!(web.starts_with("10.77."), "{web}");
    let got = p.run(&[
        "--rm",
        "--",
        "/bin/sh",
        "-c",
        &format!("ping -c 1 -W 2 {web} >/dev/null && wget -q -O - http://{web}/"),
    ]);
    assert_eq!(got, "hello from gingham\n");
    // A published port, through the chained portmap plugin.
    p.run(&["-d", "--name", "web2", "-p", "18080:80", "--", "/bin/httpd", "-f", "-p", "80", "-h", "/www"]);
    let got = p.run(&["--rm", "--", "/bin/wget", "-q", "-O", "-", "http://10.200.0.1:18080/"]);
    assert_eq!(got, "hello from gingham\n");
    // Requested addresses, dual stack.
    p.run(&["-d", "--name", "fixed", "--ip", "10.77.0.50", "--ip6", "fd00:77::50", "--", "/bin/sleep", "600"]);
    assert_eq!((p.addr("fixed", false), p.addr("fixed", true)), ("10.77.0.50".to_string(), "fd00:77::50".to_string()));
    let out = p
        .podman(&["run", "--rm", "--network", "gnet", "--ip", "10.77.0.50", "--rootfs"])
        .arg(p.dir.path().join("rootfs"))
        .arg("/bin/true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a taken address is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("10.77.0.50 is already allocated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Endpoints are named by container ID; the container's name is nowhere in them.
    let weps = p.gingham(&["get", "wep", "-o", "yaml"]);
    assert_eq!(weps.matches("  orchestrator: cni").count(), 3, "{weps}");
    assert!(!weps.contains("web1") && !weps.contains("fixed"), "{weps}");
    // Restart: same container ID, a new namespace; it serves again, one endpoint, nothing leaked.
    ok(&mut p.podman(&["restart", "-t", "0", "web1"]));
    let web = p.addr("web1", false);
    let got = p.run(&["--rm", "--", "/bin/wget", "-q", "-O", "-", &format!("http://{web}/")]);
    assert_eq!(got, "hello from gingham\n");
    assert_eq!(p.gingham(&["get", "wep", "-o", "yaml"]).matches("  orchestrator: cni").count(), 3);
    let check = Command::new(G)
        .args(["ipam", "check"])
        .env("GINGHAM_STORE_PATH", p.dir.path().join("store.db"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    // Stop and remove: nothing left behind.
    ok(&mut p.podman(&["stop", "-t", "0", "web1"]));
    ok(&mut p.podman(&["rm", "-af", "-t", "0"]));
    assert!(!ip(&["-n", &p.ns, "link"]).contains("cali"), "no veth left");
    assert!(!p.gingham(&["get", "wep"]).contains("pmnode"), "no endpoint left");
    assert!(p.gingham(&["ipam", "show"]).contains("|     0 (0%) |"), "no address left");
    let check = Command::new(G)
        .args(["ipam", "check"])
        .env("GINGHAM_STORE_PATH", p.dir.path().join("store.db"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}
