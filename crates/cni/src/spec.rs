//! The CNI specification's data: environment, network configuration, results in each version's
//! shape, and errors with the spec's codes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// Plugin-specific codes start at 100.
    pub const INTERNAL: u32 = 100;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    #[serde(rename = "cniVersion", default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { cni_version: String::new(), code, msg: msg.into(), details: String::new() }
    }
    pub fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }
}

/// libcni's rule for container IDs and network names: they end up in file names, handles and
/// endpoint names, so `/`, `..` and control characters must never get through.
pub fn valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 1024
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// libcni's rule for interface names: at most 15 bytes, not `.`/`..`, no `/`, `:` or space.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes().all(|c| c.is_ascii_graphic() && c != b'/' && c != b':')
}

/// The CNI_* environment of one invocation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS as key/value pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, …).
    pub args: BTreeMap<String, String>,
    pub path: String,
}

impl Invocation {
    /// Read the environment through `get`; checks what each command needs.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
        let command = get("CNI_COMMAND").unwrap_or_default();
        let mut inv = Invocation {
            command: command.clone(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: BTreeMap::new(),
            path: get("CNI_PATH").unwrap_or_default(),
        };
        for pair in get("CNI_ARGS").unwrap_or_default().split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::new(code::INVALID_ENV, format!("CNI_ARGS: {pair:?} is not KEY=VALUE")));
            };
            inv.args.insert(k.to_string(), v.to_string());
        }
        let need: &[(&str, &str)] = match command.as_str() {
            "ADD" | "CHECK" => {
                &[("CNI_CONTAINERID", &inv.container_id), ("CNI_NETNS", &inv.netns), ("CNI_IFNAME", &inv.ifname)]
            }
            "DEL" => &[("CNI_CONTAINERID", &inv.container_id), ("CNI_IFNAME", &inv.ifname)],
            "VERSION" | "STATUS" | "GC" => &[],
            "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
                ));
            }
        };
        for (name, value) in need {
            if value.is_empty() {
                return Err(CniError::new(code::INVALID_ENV, format!("{name} is required for {command}")));
            }
        }
        if !inv.container_id.is_empty() && !valid_id(&inv.container_id) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {:?} is not valid: letters, digits, '_', '.' and '-', starting with a letter or digit",
                    inv.container_id
                ),
            ));
        }
        if !inv.ifname.is_empty() && !valid_ifname(&inv.ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_IFNAME {:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)",
                    inv.ifname
                ),
            ));
        }
        Ok(inv)
    }

    /// Kubernetes namespace and pod, when this is a Kubernetes call: only when CNI_ARGS carry
    /// both (podman sets K8S_POD_NAME alone, to the container's name), as Calico decides.
    pub fn kubernetes_pod(&self) -> Option<(String, String)> {
        match (self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")) {
            (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => Some((ns.clone(), pod.clone())),
            _ => None,
        }
    }

    /// Addresses asked for in CNI_ARGS `IP=` (podman `--ip`; several separated by commas).
    pub fn requested_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(list) = self.args.get("IP") else { return Ok(Vec::new()) };
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_ip(s.trim()).map_err(|e| CniError::new(code::INVALID_ENV, format!("CNI_ARGS IP: {e}"))))
            .collect()
    }
}

/// An address, with or without a prefix length (`10.0.0.5`, `10.0.0.5/24`).
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<IpNet>().map(|n| n.addr()))
        .map_err(|_| format!("{s:?} is not an IP address"))
}

