//! Policy and endpoint kinds: NetworkPolicy, GlobalNetworkPolicy, Profile, (Global)NetworkSet,
//! WorkloadEndpoint, HostEndpoint, and the rule model they share.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::enums::{Action, PolicyType, Protocol};
use crate::object::{IntOrString, ObjectMeta, Spec};
use crate::validate::*;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IcmpFields {
    #[serde(rename = "type")]
    pub icmp_type: Option<i64>,
    pub code: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPath {
    pub exact: Option<String>,
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<HttpPath>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub names: Option<Vec<String>>,
    pub selector: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMatch {
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    pub nets: Option<Vec<String>>,
    pub not_nets: Option<Vec<String>>,
    pub selector: Option<String>,
    pub not_selector: Option<String>,
    pub namespace_selector: Option<String>,
    pub ports: Option<Vec<IntOrString>>,
    pub not_ports: Option<Vec<IntOrString>>,
    pub service_accounts: Option<ServiceAccountMatch>,
    pub services: Option<ServiceMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub action: Option<Action>,
    pub ip_version: Option<i64>,
    pub protocol: Option<Protocol>,
    pub not_protocol: Option<Protocol>,
    pub icmp: Option<IcmpFields>,
    #[serde(rename = "notICMP")]
    pub not_icmp: Option<IcmpFields>,
    pub source: Option<EntityRule>,
    pub destination: Option<EntityRule>,
    pub http: Option<HttpMatch>,
    pub metadata: Option<RuleMetadata>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleMetadata {
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A port entry: a number, a "min:max" range, or a named port.
pub fn check_port(p: &IntOrString, path: &str, e: &mut Errors) {
    match p {
        IntOrString::Int(n) if !(0..=65535).contains(n) => {
            e.push(FieldError::new(path, format!("port {n} is outside 0..65535")))
        }
        IntOrString::Int(_) => {}
        IntOrString::Str(s) => {
            if let Some((lo, hi)) = s.split_once(':') {
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if lo <= hi => {}
                    (Ok(_), Ok(_)) => e.push(FieldError::new(path, format!("port range {s:?} has min > max"))),
                    _ => e.push(FieldError::new(path, format!("{s:?} is not a port range (min:max, each 0-65535)"))),
                }
            } else if s.parse::<u16>().is_ok() {
            } else if s.is_empty()
                || s.len() > 15
                || !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                || !s.bytes().any(|b| b.is_ascii_lowercase())
            {
                e.push(FieldError::new(path, format!("{s:?} is not a port, port range or named port")));
            }
        }
    }
}

fn check_icmp(icmp: &IcmpFields, path: &str, e: &mut Errors) {
    if let Some(t) = icmp.icmp_type.filter(|t| !(0..=254).contains(t)) {
        e.push(FieldError::new(format!("{path}.type"), format!("{t} is outside 0..254")));
    }
    if let Some(c) = icmp.code {
        if icmp.icmp_type.is_none() {
            e.push(FieldError::new(format!("{path}.code"), "an ICMP code needs an ICMP type"));
        } else if !(0..=255).contains(&c) {
            e.push(FieldError::new(format!("{path}.code"), format!("{c} is outside 0..255")));
        }
    }
}

fn check_entity(ent: &EntityRule, rule: &Rule, path: &str, e: &mut Errors) {
    for (list, f) in [(&ent.nets, "nets"), (&ent.not_nets, "notNets")] {
        for (i, n) in list.iter().flatten().enumerate() {
            check_cidr(n, &format!("{path}.{f}[{i}]"), e);
        }
    }
    for (s, f) in [
        (&ent.selector, "selector"),
        (&ent.not_selector, "notSelector"),
        (&ent.namespace_selector, "namespaceSelector"),
    ] {
        if let Some(s) = s {
            check_selector(s, &format!("{path}.{f}"), e);
        }
    }
    for (list, f) in [(&ent.ports, "ports"), (&ent.not_ports, "notPorts")] {
        if list.as_ref().is_some_and(|l| !l.is_empty()) && !rule.protocol.is_some_and(Protocol::has_ports) {
            e.push(FieldError::new(format!("{path}.{f}"), "ports need protocol TCP, UDP or SCTP on the rule"));
        }
        for (i, p) in list.iter().flatten().enumerate() {
            check_port(p, &format!("{path}.{f}[{i}]"), e);
        }
    }
    if let Some(sa) = &ent.service_accounts {
        if let Some(s) = &sa.selector {
            check_selector(s, &format!("{path}.serviceAccounts.selector"), e);
        }
    }
    if ent.services.is_some()
        && (ent.selector.is_some() || ent.nets.is_some() || ent.service_accounts.is_some() || ent.not_nets.is_some())
    {
        e.push(FieldError::new(
            format!("{path}.services"),
            "services cannot be combined with selector, nets or serviceAccounts",
        ));
    }
}

pub fn check_rules(rules: &[Rule], path: &str, e: &mut Errors) {
    if rules.len() > 1024 {
        e.push(FieldError::new(path, format!("{} rules; at most 1024 are allowed", rules.len())));
    }
    for (i, r) in rules.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if r.action.is_none() {
            e.push(FieldError::new(format!("{p}.action"), "an action is required (Allow, Deny, Log or Pass)"));
        }
        if let Some(v) = r.ip_version.filter(|v| *v != 4 && *v != 6) {
            e.push(FieldError::new(format!("{p}.ipVersion"), format!("{v} is not 4 or 6")));
        }
        let icmp_proto = r.protocol.is_some_and(Protocol::is_icmp);
        for (icmp, f) in [(&r.icmp, "icmp"), (&r.not_icmp, "notICMP")] {
            if let Some(icmp) = icmp {
                if !icmp_proto {
                    e.push(FieldError::new(format!("{p}.{f}"), "ICMP matches need protocol ICMP or ICMPv6"));
                }
                check_icmp(icmp, &format!("{p}.{f}"), e);
            }
        }
        if let Some(s) = &r.source {
            check_entity(s, r, &format!("{p}.source"), e);
        }
        if let Some(d) = &r.destination {
            check_entity(d, r, &format!("{p}.destination"), e);
        }
    }
}

/// Calico's default `types`: from the rules present.
fn default_types(types: &mut Option<Vec<PolicyType>>, has_egress: bool, has_ingress: bool) {
    if types.as_ref().is_none_or(Vec::is_empty) {
        *types = Some(match (has_ingress, has_egress) {
            (_, false) => vec![PolicyType::Ingress],
            (false, true) => vec![PolicyType::Egress],
            (true, true) => vec![PolicyType::Ingress, PolicyType::Egress],
        });
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    pub tier: Option<String>,
    pub order: Option<f64>,
    pub selector: Option<String>,
    pub types: Option<Vec<PolicyType>>,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub service_account_selector: Option<String>,
    pub performance_hints: Option<Vec<String>>,
}

impl Spec for NetworkPolicySpec {
    fn default_fields(&mut self, _meta: &ObjectMeta) {
        let (i, eg) =
            (self.ingress.as_ref().is_some_and(|r| !r.is_empty()), self.egress.as_ref().is_some_and(|r| !r.is_empty()));
        default_types(&mut self.types, eg, i);
        self.tier.get_or_insert_with(|| "default".into());
        self.selector.get_or_insert_with(|| "all()".into());
    }
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        common_policy(
            &self.selector,
            &self.service_account_selector,
            &self.ingress,
            &self.egress,
            &self.performance_hints,
            self.order,
            e,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn common_policy(
    selector: &Option<String>,
    sa_selector: &Option<String>,
    ingress: &Option<Vec<Rule>>,
    egress: &Option<Vec<Rule>>,
    hints: &Option<Vec<String>>,
    order: Option<f64>,
    e: &mut Errors,
) {
    if let Some(s) = selector {
        check_selector(s, "spec.selector", e);
    }
    if let Some(s) = sa_selector {
        check_selector(s, "spec.serviceAccountSelector", e);
    }
    check_rules(ingress.as_deref().unwrap_or_default(), "spec.ingress", e);
    check_rules(egress.as_deref().unwrap_or_default(), "spec.egress", e);
    for (i, h) in hints.iter().flatten().enumerate() {
        check_enum(h, &["AssumeNeededOnEveryNode"], &format!("spec.performanceHints[{i}]"), e);
    }
    if order.is_some_and(|o| !o.is_finite()) {
        e.push(FieldError::new("spec.order", "must be a finite number"));
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkPolicySpec {
    pub tier: Option<String>,
    pub order: Option<f64>,
    pub selector: Option<String>,
    pub types: Option<Vec<PolicyType>>,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub service_account_selector: Option<String>,
    pub namespace_selector: Option<String>,
    pub do_not_track: Option<bool>,
    #[serde(rename = "preDNAT")]
    pub pre_dnat: Option<bool>,
    pub apply_on_forward: Option<bool>,
    pub performance_hints: Option<Vec<String>>,
}

impl Spec for GlobalNetworkPolicySpec {
    fn default_fields(&mut self, _meta: &ObjectMeta) {
        let (i, eg) =
            (self.ingress.as_ref().is_some_and(|r| !r.is_empty()), self.egress.as_ref().is_some_and(|r| !r.is_empty()));
        default_types(&mut self.types, eg, i);
        self.tier.get_or_insert_with(|| "default".into());
        self.selector.get_or_insert_with(|| "all()".into());
    }
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        common_policy(
            &self.selector,
            &self.service_account_selector,
            &self.ingress,
            &self.egress,
            &self.performance_hints,
            self.order,
            e,
        );
        if let Some(s) = &self.namespace_selector {
            check_selector(s, "spec.namespaceSelector", e);
        }
        let forward = self.apply_on_forward == Some(true);
        if self.do_not_track == Some(true) {
            if !forward {
                e.push(FieldError::new("spec.applyOnForward", "doNotTrack policies need applyOnForward: true"));
            }
            if self.pre_dnat == Some(true) {
                e.push(FieldError::new("spec.preDNAT", "preDNAT and doNotTrack cannot both be set"));
            }
        }
        if self.pre_dnat == Some(true) {
            if !forward {
                e.push(FieldError::new("spec.applyOnForward", "preDNAT policies need applyOnForward: true"));
            }
            if self.egress.as_ref().is_some_and(|r| !r.is_empty())
                || self.types.iter().flatten().any(|t| *t == PolicyType::Egress)
            {
                e.push(FieldError::new("spec.egress", "preDNAT policies are ingress-only"));
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSpec {
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub labels_to_apply: Option<BTreeMap<String, String>>,
}

impl Spec for ProfileSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        check_rules(self.ingress.as_deref().unwrap_or_default(), "spec.ingress", e);
        check_rules(self.egress.as_deref().unwrap_or_default(), "spec.egress", e);
        for k in self.labels_to_apply.iter().flatten().map(|(k, _)| k) {
            check_label_key(k, &format!("spec.labelsToApply.{k}"), e);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSetSpec {
    pub nets: Option<Vec<String>>,
}

impl Spec for NetworkSetSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        for (i, n) in self.nets.iter().flatten().enumerate() {
            check_cidr(n, &format!("spec.nets[{i}]"), e);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: i64,
    pub host_port: Option<i64>,
    #[serde(rename = "hostIP")]
    pub host_ip: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpNat {
    #[serde(rename = "internalIP")]
    pub internal_ip: String,
    #[serde(rename = "externalIP")]
    pub external_ip: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEndpointSpec {
    pub orchestrator: Option<String>,
    pub workload: Option<String>,
    pub node: Option<String>,
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
    pub pod: Option<String>,
    pub endpoint: Option<String>,
    pub service_account_name: Option<String>,
    pub ip_networks: Option<Vec<String>>,
    #[serde(rename = "ipNATs")]
    pub ip_nats: Option<Vec<IpNat>>,
    pub ipv4_gateway: Option<String>,
    pub ipv6_gateway: Option<String>,
    pub profiles: Option<Vec<String>>,
    pub interface_name: Option<String>,
    pub mac: Option<String>,
    pub ports: Option<Vec<EndpointPort>>,
    pub allow_spoofed_source_prefixes: Option<Vec<String>>,
    pub qos_controls: Option<serde_json::Value>,
}

fn check_endpoint_ports(ports: &[EndpointPort], e: &mut Errors) {
    for (i, p) in ports.iter().enumerate() {
        check_port_number(p.port, &format!("spec.ports[{i}].port"), e);
        if let Some(h) = p.host_port {
            check_port_number(h, &format!("spec.ports[{i}].hostPort"), e);
        }
    }
}

impl Spec for WorkloadEndpointSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        for (i, n) in self.ip_networks.iter().flatten().enumerate() {
            let path = format!("spec.ipNetworks[{i}]");
            if let Some(net) = check_cidr(n, &path, e) {
                if net.prefix_len() != net.max_prefix_len() {
                    e.push(FieldError::new(path, format!("{n}: workload addresses must be /32 or /128")));
                }
            }
        }
        for (i, n) in self.ip_nats.iter().flatten().enumerate() {
            check_ip(&n.internal_ip, &format!("spec.ipNATs[{i}].internalIP"), e);
            check_ip(&n.external_ip, &format!("spec.ipNATs[{i}].externalIP"), e);
        }
        for (v, f) in [(&self.ipv4_gateway, "ipv4Gateway"), (&self.ipv6_gateway, "ipv6Gateway")] {
            if let Some(g) = v {
                check_ip(g, &format!("spec.{f}"), e);
            }
        }
        for (i, n) in self.allow_spoofed_source_prefixes.iter().flatten().enumerate() {
            check_cidr(n, &format!("spec.allowSpoofedSourcePrefixes[{i}]"), e);
        }
        check_endpoint_ports(self.ports.as_deref().unwrap_or_default(), e);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostEndpointSpec {
    pub node: Option<String>,
    pub interface_name: Option<String>,
    #[serde(rename = "expectedIPs")]
    pub expected_ips: Option<Vec<String>>,
    pub profiles: Option<Vec<String>>,
    pub ports: Option<Vec<EndpointPort>>,
}

impl Spec for HostEndpointSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        if self.node.as_deref().unwrap_or_default().is_empty() {
            e.push(FieldError::new("spec.node", "the node is required"));
        }
        if self.interface_name.as_deref().unwrap_or_default().is_empty()
            && self.expected_ips.as_ref().is_none_or(Vec::is_empty)
        {
            e.push(FieldError::new("spec.interfaceName", "set interfaceName or expectedIPs"));
        }
        for (i, ip) in self.expected_ips.iter().flatten().enumerate() {
            check_ip(ip, &format!("spec.expectedIPs[{i}]"), e);
        }
        check_endpoint_ports(self.ports.as_deref().unwrap_or_default(), e);
    }
}

/// A policy tier: tiers are evaluated by order (then name); `defaultAction` is what the end of
/// the tier does to a packet none of its policies decided (Deny, or Pass to the next tier).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSpec {
    pub order: Option<f64>,
    pub default_action: Option<Action>,
}

impl Spec for TierSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        if self.order.is_some_and(|o| !o.is_finite()) {
            e.push(FieldError::new("spec.order", "must be a finite number"));
        }
        if let Some(a) = self.default_action.filter(|a| !matches!(a, Action::Deny | Action::Pass)) {
            e.push(FieldError::new("spec.defaultAction", format!("{a} is not Deny or Pass")));
        }
    }
}
