//! The generic resource object, the kind registry and datastore key layout.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::validate::{FieldError, check_name, check_namespace};
use crate::{k8s, network, policy};

pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";
pub const K8S_NETWORKING_API_VERSION: &str = "networking.k8s.io/v1";
pub const K8S_CORE_API_VERSION: &str = "v1";

/// Every kind gingham stores.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    IPPool,
    IPAMConfiguration,
    BGPConfiguration,
    BGPPeer,
    BGPFilter,
    Node,
    WorkloadEndpoint,
    HostEndpoint,
    NetworkPolicy,
    GlobalNetworkPolicy,
    NetworkSet,
    GlobalNetworkSet,
    Profile,
    FelixConfiguration,
    ClusterInformation,
    /// networking.k8s.io/v1 NetworkPolicy.
    KubernetesNetworkPolicy,
    /// v1 Namespace (name + labels), so namespace selectors work without Kubernetes.
    Namespace,
    /// A policy tier.
    Tier,
    /// The cluster controllers' settings (`gingham controllers run`).
    KubeControllersConfiguration,
    /// Addresses IPAM never hands out on its own.
    IPReservation,
}

struct KindInfo {
    kind: &'static str,
    api_version: &'static str,
    /// Key group under /calico/resources/v3/.
    group: &'static str,
    plural: &'static str,
    namespaced: bool,
    /// Names accepted on the command line (lower case), first is canonical.
    cli_names: &'static [&'static str],
    /// Other `kind:` spellings accepted in documents.
    kind_aliases: &'static [&'static str],
}

const CALICO: &str = "projectcalico.org";

impl Kind {
    pub const ALL: [Kind; 20] = [
        Kind::IPPool,
        Kind::IPAMConfiguration,
        Kind::BGPConfiguration,
        Kind::BGPPeer,
        Kind::BGPFilter,
        Kind::Node,
        Kind::WorkloadEndpoint,
        Kind::HostEndpoint,
        Kind::NetworkPolicy,
        Kind::GlobalNetworkPolicy,
        Kind::NetworkSet,
        Kind::GlobalNetworkSet,
        Kind::Profile,
        Kind::FelixConfiguration,
        Kind::ClusterInformation,
        Kind::KubernetesNetworkPolicy,
        Kind::Namespace,
        Kind::Tier,
        Kind::KubeControllersConfiguration,
        Kind::IPReservation,
    ];