/// gingham's IPAM section (Calico's `calico-ipam` keys).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assign_ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assign_ipv6: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv4_pools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6_pools: Vec<String>,
    /// Another IPAM plugin's own keys (host-local's `subnet`, `ranges`, `dataDir` …).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The network configuration on stdin (one plugin's entry of a conflist, with name/cniVersion).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nodename: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_level: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub datastore_type: String,
    /// Where the node agent listens.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_socket: String,
    /// Host-side veth name prefix (Calico: `cali`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface_prefix: String,
    #[serde(default)]
    pub ipam: IpamConf,
    #[serde(rename = "runtimeConfig", default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Value>,
    #[serde(rename = "prevResult", default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Everything else (policy, kubernetes, capabilities …) is accepted and ignored.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl NetConf {
    /// Parse stdin; checks the version and the fields gingham needs.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "the network configuration on stdin is not valid JSON")
                .details(e.to_string())
        })?;
        if conf.cni_version.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "cniVersion is missing from the network configuration"));
        }
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {} is not supported; supported: {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "name is missing from the network configuration"));
        }
        if !valid_id(&conf.name) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "network name {:?} is not valid: letters, digits, '_', '.' and '-', starting with a letter or digit",
                    conf.name
                ),
            ));
        }
        if !conf.interface_prefix.is_empty()
            && (conf.interface_prefix.len() > 11 || !conf.interface_prefix.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("interface_prefix {:?}: at most 11 letters or digits", conf.interface_prefix),
            ));
        }
        Ok(conf)
    }

    /// Addresses asked for through the `ips` capability (`runtimeConfig.ips`).
    pub fn requested_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(ips) = self.runtime_config.as_ref().and_then(|r| r.get("ips")) else { return Ok(Vec::new()) };
        let bad = || CniError::new(code::INVALID_CONFIG, "runtimeConfig.ips must be a list of IP addresses");
        ips.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|v| {
                let s = v.as_str().ok_or_else(bad)?;
                parse_ip(s).map_err(|e| CniError::new(code::INVALID_CONFIG, format!("runtimeConfig.ips: {e}")))
            })
            .collect()
    }

    /// Named ports passed without Kubernetes: runtimeConfig.namedPorts `[{name, protocol, port}]`.
    pub fn named_ports(&self) -> Result<Vec<crate::proto::NamedPort>, CniError> {
        match self.runtime_config.as_ref().and_then(|r| r.get("namedPorts")) {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("runtimeConfig.namedPorts: {e}"))),
        }
    }

    /// The service account passed without Kubernetes: runtimeConfig.serviceAccount.
    pub fn service_account(&self) -> Option<String> {
        self.runtime_config.as_ref()?.get("serviceAccount")?.as_str().filter(|s| !s.is_empty()).map(str::to_string)
    }

    /// Labels passed without Kubernetes: runtimeConfig.labels or args.labels (string map).
    pub fn labels(&self) -> BTreeMap<String, String> {
        let from = |v: Option<&Value>| -> BTreeMap<String, String> {
            v.and_then(Value::as_object)
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default()
        };
        let mut l = from(
            self.args
                .as_ref()
                .and_then(|a| a.pointer("/cni/labels"))
                .or(self.args.as_ref().and_then(|a| a.get("labels"))),
        );
        l.extend(from(self.runtime_config.as_ref().and_then(|r| r.get("labels"))));
        l
    }
}

