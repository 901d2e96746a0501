//! The install manifests (`gingham manifests`): what `kubectl apply -f` needs to run gingham on a
//! cluster, in the shape of Calico's calico.yaml — the node DaemonSet (an install-cni init
//! container writing the plugin and its conflist on each host, then the agent), the controllers
//! Deployment, their service accounts and RBAC, the ConfigMap (`cni_network_config` and friends)
//! and, for the Kubernetes datastore, Calico's CRDs (`crd.projectcalico.org/v1`), so a cluster
//! that ran Calico keeps its objects and `kubectl get ippools` works.

use gingham_cni::proto::DEFAULT_SOCKET;
use serde_json::{Value, json};

/// Where the cluster keeps gingham's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datastore {
    /// One node's SQLite store under /var/lib/gingham (single-node clusters only).
    Embedded,
    /// etcd at these endpoints (comma-separated); TLS files come from the gingham-etcd-secrets Secret.
    Etcd { endpoints: String },
    /// The Kubernetes API itself (Calico's KDD mode).
    Kubernetes,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub datastore: Datastore,
    pub namespace: String,
    pub image: String,
    /// The pods' MTU (0: the agent's choice, as Calico's veth_mtu 0).
    pub mtu: u32,
    /// The CNI network name (the IPAM handle prefix).
    pub network_name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            datastore: Datastore::Kubernetes,
            namespace: "kube-system".into(),
            image: format!("gingham:{}", env!("CARGO_PKG_VERSION")),
            mtu: 0,
            network_name: "k8s-pod-network".into(),
        }
    }
}

/// One CRD of Calico's: kind, plural, namespaced.
pub const CALICO_CRDS: &[(&str, &str, bool)] = &[
    ("BGPConfiguration", "bgpconfigurations", false),
    ("BGPFilter", "bgpfilters", false),
    ("BGPPeer", "bgppeers", false),
    ("BlockAffinity", "blockaffinities", false),
    ("CalicoNodeStatus", "caliconodestatuses", false),
    ("ClusterInformation", "clusterinformations", false),
    ("FelixConfiguration", "felixconfigurations", false),
    ("GlobalNetworkPolicy", "globalnetworkpolicies", false),
    ("GlobalNetworkSet", "globalnetworksets", false),
    ("HostEndpoint", "hostendpoints", false),
    ("IPAMBlock", "ipamblocks", false),
    ("IPAMConfig", "ipamconfigs", false),
    ("IPAMHandle", "ipamhandles", false),
    ("IPPool", "ippools", false),
    ("IPReservation", "ipreservations", false),
    ("KubeControllersConfiguration", "kubecontrollersconfigurations", false),
    ("NetworkPolicy", "networkpolicies", true),
    ("NetworkSet", "networksets", true),
    ("Tier", "tiers", false),
];

pub const CRD_GROUP: &str = "crd.projectcalico.org";
/// Replaced by the MTU in the conflist template (bare, as in Calico's, so the result is a number).
pub const MTU_PLACEHOLDER: &str = "__CNI_MTU__";
/// Replaced by the node's name in the conflist template.
pub const NODENAME_PLACEHOLDER: &str = "__KUBERNETES_NODE_NAME__";
const NODE: &str = "gingham-node";
const CONTROLLERS: &str = "gingham-kube-controllers";
const CONFIG: &str = "gingham-config";
const ETCD_SECRET: &str = "gingham-etcd-secrets";

/// Every object, in the order `kubectl apply` should create them.
pub fn render(o: &Options) -> Vec<Value> {
    let mut docs = Vec::new();
    if o.datastore == Datastore::Kubernetes {
        docs.extend(CALICO_CRDS.iter().map(|&(kind, plural, namespaced)| crd(kind, plural, namespaced)));
    }
    for sa in [NODE, CONTROLLERS] {
        docs.push(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": o.namespace}}),
        );
    }
    for (name, rules) in [(NODE, node_rules()), (CONTROLLERS, controllers_rules())] {
        docs.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules}));
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": o.namespace}],
        }));
    }
    docs.push(config_map(o));
    if matches!(o.datastore, Datastore::Etcd { .. }) {
        // Filled in by the operator (base64 PEM); empty keys mean plain HTTP.
        docs.push(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": ETCD_SECRET, "namespace": o.namespace},
            "data": {"etcd-ca": "", "etcd-cert": "", "etcd-key": ""},
        }));
    }
    docs.push(daemon_set(o));
    docs.push(controllers_deployment(o));
    docs
}

