//! What real runtimes and hostile input do to the plugin and the agent: podman-style identities,
//! requested addresses, namespaces visible only in the runtime's mount namespace, DELs that never
//! come, callers that give up, repeated and racing requests, GC, oversized requests and
//! descriptor exhaustion. Each test failed on the code before the hardening issue.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PODMAN_ID: &str = "918383d5576a436bda0d1c08825c903e2db949edb55c626bc57bbb042ffd5c45";

fn ipam_problems(lab: &Lab) -> (i32, String) {
    let o = lab.run_gingham(&["ipam", "check"]);
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn podman_style_calls_are_cni_workloads_named_by_container_id() {
    let lab = Lab::new();
    let ns = lab.pod_ns("pm");
    // podman sets K8S_POD_NAME (the container's name) and no namespace.
    let args = [("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=peaceful_ride")];
    let (code, r) = lab.plugin(G, "ADD", PODMAN_ID, &ns, "", &lab.conf("1.0.0"), &args);
    assert_eq!(code, 0, "{r}");
    let host = format!("cali{}", &PODMAN_ID[..11]);
    assert_eq!(r["interfaces"][0]["name"], host.as_str());
    let name = format!("node--1-cni-{PODMAN_ID}-eth0");
    let wep: Value = serde_json::from_str(&lab.gingham(&["get", "wep", &name, "-o", "json"])).unwrap();
    assert_eq!(wep["spec"]["orchestrator"], "cni");
    assert_eq!(wep["spec"]["workload"], PODMAN_ID);
    assert_eq!(wep["spec"]["profiles"], json!(["k8s-pod-network"]));
    assert_eq!(wep["metadata"]["labels"]["projectcalico.org/orchestrator"], "cni");
    assert!(!wep.to_string().contains("peaceful_ride"), "the container name never enters the endpoint: {wep}");
    assert_eq!(lab.plugin(G, "DEL", PODMAN_ID, &ns, "", &lab.conf("1.0.0"), &args).0, 0);
    assert!(!lab.node_links().contains(&host));
    assert!(!lab.gingham(&["get", "wep"]).contains("cni"));
}

/// The runtime may see the namespace at a path that means nothing (or something else) in the
/// agent's mount namespace: the plugin passes it open.
#[test]
fn the_pods_namespace_travels_open_not_by_path() {
    let lab = Lab::new();
    let ns = lab.pod_ns("mnt");
    // In the agent's mount namespace this path is an ordinary empty file.
    let private = lab.dir.path().join("runtime-netns");
    std::fs::write(&private, b"").unwrap();
    let script = format!("mount --bind /run/netns/{ns} {} && exec {G}", private.display());
    let mut child = Command::new("ip")
        // `ip netns exec` gives the plugin a mount namespace of its own: the bind mount is its alone.
        .args(["netns", "exec", &lab.node, "sh", "-c", &script])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "mnt1")
        .env("CNI_NETNS", &private)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=mnt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(lab.conf("1.0.0").to_string().as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ip = r["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ok(&["ip", "-n", &ns, "addr", "show", "eth0"]).contains(&format!("inet {ip}")), "{r}");
    assert_eq!(std::fs::metadata(&private).unwrap().len(), 0, "the agent's view of the path is untouched");
}

#[test]
fn requested_addresses_are_honoured_or_refused_cleanly() {
    let lab = Lab::new();
    let conf = lab.conf("1.0.0");
    let (a, b, c, d) = (lab.pod_ns("ra"), lab.pod_ns("rb"), lab.pod_ns("rc"), lab.pod_ns("rd"));
    let (code, r) = lab.plugin(G, "ADD", "ipa", &a, "", &conf, &[("CNI_ARGS", "IgnoreUnknown=1;IP=10.65.3.7")]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["ips"][0]["address"], "10.65.3.7/32");
    // Taken: a clear error, and nothing of the second container is left.
    let (code, e) = lab.plugin(G, "ADD", "ipb", &b, "", &conf, &[("CNI_ARGS", "IgnoreUnknown=1;IP=10.65.3.7")]);
    assert_eq!(code, 1);
    assert!(e["details"].as_str().unwrap().contains("10.65.3.7 is already allocated"), "{e}");
    assert!(!lab.node_links().contains("caliipb"));
    assert!(ok(&["ip", "-n", &b, "link"]).lines().count() <= 2, "no eth0 in the failed pod");
    // Outside every pool.
    let (code, e) = lab.plugin(G, "ADD", "ipc", &c, "", &conf, &[("CNI_ARGS", "IgnoreUnknown=1;IP=192.0.2.9")]);
    assert_eq!(code, 1);
    assert!(e["details"].as_str().unwrap().contains("192.0.2.9 is not in any enabled IPPool"), "{e}");
    // The `ips` capability, dual stack (podman --ip with --ip6), prefixes accepted.
    let mut dual = conf.clone();
    dual["runtimeConfig"] = json!({ "ips": ["10.65.3.8/24", "fd00:65::8"] });
    let (code, r) = lab.plugin(G, "ADD", "ipd", &d, "", &dual, &[("CNI_ARGS", "IgnoreUnknown=1")]);
    assert_eq!(code, 0, "{r}");
    let got: Vec<&str> = r["ips"].as_array().unwrap().iter().map(|i| i["address"].as_str().unwrap()).collect();
    assert_eq!(got, ["10.65.3.8/32", "fd00:65::8/128"]);
    let (code, text) = ipam_problems(&lab);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("Found 3 workload IPs."), "{text}");
}

/// With the agent down the DEL fails and the runtime forgets the container: the agent finds the
/// endpoint whose interface is gone, marks it (ipam check reports it from anywhere) and releases
/// it after the grace period. A live pod beside it is untouched.
#[test]
fn endpoints_whose_interface_vanished_are_marked_then_released() {
    let mut lab = Lab::with_agent_args(&["--orphan-grace-seconds", "3"]);
    let conf = lab.conf("1.0.0");
    let (gone, live) = (lab.pod_ns("gone"), lab.pod_ns("live"));
    let (_, r) = lab.cni("ADD", "gone1", &gone, "gone", &conf);
    let ip = r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    assert_eq!(lab.cni("ADD", "live1", &live, "live", &conf).0, 0);
    lab.stop_agent();
    ok(&["ip", "netns", "del", &gone]);
    lab.pods.lock().unwrap().retain(|p| *p != gone);
    assert_eq!(lab.cni("DEL", "gone1", &gone, "gone", &conf).0, 1, "DEL fails while the agent is down");
    lab.start_agent();
    assert!(
        eventually(Duration::from_secs(10), || lab
            .gingham(&["get", "wep", "-o", "yaml"])
            .contains("interface-gone-since")),
        "the endpoint is marked: {}",
        lab.agent_log()
    );
    let (code, text) = ipam_problems(&lab);
    assert_eq!(code, 1);
    assert!(
        text.contains("node--1-k8s-gone-eth0 on node node-1: its interface") && text.contains("has been gone since"),
        "{text}"
    );
    assert!(
        eventually(Duration::from_secs(20), || !lab.gingham(&["get", "wep"]).contains("gone")),
        "released after the grace period: {}",
        lab.agent_log()
    );
    assert!(lab.gingham(&["ipam", "show", &format!("--ip={ip}")]).contains("is not assigned"));
    assert!(lab.gingham(&["get", "wep"]).contains("live"));
    let (code, text) = ipam_problems(&lab);
    assert_eq!(code, 0, "{text}");
    let metrics = http_get(&lab.node, 9099, "/metrics");
    assert!(metrics.contains("gingham_orphaned_endpoints_released_total 1"), "{metrics}");
}

/// A request whose caller has given up is not started, or is undone when it finishes late.
#[test]
fn requests_the_caller_gave_up_on_leave_nothing() {
    use gingham_cni::proto::{Endpoint, Message, Request, now_ms, send_with_fds};
    use std::os::fd::AsRawFd;
    let lab = Lab::new();
    let ns = lab.pod_ns("late");
    let ep = |cid: &str| Endpoint {
        network: "k8s-pod-network".into(),
        container_id: cid.into(),
        netns: format!("/run/netns/{ns}"),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        pod: Some(format!("pod-{cid}")),
        mtu: 1450,
        ..Default::default()
    };
    let send = |msg: &Message| {
        let s = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let mut line = serde_json::to_vec(msg).unwrap();
        line.push(b'\n');
        assert_eq!(send_with_fds(&s, &line, &[f.as_raw_fd()]).unwrap(), line.len());
        s
    };
    // Past its deadline on arrival: refused, not started.
    let mut s = send(&Message { deadline_ms: now_ms() - 1, request: Request::Add(ep("late1")) });
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("gave up"), "{answer}");
    // The caller goes away right after asking (killed, or timed out): the ADD is taken back.
    drop(send(&Message { deadline_ms: now_ms() + 60_000, request: Request::Add(ep("late2")) }));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!lab.node_links().contains("cali"), "{}", lab.node_links());
    assert!(!lab.gingham(&["get", "wep"]).contains("late"));
    assert!(lab.gingham(&["ipam", "show"]).contains("|     0 (0%) |"));
    assert!(ok(&["ip", "-n", &ns, "link"]).lines().count() <= 2, "no eth0 left in the pod");
    // And the agent serves on.
    assert_eq!(lab.cni("ADD", "late3", &ns, "late3", &lab.conf("1.0.0")).0, 0);
}

