//! gingham against a real Kubernetes API server (kube-apiserver on a real etcd, built by
//! scripts/kube-build.sh): the install manifests are accepted by the server's own validation.

use std::process::Command;

use gingham_store::testing::kube::KubeApiServer;

fn manifests(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_gingham")).arg("manifests").args(args).output().unwrap();
    assert!(out.status.success(), "gingham manifests {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Apply `yaml` server-side; every object must come back as created or configured.
fn apply(k: &KubeApiServer, yaml: &str) -> Vec<String> {
    let out = k
        .kubectl_with_input(
            &["apply", "--server-side", "--field-manager=gingham-test", "-f", "-"],
            Some(yaml.as_bytes()),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl apply refused the manifests:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_string).collect()
}

#[test]
fn the_api_server_accepts_every_manifest_and_serves_calicos_crds() {
    let k = KubeApiServer::start().expect("kube-apiserver starts (scripts/kube-build.sh builds it)");

    // Kubernetes datastore: CRDs first, as calico.yaml does; they must become Established.
    let yaml = manifests(&["kubernetes"]);
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let applied = apply(&k, &yaml);
    assert_eq!(applied.len(), docs.len(), "{applied:?}");
    k.kubectl_ok(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]);
    for d in &docs {
        let (kind, name) = (d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap());
        let mut args = vec!["get", kind, name, "-o", "name"];
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            args.extend(["-n", ns]);
        }
        assert!(!k.kubectl_ok(&args).trim().is_empty(), "{kind} {name} is not there");
    }
    let crds = k.kubectl_ok(&["get", "crd", "-o", "name"]);
    for (_, plural, _) in gingham_manifests_crds() {
        assert!(crds.contains(&format!("{plural}.crd.projectcalico.org")), "{plural} missing from {crds}");
    }

    // A Calico object in the CRD form a cluster that ran Calico holds: kubectl lists it.
    apply(
        &k,
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 172.20.0.0/16\n  ipipMode: Always\n  natOutgoing: true\n  nodeSelector: all()\n",
    );
    let pools = k.kubectl_ok(&["get", "ippools", "-o", "jsonpath={.items[*].spec.cidr}"]);
    assert_eq!(pools.trim(), "172.20.0.0/16");

    // The etcd and embedded forms, each in a namespace of its own.
    for (store, ns) in [("etcdv3", "gingham-etcd"), ("embedded", "gingham-embedded")] {
        k.kubectl_ok(&["create", "namespace", ns]);
        let yaml = manifests(&[store, "--namespace", ns, "--etcd-endpoints", "https://10.0.0.1:2379"]);
        let n: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(apply(&k, &yaml).len(), n.len());
        let ds = k.kubectl_ok(&[
            "get",
            "daemonset",
            "gingham-node",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[*].value}",
        ]);
        let want = if store == "etcdv3" { "etcdv3" } else { "embedded" };
        assert!(ds.split_whitespace().any(|v| v == want), "{store}: DaemonSet env {ds}");
    }
}

/// Calico's CRD plurals, from the manifests the binary prints (no second list to keep in step).
fn gingham_manifests_crds() -> Vec<(String, String, bool)> {
    let yaml = manifests(&["kubernetes"]);
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    docs.iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| {
            let s = &d["spec"];
            (
                s["names"]["kind"].as_str().unwrap().into(),
                s["names"]["plural"].as_str().unwrap().into(),
                s["scope"] == "Namespaced",
            )
        })
        .collect()
}
