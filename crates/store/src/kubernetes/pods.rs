//! Workload endpoints are Pods (Calico's KDD layout): the endpoint's labels, service account,
//! node and named ports are the Pod's own; what the CNI plugin decides (addresses, container id)
//! is kept in the Pod's `cni.projectcalico.org/*` annotations, as Calico's plugin writes them;
//! the few fields of gingham's endpoint with no Calico annotation go in one annotation of ours.
//! Pure functions: no I/O.

use serde_json::{Map, Value, json};

use gingham_api::Kind;

const POD_IP: &str = "cni.projectcalico.org/podIP";
const POD_IPS: &str = "cni.projectcalico.org/podIPs";
const CONTAINER_ID: &str = "cni.projectcalico.org/containerID";
const REST: &str = "gingham.projectcalico.org/endpoint";
/// Fields of the endpoint's spec that come from the Pod (or its annotations above).
const DERIVED: &[&str] = &[
    "orchestrator",
    "node",
    "pod",
    "workload",
    "endpoint",
    "containerID",
    "serviceAccountName",
    "ipNetworks",
    "profiles",
    "ports",
];
pub const ENDPOINT: &str = "eth0";

fn escape(part: &str) -> String {
    part.replace('-', "--")
}

/// Calico's endpoint name: node, orchestrator, pod and endpoint with their dashes doubled,
/// joined by single dashes.
pub fn endpoint_name(node: &str, pod: &str) -> String {
    [node, "k8s", pod, ENDPOINT].map(escape).join("-")
}

/// The parts of an endpoint name (node, orchestrator, workload, endpoint).
pub fn parse_endpoint_name(name: &str) -> Option<[String; 4]> {
    let mut parts = vec![String::new()];
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('-', Some('-')) => {
                chars.next();
                parts.last_mut()?.push('-');
            }
            ('-', _) => parts.push(String::new()),
            (c, _) => parts.last_mut()?.push(c),
        }
    }
    let parts: [String; 4] = parts.try_into().ok()?;
    parts.iter().all(|p| !p.is_empty()).then_some(parts)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The key the Pod's endpoint has (whether or not it has one now).
pub fn endpoint_key(pod: &Value) -> Option<String> {
    let ns = str_at(pod, "/metadata/namespace")?;
    let name = str_at(pod, "/metadata/name")?;
    let node = str_at(pod, "/spec/nodeName")?;
    Some(format!("{}{ns}/{}", Kind::WorkloadEndpoint.prefix(None), endpoint_name(node, name)))
}

fn with_prefix_len(ip: &str) -> String {
    match (ip.contains('/'), ip.contains(':')) {
        (true, _) => ip.to_string(),
        (false, true) => format!("{ip}/128"),
        (false, false) => format!("{ip}/32"),
    }
}

/// The endpoint a Pod is: none for host-network pods, pods not on a node yet, finished pods,
/// and pods with no addresses.
pub fn endpoint_of(pod: &Value) -> Option<(String, Value)> {
    if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true)
        || matches!(str_at(pod, "/status/phase"), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let key = endpoint_key(pod)?;
    let meta = pod.get("metadata")?;
    let (ns, name) = (str_at(pod, "/metadata/namespace")?, str_at(pod, "/metadata/name")?);
    let node = str_at(pod, "/spec/nodeName")?;
    let annotations = meta.get("annotations").and_then(Value::as_object).cloned().unwrap_or_default();
    let ann = |k: &str| annotations.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let ips: Vec<String> = match ann(POD_IPS).or(ann(POD_IP)) {
        Some(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(with_prefix_len).collect(),
        None => pod
            .pointer("/status/podIPs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("ip").and_then(Value::as_str))
            .map(with_prefix_len)
            .collect(),
    };
    if ips.is_empty() {
        return None;
    }
    let sa = str_at(pod, "/spec/serviceAccountName");
    let mut labels = meta.get("labels").and_then(Value::as_object).cloned().unwrap_or_default();
    labels.insert("projectcalico.org/namespace".into(), json!(ns));
    labels.insert("projectcalico.org/orchestrator".into(), json!("k8s"));
    let mut profiles = vec![json!(format!("kns.{ns}"))];
    if let Some(sa) = sa {
        labels.insert("projectcalico.org/serviceaccount".into(), json!(sa));
        profiles.push(json!(format!("ksa.{ns}.{sa}")));
    }
    let ports: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| c.get("ports").and_then(Value::as_array).cloned().unwrap_or_default())
        .filter_map(|p| {
            let name = p.get("name").and_then(Value::as_str)?;
            let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            Some(json!({"name": name, "protocol": protocol, "port": p.get("containerPort")?}))
        })
        .collect();
    let mut spec: Map<String, Value> = ann(REST)
        .and_then(|s| serde_json::from_str(s).ok())
        .filter(Value::is_object)
        .and_then(|v: Value| v.as_object().cloned())
        .unwrap_or_default();
    spec.insert("orchestrator".into(), json!("k8s"));
    spec.insert("node".into(), json!(node));
    spec.insert("pod".into(), json!(name));
    spec.insert("workload".into(), json!(name));
    spec.insert("endpoint".into(), json!(ENDPOINT));
    if let Some(id) = ann(CONTAINER_ID) {
        spec.insert("containerID".into(), json!(id));
    }
    if let Some(sa) = sa {
        spec.insert("serviceAccountName".into(), json!(sa));
    }
    spec.insert("ipNetworks".into(), json!(ips));
    spec.insert("profiles".into(), json!(profiles));
    if !ports.is_empty() {
        spec.insert("ports".into(), json!(ports));
    }
    let mut m = Map::new();
    m.insert("name".into(), json!(endpoint_name(node, name)));
    m.insert("namespace".into(), json!(ns));
    m.insert("labels".into(), Value::Object(labels));
    for field in ["uid", "creationTimestamp"] {
        if let Some(x) = meta.get(field).filter(|x| !x.is_null()) {
            m.insert(field.into(), x.clone());
        }
    }
    let value = json!({"apiVersion": Kind::WorkloadEndpoint.api_version(), "kind": Kind::WorkloadEndpoint.kind_name(),
        "metadata": m, "spec": spec});
    Some((key, value))
}

/// The Pod with the endpoint `wep` (a gingham WorkloadEndpoint) recorded in its annotations;
/// its labels, spec and status are left as they are (they are the Kubernetes API's).
pub fn merge_endpoint(pod: &Value, wep: &Value) -> Result<Value, String> {
    let spec = wep.get("spec").and_then(Value::as_object).cloned().unwrap_or_default();
    if let (Some(want), Some(on)) = (spec.get("node").and_then(Value::as_str), str_at(pod, "/spec/nodeName"))
        && want != on
    {
        return Err(format!("spec.node: {want:?}, but the Pod runs on {on:?}"));
    }
    let ips: Vec<&str> =
        spec.get("ipNetworks").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let mut pod = clear_endpoint(pod);
    let annotations =
        pod.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut).ok_or("the Pod has no metadata")?;
    if let Some(first) = ips.first() {
        annotations.insert(POD_IP.into(), json!(first));
        annotations.insert(POD_IPS.into(), json!(ips.join(",")));
    }
    if let Some(id) = spec.get("containerID").and_then(Value::as_str) {
        annotations.insert(CONTAINER_ID.into(), json!(id));
    }
    let rest: Map<String, Value> =
        spec.into_iter().filter(|(k, v)| !DERIVED.contains(&k.as_str()) && !v.is_null()).collect();
    if !rest.is_empty() {
        annotations.insert(REST.into(), json!(Value::Object(rest).to_string()));
    }
    Ok(pod)
}