#[test]
fn repeated_and_racing_requests_leave_whole_endpoints() {
    let lab = Lab::new();
    let conf = lab.conf("1.0.0");
    // The same ADD twice: the second answers what the first built.
    let ns = lab.pod_ns("twice");
    let (c1, r1) = lab.cni("ADD", "tw", &ns, "twice", &conf);
    let (c2, r2) = lab.cni("ADD", "tw", &ns, "twice", &conf);
    assert_eq!((c1, c2), (0, 0), "{r2}");
    assert_eq!(r1["ips"], r2["ips"]);
    assert_eq!(r1["interfaces"], r2["interfaces"]);
    let mut check = conf.clone();
    check["prevResult"] = r2.clone();
    assert_eq!(lab.cni("CHECK", "tw", &ns, "twice", &check).0, 0);
    // A DEL racing its ADD: afterwards the pod is either wholly there or wholly gone.
    for i in 0..8 {
        let ns = lab.pod_ns(&format!("race{i}"));
        let (cid, pod) = (format!("race{i}"), format!("race-{i}"));
        let (add, del) = std::thread::scope(|s| {
            let a = s.spawn(|| lab.cni("ADD", &cid, &ns, &pod, &conf));
            std::thread::sleep(Duration::from_millis(i));
            let d = s.spawn(|| lab.cni("DEL", &cid, &ns, &pod, &conf));
            (a.join().unwrap(), d.join().unwrap())
        });
        assert_eq!(del.0, 0, "{}", del.1);
        let wep = lab.gingham(&["get", "wep", "-o", "yaml"]).contains(&format!("node--1-k8s-race--{i}-eth0"));
        if wep {
            let mut check = conf.clone();
            check["prevResult"] = add.1.clone();
            assert_eq!(lab.cni("CHECK", &cid, &ns, &pod, &check).0, 0, "left whole");
        } else {
            let links = ok(&["ip", "-n", &ns, "link"]);
            assert!(
                links.lines().count() <= 2,
                "left nothing in {ns}: {links} add={:?} del={:?} weps={}",
                add,
                del,
                lab.gingham(&["get", "wep"])
            );
        }
    }
    let (code, text) = ipam_problems(&lab);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn gc_needs_its_list_and_touches_only_its_network() {
    let lab = Lab::new();
    let conf = lab.conf("1.1.0");
    let mut other = conf.clone();
    other["name"] = json!("other-net");
    let (a, b, o) = (lab.pod_ns("gca"), lab.pod_ns("gcb"), lab.pod_ns("gco"));
    assert_eq!(lab.cni("ADD", "gca", &a, "gca", &conf).0, 0);
    assert_eq!(lab.cni("ADD", "gcb", &b, "gcb", &conf).0, 0);
    assert_eq!(lab.cni("ADD", "gco", &o, "gco", &other).0, 0);
    let none = [("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_IFNAME", "")];
    let (code, e) = lab.plugin(G, "GC", "", "", "", &conf, &none);
    assert_eq!((code, e["code"].as_u64()), (1, Some(7)), "{e}");
    assert_eq!(lab.node_links().matches("cali").count(), 3, "a GC without its list removes nothing");
    // An empty list: every attachment of this network is stale; the other network's stays.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    assert_eq!(lab.plugin(G, "GC", "", "", "", &gc, &none).0, 0);
    let weps = lab.gingham(&["get", "wep"]);
    assert!(!weps.contains("gca") && !weps.contains("gcb") && weps.contains("gco"), "{weps}");
    assert_eq!(lab.node_links().matches("cali").count(), 1);
    let (code, text) = ipam_problems(&lab);
    assert_eq!(code, 0, "{text}");
}

/// A stored pool with a selector 3,000 parentheses deep (written by another writer) once
/// overflowed the agent's stack on every ADD; now that pool alone is unusable.
#[test]
fn a_hostile_stored_pool_does_not_take_the_agent_down() {
    let lab = Lab::new();
    let deep = format!("{}all(){}", "(".repeat(3000), ")".repeat(3000));
    let pool = json!({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
        "metadata": {"name": "deep", "resourceVersion": null},
        "spec": {"cidr": "10.66.0.0/16", "blockSize": 26, "nodeSelector": deep}});
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use gingham_store::Datastore;
        let ds = gingham_store::embedded::EmbeddedStore::open(lab.store()).unwrap();
        ds.create("/calico/resources/v3/projectcalico.org/ippools/deep", pool.to_string().as_bytes()).await.unwrap();
    });
    for i in 0..2 {
        let ns = lab.pod_ns(&format!("deep{i}"));
        let (code, r) = lab.cni("ADD", &format!("deep{i}"), &ns, &format!("deep{i}"), &lab.conf("1.0.0"));
        assert_eq!(code, 0, "{r}\n{}", lab.agent_log());
        assert!(r["ips"][0]["address"].as_str().unwrap().starts_with("10.65."), "{r}");
    }
    // The CLI reads it too, without crashing.
    assert!(lab.gingham(&["get", "ippool"]).contains("deep"));
}

