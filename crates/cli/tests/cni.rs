//! The CNI plugin end to end against the real kernel: a "node" network namespace runs the agent
//! (`gingham node run`), pods are namespaces the test creates, and the plugin is the real
//! `gingham` binary driven the way a runtime drives it. Everything is removed on drop.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[test]
fn add_check_del_in_every_version() {
    let lab = Lab::new();
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let ns = lab.pod_ns(&format!("v{i}"));
        let pod = format!("web-{i}");
        let cid = format!("c{i}");
        let conf = lab.conf(v);
        let (code, r) = lab.cni("ADD", &cid, &ns, &pod, &conf);
        assert_eq!(code, 0, "{v}: {r}");
        assert_eq!(r["cniVersion"], *v);
        assert_eq!(r["ips"][0].get("version").is_some(), v.starts_with("0."), "{v}: {r}");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], format!("/var/run/netns/{ns}"));
        assert_eq!(r["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
        let ip = addr_of(&r, 0);
        let pod_addr = ok(&["ip", "-n", &ns, "-4", "-o", "addr", "show", "eth0"]);
        assert!(pod_addr.contains(&format!("inet {ip}/32")), "{pod_addr}");
        assert!(ok(&["ip", "-n", &ns, "link", "show", "eth0"]).contains("mtu 1450"));
        let routes = ok(&["ip", "-n", &ns, "route"]);
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0") && routes.contains("169.254.1.1 dev eth0 scope link"),
            "{routes}"
        );
        let host = r["interfaces"][0]["name"].as_str().unwrap().to_string();
        assert!(host.starts_with("cali") && host.len() == 15);
        assert_eq!(ok(&["ip", "-n", &lab.node, "route", "show", &ip]).trim(), format!("{ip} dev {host} scope link"));
        assert_eq!(
            ok(&["ip", "netns", "exec", &lab.node, "cat", &format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp")]).trim(),
            "1"
        );
        assert!(lab.gingham(&["get", "wep", "-o", "wide"]).contains(&format!("node--1-k8s-web--{i}-eth0")));
        // The endpoint is recorded beside the veth's making: the MAC it names is the pod's own.
        let wep: Value =
            serde_json::from_str(&lab.gingham(&["get", "wep", &format!("node--1-k8s-web--{i}-eth0"), "-o", "json"]))
                .unwrap();
        let pod_link = ok(&["ip", "-n", &ns, "-o", "link", "show", "eth0"]);
        let mac = wep["spec"]["mac"].as_str().unwrap();
        assert!(pod_link.contains(&format!("link/ether {mac} ")), "{mac} vs {pod_link}");
        assert_eq!(r["interfaces"][1]["mac"], mac);
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "unicast, locally administered: {mac}");
        if *v != "0.3.0" && *v != "0.3.1" {
            let mut check = conf.clone();
            check["prevResult"] = r.clone();
            assert_eq!(lab.cni("CHECK", &cid, &ns, &pod, &check).0, 0, "CHECK after ADD ({v})");
            // A real check: remove the address by hand and CHECK fails.
            ok(&["ip", "-n", &ns, "addr", "del", &format!("{ip}/32"), "dev", "eth0"]);
            let (code, e) = lab.cni("CHECK", &cid, &ns, &pod, &check);
            assert_eq!(code, 1);
            assert!(e["msg"].as_str().unwrap().contains(&format!("address {ip}/32 is missing")), "{e}");
        }
        assert_eq!(lab.cni("DEL", &cid, &ns, &pod, &conf).0, 0);
        assert!(!lab.node_links().contains(&host), "veth removed");
        assert!(!lab.gingham(&["get", "wep"]).contains(&pod));
        assert!(lab.gingham(&["ipam", "show", &format!("--ip={ip}")]).contains("is not assigned"));
        assert_eq!(lab.cni("DEL", &cid, &ns, &pod, &conf).0, 0, "DEL of what is gone succeeds");
    }
    assert!(lab.gingham(&["ipam", "check"]).ends_with("found 0 problems.\n"));
}