/// A CNI result, kept in the 1.x shape internally.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConf>,
    pub dns: Dns,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConf {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl CniResult {
    /// The result as `version` prints it: 0.3.x/0.4.0 add `version` to each IP; 1.1.0 keeps
    /// interface MTUs; older versions drop them.
    pub fn to_version(&self, version: &str) -> Value {
        let old = version.starts_with("0.");
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = serde_json::to_value(ip).unwrap_or_default();
                if old {
                    v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
                }
                v
            })
            .collect();
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = serde_json::to_value(i).unwrap_or_default();
                if version != "1.1.0" {
                    if let Some(m) = v.as_object_mut() {
                        m.remove("mtu");
                    }
                }
                v
            })
            .collect();
        let mut out = json!({ "cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": self.routes });
        if self.dns != Dns::default() {
            out["dns"] = serde_json::to_value(&self.dns).unwrap_or_default();
        }
        out
    }

    /// Read a prevResult of any supported version.
    pub fn from_value(v: &Value) -> Result<CniResult, CniError> {
        let bad = |what: &str| CniError::new(code::DECODE_FAILURE, format!("prevResult is not a CNI result: {what}"));
        if !v.is_object() {
            return Err(bad("it is not a JSON object"));
        }
        for k in ["interfaces", "ips", "routes"] {
            if v.get(k).is_some_and(|x| !x.is_array() && !x.is_null()) {
                return Err(bad(&format!("{k} is not a list")));
            }
        }
        if v.get("dns").is_some_and(|x| !x.is_object() && !x.is_null()) {
            return Err(bad("dns is not an object"));
        }
        let mut v = v.clone();
        if let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips {
                if let Some(m) = ip.as_object_mut() {
                    m.remove("version");
                }
            }
        }
        if let Some(m) = v.as_object_mut() {
            for k in ["interfaces", "ips", "routes"] {
                if m.get(k).is_none_or(Value::is_null) {
                    m.insert(k.into(), json!([]));
                }
            }
            if m.get("dns").is_none_or(Value::is_null) {
                m.insert("dns".into(), json!({}));
            }
        }
        serde_json::from_value(v)
            .map_err(|e| CniError::new(code::DECODE_FAILURE, "prevResult is not a CNI result").details(e.to_string()))
    }
}

