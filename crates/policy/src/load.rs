//! Stored resources into the engine: the policy kinds, profiles, namespaces and network sets as
//! the datastore holds them. A resource that does not compile is an error naming it and its
//! field; the engine then keeps nothing of it (never half of it).

use gingham_api::k8s::K8sNetworkPolicySpec;
use std::collections::BTreeMap;

use gingham_api::policy::{GlobalNetworkPolicySpec, HostEndpointSpec, NetworkPolicySpec, NetworkSetSpec, ProfileSpec};
use gingham_api::{Kind, Object};

use ipnet::IpNet;

use crate::engine::{Engine, HOST_ENDPOINT_PREFIX, Item};
use crate::index::{ItemData, NamedPort};
use crate::rules::{self, NAMESPACE_LABEL};

/// The engine's name for a policy: `<namespace>/<name>` (Kubernetes ones as Calico names them,
/// `knp.default.<name>`), or `<name>` for global policies.
pub fn policy_key(kind: Kind, namespace: Option<&str>, name: &str) -> Option<String> {
    match kind {
        Kind::NetworkPolicy => Some(format!("{}/{name}", namespace.unwrap_or("default"))),
        Kind::KubernetesNetworkPolicy => {
            Some(format!("{}/{}{name}", namespace.unwrap_or("default"), crate::knp::NAME_PREFIX))
        }
        Kind::GlobalNetworkPolicy => Some(name.to_string()),
        _ => None,
    }
}

/// The kinds the engine takes whole from the datastore.
pub const KINDS: [Kind; 10] = [
    Kind::NetworkPolicy,
    Kind::GlobalNetworkPolicy,
    Kind::Profile,
    Kind::NetworkSet,
    Kind::GlobalNetworkSet,
    Kind::KubernetesNetworkPolicy,
    Kind::Namespace,
    Kind::Tier,
    Kind::HostEndpoint,
    // Not the engine's, but its failsafe ports and endpoint-to-host action shape the rules.
    Kind::FelixConfiguration,
];

/// Whether the engine cares about this kind (workload endpoints go through their own path).
pub fn handles(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::NetworkPolicy
            | Kind::KubernetesNetworkPolicy
            | Kind::GlobalNetworkPolicy
            | Kind::Profile
            | Kind::Namespace
            | Kind::NetworkSet
            | Kind::GlobalNetworkSet
            | Kind::Tier
            | Kind::HostEndpoint
    )
}

fn set_item_key(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match kind {
        Kind::NetworkSet => format!("netset/{}/{name}", namespace.unwrap_or("default")),
        _ => format!("gnetset/{name}"),
    }
}

