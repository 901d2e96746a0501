//! Kubernetes kinds gingham accepts without Kubernetes: networking.k8s.io/v1 NetworkPolicy and
//! v1 Namespace (name + labels, so that namespace selectors work).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::enums::{PolicyType, Protocol};
use crate::object::{IntOrString, ObjectMeta, Spec};
use crate::validate::*;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

impl LabelSelector {
    /// Calico's translation (reference §1.10): matchLabels sorted by key, then expressions in
    /// order, joined by ` && `; an empty selector is `all()`.
    pub fn to_calico(&self) -> String {
        let mut parts: Vec<String> = self.match_labels.iter().flatten().map(|(k, v)| format!("{k} == '{v}'")).collect();
        for r in self.match_expressions.iter().flatten() {
            let vals = || r.values.iter().flatten().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
            parts.push(match r.operator.as_str() {
                "In" => format!("{} in {{ {} }}", r.key, vals()),
                "NotIn" => format!("{} not in {{ {} }}", r.key, vals()),
                "Exists" => format!("has({})", r.key),
                _ => format!("! has({})", r.key),
            });
        }
        if parts.is_empty() { "all()".into() } else { parts.join(" && ") }
    }

    fn validate(&self, path: &str, e: &mut Errors) {
        for k in self.match_labels.iter().flatten().map(|(k, _)| k) {
            check_label_key(k, &format!("{path}.matchLabels.{k}"), e);
        }
        for (i, r) in self.match_expressions.iter().flatten().enumerate() {
            let p = format!("{path}.matchExpressions[{i}]");
            check_label_key(&r.key, &format!("{p}.key"), e);
            check_enum(&r.operator, &["In", "NotIn", "Exists", "DoesNotExist"], &format!("{p}.operator"), e);
            let has_values = r.values.as_ref().is_some_and(|v| !v.is_empty());
            match r.operator.as_str() {
                "In" | "NotIn" if !has_values => {
                    e.push(FieldError::new(format!("{p}.values"), format!("{} needs at least one value", r.operator)))
                }
                "Exists" | "DoesNotExist" if has_values => {
                    e.push(FieldError::new(format!("{p}.values"), format!("{} takes no values", r.operator)))
                }
                _ => {}
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPort {
    pub protocol: Option<Protocol>,
    pub port: Option<IntOrString>,
    pub end_port: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    pub from: Option<Vec<NetworkPolicyPeer>>,
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    pub to: Option<Vec<NetworkPolicyPeer>>,
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct K8sNetworkPolicySpec {
    #[serde(default)]
    pub pod_selector: LabelSelector,
    pub policy_types: Option<Vec<PolicyType>>,
    pub ingress: Option<Vec<IngressRule>>,
    pub egress: Option<Vec<EgressRule>>,
}

fn check_peers(peers: &[NetworkPolicyPeer], path: &str, e: &mut Errors) {
    for (i, p) in peers.iter().enumerate() {
        let pp = format!("{path}[{i}]");
        if let Some(s) = &p.pod_selector {
            s.validate(&format!("{pp}.podSelector"), e);
        }
        if let Some(s) = &p.namespace_selector {
            s.validate(&format!("{pp}.namespaceSelector"), e);
        }
        if let Some(b) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                e.push(FieldError::new(
                    format!("{pp}.ipBlock"),
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ));
            }
            if let Some(net) = check_cidr(&b.cidr, &format!("{pp}.ipBlock.cidr"), e) {
                for (j, x) in b.except.iter().flatten().enumerate() {
                    let xp = format!("{pp}.ipBlock.except[{j}]");
                    if let Some(xn) = check_cidr(x, &xp, e) {
                        if !net.contains(&xn) || xn == net {
                            e.push(FieldError::new(xp, format!("{x} is not strictly inside {}", b.cidr)));
                        }
                    }
                }
            }
        }
        if p.pod_selector.is_none() && p.namespace_selector.is_none() && p.ip_block.is_none() {
            e.push(FieldError::new(pp, "a peer needs podSelector, namespaceSelector or ipBlock"));
        }
    }
}

fn check_np_ports(ports: &[NetworkPolicyPort], path: &str, e: &mut Errors) {
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("{path}[{i}]");
        if let Some(proto) = p.protocol.filter(|p| !matches!(p, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)) {
            e.push(FieldError::new(format!("{pp}.protocol"), format!("{proto} is not one of TCP, UDP, SCTP")));
        }
        match &p.port {
            Some(IntOrString::Int(n)) => check_port_number(*n, &format!("{pp}.port"), e),
            Some(IntOrString::Str(s)) => {
                if s.is_empty()
                    || s.len() > 15
                    || !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    e.push(FieldError::new(format!("{pp}.port"), format!("{s:?} is not a port number or named port")));
                }
            }
            None => {}
        }
        if let Some(end) = p.end_port {
            match &p.port {
                Some(IntOrString::Int(start)) if end >= *start && end <= 65535 => {}
                Some(IntOrString::Int(start)) => {
                    e.push(FieldError::new(format!("{pp}.endPort"), format!("{end} must be within {start}..65535")))
                }
                _ => e.push(FieldError::new(format!("{pp}.endPort"), "endPort needs a numeric port")),
            }
        }
    }
}

impl Spec for K8sNetworkPolicySpec {
    fn default_fields(&mut self, _meta: &ObjectMeta) {
        if self.policy_types.as_ref().is_none_or(Vec::is_empty) {
            let mut t = vec![PolicyType::Ingress];
            if self.egress.is_some() {
                t.push(PolicyType::Egress);
            }
            self.policy_types = Some(t);
        }
    }
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        self.pod_selector.validate("spec.podSelector", e);
        for (i, r) in self.ingress.iter().flatten().enumerate() {
            check_peers(r.from.as_deref().unwrap_or_default(), &format!("spec.ingress[{i}].from"), e);
            check_np_ports(r.ports.as_deref().unwrap_or_default(), &format!("spec.ingress[{i}].ports"), e);
        }
        for (i, r) in self.egress.iter().flatten().enumerate() {
            check_peers(r.to.as_deref().unwrap_or_default(), &format!("spec.egress[{i}].to"), e);
            check_np_ports(r.ports.as_deref().unwrap_or_default(), &format!("spec.egress[{i}].ports"), e);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub finalizers: Option<Vec<String>>,
}

impl Spec for NamespaceSpec {
    fn validate(&self, _meta: &ObjectMeta, _e: &mut Errors) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Selector;

    #[test]
    fn label_selector_translation() {
        let s = LabelSelector {
            match_labels: Some([("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "env".into(),
                    operator: "In".into(),
                    values: Some(vec!["prod".into(), "dev".into()]),
                },
                LabelSelectorRequirement { key: "x".into(), operator: "DoesNotExist".into(), values: None },
            ]),
        };
        let calico = s.to_calico();
        assert_eq!(calico, "a == '1' && b == '2' && env in { 'prod', 'dev' } && ! has(x)");
        let parsed = Selector::parse(&calico).unwrap();
        let labels: BTreeMap<String, String> =
            [("a", "1"), ("b", "2"), ("env", "dev")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(parsed.matches(&labels));
        assert_eq!(LabelSelector::default().to_calico(), "all()");
    }
}
