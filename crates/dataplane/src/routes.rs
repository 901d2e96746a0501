//! The route manager: routes from several sources (the calculated ones, BGP's), each with its
//! own protocol number. The kernel keys a route by table, destination, TOS and metric, so one
//! destination has one route: the manager programs the winner by source priority. Only routes
//! carrying a source's protocol are ever touched, and a source's routes left in the kernel (an
//! agent restart) stay until that source has said everything it wants.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use gingham_kernel::{Netlink, Route, RouteOp};
use gingham_prefixmap::PrefixMap;
use ipnet::IpNet;

use crate::DataplaneError;

/// Protocol of the routes gingham calculates (Felix's number, so the kernel reads as Calico's).
pub const CALC_PROTO: u8 = 80;
/// Protocol of the routes BGP learned (RTPROT_BIRD: `ip route` says `proto bird`, as on a
/// Calico node).
pub const BGP_PROTO: u8 = 12;

/// A device routes leave through, resolved to an index when programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dev {
    Underlay,
    Vxlan,
    Ipip,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Blackhole,
    /// `also`: further gateways of equal cost through the same device (ECMP).
    Via {
        gateway: IpAddr,
        also: Vec<IpAddr>,
        dev: Dev,
        onlink: bool,
    },
}

/// A source of routes: its protocol number and priority (lower wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub protocol: u8,
    pub priority: u8,
}

struct SourceState {
    source: Source,
    /// The source has given its whole state: routes of its protocol that it does not want may go.
    synced: bool,
}

/// What an apply or resync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub removed: usize,
    /// Destinations that could not be programmed (their device is missing).
    pub skipped: usize,
}

/// One destination's change in an apply: the destination, whether the route is replaced
/// (else deleted), the route, and the winner programmed once it is done.
type Planned = (IpNet, bool, Route, Option<(usize, TargetId)>);

/// Destinations programmed per round of `apply`.
const APPLY_SLICE: usize = 4096;

/// How many sources a manager takes (the calculated routes and BGP's). Each destination keeps
/// a slot per source, so this is part of every entry's size.
pub const MAX_SOURCES: usize = 2;

/// An interned target (nearly every route shares its target with thousands of others).
type TargetId = u32;
const NONE: TargetId = TargetId::MAX;

/// One destination: the target each source wants (by priority), and what is programmed.
/// Sixteen bytes: the manager holds one per route, BGP's full tables included.
#[derive(Clone, Copy, Debug)]
struct Entry {
    want: [TargetId; MAX_SOURCES],
    programmed: TargetId,
    /// The source whose route is programmed (an index into `sources`).
    programmed_by: u8,
    /// A device under the programmed route changed: program it again even if it looks right.
    reprogram: bool,
}

impl Entry {
    const EMPTY: Entry = Entry { want: [NONE; MAX_SOURCES], programmed: NONE, programmed_by: 0, reprogram: false };

    fn winner(&self) -> Option<(usize, TargetId)> {
        self.want.iter().position(|t| *t != NONE).map(|s| (s, self.want[s]))
    }

    fn programmed(&self) -> Option<(usize, TargetId)> {
        (self.programmed != NONE).then_some((self.programmed_by as usize, self.programmed))
    }

    fn unused(&self) -> bool {
        self.programmed == NONE && self.want.iter().all(|t| *t == NONE)
    }
}

/// Targets by id, counted: an id lives while an entry wants or has programmed it.
#[derive(Default)]
struct Targets {
    slots: Vec<Option<(Target, u32)>>,
    index: HashMap<Target, TargetId>,
    free: Vec<TargetId>,
}