/// Put one stored resource into the engine. On error a policy is enforced closed (its
/// selector, no rules: what it selects is denied in its directions) and anything else is
/// removed from the engine; the error names the resource and field.
pub fn put(engine: &mut Engine, obj: &Object) -> Result<(), String> {
    let Some(kind) = Kind::from_document(&obj.api_version, &obj.kind) else { return Ok(()) };
    let ns = obj.metadata.namespace.as_deref();
    let name = &obj.metadata.name;
    let what = || format!("{} {}{name}", kind.kind_name(), ns.map(|n| format!("{n}/")).unwrap_or_default());
    let result = (|| -> Result<(), String> {
        match kind {
            Kind::NetworkPolicy => {
                let spec: NetworkPolicySpec = obj.spec_as().map_err(|e| e.to_string())?;
                let p = rules::network_policy(&spec, ns.unwrap_or("default"))?;
                engine.set_policy(&policy_key(kind, ns, name).unwrap_or_default(), Some(p));
            }
            Kind::KubernetesNetworkPolicy => {
                let spec: K8sNetworkPolicySpec = obj.spec_as().map_err(|e| e.to_string())?;
                let p = rules::network_policy(&crate::knp::to_calico(&spec), ns.unwrap_or("default"))?;
                engine.set_policy(&policy_key(kind, ns, name).unwrap_or_default(), Some(p));
            }
            Kind::GlobalNetworkPolicy => {
                let spec: GlobalNetworkPolicySpec = obj.spec_as().map_err(|e| e.to_string())?;
                engine.set_policy(name, Some(rules::global_network_policy(&spec)?));
            }
            Kind::Profile => {
                let spec: ProfileSpec = obj.spec_as().map_err(|e| e.to_string())?;
                engine.set_profile(name, Some(rules::profile(&spec)?));
            }
            Kind::Namespace => engine.set_namespace(name, Some(&obj.metadata.labels)),
            Kind::Tier => {
                let spec: gingham_api::policy::TierSpec = obj.spec_as().map_err(|e| e.to_string())?;
                let pass_at_end = spec.default_action == Some(gingham_api::policy::Action::Pass);
                engine.set_tier(name, Some(crate::engine::Tier { order: spec.order, pass_at_end }));
            }
            Kind::HostEndpoint => {
                let spec: HostEndpointSpec = obj.spec_as().map_err(|e| e.to_string())?;
                let item = host_endpoint(&spec, &obj.metadata.labels, engine.node())?;
                engine.set_item(&format!("{HOST_ENDPOINT_PREFIX}{name}"), Some(item));
            }
            Kind::NetworkSet | Kind::GlobalNetworkSet => {
                let spec: NetworkSetSpec = obj.spec_as().map_err(|e| e.to_string())?;
                let mut labels = obj.metadata.labels.clone();
                let mut profiles = Vec::new();
                if let (Kind::NetworkSet, Some(n)) = (kind, ns) {
                    labels.insert(NAMESPACE_LABEL.into(), n.into());
                    profiles.push(format!("kns.{n}"));
                }
                let mut nets = Vec::new();
                for (i, n) in spec.nets.iter().flatten().enumerate() {
                    nets.push(n.parse().map_err(|_| format!("spec.nets[{i}]: {n:?} is not a CIDR"))?);
                }
                let data = ItemData { labels, profiles, nets, ports: Vec::new() };
                engine.set_item(&set_item_key(kind, ns, name), Some(Item { data, local_interface: None }));
            }
            _ => {}
        }
        Ok(())
    })();
    result.map_err(|e| {
        match closed(kind, obj) {
            Some(p) => engine.set_policy(&policy_key(kind, ns, name).unwrap_or_default(), Some(p)),
            // A missing profile would be taken as an implicit allow-all one.
            None if kind == Kind::Profile => engine.set_profile(name, Some(rules::Profile::default())),
            None => remove(engine, kind, ns, name),
        }
        format!("{}: {e}", what())
    })
}

/// A policy that failed to compile, as enforced: closed (see `rules::closed_network_policy`).
fn closed(kind: Kind, obj: &Object) -> Option<crate::rules::Policy> {
    let ns = obj.metadata.namespace.as_deref().unwrap_or("default");
    match kind {
        Kind::NetworkPolicy => rules::closed_network_policy(&obj.spec_as().ok()?, ns),
        Kind::KubernetesNetworkPolicy => {
            let spec: K8sNetworkPolicySpec = obj.spec_as().ok()?;
            rules::closed_network_policy(&crate::knp::to_calico(&spec), ns)
        }
        Kind::GlobalNetworkPolicy => rules::closed_global_network_policy(&obj.spec_as().ok()?),
        _ => None,
    }
}

/// Whether a resource compiles as the agents will compile it (for `apply` to refuse it first).
pub fn check(obj: &Object) -> Result<(), String> {
    put(&mut Engine::default(), obj)
}

/// A HostEndpoint as the engine takes it: selectable by its labels, its expected IPs in the
/// sets of selectors matching it; enforced on its interface (`*`: every host interface) when
/// it is this node's. One known by expectedIPs alone only takes part in selection here.
fn host_endpoint(spec: &HostEndpointSpec, labels: &BTreeMap<String, String>, node: &str) -> Result<Item, String> {
    let mut nets = Vec::new();
    for (i, ip) in spec.expected_ips.iter().flatten().enumerate() {
        let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("spec.expectedIPs[{i}]: {ip:?} is not an IP"))?;
        nets.push(IpNet::from(ip));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = u16::try_from(p.port).map_err(|_| format!("spec.ports[{i}].port: {} is not a port", p.port))?;
        ports.push(NamedPort { name: p.name.clone(), protocol: p.protocol.number(), port });
    }
    let iface = spec.interface_name.clone().filter(|i| !i.is_empty());
    let local = spec.node.as_deref() == Some(node) && !node.is_empty();
    Ok(Item {
        data: ItemData { labels: labels.clone(), profiles: spec.profiles.clone().unwrap_or_default(), nets, ports },
        local_interface: iface.filter(|_| local),
    })
}

