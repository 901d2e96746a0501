//! The label index: every labelled thing policy can select (workload endpoints of every node,
//! host endpoints, network sets) with its effective labels (its own over those its profiles
//! apply), and the members of every selector set in use — addresses for a selector, address +
//! protocol + port for a named port. Incremental both ways: an item that changes is matched
//! against the sets in use; a set that comes into use is matched against the items once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use gingham_api::Selector;
use gingham_api::selector::Labels;
use ipnet::IpNet;

/// `wep/<namespace>/<name>`, `hep/<name>`, `netset/<namespace>/<name>`, `gnetset/<name>`.
pub type ItemKey = String;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: u8,
    pub port: u16,
}

/// A selectable thing as its resource gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemData {
    pub labels: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub nets: Vec<IpNet>,
    pub ports: Vec<NamedPort>,
}

/// What a set holds: addresses, or (address, protocol, port) for named ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Member {
    Net(IpNet),
    Port(IpAddr, u8, u16),
}

/// A set in use: which items (a selector, or all items for a named port without one), and for
/// named-port sets the port's protocol and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SetSpec {
    pub selector: Option<Selector>,
    pub named: Option<(u8, String)>,
}

impl SetSpec {
    /// Calico's set IDs: the selector's unique ID, `n:`-prefixed for named ports.
    pub fn id(&self) -> String {
        let sel = self.selector.as_ref().unwrap_or(&Selector::All);
        match &self.named {
            None => sel.unique_id(),
            Some((proto, name)) => {
                let s = Selector::Eq(format!("{proto}/{name}"), sel.to_string());
                format!("n:{}", &s.unique_id()[2..])
            }
        }
    }
}

struct SetState {
    spec: SetSpec,
    refs: usize,
    items: HashSet<ItemKey>,
    members: BTreeMap<Member, u32>,
}

struct Indexed {
    data: ItemData,
    labels: Arc<BTreeMap<String, String>>,
}

/// Labels of an item overlaid on what its profiles apply.
struct Layered<'a>(&'a BTreeMap<String, String>);

impl Labels for Layered<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

#[derive(Default)]
pub struct Index {
    items: HashMap<ItemKey, Indexed>,
    profile_labels: HashMap<String, BTreeMap<String, String>>,
    by_profile: HashMap<String, HashSet<ItemKey>>,
    sets: HashMap<String, SetState>,
    /// Sets whose members changed since the last `take_dirty`.
    dirty: BTreeSet<String>,
    /// Items whose effective labels changed since the last `take_changed_items`.
    changed: BTreeSet<ItemKey>,
}

fn members_of(spec: &SetSpec, data: &ItemData) -> Vec<Member> {
    match &spec.named {
        None => data.nets.iter().map(|n| Member::Net(*n)).collect(),
        Some((proto, name)) => data
            .ports
            .iter()
            .filter(|p| p.protocol == *proto && &p.name == name)
            .flat_map(|p| data.nets.iter().map(move |n| Member::Port(n.addr(), p.protocol, p.port)))
            .collect(),
    }
}

impl Index {
    pub fn labels(&self, key: &str) -> Option<&Arc<BTreeMap<String, String>>> {
        self.items.get(key).map(|i| &i.labels)
    }

    pub fn item(&self, key: &str) -> Option<&ItemData> {
        self.items.get(key).map(|i| &i.data)
    }

    pub fn items(&self) -> impl Iterator<Item = (&ItemKey, &ItemData, &BTreeMap<String, String>)> {
        self.items.iter().map(|(k, i)| (k, &i.data, &*i.labels))
    }