    fn info(self) -> KindInfo {
        let calico = |kind, plural, namespaced, cli_names| KindInfo {
            kind,
            api_version: CALICO_API_VERSION,
            group: CALICO,
            plural,
            namespaced,
            cli_names,
            kind_aliases: &[],
        };
        match self {
            Kind::IPPool => calico("IPPool", "ippools", false, &["ippool", "ippools", "ipp", "ipps", "pool", "pools"]),
            Kind::IPAMConfiguration => KindInfo {
                kind_aliases: &["IPAMConfig"],
                ..calico(
                    "IPAMConfiguration",
                    "ipamconfigurations",
                    false,
                    &["ipamconfiguration", "ipamconfigurations", "ipamconfig", "ipamconfigs"],
                )
            },
            Kind::BGPConfiguration => calico(
                "BGPConfiguration",
                "bgpconfigurations",
                false,
                &["bgpconfiguration", "bgpconfigurations", "bgpconfig", "bgpconfigs"],
            ),
            Kind::BGPPeer => {
                calico("BGPPeer", "bgppeers", false, &["bgppeer", "bgppeers", "bgpp", "bgpps", "bp", "bps"])
            }
            Kind::BGPFilter => calico("BGPFilter", "bgpfilters", false, &["bgpfilter", "bgpfilters"]),
            Kind::Node => calico("Node", "nodes", false, &["node", "nodes", "no", "nos"]),
            Kind::WorkloadEndpoint => calico(
                "WorkloadEndpoint",
                "workloadendpoints",
                true,
                &["workloadendpoint", "workloadendpoints", "wep", "weps"],
            ),
            Kind::HostEndpoint => {
                calico("HostEndpoint", "hostendpoints", false, &["hostendpoint", "hostendpoints", "hep", "heps"])
            }
            Kind::NetworkPolicy => calico(
                "NetworkPolicy",
                "networkpolicies",
                true,
                &["networkpolicy", "networkpolicies", "policy", "policies", "np", "nps", "pol", "pols"],
            ),
            Kind::GlobalNetworkPolicy => calico(
                "GlobalNetworkPolicy",
                "globalnetworkpolicies",
                false,
                &["globalnetworkpolicy", "globalnetworkpolicies", "gnp", "gnps", "globalpolicy", "globalpolicies"],
            ),
            Kind::NetworkSet => {
                calico("NetworkSet", "networksets", true, &["networkset", "networksets", "netset", "netsets"])
            }
            Kind::GlobalNetworkSet => calico(
                "GlobalNetworkSet",
                "globalnetworksets",
                false,
                &["globalnetworkset", "globalnetworksets", "gns", "globalnetset", "globalnetsets"],
            ),
            Kind::Profile => calico("Profile", "profiles", false, &["profile", "profiles", "pro", "pros"]),
            Kind::Tier => calico("Tier", "tiers", false, &["tier", "tiers"]),
            Kind::IPReservation => {
                calico("IPReservation", "ipreservations", false, &["ipreservation", "ipreservations"])
            }
            Kind::KubeControllersConfiguration => calico(
                "KubeControllersConfiguration",
                "kubecontrollersconfigurations",
                false,
                &["kubecontrollersconfiguration", "kubecontrollersconfigurations", "kcc"],
            ),
            Kind::FelixConfiguration => calico(
                "FelixConfiguration",
                "felixconfigurations",
                false,
                &["felixconfiguration", "felixconfigurations", "felixconfig", "felixconfigs"],
            ),
            Kind::ClusterInformation => calico(
                "ClusterInformation",
                "clusterinformations",
                false,
                &["clusterinformation", "clusterinformations", "clusterinfo", "clusterinfos"],
            ),
            Kind::KubernetesNetworkPolicy => KindInfo {
                kind: "NetworkPolicy",
                api_version: K8S_NETWORKING_API_VERSION,
                group: "networking.k8s.io",
                plural: "networkpolicies",
                namespaced: true,
                cli_names: &[
                    "kubernetesnetworkpolicy",
                    "kubernetesnetworkpolicies",
                    "networkpolicy.networking.k8s.io",
                    "networkpolicies.networking.k8s.io",
                    "knp",
                    "knps",
                    "k8snetworkpolicy",
                ],
                kind_aliases: &[],
            },
            Kind::Namespace => KindInfo {
                kind: "Namespace",
                api_version: K8S_CORE_API_VERSION,
                group: "core",
                plural: "namespaces",
                namespaced: false,
                cli_names: &["namespace", "namespaces", "ns"],
                kind_aliases: &[],
            },
        }
    }