impl Targets {
    fn acquire(&mut self, t: Target) -> TargetId {
        if let Some(&id) = self.index.get(&t) {
            self.hold(id);
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some((t.clone(), 1));
                id
            }
            None => {
                self.slots.push(Some((t.clone(), 1)));
                (self.slots.len() - 1) as TargetId
            }
        };
        self.index.insert(t, id);
        id
    }

    fn hold(&mut self, id: TargetId) {
        if let Some(Some((_, n))) = self.slots.get_mut(id as usize) {
            *n += 1;
        }
    }

    fn release(&mut self, id: TargetId) {
        let Some(slot) = self.slots.get_mut(id as usize) else { return };
        if let Some((t, n)) = slot {
            *n -= 1;
            if *n == 0 {
                self.index.remove(t);
                *slot = None;
                self.free.push(id);
            }
        }
    }

    fn get(&self, id: TargetId) -> Option<&Target> {
        self.slots.get(id as usize)?.as_ref().map(|(t, _)| t)
    }
}

pub struct RouteManager {
    nl: Netlink,
    devices: HashMap<Dev, u32>,
    sources: Vec<SourceState>,
    targets: Targets,
    routes: PrefixMap<Entry>,
    /// How many entries have a programmed route (for metrics, without a walk of the table).
    programmed: usize,
    dirty: BTreeSet<IpNet>,
}

/// The identity the kernel compares (the device of a blackhole does not matter; the order of
/// ECMP next hops does not either).
fn same(a: &Route, b: &Route) -> bool {
    let hops = |r: &Route| {
        let mut h: Vec<IpAddr> = r.gateway.iter().chain(r.also_via.iter()).copied().collect();
        h.sort();
        h
    };
    let key = |r: &Route| (r.dst, hops(r), if r.blackhole { None } else { r.oif }, r.blackhole, r.protocol);
    key(a) == key(b)
}

impl RouteManager {
    /// At most `MAX_SOURCES` sources (a programming error otherwise).
    pub fn new(nl: Netlink, sources: &[Source]) -> RouteManager {
        assert!(sources.len() <= MAX_SOURCES, "a route manager takes at most {MAX_SOURCES} sources");
        let mut sources: Vec<SourceState> = sources.iter().map(|s| SourceState { source: *s, synced: false }).collect();
        sources.sort_by_key(|s| s.source.priority);
        RouteManager {
            nl,
            devices: HashMap::new(),
            sources,
            targets: Targets::default(),
            routes: PrefixMap::new(),
            programmed: 0,
            dirty: BTreeSet::new(),
        }
    }

    fn source_index(&self, protocol: u8) -> Option<usize> {
        self.sources.iter().position(|s| s.source.protocol == protocol)
    }

    /// A device appeared, changed index or went away: every route through it is redone.
    pub fn set_device(&mut self, dev: Dev, index: Option<u32>) {
        if self.devices.get(&dev).copied() == index {
            return;
        }
        match index {
            Some(i) => self.devices.insert(dev, i),
            None => self.devices.remove(&dev),
        };
        let targets = &self.targets;
        let through = |id: TargetId| matches!(targets.get(id), Some(Target::Via { dev: d, .. }) if *d == dev);
        for (dst, e) in self.routes.iter_mut() {
            if e.want.iter().chain([&e.programmed]).any(|t| *t != NONE && through(*t)) {
                e.reprogram = true;
                self.dirty.insert(dst);
            }
        }
    }

    /// Source `protocol` wants `dst` routed to `target` (None: it no longer routes `dst`).
    pub fn set(&mut self, protocol: u8, dst: IpNet, target: Option<Target>) {
        let Some(s) = self.source_index(protocol) else { return };
        let old = self.routes.get(&dst).map_or(NONE, |e| e.want[s]);
        if old == NONE && target.is_none() {
            return;
        }
        let new = target.map_or(NONE, |t| self.targets.acquire(t));
        if new == old {
            self.targets.release(new);
            return;
        }
        if old != NONE {
            self.targets.release(old);
        }
        let e = self.routes.get_or_insert_with(dst, || Entry::EMPTY);
        e.want[s] = new;
        self.dirty.insert(dst);
    }