/// The documents as one multi-document YAML stream.
pub fn to_yaml(docs: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(d).map_err(|e| format!("cannot write YAML: {e}"))?);
    }
    Ok(out)
}

/// A CRD whose spec is kept as written: gingham validates resources itself on every write (the
/// same checks for every datastore), so the schema only fixes the shape Kubernetes needs.
fn crd(kind: &str, plural: &str, namespaced: bool) -> Value {
    let object = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{CRD_GROUP}")},
        "spec": {
            "group": CRD_GROUP,
            "names": {"kind": kind, "listKind": format!("{kind}List"), "plural": plural, "singular": kind.to_ascii_lowercase()},
            "scope": if namespaced { "Namespaced" } else { "Cluster" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                    "spec": object, "status": object,
                }}},
            }],
        },
    })
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["get", "list", "watch", "create", "update", "delete"];
const IPAM: &[&str] = &["blockaffinities", "ipamblocks", "ipamhandles", "ipamconfigs"];

/// The agent: reads the cluster's pods, namespaces, service accounts, policies and nodes, writes
/// its own node's annotations and status, and every Calico resource it keeps up to date.
fn node_rules() -> Value {
    let calico: Vec<&str> = CALICO_CRDS.iter().map(|c| c.1).collect();
    json!([
        rule(&[""], &["pods", "namespaces", "serviceaccounts", "nodes", "endpoints", "services"], READ),
        rule(&[""], &["configmaps"], &["get"]),
        rule(&[""], &["nodes", "nodes/status"], &["patch", "update"]),
        // The CNI plugin's annotations (addresses, container id) are written on the Pod.
        rule(&[""], &["pods"], &["update", "patch"]),
        rule(&[""], &["pods/status"], &["patch"]),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        rule(&["networking.k8s.io"], &["networkpolicies"], READ),
        rule(&[""], &["serviceaccounts/token"], &["create"]),
        rule(&[CRD_GROUP], &calico, READ),
        rule(
            &[CRD_GROUP],
            &[IPAM, &["ippools", "felixconfigurations", "clusterinformations", "caliconodestatuses"]].concat(),
            WRITE
        ),
    ])
}

/// The controllers: node deletion clean-up, IPAM garbage collection, and their Lease.
fn controllers_rules() -> Value {
    json!([
        rule(&[""], &["nodes", "pods", "namespaces"], READ),
        // A deleted node's endpoints: their CNI annotations are cleared from its Pods.
        rule(&[""], &["pods"], &["update", "patch"]),
        rule(&[CRD_GROUP], IPAM, WRITE),
        rule(&[CRD_GROUP], &["ippools", "ipreservations"], READ),
        rule(&[CRD_GROUP], &["hostendpoints", "kubecontrollersconfigurations", "clusterinformations"], WRITE),
        rule(&["coordination.k8s.io"], &["leases"], &["get", "list", "watch", "create", "update", "delete"]),
    ])
}

/// Calico's calico-config ConfigMap: the conflist template install-cni fills in on each host
/// (`__KUBERNETES_NODE_NAME__`, `__CNI_MTU__`, as in Calico's), the MTU, the backend. The plugin
/// asks the node's agent over a unix socket for everything (IPAM, the pod's labels, policy), so
/// it holds no credentials of its own: no kubeconfig or token to write, rotate or leak.
fn config_map(o: &Options) -> Value {
    let mut conflist = gingham_cni::conflist(&o.network_name, "1.0.0", 0, NODENAME_PLACEHOLDER, DEFAULT_SOCKET);
    conflist["plugins"][0]["mtu"] = json!(MTU_PLACEHOLDER);
    let template = serde_json::to_string_pretty(&conflist)
        .unwrap_or_default()
        .replace(&format!("\"{MTU_PLACEHOLDER}\""), MTU_PLACEHOLDER);
    let mut data = json!({"calico_backend": "bird", "veth_mtu": o.mtu.to_string(), "cni_network_config": template});
    if let Datastore::Etcd { endpoints } = &o.datastore {
        data["etcd_endpoints"] = json!(endpoints);
        // Paths inside the containers (the Secret is mounted at /gingham-secrets); empty: plain HTTP.
        data["etcd_ca"] = json!("");
        data["etcd_cert"] = json!("");
        data["etcd_key"] = json!("");
    }
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIG, "namespace": o.namespace}, "data": data})
}