/// Calico's host-side veth name: prefix + the first (15 − prefix length) hex digits of
/// SHA-1("<namespace>.<pod>"), e.g. `cali` + 11 digits.
pub fn host_veth_name(prefix: &str, namespace: &str, pod: &str) -> String {
    use sha1::{Digest, Sha1};
    let hex: String =
        Sha1::digest(format!("{namespace}.{pod}").as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let keep = 15usize.saturating_sub(prefix.len()).min(hex.len());
    format!("{prefix}{}", &hex[..keep])
}

/// Calico's host-side veth for a workload that is not a Kubernetes pod: prefix + the start of
/// the container ID (`cali` + 11 characters).
pub fn host_veth_name_for_container(prefix: &str, container_id: &str) -> String {
    let keep = 15usize.saturating_sub(prefix.len());
    format!("{prefix}{}", container_id.chars().take(keep).collect::<String>())
}

/// Calico's WorkloadEndpoint name: node, orchestrator, workload and endpoint, each with its
/// dashes doubled, joined by single dashes.
pub fn workload_endpoint_name(node: &str, orchestrator: &str, workload: &str, endpoint: &str) -> String {
    [node, orchestrator, workload, endpoint].iter().map(|s| s.replace('-', "--")).collect::<Vec<_>>().join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_args() {
        let env: BTreeMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1"),
        ]
        .into();
        let inv = Invocation::from_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!((inv.args["K8S_POD_NAMESPACE"].as_str(), inv.args["K8S_POD_NAME"].as_str()), ("default", "web-1"));
        let missing = Invocation::from_env(|k| if k == "CNI_NETNS" { None } else { env.get(k).map(|v| v.to_string()) })
            .unwrap_err();
        assert_eq!((missing.code, missing.msg.as_str()), (code::INVALID_ENV, "CNI_NETNS is required for ADD"));
        let del = Invocation::from_env(|k| match k {
            "CNI_COMMAND" => Some("DEL".into()),
            "CNI_NETNS" => None,
            k => env.get(k).map(|v| v.to_string()),
        });
        assert!(del.is_ok(), "DEL works without a netns");
        assert_eq!(Invocation::from_env(|_| None).unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn config_errors() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE_FAILURE);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"gingham"}"#).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(NetConf::parse(br#"{"name":"n","type":"gingham"}"#).unwrap_err().code, code::INVALID_CONFIG);
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"gingham","mtu":1450,"ipam":{"type":"gingham-ipam"},"policy":{"type":"k8s"},"runtimeConfig":{"labels":{"app":"web"}}}"#).unwrap();
        assert_eq!((c.mtu, c.ipam.kind.as_str(), c.labels()["app"].as_str()), (1450, "gingham-ipam", "web"));
    }

    #[test]
    fn results_per_version() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                mtu: Some(1450),
                sandbox: "/var/run/netns/x".into(),
            }],
            ips: vec![IpConfig { address: "10.65.0.5/32".parse().unwrap(), gateway: None, interface: Some(0) }],
            routes: vec![RouteConf { dst: "0.0.0.0/0".parse().unwrap(), gw: None }],
            dns: Dns::default(),
        };
        let old = r.to_version("0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let new = r.to_version("1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][0]["mtu"], 1450);
        assert_eq!(CniResult::from_value(&old).unwrap().ips, r.ips);
    }

    #[test]
    fn hostile_identifiers_are_refused() {
        let base = |k: &str| -> Option<String> {
            match k {
                "CNI_COMMAND" => Some("ADD".into()),
                "CNI_NETNS" => Some("/var/run/netns/x".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                _ => None,
            }
        };
        for bad in ["../../etc", "c1/x", "c1\nx", ".hidden", "-x", "a b", "é"] {
            let e =
                Invocation::from_env(|k| if k == "CNI_CONTAINERID" { Some(bad.into()) } else { base(k) }).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
            assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        }
        for bad in ["..", "a/b", "eth:0", "averyveryverylongname", "e th0"] {
            let e = Invocation::from_env(|k| match k {
                "CNI_CONTAINERID" => Some("c1".into()),
                "CNI_IFNAME" => Some(bad.into()),
                k => base(k),
            })
            .unwrap_err();
            assert!(e.msg.contains("CNI_IFNAME"), "{bad:?}: {e}");
        }
        for bad in ["../x", "a\nb", "", "x/y"] {
            let conf = json!({"cniVersion": "1.0.0", "name": bad, "type": "gingham"}).to_string();
            assert_eq!(NetConf::parse(conf.as_bytes()).unwrap_err().code, code::INVALID_CONFIG, "{bad:?}");
        }
    }

    #[test]
    fn malformed_prev_results_are_errors() {
        for bad in [
            json!("a string"),
            json!(7),
            json!([1]),
            json!({"ips": "x"}),
            json!({"dns": []}),
            json!({"ips": [{"address": 5}]}),
        ] {
            assert_eq!(CniResult::from_value(&bad).unwrap_err().code, code::DECODE_FAILURE, "{bad}");
        }
        assert_eq!(CniResult::from_value(&json!({"ips": null})).unwrap(), CniResult::default());
    }

    #[test]
    fn kubernetes_only_with_both_args_and_requested_ips() {
        let inv = |args: &str| {
            let args = args.to_string();
            Invocation::from_env(move |k| match k {
                "CNI_COMMAND" => Some("ADD".into()),
                "CNI_CONTAINERID" => Some("c1".into()),
                "CNI_NETNS" => Some("/x".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_ARGS" => Some(args.clone()),
                _ => None,
            })
            .unwrap()
        };
        assert_eq!(inv("IgnoreUnknown=1;K8S_POD_NAME=peaceful_ride").kubernetes_pod(), None);
        assert_eq!(inv("K8S_POD_NAMESPACE=ns").kubernetes_pod(), None);
        assert_eq!(inv("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p").kubernetes_pod(), Some(("ns".into(), "p".into())));
        let ips = inv("IP=10.0.0.5,fd00::5/64").requested_ips().unwrap();
        assert_eq!(ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert_eq!(inv("IP=nonsense").requested_ips().unwrap_err().code, code::INVALID_ENV);
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"gingham","runtimeConfig":{"ips":["10.0.0.7/24"]}}"#,
        )
        .unwrap();
        assert_eq!(conf.requested_ips().unwrap(), vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"gingham","runtimeConfig":{"ips":"10.0.0.7"}}"#)
                .unwrap();
        assert_eq!(conf.requested_ips().unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn calico_names() {
        let n = host_veth_name("cali", "default", "web-1");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with("cali") && n[4..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(workload_endpoint_name("node1", "k8s", "mypod-1", "eth0"), "node1-k8s-mypod--1-eth0");
    }
}