    /// The `kind:` written in documents.
    pub fn kind_name(self) -> &'static str {
        self.info().kind
    }

    pub fn api_version(self) -> &'static str {
        self.info().api_version
    }

    pub fn plural(self) -> &'static str {
        self.info().plural
    }

    pub fn namespaced(self) -> bool {
        self.info().namespaced
    }

    /// Name used on the command line and in messages (distinguishes the two NetworkPolicy kinds).
    pub fn cli_name(self) -> &'static str {
        self.info().cli_names[0]
    }

    /// Resolve a command-line kind name (case-insensitive, Calico's short names included).
    pub fn from_cli(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| k.info().cli_names.contains(&lower.as_str()))
    }

    /// Resolve a document's apiVersion + kind.
    pub fn from_document(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            let i = k.info();
            i.api_version == api_version && (i.kind == kind || i.kind_aliases.contains(&kind))
        })
    }

    /// Prefix of every key of this kind (optionally of one namespace); ends with `/`.
    pub fn prefix(self, namespace: Option<&str>) -> String {
        let i = self.info();
        match namespace {
            Some(ns) if i.namespaced => {
                format!("/calico/resources/v3/{}/{}/{ns}/", i.group, i.plural)
            }
            _ => format!("/calico/resources/v3/{}/{}/", i.group, i.plural),
        }
    }

    /// The datastore key of one resource (Calico's etcd layout).
    pub fn key(self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(if self.namespaced() { Some(namespace.unwrap_or("default")) } else { None }))
    }

    /// Singletons that are named `default` (or `node.<name>`) only.
    pub fn is_singleton(self) -> bool {
        matches!(self, Kind::IPAMConfiguration | Kind::ClusterInformation)
    }

    /// Parse, default and validate `object` as this kind; returns the normalised object.
    pub fn normalize(self, object: &Value) -> Result<Object, Vec<FieldError>> {
        match self {
            Kind::IPPool => typed::<network::IPPoolSpec>(object),
            Kind::IPAMConfiguration => typed::<network::IPAMConfigSpec>(object),
            Kind::BGPConfiguration => typed::<network::BGPConfigurationSpec>(object),
            Kind::BGPPeer => typed::<network::BGPPeerSpec>(object),
            Kind::BGPFilter => typed::<network::BGPFilterSpec>(object),
            Kind::Node => typed::<network::NodeSpec>(object),
            Kind::FelixConfiguration => typed::<network::FelixConfigurationSpec>(object),
            Kind::ClusterInformation => typed::<network::ClusterInformationSpec>(object),
            Kind::WorkloadEndpoint => typed::<policy::WorkloadEndpointSpec>(object),
            Kind::HostEndpoint => typed::<policy::HostEndpointSpec>(object),
            Kind::NetworkPolicy => typed::<policy::NetworkPolicySpec>(object),
            Kind::GlobalNetworkPolicy => typed::<policy::GlobalNetworkPolicySpec>(object),
            Kind::NetworkSet | Kind::GlobalNetworkSet => typed::<policy::NetworkSetSpec>(object),
            Kind::Profile => typed::<policy::ProfileSpec>(object),
            Kind::KubernetesNetworkPolicy => typed::<k8s::K8sNetworkPolicySpec>(object),
            Kind::Namespace => typed::<k8s::NamespaceSpec>(object),
            Kind::Tier => typed::<policy::TierSpec>(object),
            Kind::KubeControllersConfiguration => typed::<network::KubeControllersConfigurationSpec>(object),
            Kind::IPReservation => typed::<network::IPReservationSpec>(object),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::KubernetesNetworkPolicy => f.write_str("NetworkPolicy.networking.k8s.io"),
            k => f.write_str(k.kind_name()),
        }
    }
}

/// Kubernetes-style object metadata (the fields Calico's resources carry).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_references: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_fields: Option<Value>,
}

/// A resource as stored and printed: apiVersion, kind, metadata, spec (normalised JSON), status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

impl Object {
    /// The registered kind of this object (it was normalised, so this is known).
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_document(&self.api_version, &self.kind)
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }

    /// The spec as its typed struct.
    pub fn spec_as<S: serde::de::DeserializeOwned>(&self) -> Result<S, serde_json::Error> {
        serde_json::from_value(self.spec.clone())
    }

    /// Stored form: no resourceVersion (the datastore's revision is the version).
    pub fn to_stored_json(&self) -> Vec<u8> {
        let mut copy = self.clone();
        copy.metadata.resource_version = None;
        serde_json::to_vec(&copy).unwrap_or_default()
    }
}

/// What every typed spec provides.
pub trait Spec: Serialize + serde::de::DeserializeOwned + Default {
    /// Fill Calico's defaults (called before validation).
    fn default_fields(&mut self, _meta: &ObjectMeta) {}
    /// Push one error per bad field, with its path below `spec`.
    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>);
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TypedObject<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: S,
    #[serde(default)]
    status: Option<Value>,
}