    /// The source has given everything it wants: its other routes may be removed at the next
    /// resync.
    pub fn mark_synced(&mut self, protocol: u8) {
        if let Some(s) = self.source_index(protocol) {
            self.sources[s].synced = true;
        }
    }

    /// A route was removed behind our back: program it again at the next apply.
    pub fn forget(&mut self, dst: IpNet) {
        let Some(e) = self.routes.get_mut(&dst) else { return };
        if e.programmed != NONE {
            let id = std::mem::replace(&mut e.programmed, NONE);
            self.targets.release(id);
            self.programmed -= 1;
            self.dirty.insert(dst);
        }
    }

    /// The kernel reports a route: if it replaced ours for that destination (a route changed by
    /// hand), ours is programmed again at the next apply. True if so.
    pub fn observed(&mut self, r: &Route) -> bool {
        let Some((s, t)) = self.routes.get(&r.dst).and_then(Entry::programmed) else { return false };
        match self.kernel_route(r.dst, s, t) {
            Ok(p) if same(&p, r) => false,
            _ => {
                self.forget(r.dst);
                true
            }
        }
    }

    /// Whether `protocol` is one of ours.
    pub fn owns(&self, protocol: u8) -> bool {
        self.sources.iter().any(|s| s.source.protocol == protocol)
    }

