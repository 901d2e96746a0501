//! The RIBs: every peer's paths (Adj-RIB-In, kept inside each destination), best-path
//! selection into the Loc-RIB, and per-peer Adj-RIB-Out with the iBGP, eBGP and
//! route-reflection (RFC 4456) export rules. Pure: paths come in as values, and out go the
//! forwarding changes (for the kernel, through the agent's route manager) and the changes to
//! send each peer.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use gingham_prefixmap::PrefixMap;
use ipnet::IpNet;

use crate::filter::Filters;
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
    /// Which next hop our routes leave with (Calico's nextHopMode / keepOriginalNextHop).
    pub next_hop: NextHopMode,
    /// How often our own AS may appear in a path from this peer (Calico's
    /// numAllowedLocalASNumbers; 0: never).
    pub allow_own_as: usize,
    /// What may come in from the peer and go out to it (BGPFilter).
    pub filters: Arc<Filters>,
}

impl PeerInfo {
    pub fn ibgp(&self) -> bool {
        self.local_as == self.remote_as
    }
}

/// Calico's nextHopMode: `Auto` is BIRD's default under Calico's config (iBGP and reflected
/// routes keep their next hop, eBGP gets ours), `SelfAddress` ("Self") always gives ours,
/// `Keep` always keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NextHopMode {
    #[default]
    Auto,
    SelfAddress,
    Keep,
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

/// What the paths of one UPDATE (or one origination) share: who sent them, their attributes,
/// and how they leave for each class of peer (made once, on the first export). A destination
/// holds a pointer to this, not a copy: 100,000 prefixes in 500 UPDATEs are 500 of these.
#[derive(Debug)]
struct Learned {
    source: Source,
    /// The sender's BGP identifier (for tie-breaks and ORIGINATOR_ID).
    router_id: Ipv4Addr,
    next_hop: NextHop,
    attrs: Arc<Attrs>,
    exported: Mutex<Vec<(Class, OutPath)>>,
}

#[derive(Clone, Debug)]
struct Path {
    learned: Arc<Learned>,
    /// The peer's path identifier (ADD-PATH), 0 otherwise.
    remote_id: u32,
    /// Ours, as we send it with ADD-PATH: the smallest free for the destination, stable
    /// while the path exists (16 bits: a destination has a path per peer and path id, not
    /// tens of thousands; the paths of a destination beyond that all share the last).
    local_id: u16,
    stale: bool,
}

impl Path {
    fn source(&self) -> Source {
        self.learned.source
    }
    fn attrs(&self) -> &Attrs {
        &self.learned.attrs
    }
}

/// Peers that get a path with the same attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Class {
    ibgp: bool,
    next_hop: NextHopMode,
    local_as: u32,
}

impl Class {
    fn of(p: &PeerInfo) -> Class {
        Class { ibgp: p.ibgp(), next_hop: p.next_hop, local_as: p.local_as }
    }
}

/// A destination's paths: one inline (nearly every destination), more boxed. Never empty: a
/// destination without paths is removed.
#[derive(Clone, Debug)]
enum Dest {
    One(Path),
    // Boxed so that the enum stays the size of one path.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Path>>),
}

impl Dest {
    fn paths(&self) -> &[Path] {
        match self {
            Dest::One(p) => std::slice::from_ref(p),
            Dest::Many(v) => v,
        }
    }

    fn paths_mut(&mut self) -> &mut [Path] {
        match self {
            Dest::One(p) => std::slice::from_mut(p),
            Dest::Many(v) => v,
        }
    }

    /// Add the path (true), or replace the one with its source and path identifier (keeping
    /// our id).
    fn set(&mut self, learned: Arc<Learned>, remote_id: u32) -> bool {
        let source = learned.source;
        if let Some(p) = self.paths_mut().iter_mut().find(|p| p.source() == source && p.remote_id == remote_id) {
            p.learned = learned;
            p.stale = false;
            return false;
        }
        let taken: Vec<u16> = self.paths().iter().map(|p| p.local_id).collect();
        let local_id = (1..=u16::MAX).find(|i| !taken.contains(i)).unwrap_or(u16::MAX);
        let path = Path { learned, remote_id, local_id, stale: false };
        match self {
            Dest::One(one) => *self = Dest::Many(Box::new(vec![one.clone(), path])),
            Dest::Many(v) => v.push(path),
        }
        true
    }

