//! An allocation block exactly as Calico stores it (JSON field names included), and the pure
//! logic of handing out and taking back its addresses.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// `{"handle_id": …, "secondary": {…}}`: shared by every ordinal of one allocation request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    #[serde(rename = "handle_id", default)]
    pub handle_id: Option<String>,
    #[serde(rename = "secondary", default)]
    pub secondary: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationBlock {
    pub cidr: IpNet,
    /// `host:<node>`, `virtual:<name>`, or null (no owner).
    #[serde(default)]
    pub affinity: Option<String>,
    #[serde(rename = "affinityClaimTime", default, skip_serializing_if = "Option::is_none")]
    pub affinity_claim_time: Option<String>,
    #[serde(rename = "strictAffinity", default)]
    pub strict_affinity: bool,
    /// One slot per address: `null` = free, else an index into `attributes`.
    pub allocations: Vec<Option<usize>>,
    /// Free ordinals, oldest-freed first: allocation takes from the front, release appends.
    pub unallocated: Vec<u32>,
    pub attributes: Vec<AllocationAttribute>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(rename = "sequenceNumber", default)]
    pub sequence_number: u64,
    #[serde(rename = "sequenceNumberForAllocation", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    /// Legacy; upgraded to `affinity` on read.
    #[serde(rename = "hostAffinity", default, skip_serializing_if = "Option::is_none")]
    pub host_affinity: Option<String>,
    /// When each ordinal was last released (Unix seconds), for ipCooldownSeconds: it is not
    /// handed out again before the cooldown has passed. Entries older than the longest
    /// cooldown are dropped.
    #[serde(rename = "releasedAt", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub released_at: BTreeMap<String, u64>,
}

/// One released address: its ordinal and the handle that held it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub ordinal: u32,
    pub handle: Option<String>,
}

/// Calico caps ipCooldownSeconds at 1200.
pub const MAX_COOLDOWN_SECS: u64 = 1200;

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

impl AllocationBlock {
    /// Whether `ord` was released less than `cooldown` seconds before `now`.
    pub fn cooling(&self, ord: u32, cooldown: u64, now: u64) -> bool {
        cooldown > 0 && self.released_at.get(&ord.to_string()).is_some_and(|t| now.saturating_sub(*t) < cooldown)
    }
}

pub fn host_affinity(node: &str) -> String {
    format!("host:{node}")
}

impl AllocationBlock {
    /// A fresh block: every ordinal free, in order. `seq` seeds the sequence number (Calico
    /// uses the creation time in nanoseconds).
    pub fn new(cidr: IpNet, affinity: Option<String>, claim_time: Option<String>, seq: u64) -> Self {
        let size = block_len(&cidr);
        AllocationBlock {
            cidr,
            affinity,
            affinity_claim_time: claim_time,
            strict_affinity: false,
            allocations: vec![None; size],
            unallocated: (0..size as u32).collect(),
            attributes: Vec::new(),
            deleted: false,
            sequence_number: seq,
            sequence_number_for_allocation: BTreeMap::new(),
            host_affinity: None,
            released_at: BTreeMap::new(),
        }
    }

    /// Read a block from its stored JSON, refusing one whose shape the allocation logic cannot
    /// trust (a datastore is input too): slot count matching the CIDR, free ordinals and
    /// attribute references in range.
    pub fn decode(bytes: &[u8]) -> Result<AllocationBlock, String> {
        let mut b: AllocationBlock = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        b.upgrade();
        let size = block_len(&b.cidr);
        if b.allocations.len() != size {
            return Err(format!("{} has {} allocation slots, not {size}", b.cidr, b.allocations.len()));
        }
        if let Some(o) = b.unallocated.iter().find(|o| **o as usize >= size) {
            return Err(format!("free ordinal {o} is outside {}", b.cidr));
        }
        if let Some(i) = b.allocations.iter().flatten().find(|i| **i >= b.attributes.len()) {
            return Err(format!("an allocation refers to attribute {i}, but there are {}", b.attributes.len()));
        }
        Ok(b)
    }

    /// Normalise what was read: legacy host affinity.
    pub fn upgrade(&mut self) {
        if self.affinity.is_none() {
            if let Some(h) = self.host_affinity.take() {
                self.affinity = Some(host_affinity(&h));
            }
        }
    }