/// The Pod without an endpoint: the CNI annotations removed.
pub fn clear_endpoint(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if !pod.pointer("/metadata/annotations").is_some_and(Value::is_object)
        && let Some(m) = pod.get_mut("metadata").and_then(Value::as_object_mut)
    {
        m.insert("annotations".into(), json!({}));
    }
    if let Some(a) = pod.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
        for k in [POD_IP, POD_IPS, CONTAINER_ID, REST] {
            a.remove(k);
        }
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "ns-a", "labels": {"app": "web"}, "resourceVersion": "3"},
            "spec": {"nodeName": "node-1", "serviceAccountName": "sa",
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9}]}]}})
    }

    #[test]
    fn names_escape_dashes_both_ways() {
        let n = endpoint_name("node-1", "web-1");
        assert_eq!(n, "node--1-k8s-web--1-eth0");
        assert_eq!(parse_endpoint_name(&n).unwrap(), ["node-1", "k8s", "web-1", "eth0"].map(String::from));
        assert!(parse_endpoint_name("a-b-c").is_none() && parse_endpoint_name("a--b").is_none());
    }

    #[test]
    fn a_pod_with_addresses_is_an_endpoint() {
        assert!(endpoint_of(&pod()).is_none(), "no addresses yet");
        let wep = json!({"spec": {"node": "node-1", "ipNetworks": ["10.65.0.5/32", "fd00::5/128"], "containerID": "abc",
                                   "interfaceName": "cali123", "mac": "ee:ee:ee:ee:ee:ee", "profiles": ["ignored"]}});
        let merged = merge_endpoint(&pod(), &wep).unwrap();
        let a = &merged["metadata"]["annotations"];
        assert_eq!((a[POD_IP].as_str(), a[POD_IPS].as_str()), (Some("10.65.0.5/32"), Some("10.65.0.5/32,fd00::5/128")));
        assert_eq!(merged["spec"], pod()["spec"], "the Pod's spec is the API's");
        let (key, v) = endpoint_of(&merged).unwrap();
        assert_eq!(key, "/calico/resources/v3/projectcalico.org/workloadendpoints/ns-a/node--1-k8s-web--1-eth0");
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        assert_eq!(v["metadata"]["labels"]["projectcalico.org/serviceaccount"], "sa");
        assert_eq!(v["spec"]["profiles"], json!(["kns.ns-a", "ksa.ns-a.sa"]));
        assert_eq!(v["spec"]["ports"], json!([{"name": "http", "protocol": "TCP", "port": 8080}]));
        assert_eq!(
            (v["spec"]["interfaceName"].as_str(), v["spec"]["containerID"].as_str()),
            (Some("cali123"), Some("abc"))
        );
        assert!(endpoint_of(&clear_endpoint(&merged)).is_none());
        let mut done = merged.clone();
        done["status"] = json!({"phase": "Succeeded"});
        assert!(endpoint_of(&done).is_none(), "finished pods hold no addresses");
        assert!(merge_endpoint(&pod(), &json!({"spec": {"node": "node-2"}})).unwrap_err().contains("node-1"));
        // Addresses the kubelet reported, without the plugin's annotations.
        let mut p = pod();
        p["status"] = json!({"podIPs": [{"ip": "10.65.0.9"}]});
        assert_eq!(endpoint_of(&p).unwrap().1["spec"]["ipNetworks"], json!(["10.65.0.9/32"]));
    }
}
