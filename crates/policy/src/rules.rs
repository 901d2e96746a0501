//! The rule model, parsed once: every selector parsed and widened to its effective form (the
//! namespace and service-account clauses Calico adds), every net and port range parsed. An error
//! names the field, so a stored policy that does not compile is reported and never half-used.

use std::collections::BTreeMap;

use gingham_api::object::IntOrString;
use gingham_api::policy::{EntityRule, GlobalNetworkPolicySpec, NetworkPolicySpec, ProfileSpec};
use gingham_api::{Selector, policy as api};
use ipnet::IpNet;

pub const NAMESPACE_LABEL: &str = "projectcalico.org/namespace";
pub const ORCHESTRATOR_LABEL: &str = "projectcalico.org/orchestrator";
pub const SERVICE_ACCOUNT_LABEL: &str = "projectcalico.org/serviceaccount";
/// Namespace labels as endpoints inherit them (through the `kns.` profile).
pub const NAMESPACE_PREFIX: &str = "pcns.";
/// Service-account labels as endpoints inherit them (through the `ksa.` profile).
pub const SERVICE_ACCOUNT_PREFIX: &str = "pcsa.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Pass,
    Log,
}

/// A port match: a range (a single port is lo == hi) or a named port of the endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Port {
    Range(u16, u16),
    Named(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Icmp {
    pub kind: u8,
    pub code: Option<u8>,
}

/// One side of a rule. `selector` is the effective selector (namespace and service-account
/// clauses folded in); None matches any address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Entity {
    pub nets: Vec<IpNet>,
    pub not_nets: Vec<IpNet>,
    pub selector: Option<Selector>,
    pub not_selector: Option<Selector>,
    pub ports: Vec<Port>,
    pub not_ports: Vec<Port>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub action: Action,
    pub ip_version: Option<u8>,
    pub protocol: Option<u8>,
    pub not_protocol: Option<u8>,
    pub icmp: Option<Icmp>,
    pub not_icmp: Option<Icmp>,
    pub source: Entity,
    pub destination: Entity,
}

/// A policy of either kind, compiled. `ingress`/`egress` are None when the policy's `types`
/// leave that direction out (an empty list is default-deny for the endpoints it selects).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub tier: String,
    pub order: Option<f64>,
    pub selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    pub labels_to_apply: BTreeMap<String, String>,
}

impl Profile {
    /// A profile that allows everything both ways (Kubernetes namespaces, CNI networks).
    pub fn allow_all(labels_to_apply: BTreeMap<String, String>) -> Profile {
        let allow = || vec![Rule::allow_any()];
        Profile { ingress: allow(), egress: allow(), labels_to_apply }
    }
}

impl Rule {
    pub fn allow_any() -> Rule {
        Rule {
            action: Action::Allow,
            ip_version: None,
            protocol: None,
            not_protocol: None,
            icmp: None,
            not_icmp: None,
            source: Entity::default(),
            destination: Entity::default(),
        }
    }
}

/// `a && b && …` without `all()` operands; `all()` when nothing is left.
pub fn and(parts: impl IntoIterator<Item = Selector>) -> Selector {
    let mut ops = Vec::new();
    for p in parts {
        match p {
            Selector::All => {}
            Selector::And(inner) => ops.extend(inner),
            s => ops.push(s),
        }
    }
    match ops.len() {
        0 => Selector::All,
        1 => ops.pop().unwrap_or(Selector::All),
        _ => Selector::And(ops),
    }
}

