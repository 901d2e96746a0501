//! The RIBs: every peer's paths (Adj-RIB-In, kept inside each destination), best-path
//! selection into the Loc-RIB, and per-peer Adj-RIB-Out with the iBGP, eBGP and
//! route-reflection (RFC 4456) export rules. Pure: paths come in as values, and out go the
//! forwarding changes (for the kernel, through the agent's route manager) and the changes to
//! send each peer.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::packet::{Attrs, Family, Nlri, Update};

/// A peer, as the RIB knows it. `Local` paths (our own blocks and addresses) have no peer.
pub type PeerId = u32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub address: IpAddr,
    pub remote_as: u32,
    pub local_as: u32,
    /// The peer is a route-reflector client of ours (we reflect its routes to everyone).
    pub rr_client: bool,
    /// Send our routes with the next hop they have (eBGP only; iBGP always keeps it).
    pub keep_next_hop: bool,
    /// How often our own AS may appear in a path from this peer (Calico's
    /// numAllowedLocalASNumbers; 0: never).
    pub allow_own_as: usize,
}

impl PeerInfo {
    pub fn ibgp(&self) -> bool {
        self.local_as == self.remote_as
    }
}

/// Where a path's next hop points when we send it: an address, or this speaker itself (the
/// session substitutes the address it speaks from).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NextHop {
    Address(IpAddr),
    Local,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Local,
    Peer(PeerId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Path {
    source: Source,
    /// The peer's path identifier (ADD-PATH), 0 otherwise.
    remote_id: u32,
    /// Ours, as we send it with ADD-PATH; stable while the path exists.
    local_id: u32,
    /// The peer's BGP identifier (for tie-breaks and ORIGINATOR_ID).
    router_id: Ipv4Addr,
    next_hop: NextHop,
    attrs: Arc<Attrs>,
    stale: bool,
    /// The path as each kind of peer gets it, made once and shared by all such peers (boxed:
    /// most paths are never sent anywhere, and a destination costs what its paths cost).
    exported: Option<Box<Vec<(Class, OutPath)>>>,
}

/// Peers that get a path with the same attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Class {
    ibgp: bool,
    keep_next_hop: bool,
    local_as: u32,
}

impl Class {
    fn of(p: &PeerInfo) -> Class {
        Class { ibgp: p.ibgp(), keep_next_hop: p.keep_next_hop, local_as: p.local_as }
    }
}

#[derive(Debug, Default)]
struct Dest {
    paths: Vec<Path>,
    next_id: u32,
}

/// One path as sent to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OutPath {
    pub next_hop: NextHop,
    pub attrs: Arc<Attrs>,
}

/// What to change in a peer's view: announce (or replace) and withdraw, by NLRI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerChanges {
    pub announce: Vec<(Nlri, OutPath)>,
    pub withdraw: Vec<Nlri>,
}

impl PeerChanges {
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }
}

/// A destination's forwarding: the next hops of its equal best paths (empty: remove the
/// route). Local paths never reach the FIB from here; they are this node's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FibChange {
    pub prefix: IpNet,
    pub next_hops: Vec<IpAddr>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub fib: Vec<FibChange>,
    pub peers: BTreeMap<PeerId, PeerChanges>,
}

struct OutPeer {
    info: PeerInfo,
    families: BTreeSet<Family>,
    add_path: BTreeSet<Family>,
    /// What the peer has from us: per prefix, (our path id, path).
    /// (Boxed slices, sized exactly: a route reflector holds one per client and prefix.)
    sent: HashMap<IpNet, Box<[(u32, OutPath)]>>,
}

pub struct Rib {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Set when this speaker is a route reflector (Calico's routeReflectorClusterID).
    pub cluster_id: Option<Ipv4Addr>,
    peers: BTreeMap<PeerId, PeerInfo>,
    up: BTreeMap<PeerId, OutPeer>,
    dests: HashMap<IpNet, Dest>,
    /// What the FIB has from us, to report only real changes.
    fib: HashMap<IpNet, Hops>,
}

/// Next hops as the FIB map keeps them: one inline (nearly every route), more boxed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hops {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl Hops {
    fn of(h: &[IpAddr]) -> Option<Hops> {
        match h {
            [] => None,
            [one] => Some(Hops::One(*one)),
            many => Some(Hops::Many(many.into())),
        }
    }
}