    pub fn size(&self) -> usize {
        self.allocations.len()
    }

    pub fn free(&self) -> usize {
        self.unallocated.len()
    }

    pub fn in_use(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.in_use() == 0
    }

    pub fn is_affine_to(&self, node: &str) -> bool {
        self.affinity.as_deref() == Some(host_affinity(node).as_str())
    }

    pub fn ip(&self, ordinal: u32) -> IpAddr {
        match self.cidr.network() {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + ordinal).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + u128::from(ordinal)).into()),
        }
    }

    pub fn ordinal(&self, ip: IpAddr) -> Option<u32> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        let off = match (ip, self.cidr.network()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => u128::from(u32::from(a) - u32::from(b)),
            (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a) - u128::from(b),
            _ => return None,
        };
        u32::try_from(off).ok().filter(|o| (*o as usize) < self.size())
    }

    /// The attribute of an allocated ordinal.
    pub fn attribute(&self, ordinal: u32) -> Option<&AllocationAttribute> {
        self.allocations.get(ordinal as usize).copied().flatten().and_then(|i| self.attributes.get(i))
    }

    pub fn handle_of(&self, ordinal: u32) -> Option<&str> {
        self.attribute(ordinal).and_then(|a| a.handle_id.as_deref())
    }

    fn attribute_index(&mut self, handle: &str, secondary: &BTreeMap<String, String>) -> usize {
        let attr = AllocationAttribute { handle_id: Some(handle.to_string()), secondary: Some(secondary.clone()) };
        match self.attributes.iter().position(|a| *a == attr) {
            Some(i) => i,
            None => {
                self.attributes.push(attr);
                self.attributes.len() - 1
            }
        }
    }

    /// Take up to `want` ordinals from the front of the free list, skipping `skip` (reserved).
    pub fn allocate(
        &mut self,
        want: usize,
        handle: &str,
        secondary: &BTreeMap<String, String>,
        skip: impl Fn(IpAddr) -> bool,
    ) -> Vec<u32> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.unallocated.len());
        for &ord in &self.unallocated {
            if taken.len() < want && !skip(self.ip(ord)) {
                taken.push(ord);
            } else {
                kept.push(ord);
            }
        }
        if taken.is_empty() {
            return taken;
        }
        self.unallocated = kept;
        let idx = self.attribute_index(handle, secondary);
        self.sequence_number += 1;
        for &ord in &taken {
            self.allocations[ord as usize] = Some(idx);
            self.sequence_number_for_allocation.insert(ord.to_string(), self.sequence_number);
        }
        taken
    }

    /// Allocate one specific ordinal; false if it is taken or out of range.
    pub fn allocate_ordinal(&mut self, ord: u32, handle: &str, secondary: &BTreeMap<String, String>) -> bool {
        let Some(pos) = self.unallocated.iter().position(|o| *o == ord) else {
            return false;
        };
        self.unallocated.remove(pos);
        let idx = self.attribute_index(handle, secondary);
        self.sequence_number += 1;
        self.allocations[ord as usize] = Some(idx);
        self.sequence_number_for_allocation.insert(ord.to_string(), self.sequence_number);
        true
    }

    /// Free the given ordinals (those allocated); freed ordinals go to the back of the free list.
    pub fn release(&mut self, ordinals: &[u32]) -> Vec<Released> {
        let now = unix_now();
        let mut out = Vec::new();
        for &ord in ordinals {
            let Some(slot) = self.allocations.get_mut(ord as usize) else {
                continue;
            };
            let Some(idx) = slot.take() else { continue };
            out.push(Released { ordinal: ord, handle: self.attributes.get(idx).and_then(|a| a.handle_id.clone()) });
            self.unallocated.push(ord);
            self.sequence_number_for_allocation.remove(&ord.to_string());
            self.released_at.insert(ord.to_string(), now);
        }
        self.released_at.retain(|_, t| now.saturating_sub(*t) <= MAX_COOLDOWN_SECS);
        if !out.is_empty() {
            self.sequence_number += 1;
            self.compact_attributes();
        }
        out
    }

    /// Every ordinal held by `handle`.
    pub fn ordinals_of(&self, handle: &str) -> Vec<u32> {
        (0..self.size() as u32).filter(|o| self.handle_of(*o) == Some(handle)).collect()
    }

    /// Drop attributes no ordinal refers to, renumbering the rest.
    fn compact_attributes(&mut self) {
        let mut used = vec![false; self.attributes.len()];
        for i in self.allocations.iter().flatten() {
            if let Some(u) = used.get_mut(*i) {
                *u = true;
            }
        }
        let mut remap = vec![None; self.attributes.len()];
        let mut kept = Vec::new();
        for (i, attr) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used[i] {
                remap[i] = Some(kept.len());
                kept.push(attr);
            }
        }
        self.attributes = kept;
        for slot in self.allocations.iter_mut() {
            *slot = slot.and_then(|i| remap[i]);
        }
    }

    /// In-use counts per handle.
    pub fn handle_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for ord in 0..self.size() as u32 {
            if let Some(h) = self.handle_of(ord) {
                *m.entry(h.to_string()).or_default() += 1;
            }
        }
        m
    }

    /// Internal consistency: free list and allocations partition the ordinals, attributes are
    /// all referenced and every reference is valid. Returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![false; self.size()];
        for &o in &self.unallocated {
            let Some(s) = seen.get_mut(o as usize) else {
                return Err(format!("free ordinal {o} is out of range"));
            };
            if *s {
                return Err(format!("ordinal {o} is free twice"));
            }
            *s = true;
            if self.allocations[o as usize].is_some() {
                return Err(format!("ordinal {o} is both free and allocated"));
            }
        }
        for (o, a) in self.allocations.iter().enumerate() {
            match a {
                Some(i) if *i >= self.attributes.len() => {
                    return Err(format!("ordinal {o} points at missing attribute {i}"));
                }
                Some(_) => {}
                None if !seen[o] => {
                    return Err(format!("ordinal {o} is neither free nor allocated"));
                }
                None => {}
            }
        }
        let mut used = vec![false; self.attributes.len()];
        self.allocations.iter().flatten().for_each(|i| used[*i] = true);
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(format!("attribute {i} is not used"));
        }
        Ok(())
    }
}

