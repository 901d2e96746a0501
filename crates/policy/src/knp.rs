//! Kubernetes NetworkPolicy → Calico NetworkPolicy (reference §1.10): tier `default`, order
//! 1000, name `knp.default.<name>`, selectors with the orchestrator clause, one Allow rule per
//! peer × protocol, numeric ports merged into ranges. The result is compiled like any other
//! NetworkPolicy of its namespace.

use std::collections::BTreeMap;

use gingham_api::k8s::{K8sNetworkPolicySpec, LabelSelector, NetworkPolicyPeer, NetworkPolicyPort};
use gingham_api::object::IntOrString;
use gingham_api::policy::{Action, EntityRule, NetworkPolicySpec, PolicyType, Protocol, Rule};

pub const NAME_PREFIX: &str = "knp.default.";
pub const ORDER: f64 = 1000.0;
const K8S_PODS: &str = "projectcalico.org/orchestrator == 'k8s'";

fn pods(s: &LabelSelector) -> String {
    match s.to_calico().as_str() {
        "all()" => K8S_PODS.to_string(),
        sel => format!("{K8S_PODS} && {sel}"),
    }
}

/// The peer part of an entity rule (None: any peer).
fn peer(p: &NetworkPolicyPeer) -> EntityRule {
    if let Some(b) = &p.ip_block {
        return EntityRule { nets: Some(vec![b.cidr.clone()]), not_nets: b.except.clone(), ..Default::default() };
    }
    EntityRule {
        selector: Some(p.pod_selector.as_ref().map_or_else(|| K8S_PODS.to_string(), pods)),
        namespace_selector: p.namespace_selector.as_ref().map(LabelSelector::to_calico),
        ..Default::default()
    }
}