fn from_config(name: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"configMapKeyRef": {"name": CONFIG, "key": key}}})
}

fn node_name_env() -> Value {
    json!({"name": "NODENAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
}

/// The environment every gingham container gets to find the datastore (as calicoctl reads it).
fn datastore_env(o: &Options) -> Vec<Value> {
    match &o.datastore {
        Datastore::Embedded => vec![
            json!({"name": "DATASTORE_TYPE", "value": "embedded"}),
            json!({"name": "GINGHAM_STORE_PATH", "value": "/var/lib/gingham/store.db"}),
        ],
        Datastore::Etcd { .. } => vec![
            json!({"name": "DATASTORE_TYPE", "value": "etcdv3"}),
            from_config("ETCD_ENDPOINTS", "etcd_endpoints"),
            from_config("ETCD_CA_CERT_FILE", "etcd_ca"),
            from_config("ETCD_CERT_FILE", "etcd_cert"),
            from_config("ETCD_KEY_FILE", "etcd_key"),
        ],
        Datastore::Kubernetes => vec![json!({"name": "DATASTORE_TYPE", "value": "kubernetes"})],
    }
}

fn host_path(name: &str, path: &str, kind: &str) -> Value {
    json!({"name": name, "hostPath": {"path": path, "type": kind}})
}

fn mount(name: &str, path: &str) -> Value {
    json!({"name": name, "mountPath": path})
}

/// The datastore's volume and mount, if it needs one.
fn datastore_volume(o: &Options) -> Option<(Value, Value)> {
    match o.datastore {
        Datastore::Embedded => Some((
            host_path("gingham-store", "/var/lib/gingham", "DirectoryOrCreate"),
            mount("gingham-store", "/var/lib/gingham"),
        )),
        Datastore::Etcd { .. } => Some((
            json!({"name": "etcd-certs", "secret": {"secretName": ETCD_SECRET, "defaultMode": 0o400}}),
            json!({"name": "etcd-certs", "mountPath": "/gingham-secrets", "readOnly": true}),
        )),
        Datastore::Kubernetes => None,
    }
}

fn daemon_set(o: &Options) -> Value {
    let mut install_env = vec![
        from_config("CNI_NETWORK_CONFIG", "cni_network_config"),
        from_config("CNI_MTU", "veth_mtu"),
        node_name_env(),
    ];
    install_env.extend(datastore_env(o));
    let mut agent_env = vec![
        node_name_env(),
        from_config("CALICO_NETWORKING_BACKEND", "calico_backend"),
        json!({"name": "IP", "value": "autodetect"}),
    ];
    agent_env.extend(datastore_env(o));
    let mut volumes = vec![
        host_path("lib-modules", "/lib/modules", ""),
        host_path("xtables-lock", "/run/xtables.lock", "FileOrCreate"),
        // The agent's socket, which the plugin on the host connects to.
        host_path("run-gingham", "/var/run/gingham", "DirectoryOrCreate"),
        host_path("cni-bin-dir", "/opt/cni/bin", "DirectoryOrCreate"),
        host_path("cni-net-dir", "/etc/cni/net.d", ""),
    ];
    let mut agent_mounts = vec![
        json!({"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": true}),
        mount("xtables-lock", "/run/xtables.lock"),
        mount("run-gingham", "/var/run/gingham"),
    ];
    if let Some((v, m)) = datastore_volume(o) {
        volumes.push(v);
        agent_mounts.push(m);
    }
    let probe = |path: &str| json!({"httpGet": {"host": "127.0.0.1", "path": path, "port": 9099}, "periodSeconds": 10, "timeoutSeconds": 10});
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": NODE, "namespace": o.namespace, "labels": {"k8s-app": NODE}},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": NODE}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"k8s-app": NODE}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "hostNetwork": true,
                    "tolerations": [{"effect": "NoSchedule", "operator": "Exists"},
                                    {"key": "CriticalAddonsOnly", "operator": "Exists"},
                                    {"effect": "NoExecute", "operator": "Exists"}],
                    "serviceAccountName": NODE,
                    "priorityClassName": "system-node-critical",
                    "terminationGracePeriodSeconds": 0,
                    "initContainers": [{
                        "name": "install-cni", "image": o.image,
                        "command": ["gingham", "cni", "install", "--conf-dir=/host/etc/cni/net.d", "--bin-dir=/host/opt/cni/bin"],
                        "env": install_env,
                        "volumeMounts": [mount("cni-bin-dir", "/host/opt/cni/bin"), mount("cni-net-dir", "/host/etc/cni/net.d")],
                        "securityContext": {"privileged": true},
                    }],
                    "containers": [{
                        "name": NODE, "image": o.image,
                        "command": ["gingham", "node", "run"],
                        "env": agent_env,
                        "securityContext": {"privileged": true},
                        "resources": {"requests": {"cpu": "100m"}},
                        "livenessProbe": probe("/liveness"),
                        "readinessProbe": probe("/readiness"),
                        "volumeMounts": agent_mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    })
}

