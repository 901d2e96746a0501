//! Inverted indexes from one label (key = value) to what has it, so a selector is evaluated
//! only against what can match it: most selectors require some label outright
//! (`app == 'web' && …`, and every namespaced policy its namespace), so a policy change meets
//! the endpoints of its namespace or app, not every endpoint, and an endpoint's label change
//! meets the policies that name one of its labels, not every policy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;

use gingham_api::Selector;

/// Labels a selector cannot match without (key, value), most telling first: Calico's
/// namespace and orchestrator clauses, which many selectors share, come last.
pub fn required_labels(sel: &Selector) -> Vec<(&str, &str)> {
    fn walk<'a>(sel: &'a Selector, out: &mut Vec<(&'a str, &'a str)>) {
        match sel {
            Selector::Eq(k, v) => out.push((k, v)),
            Selector::In(k, vs) if vs.len() == 1 => {
                if let Some(v) = vs.iter().next() {
                    out.push((k, v));
                }
            }
            Selector::And(parts) => parts.iter().for_each(|p| walk(p, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(sel, &mut out);
    let common = |k: &str| k.starts_with("projectcalico.org/");
    out.sort_by_key(|(k, _)| common(k));
    out
}

/// Things (keys) by each of their labels.
#[derive(Debug)]
pub struct ByLabel<K: Eq + Hash + Clone> {
    by: HashMap<String, HashMap<String, HashSet<K>>>,
    of: HashMap<K, BTreeMap<String, String>>,
}

impl<K: Eq + Hash + Clone> Default for ByLabel<K> {
    fn default() -> Self {
        ByLabel { by: HashMap::new(), of: HashMap::new() }
    }
}

impl<K: Eq + Hash + Clone> ByLabel<K> {
    /// `key` now has these labels (None: gone).
    pub fn set(&mut self, key: &K, labels: Option<&BTreeMap<String, String>>) {
        if self.of.get(key) == labels {
            return;
        }
        if let Some(old) = self.of.remove(key) {
            for (k, v) in &old {
                if let Some(vs) = self.by.get_mut(k) {
                    if let Some(set) = vs.get_mut(v) {
                        set.remove(key);
                        if set.is_empty() {
                            vs.remove(v);
                        }
                    }
                    if vs.is_empty() {
                        self.by.remove(k);
                    }
                }
            }
        }
        if let Some(l) = labels {
            for (k, v) in l {
                self.by.entry(k.clone()).or_default().entry(v.clone()).or_default().insert(key.clone());
            }
            self.of.insert(key.clone(), l.clone());
        }
    }

    /// Keys that may match `sel`: those with the rarest of its required labels, or None when
    /// it requires none (then anything may).
    pub fn candidates(&self, sel: &Selector) -> Option<Vec<K>> {
        let required = required_labels(sel);
        if required.is_empty() {
            return None;
        }
        let bucket = |(k, v): &(&str, &str)| self.by.get(*k).and_then(|vs| vs.get(*v));
        let smallest = required.iter().map(|r| bucket(r).map_or(0, HashSet::len)).min().unwrap_or(0);
        Some(
            required
                .iter()
                .find(|r| bucket(r).map_or(0, HashSet::len) == smallest)
                .and_then(bucket)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
        )
    }
}

/// Selectors (by key) indexed under one label each requires; the rest kept apart.
#[derive(Debug)]
pub struct Selectors<K: Eq + Hash + Clone + Ord> {
    by: HashMap<String, HashMap<String, HashSet<K>>>,
    unindexed: HashSet<K>,
    placed: HashMap<K, Option<(String, String)>>,
}

impl<K: Eq + Hash + Clone + Ord> Default for Selectors<K> {
    fn default() -> Self {
        Selectors { by: HashMap::new(), unindexed: HashSet::new(), placed: HashMap::new() }
    }
}

impl<K: Eq + Hash + Clone + Ord> Selectors<K> {
    pub fn set(&mut self, key: &K, sel: Option<&Selector>) {
        match self.placed.remove(key) {
            Some(Some((k, v))) => {
                if let Some(vs) = self.by.get_mut(&k) {
                    if let Some(s) = vs.get_mut(&v) {
                        s.remove(key);
                        if s.is_empty() {
                            vs.remove(&v);
                        }
                    }
                    if vs.is_empty() {
                        self.by.remove(&k);
                    }
                }
            }
            Some(None) => {
                self.unindexed.remove(key);
            }
            None => {}
        }
        let Some(sel) = sel else { return };
        let place = required_labels(sel).first().map(|(k, v)| (k.to_string(), v.to_string()));
        match &place {
            Some((k, v)) => {
                self.by.entry(k.clone()).or_default().entry(v.clone()).or_default().insert(key.clone());
            }
            None => {
                self.unindexed.insert(key.clone());
            }
        }
        self.placed.insert(key.clone(), place);
    }

    /// Selectors that may match these labels (a superset: evaluate each).
    pub fn candidates(&self, labels: &BTreeMap<String, String>) -> Vec<&K> {
        let mut out: Vec<&K> = self.unindexed.iter().collect();
        for (k, v) in labels {
            if let Some(s) = self.by.get(k).and_then(|vs| vs.get(v)) {
                out.extend(s.iter());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn required_labels_and_candidates() {
        let sel = Selector::parse("projectcalico.org/namespace == 'x' && app == 'web' && has(tier)").unwrap();
        assert_eq!(required_labels(&sel), vec![("app", "web"), ("projectcalico.org/namespace", "x")]);
        assert!(required_labels(&Selector::parse("app == 'a' || app == 'b'").unwrap()).is_empty());
        assert_eq!(required_labels(&Selector::parse("app in {'a'}").unwrap()), vec![("app", "a")]);

        let mut ix: ByLabel<String> = ByLabel::default();
        ix.set(&"e1".into(), Some(&labels(&[("app", "web"), ("projectcalico.org/namespace", "x")])));
        ix.set(&"e2".into(), Some(&labels(&[("app", "db"), ("projectcalico.org/namespace", "x")])));
        ix.set(&"e3".into(), Some(&labels(&[("app", "web"), ("projectcalico.org/namespace", "y")])));
        let mut c = ix.candidates(&sel).unwrap();
        c.sort();
        assert_eq!(c, vec!["e1".to_string(), "e3".to_string()], "the rarer label's bucket");
        assert_eq!(ix.candidates(&Selector::parse("all()").unwrap()), None);
        ix.set(&"e1".into(), Some(&labels(&[("app", "db")])));
        ix.set(&"e3".into(), None);
        assert_eq!(ix.candidates(&sel).unwrap(), Vec::<String>::new());

        let mut ps: Selectors<String> = Selectors::default();
        ps.set(&"p1".into(), Some(&sel));
        ps.set(&"p2".into(), Some(&Selector::parse("!has(x)").unwrap()));
        ps.set(&"p3".into(), Some(&Selector::parse("app == 'db'").unwrap()));
        let mut c: Vec<&String> = ps.candidates(&labels(&[("app", "web")]));
        c.sort();
        assert_eq!(c, vec!["p1", "p2"]);
        ps.set(&"p1".into(), None);
        assert_eq!(ps.candidates(&labels(&[("app", "web")])), vec!["p2"]);
    }
}