/// Ports grouped per protocol (TCP when unset), numeric ones merged into ranges; a protocol with
/// an entry without a port matches that whole protocol (an empty list).
fn port_groups(ports: &[NetworkPolicyPort]) -> Vec<(Protocol, Vec<IntOrString>)> {
    let mut groups: BTreeMap<Protocol, (bool, Vec<(i64, i64)>, Vec<String>)> = BTreeMap::new();
    for p in ports {
        let g = groups.entry(p.protocol.unwrap_or(Protocol::Tcp)).or_default();
        match &p.port {
            None => g.0 = true,
            Some(IntOrString::Int(n)) => g.1.push((*n, p.end_port.unwrap_or(*n))),
            Some(IntOrString::Str(s)) => match s.parse::<i64>() {
                Ok(n) => g.1.push((n, p.end_port.unwrap_or(n))),
                Err(_) => g.2.push(s.clone()),
            },
        }
    }
    groups
        .into_iter()
        .map(|(proto, (whole, mut ranges, named))| {
            if whole {
                return (proto, Vec::new());
            }
            ranges.sort();
            let mut merged: Vec<(i64, i64)> = Vec::new();
            for (lo, hi) in ranges {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            let mut out: Vec<IntOrString> = merged
                .into_iter()
                .map(|(lo, hi)| if lo == hi { IntOrString::Int(lo) } else { IntOrString::Str(format!("{lo}:{hi}")) })
                .collect();
            out.extend(named.into_iter().map(IntOrString::Str));
            (proto, out)
        })
        .collect()
}

/// One Kubernetes rule (peers, ports) as Calico rules: the cross product of peers and protocols.
fn expand(peers: &Option<Vec<NetworkPolicyPeer>>, ports: &Option<Vec<NetworkPolicyPort>>, ingress: bool) -> Vec<Rule> {
    let peers: Vec<Option<EntityRule>> = match peers.as_deref() {
        Some(p) if !p.is_empty() => p.iter().map(|p| Some(peer(p))).collect(),
        _ => vec![None],
    };
    let groups: Vec<Option<(Protocol, Vec<IntOrString>)>> = match ports.as_deref() {
        Some(p) if !p.is_empty() => port_groups(p).into_iter().map(Some).collect(),
        _ => vec![None],
    };
    let mut out = Vec::new();
    for p in &peers {
        for g in &groups {
            let ports = g.as_ref().map(|(_, ports)| ports.clone()).filter(|p| !p.is_empty());
            let mut other = p.clone().unwrap_or_default();
            let (source, destination) = if ingress {
                (p.clone(), ports.map(|ports| EntityRule { ports: Some(ports), ..Default::default() }))
            } else {
                other.ports = ports;
                (None, (p.is_some() || other.ports.is_some()).then_some(other))
            };
            out.push(Rule {
                action: Some(Action::Allow),
                protocol: g.as_ref().map(|(proto, _)| *proto),
                source,
                destination,
                ..Default::default()
            });
        }
    }
    out
}

/// The Calico NetworkPolicy gingham enforces for a Kubernetes one.
pub fn to_calico(spec: &K8sNetworkPolicySpec) -> NetworkPolicySpec {
    // Kubernetes' own defaulting (no API server did it for us): Ingress always, Egress when the
    // policy has egress rules.
    let types = match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        Some(t) => t.clone(),
        None if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => vec![PolicyType::Ingress, PolicyType::Egress],
        None => vec![PolicyType::Ingress],
    };
    let ingress = spec.ingress.iter().flatten().flat_map(|r| expand(&r.from, &r.ports, true)).collect();
    let egress = spec.egress.iter().flatten().flat_map(|r| expand(&r.to, &r.ports, false)).collect();
    NetworkPolicySpec {
        tier: Some("default".into()),
        order: Some(ORDER),
        selector: Some(pods(&spec.pod_selector)),
        types: Some(types),
        ingress: Some(ingress),
        egress: Some(egress),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Port, network_policy};

    #[test]
    fn translation_follows_calico() {
        let k: K8sNetworkPolicySpec = serde_json::from_str(
            r#"{"podSelector":{"matchLabels":{"app":"api"}},
                "ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"web"}}},
                                    {"namespaceSelector":{}},
                                    {"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}}],
                            "ports":[{"port":80},{"port":81},{"port":82},{"protocol":"UDP","port":53},
                                     {"port":9000,"endPort":9010},{"port":"metrics"}]}]}"#,
        )
        .unwrap();
        let c = to_calico(&k);
        assert_eq!(c.types, Some(vec![PolicyType::Ingress]));
        assert_eq!(c.ingress.as_ref().unwrap().len(), 6, "3 peers x 2 protocols");
        let p = network_policy(&c, "ns1").unwrap();
        assert_eq!(
            p.selector.to_string(),
            "(projectcalico.org/orchestrator == \"k8s\" && app == \"api\" && projectcalico.org/namespace == \"ns1\")"
        );
        let r = p.ingress.unwrap();
        assert_eq!(r[0].protocol, Some(6));
        assert_eq!(
            r[0].destination.ports,
            vec![Port::Range(80, 82), Port::Range(9000, 9010), Port::Named("metrics".into())]
        );
        assert_eq!(r[1].protocol, Some(17));
        assert_eq!(
            r[0].source.selector.as_ref().unwrap().to_string(),
            "(projectcalico.org/namespace == \"ns1\" && projectcalico.org/orchestrator == \"k8s\" && app == \"web\")"
        );
        assert_eq!(
            r[2].source.selector.as_ref().unwrap().to_string(),
            "(has(projectcalico.org/namespace) && projectcalico.org/orchestrator == \"k8s\")"
        );
        assert!(r[4].source.selector.is_none());
        assert_eq!(r[4].source.not_nets, vec!["10.1.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn policy_types_default_as_kubernetes() {
        let k: K8sNetworkPolicySpec = serde_json::from_str(r#"{"podSelector":{},"egress":[{}]}"#).unwrap();
        let p = network_policy(&to_calico(&k), "a").unwrap();
        assert_eq!(p.ingress, Some(vec![]), "ingress always: default deny");
        assert_eq!(p.egress.unwrap().len(), 1, "egress rule with no peers and ports: allow all");
        let k: K8sNetworkPolicySpec = serde_json::from_str(r#"{"podSelector":{},"egress":[]}"#).unwrap();
        assert!(network_policy(&to_calico(&k), "a").unwrap().egress.is_none());
    }
}
