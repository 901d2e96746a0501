//! A hash map keyed by IP prefix. `IpNet` is 18 bytes (an IPv6 address and a tag); the tables
//! that hold a route per prefix (the BGP RIB, the route manager) are nearly all IPv4, so each
//! family gets its own table and an IPv4 entry pays for 5 bytes of key.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Clone, Debug)]
pub struct PrefixMap<V> {
    v4: HashMap<Ipv4Net, V>,
    v6: HashMap<Ipv6Net, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap { v4: HashMap::new(), v6: HashMap::new() }
    }
}

impl<V> PrefixMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn get(&self, k: &IpNet) -> Option<&V> {
        match k {
            IpNet::V4(n) => self.v4.get(n),
            IpNet::V6(n) => self.v6.get(n),
        }
    }

    pub fn get_mut(&mut self, k: &IpNet) -> Option<&mut V> {
        match k {
            IpNet::V4(n) => self.v4.get_mut(n),
            IpNet::V6(n) => self.v6.get_mut(n),
        }
    }

    pub fn contains_key(&self, k: &IpNet) -> bool {
        self.get(k).is_some()
    }

    pub fn insert(&mut self, k: IpNet, v: V) -> Option<V> {
        match k {
            IpNet::V4(n) => self.v4.insert(n, v),
            IpNet::V6(n) => self.v6.insert(n, v),
        }
    }

    pub fn remove(&mut self, k: &IpNet) -> Option<V> {
        match k {
            IpNet::V4(n) => self.v4.remove(n),
            IpNet::V6(n) => self.v6.remove(n),
        }
    }

    /// The value at `k`, made by `f` if there is none.
    pub fn get_or_insert_with(&mut self, k: IpNet, f: impl FnOnce() -> V) -> &mut V {
        match k {
            IpNet::V4(n) => match self.v4.entry(n) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(f()),
            },
            IpNet::V6(n) => match self.v6.entry(n) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(f()),
            },
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> {
        self.v4.iter().map(|(k, v)| (IpNet::V4(*k), v)).chain(self.v6.iter().map(|(k, v)| (IpNet::V6(*k), v)))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (IpNet, &mut V)> {
        self.v4.iter_mut().map(|(k, v)| (IpNet::V4(*k), v)).chain(self.v6.iter_mut().map(|(k, v)| (IpNet::V6(*k), v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.v4.values().chain(self.v6.values())
    }

    pub fn retain(&mut self, mut f: impl FnMut(IpNet, &mut V) -> bool) {
        self.v4.retain(|k, v| f(IpNet::V4(*k), v));
        self.v6.retain(|k, v| f(IpNet::V6(*k), v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_live_side_by_side() {
        let mut m = PrefixMap::new();
        let a: IpNet = "10.0.0.0/24".parse().unwrap();
        let b: IpNet = "fd00::/64".parse().unwrap();
        assert_eq!(m.insert(a, 1), None);
        assert_eq!(m.insert(b, 2), None);
        assert_eq!(m.insert(a, 3), Some(1));
        assert_eq!((m.get(&a), m.get(&b), m.len()), (Some(&3), Some(&2), 2));
        *m.get_or_insert_with(b, || 0) += 10;
        *m.get_or_insert_with("10.0.1.0/24".parse().unwrap(), || 7) += 1;
        let mut all: Vec<(IpNet, i32)> = m.iter().map(|(k, v)| (k, *v)).collect();
        all.sort();
        assert_eq!(all, vec![(a, 3), ("10.0.1.0/24".parse().unwrap(), 8), (b, 12)]);
        m.retain(|k, _| k.addr().is_ipv6());
        assert_eq!((m.remove(&b), m.is_empty()), (Some(12), true));
    }

    #[test]
    fn an_ipv4_key_costs_five_bytes() {
        assert_eq!(std::mem::size_of::<Ipv4Net>(), 5);
    }
}