    /// Destinations with a programmed route.
    pub fn len(&self) -> usize {
        self.programmed
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kernel route for source `s`'s target `t` at `dst`; Err if its device is missing
    /// (then the route, for deleting, has no device).
    fn kernel_route(&self, dst: IpNet, s: usize, t: TargetId) -> Result<Route, Route> {
        let protocol = self.sources[s].source.protocol;
        let mut route = Route {
            dst,
            gateway: None,
            also_via: Vec::new(),
            oif: None,
            scope_link: false,
            onlink: false,
            blackhole: false,
            protocol,
        };
        match self.targets.get(t) {
            Some(Target::Blackhole) => {
                route.blackhole = true;
                Ok(route)
            }
            Some(Target::Via { gateway, also, dev, onlink }) => {
                route.gateway = Some(*gateway);
                route.also_via = also.clone();
                route.onlink = *onlink;
                route.oif = self.devices.get(dev).copied();
                if route.oif.is_some() { Ok(route) } else { Err(route) }
            }
            None => Err(route),
        }
    }

    /// Program the destinations that changed, many requests in flight at once. Failures stay
    /// pending for the next apply.
    pub async fn apply(&mut self) -> Result<Applied, DataplaneError> {
        let mut out = Applied::default();
        let mut first_error = None;
        let dirty: Vec<IpNet> = std::mem::take(&mut self.dirty).into_iter().collect();
        // In slices, so that a full table's routes never sit in memory as kernel messages.
        for slice in dirty.chunks(APPLY_SLICE) {
            if let Err(e) = self.apply_slice(slice, &mut out).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn apply_slice(&mut self, dirty: &[IpNet], out: &mut Applied) -> Result<(), DataplaneError> {
        let mut plan: Vec<Planned> = Vec::new();
        for &dst in dirty {
            let Some(e) = self.routes.get(&dst).copied() else { continue };
            let want = e.winner();
            match (want, e.programmed()) {
                (Some(w), Some(p)) if w == p && !e.reprogram => {}
                (Some((s, t)), have) => match self.kernel_route(dst, s, t) {
                    Ok(r) => plan.push((dst, true, r, Some((s, t)))),
                    Err(_) => {
                        out.skipped += 1;
                        if let Some((ps, pt)) = have {
                            let r = self.kernel_route(dst, ps, pt).unwrap_or_else(|r| r);
                            plan.push((dst, false, r, None));
                        }
                    }
                },
                (None, Some((ps, pt))) => {
                    let r = self.kernel_route(dst, ps, pt).unwrap_or_else(|r| r);
                    plan.push((dst, false, r, None));
                }
                (None, None) => {
                    self.settle(dst, None);
                }
            }
        }
        let ops: Vec<RouteOp> = plan
            .iter()
            .map(|(_, replace, r, _)| if *replace { RouteOp::Replace(r) } else { RouteOp::Delete(r) })
            .collect();
        let results = self.nl.change_routes(&ops).await;
        drop(ops);
        let mut first_error = None;
        for ((dst, replace, _, winner), result) in plan.into_iter().zip(results) {
            match result {
                Ok(found) => {
                    if replace {
                        out.added += 1;
                    } else if found {
                        out.removed += 1;
                    }
                    self.settle(dst, winner);
                }
                Err(e) => {
                    self.dirty.insert(dst);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Record what is programmed at `dst` now; drop the entry once nothing refers to it.
    fn settle(&mut self, dst: IpNet, programmed: Option<(usize, TargetId)>) {
        let Some(e) = self.routes.get_mut(&dst) else { return };
        let (by, id) = programmed.map_or((0, NONE), |(s, t)| (s as u8, t));
        let old = std::mem::replace(&mut e.programmed, id);
        e.programmed_by = by;
        e.reprogram = false;
        let unused = e.unused();
        if id != NONE {
            self.targets.hold(id);
            self.programmed += 1;
        }
        if old != NONE {
            self.targets.release(old);
            self.programmed -= 1;
        }
        if unused {
            self.routes.remove(&dst);
        }
    }

    /// Read the kernel's routes of our protocols and make them match the desired state
    /// (drift repair; after a restart, adoption): missing ones added, wrong ones replaced,
    /// unwanted ones removed once their source is in sync.
    pub async fn resync(&mut self) -> Result<Applied, DataplaneError> {
        let mut kernel: Vec<Route> = self.nl.routes(true).await?;
        kernel.extend(self.nl.routes(false).await?);
        let synced: BTreeSet<u8> = self.sources.iter().filter(|s| s.synced).map(|s| s.source.protocol).collect();
        let mut seen: BTreeSet<IpNet> = BTreeSet::new();
        let mut out = Applied::default();
        kernel.retain(|r| self.owns(r.protocol));
        for r in kernel {
            let want = self.routes.get(&r.dst).and_then(Entry::winner);
            match want.map(|(s, t)| (s, t, self.kernel_route(r.dst, s, t))) {
                Some((s, t, Ok(w))) if same(&w, &r) => {
                    seen.insert(r.dst);
                    self.settle(r.dst, Some((s, t)));
                }
                Some(_) => {
                    self.dirty.insert(r.dst);
                }
                None if synced.contains(&r.protocol) => {
                    if self.nl.delete_route(&r).await? {
                        out.removed += 1;
                    }
                }
                None => {}
            }
        }
        // Whatever is not in the kernel as it should be is not programmed.
        let missing: Vec<IpNet> = self.routes.iter().filter(|(d, _)| !seen.contains(d)).map(|(d, _)| d).collect();
        for dst in missing {
            self.settle(dst, None);
            if self.routes.get(&dst).is_some_and(|e| e.winner().is_some()) {
                self.dirty.insert(dst);
            }
        }
        let a = self.apply().await?;
        out.added += a.added;
        out.removed += a.removed;
        out.skipped += a.skipped;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
    }

    #[test]
    fn targets_are_shared_and_freed_with_their_last_user() {
        let mut t = Targets::default();
        let via =
            |g: &str| Target::Via { gateway: g.parse().unwrap(), also: vec![], dev: Dev::Underlay, onlink: false };
        let a = t.acquire(via("10.0.0.1"));
        assert_eq!(t.acquire(via("10.0.0.1")), a);
        let b = t.acquire(via("10.0.0.2"));
        assert_ne!(a, b);
        t.release(a);
        assert_eq!(t.get(a), Some(&via("10.0.0.1")));
        t.release(a);
        assert_eq!(t.get(a), None);
        assert_eq!(t.acquire(Target::Blackhole), a, "a freed id is used again");
    }
}