/// Default LOCAL_PREF of paths that come without one (eBGP, local).
pub const DEFAULT_LOCAL_PREF: u32 = 100;

impl Rib {
    pub fn new(local_as: u32, router_id: Ipv4Addr, cluster_id: Option<Ipv4Addr>) -> Rib {
        Rib {
            local_as,
            router_id,
            cluster_id,
            peers: BTreeMap::new(),
            up: BTreeMap::new(),
            dests: HashMap::new(),
            fib: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.dests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dests.is_empty()
    }

    pub fn set_peer(&mut self, id: PeerId, info: PeerInfo) {
        self.peers.insert(id, info);
    }

    /// The best path's attributes and next hop for a prefix (for `node status --routes`).
    pub fn best(&self, prefix: &IpNet) -> Option<(Source, NextHop, Arc<Attrs>)> {
        let d = self.dests.get(prefix)?;
        let i = self.ranked(d).first().copied()?;
        let p = &d.paths[i];
        Some((p.source, p.next_hop, p.attrs.clone()))
    }

    /// Prefixes a peer sent us and we kept, and those we sent it.
    pub fn counts(&self, peer: PeerId) -> (usize, usize) {
        let received =
            self.dests.values().map(|d| d.paths.iter().filter(|p| p.source == Source::Peer(peer)).count()).sum();
        (received, self.up.get(&peer).map_or(0, |o| o.sent.values().map(|v| v.len()).sum()))
    }

    /// A peer no longer configured (after `peer_down`).
    pub fn remove_peer(&mut self, id: PeerId) {
        self.peers.remove(&id);
        self.up.remove(&id);
    }

    /// Every destination with its best path's source and attributes.
    pub fn routes(&self) -> Vec<(IpNet, String, Arc<Attrs>)> {
        let mut out: Vec<_> = self
            .dests
            .iter()
            .filter_map(|(prefix, d)| {
                let i = *self.ranked(d).first()?;
                let p = &d.paths[i];
                let from = match (p.source, p.next_hop) {
                    (Source::Local, _) => "local".to_string(),
                    (_, NextHop::Address(a)) => a.to_string(),
                    (_, NextHop::Local) => "self".to_string(),
                };
                Some((*prefix, from, p.attrs.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The peer asked for a family again (ROUTE-REFRESH): everything we have for it.
    pub fn refresh(&mut self, id: PeerId, family: Family) -> Changes {
        let Some(out) = self.up.get_mut(&id) else { return Changes::default() };
        out.sent.retain(|p, _| Family::of(p) != family);
        let prefixes: Vec<IpNet> = self.dests.keys().filter(|p| Family::of(p) == family).copied().collect();
        let mut ch = Changes::default();
        for p in prefixes {
            self.export_to(id, &p, &mut ch);
        }
        ch
    }

    /// A session came up: it gets everything it should have.
    pub fn peer_up(&mut self, id: PeerId, families: BTreeSet<Family>, add_path: BTreeSet<Family>) -> Changes {
        let Some(info) = self.peers.get(&id).cloned() else { return Changes::default() };
        self.up.insert(id, OutPeer { info, families, add_path, sent: HashMap::new() });
        let all: Vec<IpNet> = self.dests.keys().copied().collect();
        let mut ch = Changes::default();
        for prefix in all {
            self.export_to(id, &prefix, &mut ch);
        }
        ch
    }

    /// A session went down. With `keep_stale` its paths stay, marked stale, until End-of-RIB
    /// or `sweep_stale` (graceful restart); otherwise they go now.
    pub fn peer_down(&mut self, id: PeerId, keep_stale: bool) -> Changes {
        self.up.remove(&id);
        let mut touched = Vec::new();
        for (prefix, d) in self.dests.iter_mut() {
            let before = d.paths.len();
            if keep_stale {
                for p in d.paths.iter_mut().filter(|p| p.source == Source::Peer(id)) {
                    p.stale = true;
                }
            } else {
                d.paths.retain(|p| p.source != Source::Peer(id));
                if d.paths.len() != before {
                    touched.push(*prefix);
                }
            }
        }
        self.recompute(touched)
    }

    /// Graceful restart is over for a peer's family (End-of-RIB received, or its restart
    /// time ran out): what it did not send again goes.
    pub fn sweep_stale(&mut self, id: PeerId, family: Option<Family>) -> Changes {
        let mut touched = Vec::new();
        for (prefix, d) in self.dests.iter_mut() {
            if family.is_some_and(|f| f != Family::of(prefix)) {
                continue;
            }
            let before = d.paths.len();
            d.paths.retain(|p| !(p.source == Source::Peer(id) && p.stale));
            if d.paths.len() != before {
                touched.push(*prefix);
            }
        }
        self.recompute(touched)
    }

    /// Our own route (an affine block, a borrowed address, a service range).
    pub fn originate(&mut self, prefix: IpNet, attrs: Attrs) -> Changes {
        self.set_path(prefix, Source::Local, 0, self.router_id, NextHop::Local, Arc::new(attrs));
        self.recompute(vec![prefix])
    }

    pub fn withdraw_local(&mut self, prefix: IpNet) -> Changes {
        self.remove_path(&prefix, Source::Local, 0);
        self.recompute(vec![prefix])
    }

    /// An UPDATE from an established peer (already through the FSM).
    pub fn update(&mut self, id: PeerId, router_id: Ipv4Addr, u: &Update) -> Changes {
        let Some(info) = self.peers.get(&id).cloned() else { return Changes::default() };
        let mut touched = Vec::new();
        for n in u.withdrawals() {
            self.remove_path(&n.prefix, Source::Peer(id), n.path_id);
            touched.push(n.prefix);
        }
        let reject = u.treat_as_withdraw() || u.attrs.as_ref().is_none_or(|a| !self.acceptable(&info, a));
        let attrs = u.attrs.as_ref().map(|a| {
            let mut a = a.clone();
            if !info.ibgp() {
                a.local_pref = None;
            }
            Arc::new(a)
        });
        for (n, nh) in u.announced() {
            touched.push(n.prefix);
            match (reject, &attrs, nh) {
                (false, Some(a), Some(nh)) => {
                    self.set_path(n.prefix, Source::Peer(id), n.path_id, router_id, NextHop::Address(nh), a.clone())
                }
                _ => self.remove_path(&n.prefix, Source::Peer(id), n.path_id),
            }
        }
        self.recompute(touched)
    }

    /// Loop checks on the way in: our AS in the path (eBGP), our identifier as originator or
    /// our cluster in the cluster list (reflection).
    fn acceptable(&self, info: &PeerInfo, a: &Attrs) -> bool {
        if a.contains_as(self.local_as) > info.allow_own_as && !info.ibgp() {
            return false;
        }
        if a.originator_id == Some(self.router_id) {
            return false;
        }
        !self.cluster_id.is_some_and(|c| a.cluster_list.contains(&c))
    }

    fn set_path(
        &mut self,
        prefix: IpNet,
        source: Source,
        remote_id: u32,
        router_id: Ipv4Addr,
        next_hop: NextHop,
        attrs: Arc<Attrs>,
    ) {
        let d = self.dests.entry(prefix).or_default();
        if let Some(p) = d.paths.iter_mut().find(|p| p.source == source && p.remote_id == remote_id) {
            p.attrs = attrs;
            p.next_hop = next_hop;
            p.router_id = router_id;
            p.stale = false;
            p.exported = None;
            return;
        }
        d.next_id += 1;
        let local_id = d.next_id;
        // A first push would reserve room for four paths; nearly every destination has one.
        d.paths.reserve_exact(1);
        d.paths.push(Path { source, remote_id, local_id, router_id, next_hop, attrs, stale: false, exported: None });
    }

    fn remove_path(&mut self, prefix: &IpNet, source: Source, remote_id: u32) {
        if let Some(d) = self.dests.get_mut(prefix) {
            d.paths.retain(|p| !(p.source == source && p.remote_id == remote_id));
        }
    }

    fn recompute(&mut self, mut touched: Vec<IpNet>) -> Changes {
        touched.sort();
        touched.dedup();
        let mut ch = Changes::default();
        for prefix in touched {
            self.fib_of(&prefix, &mut ch);
            let ids: Vec<PeerId> = self.up.keys().copied().collect();
            for id in ids {
                self.export_to(id, &prefix, &mut ch);
            }
            if self.dests.get(&prefix).is_some_and(|d| d.paths.is_empty()) {
                self.dests.remove(&prefix);
            }
        }
        ch
    }

    /// Path indexes best first (RFC 4271 §9.1.2.2 with deterministic MED: MED compares only
    /// paths from the same neighbouring AS, each such group ranked first, then the groups).
    fn ranked(&self, d: &Dest) -> Vec<usize> {
        if d.paths.len() <= 1 {
            return (0..d.paths.len()).collect();
        }
        let mut groups: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
        for (i, p) in d.paths.iter().enumerate() {
            groups.entry(p.attrs.neighbour_as()).or_default().push(i);
        }
        let mut out: Vec<usize> = Vec::with_capacity(d.paths.len());
        let mut group_heads: Vec<Vec<usize>> = groups
            .into_values()
            .map(|mut g| {
                g.sort_by(|a, b| self.compare(&d.paths[*a], &d.paths[*b], true));
                g
            })
            .collect();
        group_heads.sort_by(|a, b| self.compare(&d.paths[a[0]], &d.paths[b[0]], false));
        for g in group_heads {
            out.extend(g);
        }
        // Groups are ordered by their heads; a path of a worse group may still beat a group's
        // tail ignoring MED, which matters only for multipath (handled by `equal_cost`).
        out
    }

    fn peer_info(&self, s: Source) -> Option<&PeerInfo> {
        match s {
            Source::Local => None,
            Source::Peer(id) => self.peers.get(&id),
        }
    }

    fn local_pref(&self, p: &Path) -> u32 {
        p.attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)
    }

    /// Less is better.
    fn compare(&self, a: &Path, b: &Path, med: bool) -> Ordering {
        let ebgp = |p: &Path| self.peer_info(p.source).is_some_and(|i| !i.ibgp());
        let id = |p: &Path| u32::from(p.attrs.originator_id.unwrap_or(p.router_id));
        let addr = |p: &Path| self.peer_info(p.source).map(|i| i.address);
        self.local_pref(b)
            .cmp(&self.local_pref(a))
            .then_with(|| (a.source != Source::Local).cmp(&(b.source != Source::Local)))
            .then_with(|| a.attrs.as_path_len().cmp(&b.attrs.as_path_len()))
            .then_with(|| a.attrs.origin.cmp(&b.attrs.origin))
            .then_with(|| if med { a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0)) } else { Ordering::Equal })
            .then_with(|| ebgp(b).cmp(&ebgp(a)))
            .then_with(|| a.stale.cmp(&b.stale))
            .then_with(|| id(a).cmp(&id(b)))
            .then_with(|| a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()))
            .then_with(|| addr(a).cmp(&addr(b)))
            .then_with(|| a.remote_id.cmp(&b.remote_id))
    }

    /// Equal for ECMP: the same up to (and including) eBGP-over-iBGP.
    fn equal_cost(&self, a: &Path, b: &Path) -> bool {
        let ebgp = |p: &Path| self.peer_info(p.source).is_some_and(|i| !i.ibgp());
        self.local_pref(a) == self.local_pref(b)
            && a.source != Source::Local
            && b.source != Source::Local
            && a.attrs.as_path_len() == b.attrs.as_path_len()
            && a.attrs.origin == b.attrs.origin
            && (a.attrs.neighbour_as() != b.attrs.neighbour_as()
                || a.attrs.med.unwrap_or(0) == b.attrs.med.unwrap_or(0))
            && ebgp(a) == ebgp(b)
    }

    fn fib_of(&mut self, prefix: &IpNet, ch: &mut Changes) {
        let mut hops = Vec::new();
        if let Some(d) = self.dests.get(prefix) {
            let ranked = self.ranked(d);
            if let Some(&best) = ranked.first() {
                let b = &d.paths[best];
                if b.source != Source::Local {
                    for &i in &ranked {
                        let p = &d.paths[i];
                        if i == best || self.equal_cost(b, p) {
                            if let NextHop::Address(a) = p.next_hop {
                                hops.push(a);
                            }
                        }
                    }
                }
            }
        }
        hops.sort();
        hops.dedup();
        let new = Hops::of(&hops);
        if self.fib.get(prefix) != new.as_ref() {
            match new {
                None => self.fib.remove(prefix),
                Some(h) => self.fib.insert(*prefix, h),
            };
            ch.fib.push(FibChange { prefix: *prefix, next_hops: hops });
        }
    }

    /// Whether a path from `from` may go to `to` (RFC 4271 §9.2, RFC 4456 §6).
    fn may_send(&self, from: Source, to: &PeerInfo, to_id: PeerId) -> bool {
        let Source::Peer(f) = from else { return true };
        if f == to_id {
            return false;
        }
        let Some(src) = self.peers.get(&f) else { return false };
        if !src.ibgp() || !to.ibgp() {
            return true;
        }
        // iBGP to iBGP only by reflection: a client's path to everyone, others' to clients.
        self.cluster_id.is_some() && (src.rr_client || to.rr_client)
    }

    fn export_to(&mut self, id: PeerId, prefix: &IpNet, ch: &mut Changes) {
        let Some(out) = self.up.get(&id) else { return };
        let family = Family::of(prefix);
        if !out.families.contains(&family) {
            return;
        }
        let add_path = out.add_path.contains(&family);
        let to = out.info.clone();
        let mut want: Vec<(u32, OutPath)> = Vec::new();
        let ranked = self.dests.get(prefix).map(|d| self.ranked(d)).unwrap_or_default();
        if let Some(&best) = ranked.first() {
            let d = &self.dests[prefix];
            let chosen: Vec<usize> = ranked
                .iter()
                .copied()
                .filter(|&i| i == best || (add_path && self.equal_cost(&d.paths[best], &d.paths[i])))
                .filter(|&i| self.may_send(d.paths[i].source, &to, id))
                .collect();
            let from: Vec<Option<bool>> =
                chosen.iter().map(|&i| self.peer_info(d.paths[i].source).map(|f| f.ibgp())).collect();
            let (cluster_id, class) = (self.cluster_id, Class::of(&to));
            let d = self.dests.get_mut(prefix).expect("ranked above");
            for (&i, from_ibgp) in chosen.iter().zip(from) {
                let p = &mut d.paths[i];
                let cached =
                    p.exported.as_ref().and_then(|e| e.iter().find(|(c, _)| *c == class).map(|(_, o)| o.clone()));
                let path = match cached {
                    Some(o) => o,
                    None => {
                        let o = out_path(p, from_ibgp, &to, cluster_id);
                        p.exported.get_or_insert_with(Default::default).push((class, o.clone()));
                        o
                    }
                };
                want.push((if add_path { p.local_id } else { 0 }, path));
            }
        }
        let out = self.up.get_mut(&id).expect("checked above");
        let mut changes = PeerChanges::default();
        let sent = out.sent.remove(prefix).unwrap_or_default();
        for (i, _) in sent.iter() {
            if !want.iter().any(|(w, _)| w == i) {
                changes.withdraw.push(Nlri { prefix: *prefix, path_id: *i });
            }
        }
        for (i, path) in &want {
            if !sent.iter().any(|(s, p)| s == i && p == path) {
                changes.announce.push((Nlri { prefix: *prefix, path_id: *i }, path.clone()));
            }
        }
        if !want.is_empty() {
            out.sent.insert(*prefix, want.into_boxed_slice());
        }
        if !changes.is_empty() {
            let e = ch.peers.entry(id).or_default();
            e.announce.extend(changes.announce);
            e.withdraw.extend(changes.withdraw);
        }
    }
}

/// A path as a peer of class `to` gets it. `from_ibgp`: None for our own paths.
fn out_path(p: &Path, from_ibgp: Option<bool>, to: &PeerInfo, cluster_id: Option<Ipv4Addr>) -> OutPath {
    let mut a = (*p.attrs).clone();
    let mut next_hop = p.next_hop;
    if to.ibgp() {
        a.local_pref = Some(p.attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF));
        if from_ibgp == Some(true) {
            // Reflected (RFC 4456 §8).
            if a.originator_id.is_none() {
                a.originator_id = Some(p.router_id);
            }
            if let Some(c) = cluster_id {
                a.cluster_list.insert(0, c);
            }
        }
    } else {
        a.local_pref = None;
        a.originator_id = None;
        a.cluster_list.clear();
        // A MED we learned does not leave for another AS (RFC 4271 §5.1.4).
        if from_ibgp.is_some() {
            a.med = None;
        }
        a.prepend(to.local_as);
        if !to.keep_next_hop {
            next_hop = NextHop::Local;
        }
    }
    OutPath { next_hop, attrs: Arc::new(a) }
}

#[cfg(test)]
mod tests;