/// The selector with every label key prefixed (`pcns.`, `pcsa.`).
pub fn prefixed(s: &Selector, p: &str) -> Selector {
    let k = |k: &String| format!("{p}{k}");
    match s {
        Selector::All => Selector::All,
        Selector::Global => Selector::Global,
        Selector::Has(a) => Selector::Has(k(a)),
        Selector::Eq(a, v) => Selector::Eq(k(a), v.clone()),
        Selector::Ne(a, v) => Selector::Ne(k(a), v.clone()),
        Selector::Contains(a, v) => Selector::Contains(k(a), v.clone()),
        Selector::StartsWith(a, v) => Selector::StartsWith(k(a), v.clone()),
        Selector::EndsWith(a, v) => Selector::EndsWith(k(a), v.clone()),
        Selector::In(a, v) => Selector::In(k(a), v.clone()),
        Selector::NotIn(a, v) => Selector::NotIn(k(a), v.clone()),
        Selector::Not(i) => Selector::Not(Box::new(prefixed(i, p))),
        Selector::And(o) => Selector::And(o.iter().map(|s| prefixed(s, p)).collect()),
        Selector::Or(o) => Selector::Or(o.iter().map(|s| prefixed(s, p)).collect()),
    }
}

fn parse_sel(s: &str, path: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| format!("{path}: {e}"))
}

/// A namespaceSelector as a selector on endpoints: `all()` is every namespaced endpoint,
/// `global()` every endpoint without a namespace.
fn namespace_selector(s: &str, path: &str) -> Result<Selector, String> {
    Ok(match parse_sel(s, path)? {
        Selector::All => Selector::Has(NAMESPACE_LABEL.into()),
        Selector::Global => Selector::Not(Box::new(Selector::Has(NAMESPACE_LABEL.into()))),
        s => prefixed(&s, NAMESPACE_PREFIX),
    })
}

fn service_accounts(m: &api::ServiceAccountMatch, path: &str) -> Result<Vec<Selector>, String> {
    let mut out = Vec::new();
    if let Some(names) = m.names.as_ref().filter(|n| !n.is_empty()) {
        out.push(Selector::In(SERVICE_ACCOUNT_LABEL.into(), names.iter().cloned().collect()));
    }
    if let Some(s) = &m.selector {
        out.push(prefixed(&parse_sel(s, &format!("{path}.selector"))?, SERVICE_ACCOUNT_PREFIX));
    }
    Ok(out)
}

