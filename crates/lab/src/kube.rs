//! The lab on the Kubernetes API (`lab up --datastore kubernetes`): a real kube-apiserver on the
//! underlay (10.99.0.1:6443, on the lab's etcd), Calico's CRDs and gingham's RBAC from `gingham
//! manifests`, and the lab playing the kubelet: it registers each node's Node, creates each Pod
//! before the CNI ADD (with the CNI_ARGS a kubelet passes) and writes the Pod's IPs to its
//! status after. Agents and controllers reach the API as their service accounts (static
//! tokens), so the manifests' RBAC is what they run under.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gingham_store::StoreError;
use gingham_store::kubernetes::{KubeConfig, KubeStore};
use gingham_store::testing::kube::{apiserver_command, kube_bin_dir, kubeconfig, run_kubectl, write_apiserver_files};
use serde_json::json;

use crate::{PodExtras, Result, State, in_ns_command, msg};

pub const API_IP: &str = "10.99.0.1";
pub const API_PORT: u16 = 6443;
/// The service accounts gingham's manifests bind their roles to.
const NODE_USER: &str = "system:serviceaccount:kube-system:gingham-node";
const CONTROLLERS_USER: &str = "system:serviceaccount:kube-system:gingham-kube-controllers";
const SA_GROUPS: &str = "system:serviceaccounts,system:serviceaccounts:kube-system";

/// A random bearer token (what a static token file holds).
fn token() -> Result<String> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Start kube-apiserver in the underlay on the lab's etcd; wait until it is ready; install the
/// CRDs, service accounts and RBAC. Sets the lab's environment to the admin's kubeconfig.
pub fn start(state: &mut State, underlay_ns: &str, etcd: &str, quiet: bool) -> Result<()> {
    crate::progress(quiet, &format!("Kubernetes API on the underlay at https://{API_IP}:{API_PORT}"));
    let bin = kube_bin_dir().map_err(|e| msg(format!("kube-apiserver: {e}")))?;
    // Certificates, keys, tokens, kubeconfigs: the lab's, removed whole by `down`.
    let dir = state.record("kube")?;
    gingham_files::ensure_dir(&dir, 0o700).map_err(|e| msg(e.to_string()))?;
    let (admin, node, controllers) = (token()?, token()?, token()?);
    let files = write_apiserver_files(
        &dir,
        API_IP,
        &[
            (&admin, "admin", "system:masters"),
            (&node, NODE_USER, SA_GROUPS),
            (&controllers, CONTROLLERS_USER, SA_GROUPS),
        ],
    )
    .map_err(|e| msg(format!("kube-apiserver's certificates: {e}")))?;
    let url = format!("https://{API_IP}:{API_PORT}");
    for (name, t) in [("admin", &admin), ("node", &node), ("controllers", &controllers)] {
        let path = dir.join(format!("{name}.kubeconfig"));
        gingham_files::write_atomic(&path, kubeconfig(&url, &files.tls.ca, t).as_bytes(), 0o600)
            .map_err(|e| msg(e.to_string()))?;
    }
    let log = state.new_log("kube-apiserver.log")?;
    let mut cmd = in_ns_command(underlay_ns, &bin.join("kube-apiserver"))?;
    let template = apiserver_command(&bin, &files, etcd, API_IP, API_PORT);
    cmd.args(template.get_args()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).process_group(0);
    let child = cmd.spawn().map_err(|e| msg(format!("cannot start kube-apiserver: {e}")))?;
    state.kube_pid = Some(child.id() as i32);
    state.kube_bin = Some(bin);
    state.env.insert("DATASTORE_TYPE".into(), "kubernetes".into());
    state.env.insert("KUBECONFIG".into(), dir.join("admin.kubeconfig").display().to_string());
    state.env.remove("ETCD_ENDPOINTS");
    state.save()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while kubectl(state, &["get", "--raw", "/readyz"], None).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(state.dir.join("kube-apiserver.log")).unwrap_or_default();
            return Err(msg(format!("kube-apiserver not ready within 90 s:\n{}", crate::tail(&log, 15))));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // What `kubectl apply -f <(gingham manifests)` installs, less the workloads the lab runs itself.
    let docs: Vec<serde_json::Value> = gingham_manifests::render(&Default::default())
        .into_iter()
        .filter(|d| !matches!(d["kind"].as_str(), Some("DaemonSet" | "Deployment")))
        .collect();
    kubectl(state, &["apply", "--server-side", "-f", "-"], Some(&gingham_manifests::to_yaml(&docs).map_err(msg)?))?;
    kubectl(state, &["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"], None)?;
    Ok(())
}

