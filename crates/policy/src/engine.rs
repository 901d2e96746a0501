//! The calculation: which policies and profiles apply to each local endpoint, in order, and
//! which sets their rules need. Only what a local endpoint uses is active (Felix's
//! active-rules calculator): a policy selecting nothing here costs a selector check per local
//! endpoint change and nothing else. Callers feed changes and take what became dirty.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;

use crate::index::{Index, ItemData, SetSpec};
use crate::labels::{ByLabel, Selectors};
use crate::rules::{Policy, Port, Profile, Rule};

pub use crate::index::{ItemKey, Member, NamedPort};

/// `<namespace>/<name>` for namespaced policies, `<name>` for global ones (Calico's display).
pub type PolicyKey = String;

/// The default tier's order (Calico: tiers without an order come last, `default` at 1,000,000).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;

#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    pub order: Option<f64>,
    /// What the end of the tier does to a packet no policy decided: drop (Calico's default) or pass.
    pub pass_at_end: bool,
}

/// One tier's part of an endpoint's policy in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierPlan {
    pub name: String,
    pub policies: Vec<PolicyKey>,
    pub pass_at_end: bool,
}

/// A local endpoint's whole policy: per direction the tiers with their policies in order (empty:
/// no policy, straight to the profiles), then the profiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPlan {
    pub key: ItemKey,
    pub ips: Vec<IpNet>,
    pub ingress: Vec<TierPlan>,
    pub egress: Vec<TierPlan>,
    pub profiles: Vec<String>,
}

/// What changed since the last `take_dirty`: look each up for its new value (absent: remove).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub sets: BTreeSet<String>,
    pub policies: BTreeSet<PolicyKey>,
    pub profiles: BTreeSet<String>,
    /// Local endpoints by host interface.
    pub endpoints: BTreeSet<String>,
}

/// A thing policy can select, as the engine takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Item {
    pub data: ItemData,
    /// The host-side interface when the endpoint is on this node.
    pub local_interface: Option<String>,
}

#[derive(Default)]
pub struct Engine {
    index: Index,
    policies: BTreeMap<PolicyKey, Policy>,
    profiles: HashMap<String, Profile>,
    tiers: HashMap<String, Tier>,
    /// Local endpoints: item key → interface, and the policies applying to each.
    locals: BTreeMap<ItemKey, String>,
    applying: HashMap<ItemKey, BTreeSet<PolicyKey>>,
    /// Active policies and profiles: how many local endpoints use each, and the sets they hold.
    policy_users: HashMap<PolicyKey, (usize, Vec<String>)>,
    profile_users: HashMap<String, (usize, Vec<String>)>,
    plans: HashMap<String, EndpointPlan>,
    /// Local endpoints whose policies changed, replanned once at `settle` (a full sync of
    /// thousands of policies replans each endpoint once, not once per policy).
    pending: HashMap<ItemKey, BTreeSet<PolicyKey>>,
    dirty: Dirty,
    /// This node's name: its host endpoints are local.
    node: String,
    /// Local endpoints by label, and policies by a label their selector requires: a policy
    /// change meets only the endpoints it may select, a label change only the policies that
    /// may select it.
    local_labels: ByLabel<ItemKey>,
    policy_selectors: Selectors<PolicyKey>,
}

/// Item keys of host endpoints start with this.
pub const HOST_ENDPOINT_PREFIX: &str = "hep/";

impl EndpointPlan {
    /// A host endpoint's plan (its chains guard the host's own traffic, not a workload's).
    pub fn is_host_endpoint(&self) -> bool {
        self.key.starts_with(HOST_ENDPOINT_PREFIX)
    }
}

/// The sets a rule's matches need.
pub fn rule_sets(r: &Rule) -> Vec<SetSpec> {
    let mut out = Vec::new();
    for e in [&r.source, &r.destination] {
        for s in [&e.selector, &e.not_selector].into_iter().flatten() {
            out.push(SetSpec { selector: Some(s.clone()), named: None });
        }
        for p in e.ports.iter().chain(&e.not_ports) {
            if let (Port::Named(n), Some(proto)) = (p, r.protocol) {
                out.push(SetSpec { selector: e.selector.clone(), named: Some((proto, n.clone())) });
            }
        }
    }
    out
}