fn typed<S: Spec>(object: &Value) -> Result<Object, Vec<FieldError>> {
    let parsed: TypedObject<S> = serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        vec![FieldError::new(if path == "." { String::new() } else { path }, message)]
    })?;
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let Some(k) = Kind::from_document(api_version, kind) else {
        return Err(vec![FieldError::new("kind", format!("unknown kind {kind:?} for apiVersion {api_version:?}"))]);
    };
    let TypedObject { metadata, mut spec, status, .. } = parsed;
    let mut errors = Vec::new();
    check_name(k, &metadata.name, &mut errors);
    if k.namespaced() {
        if let Some(ns) = &metadata.namespace {
            check_namespace(ns, &mut errors);
        }
    } else if let Some(ns) = &metadata.namespace {
        errors.push(FieldError::new("metadata.namespace", format!("{k} is cluster-scoped; remove namespace {ns:?}")));
    }
    for (key, value) in &metadata.labels {
        crate::validate::check_label_key(key, &format!("metadata.labels.{key}"), &mut errors);
        crate::validate::check_label_value(value, &format!("metadata.labels.{key}"), &mut errors);
    }
    spec.default_fields(&metadata);
    spec.validate(&metadata, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut metadata = metadata;
    if k.namespaced() && metadata.namespace.is_none() {
        metadata.namespace = Some("default".into());
    }
    let mut spec = serde_json::to_value(&spec).map_err(|e| vec![FieldError::new("spec", e.to_string())])?;
    if k == Kind::KubernetesNetworkPolicy {
        // `{}` means something here: `namespaceSelector: {}` is every namespace.
        strip_nulls(&mut spec);
    } else {
        strip_empty(&mut spec);
    }
    Ok(Object { api_version: k.api_version().into(), kind: k.kind_name().into(), metadata, spec, status })
}

/// Changes that an update may not make: an IPPool's cidr and blockSize are fixed for life, since
/// allocated blocks and routes are computed from them. Each error says how to migrate.
pub fn check_update(old: &Object, new: &Object) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if new.kind() == Some(Kind::IPPool) {
        for (field, what) in [("cidr", "CIDR"), ("blockSize", "block size")] {
            let (a, b) = (&old.spec[field], &new.spec[field]);
            if a != b {
                errors.push(FieldError::new(
                    format!("spec.{field}"),
                    format!(
                        "cannot change from {a} to {b}: an IPPool's {field} is immutable. To migrate, create a new IPPool with the new {what}, \
                         set spec.disabled: true on {name:?}, recreate the pods that use it, then delete {name:?}",
                        name = old.metadata.name
                    ),
                ));
            }
        }
    }
    errors
}

/// Drop nulls and empty lists/maps, as Go's `omitempty` does in Calico's output.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.values_mut().for_each(strip_nulls);
            map.retain(|_, c| !c.is_null());
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

pub fn strip_empty(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                strip_empty(child);
            }
            map.retain(|_, c| {
                !(c.is_null() || c.as_array().is_some_and(Vec::is_empty) || c.as_object().is_some_and(|m| m.is_empty()))
            });
        }
        Value::Array(items) => items.iter_mut().for_each(strip_empty),
        _ => {}
    }
}

/// A value that is written either as a number or as a string (ports, protocols, AS numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

impl Default for IntOrString {
    fn default() -> Self {
        IntOrString::Str(String::new())
    }
}

impl Serialize for IntOrString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(i) => s.serialize_i64(*i),
            IntOrString::Str(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v).map(IntOrString::Int).map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<IntOrString, E> {
                Err(E::custom(format!("{v} is not a whole number")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(i) => write!(f, "{i}"),
            IntOrString::Str(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_calico_layout() {
        assert_eq!(
            Kind::IPPool.key(None, "default-ipv4-ippool"),
            "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"
        );
        assert_eq!(
            Kind::NetworkPolicy.key(Some("ns1"), "p"),
            "/calico/resources/v3/projectcalico.org/networkpolicies/ns1/p"
        );
        assert_eq!(
            Kind::WorkloadEndpoint.key(None, "w"),
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/w"
        );
        assert_eq!(
            Kind::KubernetesNetworkPolicy.prefix(Some("a")),
            "/calico/resources/v3/networking.k8s.io/networkpolicies/a/"
        );
    }

    #[test]
    fn cli_names_are_unique_and_resolve() {
        let mut seen = std::collections::HashSet::new();
        for k in Kind::ALL {
            for n in k.info().cli_names {
                assert!(seen.insert(*n), "{n} used twice");
                assert_eq!(Kind::from_cli(n), Some(k));
            }
            assert_eq!(Kind::from_document(k.api_version(), k.kind_name()), Some(k));
        }
        assert_eq!(Kind::from_cli("IPP"), Some(Kind::IPPool));
        assert_eq!(Kind::from_cli("bogus"), None);
        assert_eq!(Kind::from_document(CALICO_API_VERSION, "IPAMConfig"), Some(Kind::IPAMConfiguration));
    }
}