    fn effective(&self, data: &ItemData) -> BTreeMap<String, String> {
        let mut labels = data.labels.clone();
        for p in &data.profiles {
            for (k, v) in self.profile_labels.get(p).into_iter().flatten() {
                labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        labels
    }

    pub fn set_item(&mut self, key: &str, data: Option<ItemData>) {
        let old = self.items.remove(key);
        if let Some(old) = &old {
            for p in &old.data.profiles {
                if let Some(s) = self.by_profile.get_mut(p) {
                    s.remove(key);
                }
            }
        }
        let new = data.map(|data| {
            for p in &data.profiles {
                self.by_profile.entry(p.clone()).or_default().insert(key.to_string());
            }
            let labels = Arc::new(self.effective(&data));
            Indexed { data, labels }
        });
        if old.as_ref().map(|o| &o.labels) != new.as_ref().map(|n| &n.labels) {
            self.changed.insert(key.to_string());
        }
        // Each set changes by the difference between what the item gave it before and now.
        for (id, s) in self.sets.iter_mut() {
            let give = |i: &Option<Indexed>| -> Vec<Member> {
                match i {
                    Some(i) if s.spec.selector.as_ref().is_none_or(|sel| sel.matches(&Layered(&i.labels))) => {
                        members_of(&s.spec, &i.data)
                    }
                    _ => Vec::new(),
                }
            };
            let (was, now) = (give(&old), give(&new));
            let matched = new
                .as_ref()
                .is_some_and(|i| s.spec.selector.as_ref().is_none_or(|sel| sel.matches(&Layered(&i.labels))));
            if matched {
                s.items.insert(key.to_string());
            } else {
                s.items.remove(key);
            }
            for m in was.iter().filter(|m| !now.contains(m)) {
                if let Some(n) = s.members.get_mut(m) {
                    *n -= 1;
                    if *n == 0 {
                        s.members.remove(m);
                        self.dirty.insert(id.clone());
                    }
                }
            }
            for m in now.into_iter().filter(|m| !was.contains(m)) {
                let n = s.members.entry(m).or_insert(0);
                *n += 1;
                if *n == 1 {
                    self.dirty.insert(id.clone());
                }
            }
        }
        if let Some(n) = new {
            self.items.insert(key.to_string(), n);
        }
    }

    /// A profile's labelsToApply changed: its items' effective labels change.
    pub fn set_profile_labels(&mut self, profile: &str, labels: BTreeMap<String, String>) {
        if self.profile_labels.get(profile) == Some(&labels) {
            return;
        }
        if labels.is_empty() {
            self.profile_labels.remove(profile);
        } else {
            self.profile_labels.insert(profile.to_string(), labels);
        }
        let keys: Vec<ItemKey> = self.by_profile.get(profile).into_iter().flatten().cloned().collect();
        for k in keys {
            if let Some(i) = self.items.get(&k) {
                let data = i.data.clone();
                self.set_item(&k, Some(data));
            }
        }
    }

    /// Take a reference on a set (created and filled on first use); returns its ID.
    pub fn use_set(&mut self, spec: &SetSpec) -> String {
        let id = spec.id();
        if let Some(s) = self.sets.get_mut(&id) {
            s.refs += 1;
            return id;
        }
        let mut s = SetState { spec: spec.clone(), refs: 1, items: HashSet::new(), members: BTreeMap::new() };
        for (k, i) in &self.items {
            if spec.selector.as_ref().is_none_or(|sel| sel.matches(&Layered(&i.labels))) {
                s.items.insert(k.clone());
                for m in members_of(spec, &i.data) {
                    *s.members.entry(m).or_insert(0) += 1;
                }
            }
        }
        self.sets.insert(id.clone(), s);
        self.dirty.insert(id.clone());
        id
    }

    pub fn release_set(&mut self, id: &str) {
        if let Some(s) = self.sets.get_mut(id) {
            s.refs -= 1;
            if s.refs == 0 {
                self.sets.remove(id);
                self.dirty.insert(id.to_string());
            }
        }
    }

    /// A set's members (None: not in use).
    pub fn members(&self, id: &str) -> Option<impl Iterator<Item = &Member>> {
        self.sets.get(id).map(|s| s.members.keys())
    }

    pub fn set_spec(&self, id: &str) -> Option<&SetSpec> {
        self.sets.get(id).map(|s| &s.spec)
    }

    pub fn set_ids(&self) -> impl Iterator<Item = &String> {
        self.sets.keys()
    }

    pub fn take_dirty(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.dirty)
    }

    pub fn take_changed_items(&mut self) -> BTreeSet<ItemKey> {
        std::mem::take(&mut self.changed)
    }

    /// Whether `labels` match a selector (for the policy selectors of local endpoints).
    pub fn matches(sel: &Selector, labels: &BTreeMap<String, String>) -> bool {
        sel.matches(&Layered(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(labels: &[(&str, &str)], ip: &str, profiles: &[&str]) -> ItemData {
        ItemData {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
            nets: vec![ip.parse().unwrap()],
            ports: vec![NamedPort { name: "http".into(), protocol: 6, port: 8080 }],
        }
    }

    fn members(ix: &Index, id: &str) -> Vec<Member> {
        ix.members(id).unwrap().cloned().collect()
    }

    #[test]
    fn sets_follow_items_labels_and_profiles() {
        let mut ix = Index::default();
        ix.set_item("wep/a/1", Some(item(&[("app", "web")], "10.0.0.1/32", &["kns.a"])));
        ix.set_item("wep/a/2", Some(item(&[("app", "db")], "10.0.0.2/32", &["kns.a"])));
        let web = SetSpec { selector: Some(Selector::parse("app == 'web'").unwrap()), named: None };
        let team = SetSpec { selector: Some(Selector::parse("pcns.team == 'x'").unwrap()), named: None };
        let http = SetSpec { selector: None, named: Some((6, "http".into())) };
        let (w, t, h) = (ix.use_set(&web), ix.use_set(&team), ix.use_set(&http));
        assert!(w.starts_with("s:") && h.starts_with("n:"));
        ix.take_dirty();
        assert_eq!(members(&ix, &w), vec![Member::Net("10.0.0.1/32".parse().unwrap())]);
        assert!(members(&ix, &t).is_empty());
        assert_eq!(members(&ix, &h).len(), 2);
        // A label change is a member change of exactly the sets concerned.
        ix.set_item("wep/a/2", Some(item(&[("app", "web")], "10.0.0.2/32", &["kns.a"])));
        assert_eq!(ix.take_dirty(), [w.clone()].into());
        // Namespace labels arrive through the profile: every item of it moves.
        ix.set_profile_labels("kns.a", [("pcns.team".to_string(), "x".to_string())].into());
        assert_eq!(members(&ix, &t).len(), 2);
        assert_eq!(ix.take_dirty(), [t.clone()].into());
        // The item's own label wins over the profile's.
        ix.set_item("wep/a/1", Some(item(&[("app", "web"), ("pcns.team", "y")], "10.0.0.1/32", &["kns.a"])));
        assert_eq!(members(&ix, &t), vec![Member::Net("10.0.0.2/32".parse().unwrap())]);
        ix.set_item("wep/a/2", None);
        assert!(members(&ix, &t).is_empty());
        ix.release_set(&t);
        assert!(ix.members(&t).is_none());
    }
}