/// The kubeconfig an agent (`node`) or the controllers use.
pub fn kubeconfig_of(state: &State, who: &str) -> PathBuf {
    state.dir.join("kube").join(format!("{who}.kubeconfig"))
}

/// kubectl as the admin (at most 60 s); its standard output, or an error with its stderr.
pub fn kubectl(state: &State, args: &[&str], input: Option<&str>) -> Result<String> {
    let bin = state.kube_bin.clone().ok_or_else(|| msg("this lab has no Kubernetes API"))?;
    let out = run_kubectl(&bin, &kubeconfig_of(state, "admin"), args, input.map(str::as_bytes))?;
    if !out.status.success() {
        return Err(msg(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The API as the admin, for what the lab does as the kubelet (no kubectl process, no discovery).
async fn api(state: &State) -> Result<KubeStore> {
    KubeStore::connect(&KubeConfig { kubeconfig: Some(kubeconfig_of(state, "admin")) })
        .await
        .map_err(|e| msg(e.to_string()))
}

/// Create `object`; one that exists already is fine.
async fn ensure(api: &KubeStore, plural: &str, object: serde_json::Value) -> Result<()> {
    match api.create_object("/api/v1", plural, &object).await {
        Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(msg(format!("creating {plural} {}: {e}", object["metadata"]["name"]))),
    }
}

/// Register a node, as its kubelet does.
pub async fn register_node(state: &State, name: &str, ip: &str, pod_cidr: Option<&str>) -> Result<()> {
    let api = api(state).await?;
    let mut node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}});
    // As the controller manager's node IPAM (--allocate-node-cidrs) sets it.
    if let Some(c) = pod_cidr {
        node["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    ensure(&api, "nodes", node).await?;
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}});
    api.patch_object(&format!("/api/v1/nodes/{name}/status"), &status).await.map_err(|e| msg(e.to_string()))?;
    Ok(())
}

/// Create the Pod object `ns/name` on `node`, as the API server holds it before its kubelet runs
/// the CNI ADD (its namespace and service accounts too, if missing).
pub async fn create_pod(
    state: &State,
    pod: &str,
    node: &str,
    labels: &BTreeMap<String, String>,
    extras: &PodExtras,
) -> Result<()> {
    let api = api(state).await?;
    let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
    let sa = extras.service_account.as_deref().unwrap_or("default");
    ensure(&api, "namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})).await?;
    for a in ["default", sa] {
        let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": a, "namespace": ns}});
        ensure(&api, "serviceaccounts", account).await?;
    }
    let ports: Vec<serde_json::Value> = extras
        .named_ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "containerPort": port}))
        .collect();
    let object = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": extras.annotations},
        "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": false,
                 "containers": [{"name": "main", "image": "lab", "ports": ports}]}});
    api.create_object("/api/v1", "pods", &object).await.map_err(|e| msg(format!("creating Pod {pod}: {e}")))?;
    Ok(())
}

/// Write the Pod's addresses to its status, as its kubelet does once the sandbox is up.
pub async fn set_pod_ips(state: &State, pod: &str, ips: &[String]) -> Result<()> {
    let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
    let Some(first) = ips.first() else { return Ok(()) };
    let status = json!({"status": {"phase": "Running", "podIP": first, "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}});
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
    api(state).await?.patch_object(&path, &status).await.map_err(|e| msg(e.to_string()))?;
    Ok(())
}

pub fn delete_pod(state: &State, pod: &str) -> Result<()> {
    let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
    kubectl(state, &["delete", "pod", name, "-n", ns, "--ignore-not-found", "--wait=false"], None)?;
    Ok(())
}