fn nets(list: &Option<Vec<String>>, path: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for (i, n) in list.iter().flatten().enumerate() {
        let net = n
            .parse::<IpNet>()
            .or_else(|_| n.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{path}[{i}]: {n:?} is not a CIDR"))?;
        out.push(net.trunc());
    }
    Ok(out)
}

pub fn port(p: &IntOrString, path: &str) -> Result<Port, String> {
    let bad = || format!("{path}: {p:?} is not a port, port range or named port");
    let num = |n: i64| u16::try_from(n).map_err(|_| bad());
    match p {
        IntOrString::Int(n) => num(*n).map(|n| Port::Range(n, n)),
        IntOrString::Str(s) => match s.split_once(':') {
            Some((lo, hi)) => match (lo.parse::<u16>(), hi.parse::<u16>()) {
                (Ok(lo), Ok(hi)) if lo <= hi => Ok(Port::Range(lo, hi)),
                _ => Err(bad()),
            },
            None => match s.parse::<u16>() {
                Ok(n) => Ok(Port::Range(n, n)),
                Err(_) if !s.is_empty() && s.len() <= 15 => Ok(Port::Named(s.clone())),
                Err(_) => Err(bad()),
            },
        },
    }
}

fn ports(list: &Option<Vec<IntOrString>>, path: &str) -> Result<Vec<Port>, String> {
    list.iter().flatten().enumerate().map(|(i, p)| port(p, &format!("{path}[{i}]"))).collect()
}

/// One side of a rule, widened as Calico does for a policy in `namespace` (None: global).
fn entity(e: Option<&EntityRule>, namespace: Option<&str>, path: &str) -> Result<Entity, String> {
    let Some(e) = e else { return Ok(Entity::default()) };
    let mut parts = Vec::new();
    let sa = match &e.service_accounts {
        Some(m) => service_accounts(m, &format!("{path}.serviceAccounts"))?,
        None => Vec::new(),
    };
    let selects = e.selector.is_some() || e.not_selector.is_some() || !sa.is_empty();
    match (&e.namespace_selector, namespace) {
        (Some(ns), _) => parts.push(namespace_selector(ns, &format!("{path}.namespaceSelector"))?),
        (None, Some(ns)) if selects => parts.push(Selector::Eq(NAMESPACE_LABEL.into(), ns.into())),
        _ => {}
    }
    if let Some(s) = &e.selector {
        parts.push(parse_sel(s, &format!("{path}.selector"))?);
    }
    parts.extend(sa);
    let selector = (!parts.is_empty()).then(|| and(parts));
    let not_selector = match &e.not_selector {
        Some(s) => Some(parse_sel(s, &format!("{path}.notSelector"))?),
        None => None,
    };
    if e.services.is_some() {
        return Err(format!("{path}.services: Service matches need the Kubernetes datastore (not supported yet)"));
    }
    Ok(Entity {
        nets: nets(&e.nets, &format!("{path}.nets"))?,
        not_nets: nets(&e.not_nets, &format!("{path}.notNets"))?,
        selector,
        not_selector,
        ports: ports(&e.ports, &format!("{path}.ports"))?,
        not_ports: ports(&e.not_ports, &format!("{path}.notPorts"))?,
    })
}

fn icmp(f: &Option<api::IcmpFields>, path: &str) -> Result<Option<Icmp>, String> {
    let Some(f) = f else { return Ok(None) };
    let byte = |v: i64, p: &str| u8::try_from(v).map_err(|_| format!("{path}.{p}: {v} is outside 0..255"));
    let kind = match f.icmp_type {
        Some(t) => byte(t, "type")?,
        None if f.code.is_some() => return Err(format!("{path}.code: an ICMP code needs an ICMP type")),
        None => return Ok(None),
    };
    Ok(Some(Icmp { kind, code: f.code.map(|c| byte(c, "code")).transpose()? }))
}

pub fn rule(r: &api::Rule, namespace: Option<&str>, path: &str) -> Result<Rule, String> {
    let action = match r.action {
        Some(api::Action::Allow) => Action::Allow,
        Some(api::Action::Deny) => Action::Deny,
        Some(api::Action::Pass) => Action::Pass,
        Some(api::Action::Log) => Action::Log,
        None => return Err(format!("{path}.action: an action is required")),
    };
    let ip_version = match r.ip_version {
        None => None,
        Some(v @ (4 | 6)) => Some(v as u8),
        Some(v) => return Err(format!("{path}.ipVersion: {v} is not 4 or 6")),
    };
    let src = entity(r.source.as_ref(), namespace, &format!("{path}.source"))?;
    let dst = entity(r.destination.as_ref(), namespace, &format!("{path}.destination"))?;
    let protocol = r.protocol.map(|p| p.number());
    if !(src.ports.is_empty() && src.not_ports.is_empty() && dst.ports.is_empty() && dst.not_ports.is_empty())
        && !matches!(protocol, Some(6 | 17 | 132 | 136))
    {
        return Err(format!("{path}.protocol: ports need protocol TCP, UDP, SCTP or UDPLite"));
    }
    let (icmp_m, not_icmp) = (icmp(&r.icmp, &format!("{path}.icmp"))?, icmp(&r.not_icmp, &format!("{path}.notICMP"))?);
    if (icmp_m.is_some() || not_icmp.is_some()) && !matches!(protocol, Some(1 | 58)) {
        return Err(format!("{path}.icmp: ICMP matches need protocol ICMP or ICMPv6"));
    }
    Ok(Rule {
        action,
        ip_version,
        protocol,
        not_protocol: r.not_protocol.map(|p| p.number()),
        icmp: icmp_m,
        not_icmp,
        source: src,
        destination: dst,
    })
}

fn rules(list: &Option<Vec<api::Rule>>, namespace: Option<&str>, path: &str) -> Result<Vec<Rule>, String> {
    list.iter().flatten().enumerate().map(|(i, r)| rule(r, namespace, &format!("{path}[{i}]"))).collect()
}

/// The directions a policy covers: its types as stored; if absent (another writer), Calico's
/// defaulting from the rules present.
fn policy_types(
    types: &Option<Vec<api::PolicyType>>,
    ingress: &Option<Vec<api::Rule>>,
    egress: &Option<Vec<api::Rule>>,
) -> (bool, bool) {
    let has = |l: &Option<Vec<api::Rule>>| l.as_ref().is_some_and(|r| !r.is_empty());
    match types.as_ref().filter(|t| !t.is_empty()) {
        Some(t) => (t.contains(&api::PolicyType::Ingress), t.contains(&api::PolicyType::Egress)),
        None => (has(ingress) || !has(egress), has(egress)),
    }
}

fn directions(
    types: &Option<Vec<api::PolicyType>>,
    ingress: &Option<Vec<api::Rule>>,
    egress: &Option<Vec<api::Rule>>,
    namespace: Option<&str>,
) -> Result<(Option<Vec<Rule>>, Option<Vec<Rule>>), String> {
    let (i, e) = policy_types(types, ingress, egress);
    Ok((
        if i { Some(rules(ingress, namespace, "spec.ingress")?) } else { None },
        if e { Some(rules(egress, namespace, "spec.egress")?) } else { None },
    ))
}

fn tier(t: &Option<String>) -> String {
    t.clone().filter(|t| !t.is_empty()).unwrap_or_else(|| "default".into())
}

fn network_policy_selector(spec: &NetworkPolicySpec, namespace: &str) -> Result<Selector, String> {
    let mut parts = vec![parse_sel(spec.selector.as_deref().unwrap_or("all()"), "spec.selector")?];
    if let Some(s) = &spec.service_account_selector {
        parts.push(prefixed(&parse_sel(s, "spec.serviceAccountSelector")?, SERVICE_ACCOUNT_PREFIX));
    }
    parts.push(Selector::Eq(NAMESPACE_LABEL.into(), namespace.into()));
    Ok(and(parts))
}

/// A namespaced NetworkPolicy: its selector is restricted to its own namespace.
pub fn network_policy(spec: &NetworkPolicySpec, namespace: &str) -> Result<Policy, String> {
    let selector = network_policy_selector(spec, namespace)?;
    let (ingress, egress) = directions(&spec.types, &spec.ingress, &spec.egress, Some(namespace))?;
    Ok(Policy { tier: tier(&spec.tier), order: spec.order, selector, ingress, egress })
}

fn global_network_policy_selector(spec: &GlobalNetworkPolicySpec) -> Result<Selector, String> {
    let mut parts = vec![parse_sel(spec.selector.as_deref().unwrap_or("all()"), "spec.selector")?];
    if let Some(s) = &spec.namespace_selector {
        parts.push(namespace_selector(s, "spec.namespaceSelector")?);
    }
    if let Some(s) = &spec.service_account_selector {
        parts.push(prefixed(&parse_sel(s, "spec.serviceAccountSelector")?, SERVICE_ACCOUNT_PREFIX));
    }
    Ok(and(parts))
}

pub fn global_network_policy(spec: &GlobalNetworkPolicySpec) -> Result<Policy, String> {
    if spec.do_not_track == Some(true) || spec.pre_dnat == Some(true) {
        return Err("spec.doNotTrack/preDNAT: untracked and pre-DNAT policies are not supported yet".into());
    }
    let selector = global_network_policy_selector(spec)?;
    let (ingress, egress) = directions(&spec.types, &spec.ingress, &spec.egress, None)?;
    Ok(Policy { tier: tier(&spec.tier), order: spec.order, selector, ingress, egress })
}

/// What a policy that does not compile is enforced as: its selector and directions with no
/// rules, so what it selects is denied there rather than opened because one rule was bad.
/// None when even the selector is unreadable (then nothing can say what it would select).
fn closed(
    selector: Result<Selector, String>,
    tier_name: &Option<String>,
    order: Option<f64>,
    types: &Option<Vec<api::PolicyType>>,
    ingress: &Option<Vec<api::Rule>>,
    egress: &Option<Vec<api::Rule>>,
) -> Option<Policy> {
    let (i, e) = policy_types(types, ingress, egress);
    Some(Policy {
        tier: tier(tier_name),
        order,
        selector: selector.ok()?,
        ingress: i.then(Vec::new),
        egress: e.then(Vec::new),
    })
}

pub fn closed_network_policy(spec: &NetworkPolicySpec, namespace: &str) -> Option<Policy> {
    let sel = network_policy_selector(spec, namespace);
    closed(sel, &spec.tier, spec.order, &spec.types, &spec.ingress, &spec.egress)
}

pub fn closed_global_network_policy(spec: &GlobalNetworkPolicySpec) -> Option<Policy> {
    let sel = global_network_policy_selector(spec);
    closed(sel, &spec.tier, spec.order, &spec.types, &spec.ingress, &spec.egress)
}

pub fn profile(spec: &ProfileSpec) -> Result<Profile, String> {
    Ok(Profile {
        ingress: rules(&spec.ingress, None, "spec.ingress")?,
        egress: rules(&spec.egress, None, "spec.egress")?,
        labels_to_apply: spec.labels_to_apply.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(yaml: &str) -> NetworkPolicySpec {
        serde_saphyr_free_json(yaml)
    }

    // Specs in JSON (no YAML parser in this crate's dependencies).
    fn serde_saphyr_free_json<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rule_selectors_are_widened_as_calico_does() {
        let spec = np(r#"{"selector":"app == 'api'","types":["Ingress"],"ingress":[
            {"action":"Allow","protocol":"TCP","source":{"selector":"app == 'web'"},"destination":{"ports":[80,"8000:8080","http"]}},
            {"action":"Allow","source":{"namespaceSelector":"team == 'a'","serviceAccounts":{"names":["x"]}}},
            {"action":"Deny","source":{"nets":["10.0.0.0/8"],"notSelector":"has(b)"}}]}"#);
        let p = network_policy(&spec, "prod").unwrap();
        assert_eq!(p.selector.to_string(), "(app == \"api\" && projectcalico.org/namespace == \"prod\")");
        assert!(p.egress.is_none());
        let r = p.ingress.unwrap();
        assert_eq!(
            r[0].source.selector.as_ref().unwrap().to_string(),
            "(projectcalico.org/namespace == \"prod\" && app == \"web\")"
        );
        assert_eq!(
            r[0].destination.ports,
            vec![Port::Range(80, 80), Port::Range(8000, 8080), Port::Named("http".into())]
        );
        assert_eq!(
            r[1].source.selector.as_ref().unwrap().to_string(),
            "(pcns.team == \"a\" && projectcalico.org/serviceaccount in {\"x\"})"
        );
        // notSelector alone still keeps the rule to the policy's namespace; nets are not namespaced.
        assert_eq!(r[2].source.selector.as_ref().unwrap().to_string(), "projectcalico.org/namespace == \"prod\"");
        assert_eq!(r[2].source.nets, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(r[2].action, Action::Deny);
    }

    #[test]
    fn bad_stored_rules_are_errors_naming_the_field() {
        let spec = np(r#"{"ingress":[{"action":"Allow"},{"action":"Allow","destination":{"ports":[80]}}]}"#);
        let e = network_policy(&spec, "a").unwrap_err();
        assert!(e.starts_with("spec.ingress[1].protocol"), "{e}");
        let spec = np(r#"{"egress":[{"action":"Allow","source":{"selector":"a ==="}}]}"#);
        assert!(network_policy(&spec, "a").unwrap_err().starts_with("spec.egress[0].source.selector"));
        let g: GlobalNetworkPolicySpec = serde_saphyr_free_json(r#"{"namespaceSelector":"all()"}"#);
        let p = global_network_policy(&g).unwrap();
        assert_eq!(p.selector.to_string(), "has(projectcalico.org/namespace)");
        assert_eq!(p.ingress, Some(vec![]), "no types and no rules: ingress, default deny");
    }
}