/// Number of addresses in a block.
pub fn block_len(cidr: &IpNet) -> usize {
    1usize << (cidr.max_prefix_len() - cidr.prefix_len()).min(20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(pod: &str) -> BTreeMap<String, String> {
        [("pod".to_string(), pod.to_string())].into()
    }

    #[test]
    fn fifo_and_calico_json() {
        let mut b = AllocationBlock::new("10.65.0.0/26".parse().unwrap(), Some(host_affinity("node-1")), None, 100);
        assert_eq!(b.size(), 64);
        assert_eq!(b.allocate(2, "h1", &attrs("a"), |_| false), vec![0, 1]);
        assert_eq!(b.allocate(1, "h2", &attrs("b"), |_| false), vec![2]);
        assert_eq!(b.release(&[0]), vec![Released { ordinal: 0, handle: Some("h1".into()) }]);
        // The freed ordinal goes to the back: the longest-free address is reused first.
        assert_eq!(b.allocate(1, "h3", &attrs("c"), |_| false), vec![3]);
        assert_eq!(*b.unallocated.last().unwrap(), 0);
        assert_eq!(b.ip(3), "10.65.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(b.ordinal("10.65.0.63".parse().unwrap()), Some(63));
        assert_eq!(b.ordinal("10.65.0.64".parse().unwrap()), None);
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["cidr"], "10.65.0.0/26");
        assert_eq!(json["affinity"], "host:node-1");
        assert_eq!(json["allocations"][1], 0);
        assert_eq!(json["allocations"][0], serde_json::Value::Null);
        assert_eq!(json["attributes"][0]["handle_id"], "h1");
        assert_eq!(json["attributes"][0]["secondary"]["pod"], "a");
        assert!(json["sequenceNumberForAllocation"]["1"].is_u64());
        let back = AllocationBlock::decode(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(back, b);
        // Shapes the allocation logic cannot trust are refused, not indexed into.
        let mut bad = json.clone();
        bad["unallocated"][0] = serde_json::json!(64);
        assert!(AllocationBlock::decode(&serde_json::to_vec(&bad).unwrap()).unwrap_err().contains("free ordinal 64"));
        let mut bad = json.clone();
        bad["allocations"][1] = serde_json::json!(9);
        assert!(AllocationBlock::decode(&serde_json::to_vec(&bad).unwrap()).unwrap_err().contains("attribute 9"));
        let mut bad = json;
        bad["allocations"].as_array_mut().unwrap().pop();
        assert!(
            AllocationBlock::decode(&serde_json::to_vec(&bad).unwrap()).unwrap_err().contains("63 allocation slots")
        );
        b.check().unwrap();
        // Skipped (reserved) addresses stay free.
        let taken = b.allocate(2, "h4", &attrs("d"), |ip| ip == "10.65.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(taken, vec![5, 6]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(usize, u8),
        ReleaseHandle(u8),
        ReleaseOrdinals(Vec<u32>),
        AllocOrdinal(u32, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..20, 0u8..6).prop_map(|(n, h)| Op::Alloc(n, h)),
            (0u8..6).prop_map(Op::ReleaseHandle),
            prop::collection::vec(0u32..70, 0..8).prop_map(Op::ReleaseOrdinals),
            (0u32..64, 0u8..6).prop_map(|(o, h)| Op::AllocOrdinal(o, h)),
        ]
    }

    proptest! {
        /// Random allocate/release sequences keep the block consistent and agree with a model of
        /// who holds what.
        #[test]
        fn random_sequences_keep_invariants(ops in prop::collection::vec(op(), 1..60)) {
            let mut b = AllocationBlock::new("10.0.0.0/26".parse().unwrap(), Some(host_affinity("n")), None, 1);
            let mut model: BTreeMap<u32, String> = BTreeMap::new();
            for op in ops {
                let seq_before = b.sequence_number;
                match op {
                    Op::Alloc(n, h) => {
                        let handle = format!("h{h}");
                        let free = b.free();
                        let got = b.allocate(n, &handle, &attrs(&handle), |_| false);
                        prop_assert_eq!(got.len(), n.min(free));
                        for o in got {
                            prop_assert!(model.insert(o, handle.clone()).is_none(), "ordinal {} handed out twice", o);
                            prop_assert_eq!(b.sequence_number_for_allocation.get(&o.to_string()), Some(&b.sequence_number));
                        }
                    }
                    Op::ReleaseHandle(h) => {
                        let handle = format!("h{h}");
                        let ords = b.ordinals_of(&handle);
                        let rel = b.release(&ords);
                        prop_assert!(rel.iter().all(|r| r.handle.as_deref() == Some(handle.as_str())));
                        model.retain(|_, v| *v != handle);
                    }
                    Op::ReleaseOrdinals(ords) => {
                        let mut unique = ords.clone();
                        unique.sort();
                        unique.dedup();
                        let expected = unique.iter().filter(|o| model.contains_key(o)).count();
                        let rel = b.release(&unique);
                        prop_assert_eq!(rel.len(), expected);
                        for r in &rel {
                            prop_assert_eq!(model.remove(&r.ordinal), r.handle.clone());
                        }
                    }
                    Op::AllocOrdinal(o, h) => {
                        let handle = format!("h{h}");
                        let was_free = !model.contains_key(&o);
                        prop_assert_eq!(b.allocate_ordinal(o, &handle, &attrs(&handle)), was_free);
                        if was_free {
                            model.insert(o, handle);
                        }
                    }
                }
                prop_assert!(b.sequence_number >= seq_before);
                if let Err(e) = b.check() {
                    return Err(TestCaseError::fail(e));
                }
                prop_assert_eq!(b.in_use(), model.len());
                prop_assert_eq!(b.free() + b.in_use(), 64);
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for h in model.values() {
                    *counts.entry(h.clone()).or_default() += 1;
                }
                prop_assert_eq!(b.handle_counts(), counts);
                for (o, h) in &model {
                    prop_assert_eq!(b.handle_of(*o), Some(h.as_str()));
                    prop_assert_eq!(b.attribute(*o).and_then(|a| a.secondary.as_ref()).and_then(|s| s.get("pod")), Some(h));
                }
            }
        }
    }
}