#[test]
fn the_socket_is_0660_and_requests_are_bounded() {
    let lab = Lab::new();
    let mode = std::fs::metadata(lab.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "agent started under umask 000");
    // A request line without end: refused after 1 MiB, not read into memory for ever.
    let mut s = std::os::unix::net::UnixStream::connect(lab.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let _ = writer.join();
    assert!(answer.contains("longer than 1048576 bytes"), "{answer:?}");
    // Still serving, and ready although it programs no routes (--endpoints-only).
    assert!(http_get(&lab.node, 9099, "/readiness").contains(" 200 "));
}

/// accept() failing for want of descriptors used to spin the health server at 100% CPU.
#[test]
fn descriptor_exhaustion_does_not_spin() {
    let lab = Lab::new();
    let pid = lab.agent.as_ref().unwrap().id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    ok(&["prlimit", "--pid", &pid.to_string(), &format!("--nofile={}:", fds + 2)]);
    let node = lab.node.clone();
    // Connections that hold their descriptor and never send a request.
    let held = in_ns(&node, || {
        (0..8).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", 9099)).ok()).collect::<Vec<_>>()
    });
    assert!(!held.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat.rsplit(')').next().unwrap().split_whitespace().filter_map(|x| x.parse().ok()).collect();
        f[10] + f[11] // utime + stime, in clock ticks (1/100 s)
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu() - before;
    assert!(used < 20, "the agent used {used}/100 s of CPU in 1 s while accept() failed");
    drop(held);
    ok(&["prlimit", "--pid", &pid.to_string(), "--nofile=1024:"]);
    assert!(eventually(Duration::from_secs(10), || http_get(&node, 9099, "/liveness").contains(" 200 ")));
}

#[test]
fn install_writes_fresh_files_with_their_modes_whatever_was_planted() {
    let d = tempfile::tempdir().unwrap();
    let (conf_dir, bin_dir) = (d.path().join("net.d"), d.path().join("bin"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&bin_dir).unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    for planted in [
        conf_dir.join(".10-gingham.conflist.tmp"),
        conf_dir.join("10-gingham.conflist"),
        bin_dir.join(".gingham.tmp"),
        bin_dir.join("gingham-ipam"),
    ] {
        std::os::unix::fs::symlink(&victim, planted).unwrap();
    }
    let o = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\"", G, "cni", "install", "--conf-dir"])
        .arg(&conf_dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let mode = |p: std::path::PathBuf| {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_file(), "{} is a regular file", p.display());
        m.permissions().mode() & 0o777
    };
    assert_eq!(mode(conf_dir.join("10-gingham.conflist")), 0o644);
    assert_eq!(mode(bin_dir.join("gingham")), 0o755);
    assert_eq!(mode(bin_dir.join("gingham-ipam")), 0o755);
    let fresh = d.path().join("fresh/net.d");
    let o = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\"", G, "cni", "install", "--conf-dir"])
        .arg(&fresh)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o755);
}

/// Run by a runtime but without CNI_COMMAND: a CNI error on stdout, not CLI usage.
#[test]
fn plugin_names_without_cni_command_answer_in_cni_terms() {
    let d = tempfile::tempdir().unwrap();
    let ipam = d.path().join("gingham-ipam");
    std::os::unix::fs::symlink(G, &ipam).unwrap();
    for (exe, env) in [(ipam.as_path(), vec![]), (std::path::Path::new(G), vec![("CNI_CONTAINERID", "c1")])] {
        let o = Command::new(exe).envs(env).env_remove("CNI_COMMAND").stdin(Stdio::null()).output().unwrap();
        assert!(!o.status.success());
        let e: Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stdout)));
        assert_eq!(e["code"], 4, "{e}");
        assert!(e["msg"].as_str().unwrap().contains("CNI_COMMAND is not set"));
    }
}