fn rules_sets<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<SetSpec> {
    rules.flat_map(rule_sets).collect()
}

impl Engine {
    /// The engine of node `node` (whose host endpoints it enforces).
    pub fn for_node(node: &str) -> Engine {
        Engine { node: node.into(), ..Default::default() }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn policy(&self, key: &str) -> Option<&Policy> {
        self.policies.get(key)
    }

    pub fn policies(&self) -> impl Iterator<Item = (&PolicyKey, &Policy)> {
        self.policies.iter()
    }

    /// Whether a policy is programmed here (selects a local endpoint).
    pub fn is_active(&self, key: &str) -> bool {
        self.policy_users.contains_key(key)
    }

    pub fn profile_active(&self, name: &str) -> bool {
        self.profile_users.contains_key(name)
    }

    /// A profile as enforced: the stored one, else Calico's implicit ones — a Kubernetes
    /// namespace's `kns.` and a CNI network's profile allow everything, `ksa.` has no rules.
    pub fn profile(&self, name: &str) -> Profile {
        match self.profiles.get(name) {
            Some(p) => p.clone(),
            None if name.starts_with("ksa.") => Profile::default(),
            None => Profile::allow_all(BTreeMap::new()),
        }
    }

    pub fn plan(&self, iface: &str) -> Option<&EndpointPlan> {
        self.plans.get(iface)
    }

    pub fn plans(&self) -> impl Iterator<Item = (&String, &EndpointPlan)> {
        self.plans.iter()
    }

    /// Replan the endpoints whose policies changed since the last call.
    pub fn settle(&mut self) {
        for (k, now) in std::mem::take(&mut self.pending) {
            self.replan_with(&k, now);
        }
    }

    pub fn take_dirty(&mut self) -> Dirty {
        self.settle();
        let mut d = std::mem::take(&mut self.dirty);
        d.sets = self.index.take_dirty();
        d
    }

    pub fn set_tier(&mut self, name: &str, tier: Option<Tier>) {
        match tier {
            Some(t) => self.tiers.insert(name.into(), t),
            None => self.tiers.remove(name),
        };
        let locals: Vec<ItemKey> = self.locals.keys().cloned().collect();
        for k in locals {
            self.replan(&k);
        }
    }

    /// A namespace's labels, as its endpoints inherit them (`pcns.` through `kns.<name>`).
    pub fn set_namespace(&mut self, name: &str, labels: Option<&BTreeMap<String, String>>) {
        let mut l: BTreeMap<String, String> =
            labels.into_iter().flatten().map(|(k, v)| (format!("pcns.{k}"), v.clone())).collect();
        if labels.is_some() {
            l.insert("pcns.projectcalico.org/name".into(), name.into());
        }
        self.index.set_profile_labels(&format!("kns.{name}"), l);
        self.relabelled();
    }

    pub fn set_profile(&mut self, name: &str, profile: Option<Profile>) {
        let labels = profile.as_ref().map(|p| p.labels_to_apply.clone()).unwrap_or_default();
        match profile {
            Some(p) => self.profiles.insert(name.into(), p),
            None => self.profiles.remove(name),
        };
        if let Some((n, held)) = self.profile_users.remove(name) {
            for id in held {
                self.index.release_set(&id);
            }
            let held = self.use_sets_of_profile(name);
            self.profile_users.insert(name.into(), (n, held));
        }
        self.dirty.profiles.insert(name.into());
        self.index.set_profile_labels(name, labels);
        self.relabelled();
    }

    fn use_sets_of_profile(&mut self, name: &str) -> Vec<String> {
        let p = self.profile(name);
        rules_sets(p.ingress.iter().chain(&p.egress)).iter().map(|s| self.index.use_set(s)).collect()
    }

    /// Local endpoints whose labels changed (through a namespace or profile) get replanned.
    fn relabelled(&mut self) {
        for k in self.index.take_changed_items() {
            if self.locals.contains_key(&k) {
                self.replan(&k);
            }
        }
    }

    pub fn set_policy(&mut self, key: &str, policy: Option<Policy>) {
        let old = match policy {
            Some(p) => self.policies.insert(key.into(), p),
            None => self.policies.remove(key),
        };
        // Held sets move to the new rules (taken before released, so shared sets stay).
        if let Some((n, held)) = self.policy_users.remove(key) {
            let new = self.use_sets_of_policy(key);
            for id in held {
                self.index.release_set(&id);
            }
            if self.policies.contains_key(key) {
                self.policy_users.insert(key.into(), (n, new));
            }
        }
        self.dirty.policies.insert(key.into());
        let selector_same = match (&old, self.policies.get(key)) {
            (Some(a), Some(b)) => {
                a.selector == b.selector
                    && a.tier == b.tier
                    && a.order == b.order
                    && a.ingress.is_some() == b.ingress.is_some()
                    && a.egress.is_some() == b.egress.is_some()
            }
            (None, None) => true,
            _ => false,
        };
        self.policy_selectors.set(&key.to_string(), self.policies.get(key).map(|p| &p.selector));
        if !selector_same {
            // Only this policy's selector is evaluated, against the local endpoints it may have
            // selected before or may select now (those with a label each selector requires).
            let may = |sel: Option<&gingham_api::Selector>| match sel {
                None => Some(Vec::new()),
                Some(s) => self.local_labels.candidates(s),
            };
            let locals: Vec<ItemKey> =
                match (may(old.as_ref().map(|p| &p.selector)), may(self.policies.get(key).map(|p| &p.selector))) {
                    (Some(mut a), Some(b)) => {
                        a.extend(b);
                        a.sort();
                        a.dedup();
                        a
                    }
                    _ => self.locals.keys().cloned().collect(),
                };
            for k in locals {
                if !self.locals.contains_key(&k) {
                    continue;
                }
                let Some(labels) = self.index.labels(&k) else { continue };
                let selects = self.policies.get(key).is_some_and(|p| Index::matches(&p.selector, labels));
                let had = self.pending.get(&k).or(self.applying.get(&k)).is_some_and(|s| s.contains(key));
                if !had && !selects {
                    continue;
                }
                let applying = &self.applying;
                let now =
                    self.pending.entry(k.clone()).or_insert_with(|| applying.get(&k).cloned().unwrap_or_default());
                if selects {
                    now.insert(key.into());
                } else {
                    now.remove(key);
                }
            }
        }
    }

    fn use_sets_of_policy(&mut self, key: &str) -> Vec<String> {
        let Some(p) = self.policies.get(key) else { return Vec::new() };
        let specs = rules_sets(p.ingress.iter().flatten().chain(p.egress.iter().flatten()));
        specs.iter().map(|s| self.index.use_set(s)).collect()
    }

    pub fn set_item(&mut self, key: &str, item: Option<Item>) {
        let iface = item.as_ref().and_then(|i| i.local_interface.clone());
        self.index.set_item(key, item.map(|i| i.data));
        match (self.locals.get(key).cloned(), iface) {
            (Some(old), new) if new.as_ref() != Some(&old) => {
                self.unplan(key, &old);
                if let Some(n) = new {
                    self.locals.insert(key.into(), n);
                }
            }
            (None, Some(n)) => {
                self.locals.insert(key.into(), n);
            }
            _ => {}
        }
        if self.locals.contains_key(key) {
            self.replan(key);
        }
        self.relabelled();
    }

    fn unplan(&mut self, key: &str, iface: &str) {
        self.locals.remove(key);
        self.local_labels.set(&key.to_string(), None);
        self.pending.remove(key);
        for p in self.applying.remove(key).unwrap_or_default() {
            self.unuse_policy(&p);
        }
        if let Some(plan) = self.plans.remove(iface) {
            for p in plan.profiles {
                self.unuse_profile(&p);
            }
        }
        self.dirty.endpoints.insert(iface.into());
    }

    fn unuse_policy(&mut self, p: &str) {
        if Self::unuse(&mut self.policy_users, &mut self.index, p) {
            self.dirty.policies.insert(p.into());
        }
    }

    fn unuse_profile(&mut self, p: &str) {
        if Self::unuse(&mut self.profile_users, &mut self.index, p) {
            self.dirty.profiles.insert(p.into());
        }
    }

    /// One user fewer; the last one releases the sets held (true: no longer active).
    fn unuse(users: &mut HashMap<String, (usize, Vec<String>)>, index: &mut Index, name: &str) -> bool {
        let Some((n, _)) = users.get_mut(name) else { return false };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        for id in users.remove(name).map(|(_, held)| held).unwrap_or_default() {
            index.release_set(&id);
        }
        true
    }

    fn tier_order(&self, name: &str) -> f64 {
        match self.tiers.get(name) {
            Some(t) => t.order.unwrap_or(f64::INFINITY),
            None if name == "default" => DEFAULT_TIER_ORDER,
            None => f64::INFINITY,
        }
    }

    /// The policies that select these labels (any endpoint, local or not).
    pub fn selecting(&self, labels: &BTreeMap<String, String>) -> BTreeSet<PolicyKey> {
        self.policy_selectors
            .candidates(labels)
            .into_iter()
            .filter(|k| self.policies.get(*k).is_some_and(|p| Index::matches(&p.selector, labels)))
            .cloned()
            .collect()
    }

    /// Policies in evaluation order, grouped by tier, per direction (ingress, egress): tier
    /// (order, name), then policy order (none = last), then name.
    pub fn tiers_for(&self, keys: &BTreeSet<PolicyKey>) -> (Vec<TierPlan>, Vec<TierPlan>) {
        let mut ordered: Vec<(f64, &str, f64, &PolicyKey, &Policy)> = keys
            .iter()
            .filter_map(|k| {
                let p = self.policies.get(k)?;
                Some((self.tier_order(&p.tier), p.tier.as_str(), p.order.unwrap_or(f64::INFINITY), k, p))
            })
            .collect();
        ordered.sort_by(|a, b| {
            a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)).then_with(|| a.2.total_cmp(&b.2)).then_with(|| a.3.cmp(b.3))
        });
        let ordered: Vec<(&PolicyKey, &Policy)> = ordered.into_iter().map(|(_, _, _, k, p)| (k, p)).collect();
        let tiers = |ingress: bool| {
            let mut out: Vec<TierPlan> = Vec::new();
            for (k, p) in &ordered {
                if (ingress && p.ingress.is_none()) || (!ingress && p.egress.is_none()) {
                    continue;
                }
                match out.last_mut() {
                    Some(t) if t.name == p.tier => t.policies.push((*k).clone()),
                    _ => out.push(TierPlan {
                        name: p.tier.clone(),
                        policies: vec![(*k).clone()],
                        pass_at_end: self.tiers.get(&p.tier).is_some_and(|t| t.pass_at_end),
                    }),
                }
            }
            out
        };
        (tiers(true), tiers(false))
    }

    /// Recompute one local endpoint's plan; activate and deactivate what it starts or stops using.
    fn replan(&mut self, key: &str) {
        self.pending.remove(key);
        let Some(labels) = self.index.labels(key).cloned() else { return };
        self.local_labels.set(&key.to_string(), Some(&labels));
        let now = self.selecting(&labels);
        self.replan_with(key, now);
    }

    /// Replan a local endpoint given the policies that select it.
    fn replan_with(&mut self, key: &str, now: BTreeSet<PolicyKey>) {
        let Some(iface) = self.locals.get(key).cloned() else { return };
        let data = self.index.item(key).cloned().unwrap_or_default();
        let before = self.applying.insert(key.into(), now.clone()).unwrap_or_default();
        for p in now.difference(&before) {
            let entry = self.policy_users.entry(p.clone()).or_insert((0, Vec::new()));
            entry.0 += 1;
            if entry.0 == 1 {
                let held = self.use_sets_of_policy(p);
                if let Some(e) = self.policy_users.get_mut(p) {
                    e.1 = held;
                }
                self.dirty.policies.insert(p.clone());
            }
        }
        for p in before.difference(&now) {
            self.unuse_policy(p);
        }
        let (ingress, egress) = self.tiers_for(&now);
        let plan =
            EndpointPlan { key: key.into(), ips: data.nets.clone(), ingress, egress, profiles: data.profiles.clone() };
        let old_profiles = self.plans.get(&iface).map(|p| p.profiles.clone()).unwrap_or_default();
        for p in &plan.profiles {
            let entry = self.profile_users.entry(p.clone()).or_insert((0, Vec::new()));
            entry.0 += 1;
            if entry.0 == 1 {
                let held = self.use_sets_of_profile(p);
                if let Some(e) = self.profile_users.get_mut(p) {
                    e.1 = held;
                }
                self.dirty.profiles.insert(p.clone());
            }
        }
        for p in &old_profiles {
            self.unuse_profile(p);
        }
        if self.plans.get(&iface) != Some(&plan) {
            self.dirty.endpoints.insert(iface.clone());
            self.plans.insert(iface, plan);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::network_policy;

    fn wep(ns: &str, labels: &[(&str, &str)], ip: &str, iface: Option<&str>) -> Item {
        let mut l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.insert("projectcalico.org/namespace".into(), ns.into());
        Item {
            data: ItemData {
                labels: l,
                profiles: vec![format!("kns.{ns}")],
                nets: vec![ip.parse().unwrap()],
                ports: vec![],
            },
            local_interface: iface.map(str::to_string),
        }
    }

    fn np(json: &str, ns: &str) -> Policy {
        network_policy(&serde_json::from_str(json).unwrap(), ns).unwrap()
    }

    #[test]
    fn plans_order_policies_and_only_local_use_activates() {
        let mut e = Engine::default();
        e.set_item("wep/a/web", Some(wep("a", &[("app", "web")], "10.0.0.1/32", Some("cali1"))));
        e.set_item("wep/a/db", Some(wep("a", &[("app", "db")], "10.0.1.1/32", None)));
        let d = e.take_dirty();
        assert_eq!(d.endpoints, ["cali1".to_string()].into());
        assert_eq!(e.plan("cali1").unwrap().ingress, vec![]);
        assert_eq!(e.plan("cali1").unwrap().profiles, vec!["kns.a".to_string()]);
        e.set_policy("a/p2", Some(np(r#"{"order":10,"selector":"app == 'web'","ingress":[{"action":"Allow","source":{"selector":"app == 'db'"}}]}"#, "a")));
        e.set_policy("a/p1", Some(np(r#"{"order":10,"selector":"all()","types":["Ingress","Egress"]}"#, "a")));
        e.set_policy("a/p0", Some(np(r#"{"order":20,"selector":"app == 'web'","types":["Egress"]}"#, "a")));
        e.set_policy(
            "a/other",
            Some(np(
                r#"{"selector":"app == 'db'","ingress":[{"action":"Allow","source":{"selector":"x == 'y'"}}]}"#,
                "a",
            )),
        );
        e.set_policy("b/p", Some(np(r#"{"selector":"all()"}"#, "b")));
        e.settle();
        let plan = e.plan("cali1").unwrap();
        assert_eq!(plan.ingress[0].policies, vec!["a/p1".to_string(), "a/p2".to_string()], "order, then name");
        assert_eq!(plan.egress[0].policies, vec!["a/p1".to_string(), "a/p0".to_string()]);
        assert!(e.is_active("a/p2") && !e.is_active("a/other") && !e.is_active("b/p"));
        // Only the active policy's rule selector became a set, holding the db endpoint's address.
        let d = e.take_dirty();
        assert_eq!(d.sets.len(), 1);
        let id = d.sets.iter().next().unwrap();
        assert_eq!(e.index().members(id).unwrap().count(), 1);
        // The endpoint stops matching: p2 is no longer active and its set goes.
        e.set_item("wep/a/web", Some(wep("a", &[("app", "other")], "10.0.0.1/32", Some("cali1"))));
        assert!(!e.is_active("a/p2"));
        let d = e.take_dirty();
        assert!(d.policies.contains("a/p2") && d.sets.contains(id));
        assert!(e.index().members(id).is_none());
        e.set_item("wep/a/web", None);
        assert!(e.plan("cali1").is_none() && !e.is_active("a/p1"));
        assert!(!e.profile_active("kns.a"));
    }

    #[test]
    fn tiers_order_before_policies() {
        let mut e = Engine::default();
        e.set_item("wep/a/w", Some(wep("a", &[], "10.0.0.1/32", Some("cali1"))));
        let mut p = np(r#"{"order":1,"ingress":[{"action":"Pass"}]}"#, "a");
        e.set_policy("a/late", Some(p.clone()));
        p.tier = "security".into();
        p.order = Some(500.0);
        e.set_policy("a/security.first", Some(p));
        e.set_tier("security", Some(Tier { order: Some(100.0), pass_at_end: false }));
        e.settle();
        let plan = e.plan("cali1").unwrap();
        assert_eq!(plan.ingress.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["security", "default"]);
    }
}