    /// Keep the paths `keep` says; None when none is left.
    fn retain(self, keep: impl Fn(&Path) -> bool) -> Option<Dest> {
        match self {
            Dest::One(p) => keep(&p).then_some(Dest::One(p)),
            Dest::Many(mut v) => {
                v.retain(|p| keep(p));
                match v.len() {
                    0 => None,
                    1 => v.pop().map(Dest::One),
                    _ => Some(Dest::Many(v)),
                }
            }
        }
    }
}

/// One path as sent to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OutPath {
    pub next_hop: NextHop,
    pub attrs: Arc<Attrs>,
}

impl OutPath {
    fn same(&self, o: &OutPath) -> bool {
        self.next_hop == o.next_hop && (Arc::ptr_eq(&self.attrs, &o.attrs) || self.attrs == o.attrs)
    }
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
    pub next_hops: NextHops,
}

/// Next hops of a route: one inline (nearly every route, so a change costs no allocation),
/// more boxed. Reads as a slice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NextHops {
    #[default]
    None,
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl std::ops::Deref for NextHops {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        match self {
            NextHops::None => &[],
            NextHops::One(a) => std::slice::from_ref(a),
            NextHops::Many(v) => v,
        }
    }
}

impl From<Vec<IpAddr>> for NextHops {
    fn from(v: Vec<IpAddr>) -> NextHops {
        match v.as_slice() {
            [] => NextHops::None,
            [one] => NextHops::One(*one),
            _ => NextHops::Many(v.into_boxed_slice()),
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub fib: Vec<FibChange>,
    pub peers: BTreeMap<PeerId, PeerChanges>,
}

/// An established peer. What it has from us is not stored (as in BIRD, there is no
/// Adj-RIB-Out): it is what the export rules give for the Loc-RIB, and each change sends the
/// difference between the rules applied to the destination before and after it.
struct OutPeer {
    info: PeerInfo,
    families: BTreeSet<Family>,
    add_path: BTreeSet<Family>,
    /// NLRIs the peer has from us.
    advertised: usize,
}

/// Destinations as they were before a change, to compare with after it.
type Touched = Vec<(IpNet, Option<Dest>)>;

pub struct Rib {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Set when this speaker is a route reflector (Calico's routeReflectorClusterID).
    pub cluster_id: Option<Ipv4Addr>,
    peers: BTreeMap<PeerId, PeerInfo>,
    up: BTreeMap<PeerId, OutPeer>,
    dests: PrefixMap<Dest>,
    /// Paths held per peer (stale ones included).
    received: HashMap<PeerId, usize>,
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
            dests: PrefixMap::new(),
            received: HashMap::new(),
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
        let paths = self.dests.get(prefix)?.paths();
        let p = &paths[*self.ranked(paths).first()?];
        Some((p.source(), p.learned.next_hop, p.learned.attrs.clone()))
    }

    /// Prefixes a peer sent us and we kept, and those we sent it.
    pub fn counts(&self, peer: PeerId) -> (usize, usize) {
        (self.received.get(&peer).copied().unwrap_or(0), self.up.get(&peer).map_or(0, |o| o.advertised))
    }

    /// What a peer sent us and we kept: NLRI, next hop, attributes, and whether it is stale.
    pub fn received(&self, peer: PeerId) -> Vec<(Nlri, NextHop, Arc<Attrs>, bool)> {
        let mut out: Vec<_> = self
            .dests
            .iter()
            .flat_map(|(prefix, d)| {
                d.paths().iter().filter(move |p| p.source() == Source::Peer(peer)).map(move |p| {
                    (Nlri { prefix, path_id: p.remote_id }, p.learned.next_hop, p.learned.attrs.clone(), p.stale)
                })
            })
            .collect();
        out.sort_by_key(|r| (r.0.prefix, r.0.path_id));
        out
    }

    /// What a peer has from us, as the export rules give it now.
    pub fn advertised(&self, peer: PeerId) -> Vec<(Nlri, OutPath)> {
        let Some(out) = self.up.get(&peer) else { return Vec::new() };
        let mut all: Vec<(Nlri, OutPath)> = self
            .dests
            .iter()
            .flat_map(|(prefix, d)| {
                self.want(peer, out, &prefix, &self.best_first(d.paths()))
                    .into_iter()
                    .map(move |(id, p)| (Nlri { prefix, path_id: id }, p))
            })
            .collect();
        all.sort_by_key(|r| (r.0.prefix, r.0.path_id));
        all
    }

    /// A peer no longer configured (after `peer_down`).
    pub fn remove_peer(&mut self, id: PeerId) {
        self.peers.remove(&id);
        self.received.remove(&id);
        self.up.remove(&id);
    }

    /// Every destination with its best path's source and attributes.
    pub fn routes(&self) -> Vec<(IpNet, String, Arc<Attrs>)> {
        let mut out: Vec<_> = self
            .dests
            .iter()
            .filter_map(|(prefix, d)| {
                let paths = d.paths();
                let p = &paths[*self.ranked(paths).first()?];
                let from = match (p.source(), p.learned.next_hop) {
                    (Source::Local, _) => "local".to_string(),
                    (_, NextHop::Address(a)) => a.to_string(),
                    (_, NextHop::Local) => "self".to_string(),
                };
                Some((prefix, from, p.learned.attrs.clone()))
            })
            .collect();
        out.sort_by_key(|r| r.0);
        out
    }

    /// The peer asked for a family again (ROUTE-REFRESH): everything we have for it.
    pub fn refresh(&mut self, id: PeerId, family: Family) -> Changes {
        self.announce_all(id, Some(family), false)
    }

    /// A session came up: it gets everything it should have.
    pub fn peer_up(&mut self, id: PeerId, families: BTreeSet<Family>, add_path: BTreeSet<Family>) -> Changes {
        let Some(info) = self.peers.get(&id).cloned() else { return Changes::default() };
        self.up.insert(id, OutPeer { info, families, add_path, advertised: 0 });
        self.announce_all(id, None, true)
    }

    fn announce_all(&mut self, id: PeerId, family: Option<Family>, count: bool) -> Changes {
        let mut ch = Changes::default();
        let Some(out) = self.up.get(&id) else { return ch };
        let mut pc = PeerChanges::default();
        for (prefix, d) in self.dests.iter() {
            if family.is_some_and(|f| f != Family::of(&prefix)) {
                continue;
            }
            for (path_id, p) in self.want(id, out, &prefix, &self.best_first(d.paths())) {
                pc.announce.push((Nlri { prefix, path_id }, p));
            }
        }
        if count {
            if let Some(o) = self.up.get_mut(&id) {
                o.advertised = pc.announce.len();
            }
        }
        if !pc.is_empty() {
            ch.peers.insert(id, pc);
        }
        ch
    }

    /// A session went down. With `keep_stale` its paths stay, marked stale, until End-of-RIB
    /// or `sweep_stale` (graceful restart); otherwise they go now.
    pub fn peer_down(&mut self, id: PeerId, keep_stale: bool) -> Changes {
        self.up.remove(&id);
        let from = Source::Peer(id);
        let mut touched = Touched::new();
        if keep_stale {
            for (prefix, d) in self.dests.iter_mut() {
                if d.paths().iter().any(|p| p.source() == from && !p.stale) {
                    touched.push((prefix, Some(d.clone())));
                    d.paths_mut().iter_mut().filter(|p| p.source() == from).for_each(|p| p.stale = true);
                }
            }
        } else {
            self.drop_paths(|_| true, |p| p.source() == from, &mut touched);
        }
        self.recompute(touched)
    }

    /// Graceful restart is over for a peer's family (End-of-RIB received, or its restart
    /// time ran out): what it did not send again goes.
    pub fn sweep_stale(&mut self, id: PeerId, family: Option<Family>) -> Changes {
        let mut touched = Touched::new();
        self.drop_paths(
            |prefix| family.is_none_or(|f| f == Family::of(prefix)),
            |p| p.source() == Source::Peer(id) && p.stale,
            &mut touched,
        );
        self.recompute(touched)
    }

    /// Remove, from the destinations `at` selects, the paths `gone` selects.
    fn drop_paths(&mut self, at: impl Fn(&IpNet) -> bool, gone: impl Fn(&Path) -> bool, touched: &mut Touched) {
        let hit: Vec<IpNet> =
            self.dests.iter().filter(|(p, d)| at(p) && d.paths().iter().any(&gone)).map(|(p, _)| p).collect();
        for prefix in hit {
            self.drop_at(prefix, &gone, touched);
        }
    }

    fn drop_at(&mut self, prefix: IpNet, gone: impl Fn(&Path) -> bool, touched: &mut Touched) {
        if !self.dests.get(&prefix).is_some_and(|d| d.paths().iter().any(&gone)) {
            return;
        }
        if let Some(d) = self.dests.remove(&prefix) {
            for p in d.paths().iter().filter(|p| gone(p)) {
                if let Source::Peer(id) = p.source() {
                    if let Some(n) = self.received.get_mut(&id) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            touched.push((prefix, Some(d.clone())));
            if let Some(kept) = d.retain(|p| !gone(p)) {
                self.dests.insert(prefix, kept);
            }
        }
    }

    /// Our own route (an affine block, a borrowed address, a service range).
    pub fn originate(&mut self, prefix: IpNet, attrs: Attrs) -> Changes {
        let learned = Arc::new(Learned {
            source: Source::Local,
            router_id: self.router_id,
            next_hop: NextHop::Local,
            attrs: Arc::new(attrs),
            exported: Mutex::default(),
        });
        let mut touched = Touched::new();
        self.set_path(prefix, learned, 0, &mut touched);
        self.recompute(touched)
    }

    pub fn withdraw_local(&mut self, prefix: IpNet) -> Changes {
        let mut touched = Touched::new();
        self.remove_path(prefix, Source::Local, 0, &mut touched);
        self.recompute(touched)
    }

    /// An UPDATE from an established peer (already through the FSM).
    pub fn update(&mut self, id: PeerId, router_id: Ipv4Addr, u: &Update) -> Changes {
        let Some(info) = self.peers.get(&id).cloned() else { return Changes::default() };
        let mut touched = Touched::new();
        for n in u.withdrawals() {
            self.remove_path(n.prefix, Source::Peer(id), n.path_id, &mut touched);
        }
        let reject = u.treat_as_withdraw() || u.attrs.as_ref().is_none_or(|a| !self.acceptable(&info, a));
        let attrs = u.attrs.as_ref().map(|a| {
            let mut a = a.clone();
            if !info.ibgp() {
                a.local_pref = None;
            }
            Arc::new(a)
        });
        // One shared record per next hop (the IPv4 field's and MP_REACH's may differ).
        let mut groups: Vec<(IpAddr, Arc<Learned>)> = Vec::new();
        for (n, nh) in u.announced() {
            let refused = !info.filters.imports(&n.prefix);
            match (reject || refused, &attrs, nh) {
                (false, Some(a), Some(nh)) => {
                    let learned = match groups.iter().find(|(h, _)| *h == nh) {
                        Some((_, l)) => l.clone(),
                        None => {
                            let l = Arc::new(Learned {
                                source: Source::Peer(id),
                                router_id,
                                next_hop: NextHop::Address(nh),
                                attrs: a.clone(),
                                exported: Mutex::default(),
                            });
                            groups.push((nh, l.clone()));
                            l
                        }
                    };
                    self.set_path(n.prefix, learned, n.path_id, &mut touched);
                }
                _ => self.remove_path(n.prefix, Source::Peer(id), n.path_id, &mut touched),
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

    fn set_path(&mut self, prefix: IpNet, learned: Arc<Learned>, remote_id: u32, touched: &mut Touched) {
        let source = learned.source;
        let added = match self.dests.get_mut(&prefix) {
            Some(d) => {
                touched.push((prefix, Some(d.clone())));
                d.set(learned, remote_id)
            }
            None => {
                touched.push((prefix, None));
                self.dests.insert(prefix, Dest::One(Path { learned, remote_id, local_id: 1, stale: false }));
                true
            }
        };
        if let (true, Source::Peer(id)) = (added, source) {
            *self.received.entry(id).or_default() += 1;
        }
    }

    fn remove_path(&mut self, prefix: IpNet, source: Source, remote_id: u32, touched: &mut Touched) {
        self.drop_at(prefix, |p| p.source() == source && p.remote_id == remote_id, touched);
    }

    /// Compare each touched destination before and after: forwarding changes, and for every
    /// established peer the difference between what it had and what it should have.
    fn recompute(&mut self, mut touched: Touched) -> Changes {
        // The first snapshot of a destination is its state before this change (stable sort).
        touched.sort_by_key(|t| t.0);
        touched.dedup_by_key(|t| t.0);
        let mut ch = Changes::default();
        let mut counts: Vec<(PeerId, isize)> = self.up.keys().map(|id| (*id, 0)).collect();
        for (prefix, before) in &touched {
            let was = before.as_ref().map_or(&[][..], Dest::paths);
            let now = self.dests.get(prefix).map_or(&[][..], Dest::paths);
            let (was, now) = (self.best_first(was), self.best_first(now));
            let hops = self.fib_hops(&now);
            if self.fib_hops(&was) != hops {
                ch.fib.push(FibChange { prefix: *prefix, next_hops: hops });
            }
            for (id, count) in counts.iter_mut() {
                let out = &self.up[id];
                let (old, new) = (self.want(*id, out, prefix, &was), self.want(*id, out, prefix, &now));
                if old.is_empty() && new.is_empty() {
                    continue;
                }
                let pc = ch.peers.entry(*id).or_default();
                for (i, _) in &old {
                    if !new.iter().any(|(n, _)| n == i) {
                        pc.withdraw.push(Nlri { prefix: *prefix, path_id: *i });
                        *count -= 1;
                    }
                }
                for (i, path) in new {
                    match old.iter().find(|(o, _)| *o == i) {
                        Some((_, o)) if o.same(&path) => {}
                        Some(_) => pc.announce.push((Nlri { prefix: *prefix, path_id: i }, path)),
                        None => {
                            pc.announce.push((Nlri { prefix: *prefix, path_id: i }, path));
                            *count += 1;
                        }
                    }
                }
            }
        }
        ch.peers.retain(|_, pc| !pc.is_empty());
        for (id, delta) in counts {
            if let Some(o) = self.up.get_mut(&id) {
                o.advertised = o.advertised.saturating_add_signed(delta);
            }
        }
        ch
    }

    /// Path indexes best first (RFC 4271 §9.1.2.2 with deterministic MED: MED compares only
    /// paths from the same neighbouring AS, each such group ranked first, then the groups).
    fn ranked(&self, paths: &[Path]) -> Vec<usize> {
        if paths.len() <= 1 {
            return (0..paths.len()).collect();
        }
        let mut groups: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            groups.entry(p.attrs().neighbour_as()).or_default().push(i);
        }
        let mut out: Vec<usize> = Vec::with_capacity(paths.len());
        let mut group_heads: Vec<Vec<usize>> = groups
            .into_values()
            .map(|mut g| {
                g.sort_by(|a, b| self.compare(&paths[*a], &paths[*b], true));
                g
            })
            .collect();
        group_heads.sort_by(|a, b| self.compare(&paths[a[0]], &paths[b[0]], false));
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
        p.attrs().local_pref.unwrap_or(DEFAULT_LOCAL_PREF)
    }

    /// Less is better.
    fn compare(&self, a: &Path, b: &Path, med: bool) -> Ordering {
        let ebgp = |p: &Path| self.peer_info(p.source()).is_some_and(|i| !i.ibgp());
        let id = |p: &Path| u32::from(p.attrs().originator_id.unwrap_or(p.learned.router_id));
        let addr = |p: &Path| self.peer_info(p.source()).map(|i| i.address);
        let (x, y) = (a.attrs(), b.attrs());
        self.local_pref(b)
            .cmp(&self.local_pref(a))
            .then_with(|| (a.source() != Source::Local).cmp(&(b.source() != Source::Local)))
            .then_with(|| x.as_path_len().cmp(&y.as_path_len()))
            .then_with(|| x.origin.cmp(&y.origin))
            .then_with(|| if med { x.med.unwrap_or(0).cmp(&y.med.unwrap_or(0)) } else { Ordering::Equal })
            .then_with(|| ebgp(b).cmp(&ebgp(a)))
            .then_with(|| a.stale.cmp(&b.stale))
            .then_with(|| id(a).cmp(&id(b)))
            .then_with(|| x.cluster_list.len().cmp(&y.cluster_list.len()))
            .then_with(|| addr(a).cmp(&addr(b)))
            .then_with(|| a.remote_id.cmp(&b.remote_id))
    }

    /// Equal for ECMP: the same up to (and including) eBGP-over-iBGP.
    fn equal_cost(&self, a: &Path, b: &Path) -> bool {
        let ebgp = |p: &Path| self.peer_info(p.source()).is_some_and(|i| !i.ibgp());
        let (x, y) = (a.attrs(), b.attrs());
        self.local_pref(a) == self.local_pref(b)
            && a.source() != Source::Local
            && b.source() != Source::Local
            && x.as_path_len() == y.as_path_len()
            && x.origin == y.origin
            && (x.neighbour_as() != y.neighbour_as() || x.med.unwrap_or(0) == y.med.unwrap_or(0))
            && ebgp(a) == ebgp(b)
    }

    /// The paths best first (what `fib_hops` and `want` take: ranked once per destination
    /// state, not once per peer).
    fn best_first<'a>(&self, paths: &'a [Path]) -> Vec<&'a Path> {
        self.ranked(paths).into_iter().map(|i| &paths[i]).collect()
    }

    /// The FIB's next hops for a destination: its equal best paths' (none if the best is ours).
    fn fib_hops(&self, ranked: &[&Path]) -> NextHops {
        let hop = |p: &Path| match p.learned.next_hop {
            NextHop::Address(a) => Some(a),
            NextHop::Local => None,
        };
        let Some(best) = ranked.first().copied() else { return NextHops::None };
        if best.source() == Source::Local {
            return NextHops::None;
        }
        if ranked.len() == 1 {
            return hop(best).map_or(NextHops::None, NextHops::One);
        }
        let mut hops: Vec<IpAddr> = ranked
            .iter()
            .filter(|p| std::ptr::eq(**p, best) || self.equal_cost(best, p))
            .filter_map(|p| hop(p))
            .collect();
        hops.sort();
        hops.dedup();
        hops.into()
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

    /// What peer `id` should have for a destination with these paths: the best path (with
    /// ADD-PATH, every equal one), as the export rules allow, each with the path id it goes
    /// under.
    fn want(&self, id: PeerId, out: &OutPeer, prefix: &IpNet, ranked: &[&Path]) -> Vec<(u32, OutPath)> {
        let family = Family::of(prefix);
        let Some(best) = ranked.first().copied() else { return Vec::new() };
        if !out.families.contains(&family) {
            return Vec::new();
        }
        let add_path = out.add_path.contains(&family);
        let class = Class::of(&out.info);
        let mut want = Vec::new();
        for &p in ranked {
            if !(std::ptr::eq(p, best) || (add_path && self.equal_cost(best, p))) {
                continue;
            }
            if !self.may_send(p.source(), &out.info, id)
                || !out.info.filters.exports(prefix, p.source() != Source::Local)
            {
                continue;
            }
            let from_ibgp = self.peer_info(p.source()).map(|f| f.ibgp());
            let mut cache = p.learned.exported.lock().unwrap_or_else(|e| e.into_inner());
            let path = match cache.iter().find(|(c, _)| *c == class) {
                Some((_, o)) => o.clone(),
                None => {
                    let o = out_path(&p.learned, from_ibgp, &out.info, self.cluster_id);
                    cache.push((class, o.clone()));
                    o
                }
            };
            want.push((if add_path { u32::from(p.local_id) } else { 0 }, path));
        }
        want
    }
}
/// A path as a peer of class `to` gets it. `from_ibgp`: None for our own paths.
fn out_path(p: &Learned, from_ibgp: Option<bool>, to: &PeerInfo, cluster_id: Option<Ipv4Addr>) -> OutPath {
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
        if to.next_hop != NextHopMode::Keep {
            next_hop = NextHop::Local;
        }
    }
    if to.next_hop == NextHopMode::SelfAddress {
        next_hop = NextHop::Local;
    }
    OutPath { next_hop, attrs: Arc::new(a) }
}

#[cfg(test)]
mod tests;