#[test]
fn pods_reach_each_other_dual_stack_and_labels() {
    let lab = Lab::new();
    let mut conf = lab.conf("1.0.0");
    conf["ipam"]["assign_ipv6"] = json!("true");
    conf["runtimeConfig"] = json!({ "labels": { "app": "web" } });
    let a = lab.pod_ns("a");
    let b = lab.pod_ns("b");
    let (_, ra) = lab.cni("ADD", "ca", &a, "pod-a", &conf);
    let (_, rb) = lab.cni("ADD", "cb", &b, "pod-b", &conf);
    assert_eq!(rb["ips"].as_array().unwrap().len(), 2, "{rb}");
    let b4 = addr_of(&rb, 0);
    let b6 = addr_of(&rb, 1);
    assert!(b6.starts_with("fd00:65::"), "{rb}");
    let out = ok(&["ip", "netns", "exec", &a, "ping", "-c", "2", "-W", "2", &b4]);
    assert!(out.contains("2 received"), "{out}");
    ok(&["ip", "netns", "exec", &lab.node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let out = ok(&["ip", "netns", "exec", &a, "ping", "-6", "-c", "2", "-W", "2", &b6]);
    assert!(out.contains("2 received"), "{out}");
    assert!(ok(&["ip", "-n", &a, "-6", "route"]).contains("default via fe80::ecee:eeff:feee:eeee dev eth0"));
    let wep: Value =
        serde_json::from_str(&lab.gingham(&["get", "wep", "node--1-k8s-pod--a-eth0", "-o", "json"])).unwrap();
    assert_eq!(wep["metadata"]["labels"]["app"], "web");
    assert_eq!(wep["metadata"]["labels"]["projectcalico.org/namespace"], "default");
    assert_eq!(wep["spec"]["containerID"], "ca");
    assert_eq!(wep["spec"]["ipNetworks"].as_array().unwrap().len(), 2);
    let _ = ra;
}

#[test]
fn bad_input_gets_spec_errors_and_leaves_the_host_unchanged() {
    let lab = Lab::new();
    let ns = lab.pod_ns("bad");
    let before = lab.node_links();
    let cases: Vec<(Value, Vec<(&str, &str)>, u64, &str)> = vec![
        (json!("not an object"), vec![], 6, "not valid JSON"),
        (json!({ "cniVersion": "1.0.0", "type": "gingham" }), vec![], 7, "name is missing"),
        (
            json!({ "cniVersion": "0.2.0", "name": "n", "type": "gingham" }),
            vec![],
            1,
            "cniVersion 0.2.0 is not supported",
        ),
        (lab.conf("1.0.0"), vec![("CNI_NETNS", "")], 4, "CNI_NETNS is required for ADD"),
        (
            lab.conf("1.0.0"),
            vec![("CNI_NETNS", "/var/run/netns/does-not-exist")],
            3,
            "network namespace /var/run/netns/does-not-exist cannot be opened",
        ),
    ];
    for (conf, env, code, msg) in cases {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lab.node, G])
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "x")
            .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in &env {
            if v.is_empty() {
                c.env_remove(k)
            } else {
                c.env(k, v)
            };
        }
        let mut child = c.spawn().unwrap();
        let text = if conf.is_string() { "{ not json".to_string() } else { conf.to_string() };
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success());
        let e: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(e["code"], code, "{e}");
        assert!(e["msg"].as_str().unwrap().contains(msg), "{e}");
    }
    // An interface name already taken in the pod.
    ok(&["ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0"]);
    let (code, e) = lab.cni("ADD", "x", &ns, "bad", &lab.conf("1.0.0"));
    assert_eq!((code, e["code"].as_u64()), (1, Some(101)), "{e}");
    assert!(e["msg"].as_str().unwrap().contains("interface eth0 already exists"));
    assert_eq!(lab.node_links(), before, "no veth left on the node");
    assert!(!lab.gingham(&["get", "wep"]).contains("bad"));
    assert!(lab.gingham(&["ipam", "show"]).contains("|     0 (0%) |"), "no address allocated");
}

#[test]
fn no_agent_means_try_again_later() {
    let mut lab = Lab::new();
    lab.stop_agent();
    let ns = lab.pod_ns("x");
    let (code, e) = lab.cni("ADD", "x", &ns, "x", &lab.conf("1.0.0"));
    assert_eq!((code, e["code"].as_u64()), (1, Some(11)), "{e}");
    assert!(e["details"].as_str().unwrap().contains("gingham node run"), "{e}");
}

