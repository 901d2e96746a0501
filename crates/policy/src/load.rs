//! Stored resources into the engine: the policy kinds, profiles, namespaces and network sets as
//! the datastore holds them. A resource that does not compile is an error naming it and its
//! field; the engine then keeps nothing of it (never half of it).

use gingham_api::k8s::K8sNetworkPolicySpec;
use gingham_api::policy::{GlobalNetworkPolicySpec, NetworkPolicySpec, NetworkSetSpec, ProfileSpec};
use gingham_api::{Kind, Object};

use crate::engine::{Engine, Item};
use crate::index::ItemData;
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
pub const KINDS: [Kind; 8] = [
    Kind::NetworkPolicy,
    Kind::GlobalNetworkPolicy,
    Kind::Profile,
    Kind::NetworkSet,
    Kind::GlobalNetworkSet,
    Kind::KubernetesNetworkPolicy,
    Kind::Namespace,
    Kind::Tier,
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
    )
}

fn set_item_key(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match kind {
        Kind::NetworkSet => format!("netset/{}/{name}", namespace.unwrap_or("default")),
        _ => format!("gnetset/{name}"),
    }
}

/// Put one stored resource into the engine. On error the resource is removed from the engine.
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
        remove(engine, kind, ns, name);
        format!("{}: {e}", what())
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