/// A stored resource was deleted.
pub fn remove(engine: &mut Engine, kind: Kind, namespace: Option<&str>, name: &str) {
    match kind {
        Kind::NetworkPolicy | Kind::KubernetesNetworkPolicy | Kind::GlobalNetworkPolicy => {
            if let Some(k) = policy_key(kind, namespace, name) {
                engine.set_policy(&k, None);
            }
        }
        Kind::Profile => engine.set_profile(name, None),
        Kind::Namespace => engine.set_namespace(name, None),
        Kind::Tier => engine.set_tier(name, None),
        Kind::HostEndpoint => engine.set_item(&format!("{HOST_ENDPOINT_PREFIX}{name}"), None),
        Kind::NetworkSet | Kind::GlobalNetworkSet => engine.set_item(&set_item_key(kind, namespace, name), None),
        _ => {}
    }
}

/// A digest of the policy-kind resources as stored (key and revision of each): the agent
/// publishes the one it has programmed, so a tool can wait until every node enforces what the
/// datastore holds. FNV-1a over the sorted pairs, 52 bits (exact as a metric's float).
pub fn digest<'a>(items: impl IntoIterator<Item = (&'a str, i64)>) -> u64 {
    let mut v: Vec<(&str, i64)> = items.into_iter().collect();
    v.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, r) in v {
        for b in k.bytes().chain([0]).chain(r.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h & ((1 << 52) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: serde_json::Value) -> Object {
        serde_json::from_value(json).unwrap()
    }

    fn wep(engine: &mut Engine, iface: &str) {
        let labels = [("projectcalico.org/namespace".to_string(), "x".to_string())].into();
        let data = ItemData { labels, profiles: vec!["kns.x".into()], ..Default::default() };
        engine.set_item("wep/x/a", Some(Item { data, local_interface: Some(iface.into()) }));
    }

    #[test]
    fn a_policy_that_does_not_compile_is_enforced_closed() {
        let mut e = Engine::for_node("n1");
        wep(&mut e, "cali1");
        let bad = object(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"selector": "all()", "types": ["Egress"],
                     "egress": [{"action": "Allow", "protocol": "ICMP", "destination": {"ports": [80]}}]}
        }));
        let err = put(&mut e, &bad).unwrap_err();
        assert!(err.contains("NetworkPolicy x/web") && err.contains("spec.egress[0].protocol"), "{err}");
        assert_eq!(check(&bad).unwrap_err(), err);
        e.settle();
        let plan = e.plan("cali1").unwrap();
        assert_eq!(plan.egress[0].policies, vec!["x/web".to_string()], "still selects: {plan:?}");
        assert!(plan.ingress.is_empty());
        assert_eq!(e.policy("x/web").unwrap().egress, Some(vec![]), "no rule allows anything");

        // A broken profile denies rather than becoming an implicit allow-all one.
        let prof = object(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "Profile", "metadata": {"name": "kns.x"},
            "spec": {"ingress": [{"action": "Allow", "icmp": {"code": 1}}]}
        }));
        assert!(put(&mut e, &prof).unwrap_err().contains("Profile kns.x"));
        assert!(e.profile("kns.x").ingress.is_empty() && e.profile("kns.x").egress.is_empty());
    }

    #[test]
    fn host_endpoints_are_local_on_their_node_only() {
        let hep = |node: &str, iface: &str| {
            object(serde_json::json!({
                "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                "metadata": {"name": format!("{node}-eth0"), "labels": {"role": "node"}},
                "spec": {"node": node, "interfaceName": iface, "expectedIPs": ["192.0.2.1"],
                         "ports": [{"name": "ssh", "protocol": "TCP", "port": 22}]}
            }))
        };
        let mut e = Engine::for_node("n1");
        put(&mut e, &hep("n1", "eth0")).unwrap();
        put(&mut e, &hep("n2", "eth0")).unwrap();
        e.settle();
        let plan = e.plan("eth0").unwrap();
        assert!(plan.is_host_endpoint() && plan.key == "hep/n1-eth0", "{plan:?}");
        assert_eq!(e.plans().count(), 1, "n2's host endpoint is only selectable here");
        let remote = e.index().item("hep/n2-eth0").unwrap();
        assert_eq!(remote.nets, vec!["192.0.2.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(remote.ports[0], NamedPort { name: "ssh".into(), protocol: 6, port: 22 });
        remove(&mut e, Kind::HostEndpoint, None, "n1-eth0");
        e.settle();
        assert!(e.plan("eth0").is_none());
    }
}