#[test]
fn hundred_pods_in_bursts_of_twenty() {
    let lab = Lab::new();
    let conf = lab.conf("1.0.0");
    let names: Vec<(String, String)> = (0..100).map(|i| (lab.pod_ns(&format!("p{i}")), format!("pod-{i}"))).collect();
    let mut ips = std::collections::BTreeSet::new();
    for chunk in names.chunks(20) {
        let results: Vec<(i32, Value)> = std::thread::scope(|s| {
            let (lab, conf) = (&lab, &conf);
            let hs: Vec<_> = chunk
                .iter()
                .map(|(ns, pod)| s.spawn(move || lab.cni("ADD", &format!("cid-{pod}"), ns, pod, conf)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (code, r) in results {
            assert_eq!(code, 0, "{r}");
            assert!(ips.insert(addr_of(&r, 0)), "duplicate address {}", addr_of(&r, 0));
        }
    }
    assert_eq!(ips.len(), 100);
    assert_eq!(lab.node_links().matches("cali").count(), 100);
    assert!(lab.gingham(&["ipam", "check"]).ends_with("found 0 problems.\n"));
    for chunk in names.chunks(20) {
        std::thread::scope(|s| {
            for (ns, pod) in chunk {
                let conf = &conf;
                let lab = &lab;
                s.spawn(move || assert_eq!(lab.cni("DEL", &format!("cid-{pod}"), ns, pod, conf).0, 0));
            }
        });
    }
    assert_eq!(lab.node_links().matches("cali").count(), 0);
    assert!(lab.gingham(&["ipam", "show"]).contains("|     0 (0%) |"));
    assert!(lab.gingham(&["ipam", "check"]).ends_with("found 0 problems.\n"));
}

#[test]
fn killed_plugin_and_gc() {
    let lab = Lab::new();
    let conf = lab.conf("1.1.0");
    // Three pods; a fourth ADD whose plugin is killed at once (the agent may finish it or not).
    let pods: Vec<String> = (0..4).map(|i| lab.pod_ns(&format!("g{i}"))).collect();
    for i in 0..3 {
        assert_eq!(lab.cni("ADD", &format!("g{i}"), &pods[i], &format!("gpod-{i}"), &conf).0, 0);
    }
    let mut c = Command::new("ip")
        .args(["netns", "exec", &lab.node, G])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "g3")
        .env("CNI_NETNS", format!("/var/run/netns/{}", pods[3]))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=gpod-3")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    let _ = c.kill();
    let _ = c.wait();
    std::thread::sleep(Duration::from_millis(300));
    // The runtime's GC keeps only g0: everything else of this network on the node goes.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "g0", "ifname": "eth0" }]);
    let (code, e) =
        lab.plugin(G, "GC", "", "", "", &gc, &[("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_IFNAME", "")]);
    assert_eq!(code, 0, "{e}");
    let links = lab.node_links();
    assert_eq!(links.matches("cali").count(), 1, "{links}");
    let weps = lab.gingham(&["get", "wep"]);
    assert!(weps.contains("gpod-0") && !weps.contains("gpod-1") && !weps.contains("gpod-3"), "{weps}");
    let show = lab.gingham(&["ipam", "show"]);
    assert!(show.contains("|     1 (0%) |"), "{show}");
    assert!(lab.gingham(&["ipam", "check"]).ends_with("found 0 problems.\n"));
    // STATUS: ready with an enabled pool; 51 without one.
    assert_eq!(
        lab.plugin(G, "STATUS", "", "", "", &conf, &[("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_IFNAME", "")]).0,
        0
    );
    lab.gingham(&["patch", "ippool", "default-ipv4-ippool", "-p", r#"{"spec":{"disabled":true}}"#]);
    lab.gingham(&["patch", "ippool", "default-ipv6-ippool", "-p", r#"{"spec":{"disabled":true}}"#]);
    let (code, e) =
        lab.plugin(G, "STATUS", "", "", "", &conf, &[("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_IFNAME", "")]);
    assert_eq!((code, e["code"].as_u64()), (1, Some(51)), "{e}");
}

#[test]
fn ipam_mode_install_and_chaining_with_portmap_and_bandwidth() {
    let lab = Lab::new();
    // `gingham cni install` writes the binaries and a conflist shaped like Calico's.
    let bin = lab.dir.path().join("bin");
    let confdir = lab.dir.path().join("net.d");
    let out = lab.gingham(&[
        "cni",
        "install",
        "--bin-dir",
        bin.to_str().unwrap(),
        "--conf-dir",
        confdir.to_str().unwrap(),
        "--mtu",
        "1440",
        "--nodename",
        "node-1",
        "--socket",
        lab.socket().to_str().unwrap(),
    ]);
    assert!(out.contains("10-gingham.conflist"));
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(confdir.join("10-gingham.conflist")).unwrap()).unwrap();
    assert_eq!(list["plugins"][0]["type"], "gingham");
    assert_eq!(list["plugins"][0]["ipam"]["type"], "gingham-ipam");
    let ipam_bin = bin.join("gingham-ipam");
    assert!(ipam_bin.exists() && bin.join("gingham").exists());
    // What is installed is the plugin alone, not all of gingham.
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&bin.join("gingham")) * 4 < size(std::path::Path::new(G)), "the small plugin binary is installed");

    // As another plugin's IPAM: addresses only, released on DEL.
    let ns = lab.pod_ns("ipam");
    let (code, r) = lab.plugin(ipam_bin.to_str().unwrap(), "ADD", "i1", &ns, "ipam-pod", &lab.conf("1.0.0"), &[]);
    assert_eq!(code, 0, "{r}");
    assert!(r["interfaces"].as_array().unwrap().is_empty());
    let ip = addr_of(&r, 0);
    assert!(lab.gingham(&["ipam", "show", &format!("--ip={ip}")]).contains("Handle ID: k8s-pod-network.i1"));
    assert_eq!(lab.plugin(ipam_bin.to_str().unwrap(), "DEL", "i1", &ns, "ipam-pod", &lab.conf("1.0.0"), &[]).0, 0);
    assert!(lab.gingham(&["ipam", "show", &format!("--ip={ip}")]).contains("is not assigned"));

    // The conflist chain as a runtime runs it: gingham, then portmap, then bandwidth, each
    // given the previous result; DEL in reverse.
    let ns = lab.pod_ns("chain");
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let (code, r) = lab.plugin(bin.join("gingham").to_str().unwrap(), "ADD", "ch", &ns, "chain-pod", &conf, &[]);
    assert_eq!(code, 0, "{r}");
    let mut pm = list["plugins"][1].clone();
    pm["cniVersion"] = list["cniVersion"].clone();
    pm["name"] = list["name"].clone();
    pm["prevResult"] = r.clone();
    pm["runtimeConfig"] = json!({ "portMappings": [{ "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }] });
    let (code, r2) = lab.plugin("/usr/lib/cni/portmap", "ADD", "ch", &ns, "chain-pod", &pm, &[]);
    assert_eq!(code, 0, "portmap: {r2}");
    assert_eq!(r2["ips"], r["ips"], "portmap passes our result through");
    let nat = ok(&["ip", "netns", "exec", &lab.node, "iptables-save", "-t", "nat"]);
    assert!(nat.contains("18080") && nat.contains(&addr_of(&r, 0)), "portmap DNAT rule for the pod: {nat}");
    let mut bw = list["plugins"][2].clone();
    bw["cniVersion"] = list["cniVersion"].clone();
    bw["name"] = list["name"].clone();
    bw["prevResult"] = r2.clone();
    bw["runtimeConfig"] = json!({ "bandwidth": { "ingressRate": 1_000_000, "ingressBurst": 100_000, "egressRate": 1_000_000, "egressBurst": 100_000 } });
    let (code, r3) = lab.plugin("/usr/lib/cni/bandwidth", "ADD", "ch", &ns, "chain-pod", &bw, &[]);
    assert_eq!(code, 0, "bandwidth: {r3}");
    let host = r["interfaces"][0]["name"].as_str().unwrap();
    assert!(
        ok(&["ip", "netns", "exec", &lab.node, "tc", "qdisc", "show", "dev", host]).contains("tbf"),
        "bandwidth shaped the host veth"
    );
    for (exe, c) in [("/usr/lib/cni/bandwidth", &bw), ("/usr/lib/cni/portmap", &pm)] {
        assert_eq!(lab.plugin(exe, "DEL", "ch", &ns, "chain-pod", c, &[]).0, 0, "{exe} DEL");
    }
    assert_eq!(lab.plugin(bin.join("gingham").to_str().unwrap(), "DEL", "ch", &ns, "chain-pod", &conf, &[]).0, 0);
    assert!(!lab.node_links().contains(host));
    assert!(lab.gingham(&["ipam", "check"]).ends_with("found 0 problems.\n"));
}

#[test]
fn ipam_plugin_under_ptp_and_undo_and_stale_del() {
    let lab = Lab::new();
    // gingham-ipam as the IPAM of the distribution's ptp plugin (found through CNI_PATH).
    let bin = lab.install_cni();
    let ns = lab.pod_ns("ptp");
    let conf = json!({ "cniVersion": "1.0.0", "name": "ptpnet", "type": "ptp", "agent_socket": lab.socket(), "ipam": { "type": "gingham-ipam" } });
    let path = format!("{}:/usr/lib/cni", bin.display());
    let (code, r) = lab.plugin("/usr/lib/cni/ptp", "ADD", "pt", &ns, "ptp-pod", &conf, &[("CNI_PATH", &path)]);
    assert_eq!(code, 0, "{r}");
    let ip = addr_of(&r, 0);
    assert!(ip.starts_with("10.65."), "{r}");
    assert!(lab.gingham(&["ipam", "show", &format!("--ip={ip}")]).contains("Handle ID: ptpnet.pt"));
    assert_eq!(lab.plugin("/usr/lib/cni/ptp", "DEL", "pt", &ns, "ptp-pod", &conf, &[("CNI_PATH", &path)]).0, 0);
    assert!(lab.gingham(&["ipam", "show", &format!("--ip={ip}")]).contains("is not assigned"));

    // A step after IPAM fails (the kernel refuses this MTU): the address is given back and no
    // interface or endpoint remains.
    let before = lab.node_links();
    let mut bad = lab.conf("1.0.0");
    bad["mtu"] = json!(100_000);
    let ns = lab.pod_ns("undo");
    let (code, e) = lab.cni("ADD", "u1", &ns, "undo-pod", &bad);
    assert_eq!(code, 1, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("creating the veth pair failed"), "{e}");
    assert_eq!(lab.node_links(), before);
    assert!(lab.gingham(&["ipam", "show"]).contains("|     0 (0%) |"), "the address was released");
    assert!(!lab.gingham(&["get", "wep"]).contains("undo-pod"));

    // The same pod name again with a new container: a late DEL for the old container releases
    // only the old container's addresses and leaves the new endpoint and veth alone.
    let conf = lab.conf("1.0.0");
    let old_ns = lab.pod_ns("old");
    let new_ns = lab.pod_ns("new");
    assert_eq!(lab.cni("ADD", "old-cid", &old_ns, "same", &conf).0, 0);
    let (_, r) = lab.cni("ADD", "new-cid", &new_ns, "same", &conf);
    let host = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(lab.cni("DEL", "old-cid", &old_ns, "same", &conf).0, 0);
    assert!(lab.node_links().contains(&host), "the new pod's veth stays");
    let wep: Value =
        serde_json::from_str(&lab.gingham(&["get", "wep", "node--1-k8s-same-eth0", "-o", "json"])).unwrap();
    assert_eq!(wep["spec"]["containerID"], "new-cid");
    let mut check = conf.clone();
    check["prevResult"] = r.clone();
    assert_eq!(lab.cni("CHECK", "new-cid", &new_ns, "same", &check).0, 0);
    assert!(lab.gingham(&["ipam", "check"]).ends_with("found 0 problems.\n"));
}

/// Migration from host-local (Flannel's IPAM), as seed 004's `calico-ipam -upgrade`: addresses
/// the distribution's host-local handed out become allocations under the CNI handles (the one
/// in another node's block borrowed there), a second run changes nothing, and a DEL through
/// gingham-ipam releases exactly its container's address.
#[test]
fn host_local_addresses_are_imported_and_released_by_del() {
    let lab = Lab::new();
    let data = lab.dir.path().join("host-local");
    // node-2 owns the block 10.65.9.64/26 already.
    lab.gingham_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-2}\nspec: {}\n"),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ds = std::sync::Arc::new(gingham_store::embedded::EmbeddedStore::open(lab.store()).unwrap());
        let attrs = [("node".to_string(), "node-2".to_string())].into();
        gingham_ipam::IpamClient::new(ds)
            .assign_ip("10.65.9.100".parse().unwrap(), "node-2-pod", &attrs, "node-2", false)
            .await
            .unwrap();
    });
    // host-local hands out .62, .63 and .64 to three containers.
    let conf = json!({ "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "host-local",
        "ipam": { "type": "host-local", "dataDir": data, "ranges": [[{ "subnet": "10.65.9.0/24", "rangeStart": "10.65.9.62" }]] } });
    let mut ips = Vec::new();
    for cid in ["hl-a", "hl-b", "hl-c"] {
        let ns = lab.pod_ns(cid);
        let (code, r) = lab.plugin("/usr/lib/cni/host-local", "ADD", cid, &ns, cid, &conf, &[]);
        assert_eq!(code, 0, "host-local: {r}");
        ips.push(addr_of(&r, 0));
    }
    assert_eq!(ips, ["10.65.9.62", "10.65.9.63", "10.65.9.64"]);
    let data_s = data.to_str().unwrap();
    let out = lab.gingham(&["ipam", "upgrade", "--data-dir", data_s, "--nodename", "node-1"]);
    assert!(out.ends_with(": 3 imported, 0 already imported, 0 not imported\n"), "{out}");
    for (ip, cid) in ips.iter().zip(["hl-a", "hl-b", "hl-c"]) {
        assert!(
            lab.gingham(&["ipam", "show", &format!("--ip={ip}")])
                .contains(&format!("Handle ID: k8s-pod-network.{cid}"))
        );
    }
    let blocks = lab.gingham(&["ipam", "show", "--show-blocks"]);
    assert!(
        blocks.contains("| 10.65.9.64/26 |        64 |     2 (3%) |"),
        "the borrowed one joins node-2's block: {blocks}"
    );
    let again = lab.gingham(&["ipam", "upgrade", "--data-dir", data_s, "--nodename", "node-1"]);
    assert!(again.ends_with(": 0 imported, 3 already imported, 0 not imported\n"), "{again}");
    // DEL through gingham-ipam (the same network and container): only hl-b's address goes.
    let bin = lab.install_cni();
    let ns = lab.pod_ns("hl-b-del");
    let (code, r) =
        lab.plugin(bin.join("gingham-ipam").to_str().unwrap(), "DEL", "hl-b", &ns, "hl-b", &lab.conf("1.0.0"), &[]);
    assert_eq!(code, 0, "{r}");
    assert!(lab.gingham(&["ipam", "show", "--ip=10.65.9.63"]).contains("is not assigned"));
    assert!(lab.gingham(&["ipam", "show", "--ip=10.65.9.62"]).contains("is in use"));
    assert!(lab.gingham(&["ipam", "show", "--ip=10.65.9.64"]).contains("is in use"));
    // A record held by someone else is reported, and the command fails.
    std::fs::write(data.join("k8s-pod-network/10.65.9.100"), "intruder\neth0").unwrap();
    let out = lab.run_gingham(&["ipam", "upgrade", "--data-dir", data_s, "--nodename", "node-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not imported 10.65.9.100: already held by handle node-2-pod")
    );
}

/// A DEL takes the host veth out of the way at once (renamed, deleted in the background): the
/// name is free when DEL returns, an ADD of the same pod into the same namespace right after
/// succeeds, and what a killed agent left renamed is deleted when it starts again — only names
/// of that exact shape.
#[test]
fn del_frees_the_name_at_once_and_leftovers_are_swept() {
    let mut lab = Lab::new();
    let ns = lab.pod_ns("td");
    let conf = lab.conf("1.0.0");
    let (code, r) = lab.cni("ADD", "td1", &ns, "td-pod", &conf);
    assert_eq!(code, 0, "{r}");
    let host = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert!(lab.node_links().contains(&host));
    let (code, r) = lab.cni("DEL", "td1", &ns, "td-pod", &conf);
    assert_eq!(code, 0, "{r}");
    assert!(!lab.node_links().contains(&format!(" {host}@")), "the name is free when DEL returns");
    // The same pod again, into the same namespace, at once.
    let (code, r) = lab.cni("ADD", "td1", &ns, "td-pod", &conf);
    assert_eq!(code, 0, "re-ADD right after DEL: {r}");
    assert_eq!(lab.cni("DEL", "td1", &ns, "td-pod", &conf).0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lab.node_links().contains(" gdl") {
        assert!(std::time::Instant::now() < deadline, "background deletion did not finish: {}", lab.node_links());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Leftovers of a killed agent: ours (gdl + 12 hex digits) go at the next start; others stay.
    lab.stop_agent();
    ok(&["ip", "-n", &lab.node, "link", "add", "gdl0123456789ab", "type", "veth", "peer", "name", "left0"]);
    ok(&["ip", "-n", &lab.node, "link", "add", "gdlnotours", "type", "veth", "peer", "name", "other0"]);
    lab.start_agent();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lab.node_links().contains("gdl0123456789ab") {
        assert!(std::time::Instant::now() < deadline, "leftover not swept: {}", lab.node_links());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lab.node_links().contains("gdlnotours"), "a name we did not make stays");
}