fn controllers_deployment(o: &Options) -> Value {
    let mut env = vec![json!({"name": "ENABLED_CONTROLLERS", "value": "node"})];
    env.extend(datastore_env(o));
    let mut pod = json!({
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
        "serviceAccountName": CONTROLLERS,
        "priorityClassName": "system-cluster-critical",
        "containers": [{
            "name": CONTROLLERS, "image": o.image,
            "command": ["gingham", "controllers", "run", "--metrics-listen=0.0.0.0:9094"],
            "env": env,
            "ports": [{"name": "metrics", "containerPort": 9094}],
        }],
    });
    if let Some((v, m)) = datastore_volume(o) {
        pod["volumes"] = json!([v]);
        pod["containers"][0]["volumeMounts"] = json!([m]);
    }
    if o.datastore == Datastore::Embedded {
        // The embedded store lives on one host: the controllers must run beside it.
        pod["hostNetwork"] = json!(true);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CONTROLLERS, "namespace": o.namespace, "labels": {"k8s-app": CONTROLLERS}},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"k8s-app": CONTROLLERS}},
            "template": {"metadata": {"labels": {"k8s-app": CONTROLLERS}}, "spec": pod},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(docs: &[Value]) -> Vec<String> {
        docs.iter().map(|d| d["kind"].as_str().unwrap_or_default().to_string()).collect()
    }

    #[test]
    fn crds_only_for_the_kubernetes_datastore() {
        let k = render(&Options::default());
        assert_eq!(kinds(&k).iter().filter(|k| *k == "CustomResourceDefinition").count(), CALICO_CRDS.len());
        let e = render(&Options {
            datastore: Datastore::Etcd { endpoints: "https://e:2379".into() },
            ..Default::default()
        });
        assert!(!kinds(&e).contains(&"CustomResourceDefinition".into()));
        assert!(kinds(&e).contains(&"Secret".into()));
        let cm = e.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        assert_eq!(cm["data"]["etcd_endpoints"], "https://e:2379");
    }

    #[test]
    fn the_conflist_template_is_json_with_calicos_placeholders() {
        let docs = render(&Options::default());
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        let text = cm["data"]["cni_network_config"].as_str().unwrap();
        assert!(text.contains("\"mtu\": __CNI_MTU__"), "{text}");
        let conf: Value = serde_json::from_str(&text.replace(MTU_PLACEHOLDER, "1440")).unwrap();
        assert_eq!(conf["plugins"][0]["type"], "gingham");
        assert_eq!(conf["plugins"][0]["mtu"], 1440);
        assert_eq!(conf["plugins"][0]["nodename"], NODENAME_PLACEHOLDER);
    }

    #[test]
    fn yaml_round_trips() {
        let docs = render(&Options { datastore: Datastore::Embedded, ..Default::default() });
        let yaml = to_yaml(&docs).unwrap();
        let back: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(back, docs);
    }
}
