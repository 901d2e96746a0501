//! The route manager: routes from several sources (the calculated ones, BGP's), each with its
//! own protocol number. The kernel keys a route by table, destination, TOS and metric, so one
//! destination has one route: the manager programs the winner by source priority. Only routes
//! carrying a source's protocol are ever touched, and a source's routes left in the kernel (an
//! agent restart) stay until that source has said everything it wants.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use gingham_kernel::{Netlink, Route};
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
    routes: HashMap<IpNet, Target>,
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

pub struct RouteManager {
    nl: Netlink,
    devices: HashMap<Dev, u32>,
    sources: Vec<SourceState>,
    /// What is in the kernel for each destination, as far as we know.
    programmed: HashMap<IpNet, Route>,
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
    pub fn new(nl: Netlink, sources: &[Source]) -> RouteManager {
        let mut sources: Vec<SourceState> =
            sources.iter().map(|s| SourceState { source: *s, routes: HashMap::new(), synced: false }).collect();
        sources.sort_by_key(|s| s.source.priority);
        RouteManager { nl, devices: HashMap::new(), sources, programmed: HashMap::new(), dirty: BTreeSet::new() }
    }

    fn source_mut(&mut self, protocol: u8) -> Option<&mut SourceState> {
        self.sources.iter_mut().find(|s| s.source.protocol == protocol)
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
        for s in &self.sources {
            for (dst, t) in &s.routes {
                if matches!(t, Target::Via { dev: d, .. } if *d == dev) {
                    self.dirty.insert(*dst);
                }
            }
        }
    }

    /// Source `protocol` wants `dst` routed to `target` (None: it no longer routes `dst`).
    pub fn set(&mut self, protocol: u8, dst: IpNet, target: Option<Target>) {
        let Some(s) = self.source_mut(protocol) else { return };
        let changed = match target {
            Some(t) => s.routes.insert(dst, t.clone()).as_ref() != Some(&t),
            None => s.routes.remove(&dst).is_some(),
        };
        if changed {
            self.dirty.insert(dst);
        }
    }

    /// The source has given everything it wants: its other routes may be removed at the next
    /// resync.
    pub fn mark_synced(&mut self, protocol: u8) {
        if let Some(s) = self.source_mut(protocol) {
            s.synced = true;
        }
    }

    /// A route was removed behind our back: program it again at the next apply.
    pub fn forget(&mut self, dst: IpNet) {
        if self.programmed.remove(&dst).is_some() {
            self.dirty.insert(dst);
        }
    }

    /// The kernel reports a route: if it replaced ours for that destination (a route changed by
    /// hand), ours is programmed again at the next apply. True if so.
    pub fn observed(&mut self, r: &Route) -> bool {
        match self.programmed.get(&r.dst) {
            Some(p) if !same(p, r) => {
                self.forget(r.dst);
                true
            }
            _ => false,
        }
    }

    /// Whether `protocol` is one of ours.
    pub fn owns(&self, protocol: u8) -> bool {
        self.sources.iter().any(|s| s.source.protocol == protocol)
    }

    /// Destinations with a winning route.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    /// The kernel route `dst` should have now, if any (and whether a device was missing).
    fn winner(&self, dst: &IpNet) -> (Option<Route>, bool) {
        for s in &self.sources {
            let Some(t) = s.routes.get(dst) else { continue };
            let route = match t {
                Target::Blackhole => Route {
                    dst: *dst,
                    gateway: None,
                    also_via: Vec::new(),
                    oif: None,
                    scope_link: false,
                    onlink: false,
                    blackhole: true,
                    protocol: s.source.protocol,
                },
                Target::Via { gateway, also, dev, onlink } => match self.devices.get(dev) {
                    Some(oif) => Route {
                        dst: *dst,
                        gateway: Some(*gateway),
                        also_via: also.clone(),
                        oif: Some(*oif),
                        scope_link: false,
                        onlink: *onlink,
                        blackhole: false,
                        protocol: s.source.protocol,
                    },
                    None => return (None, true),
                },
            };
            return (Some(route), false);
        }
        (None, false)
    }

    /// Program the destinations that changed. Failures stay pending for the next apply.
    pub async fn apply(&mut self) -> Result<Applied, DataplaneError> {
        let mut out = Applied::default();
        let mut first_error = None;
        for dst in std::mem::take(&mut self.dirty) {
            let (want, missing_dev) = self.winner(&dst);
            out.skipped += usize::from(missing_dev);
            let have = self.programmed.get(&dst);
            let result = match (&want, have) {
                (Some(w), Some(h)) if same(w, h) => Ok(()),
                (Some(w), _) => self.nl.replace_route(w).await.map(|()| {
                    out.added += 1;
                }),
                (None, Some(h)) => self.nl.delete_route(h).await.map(|_| {
                    out.removed += 1;
                }),
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => match want {
                    Some(w) => {
                        self.programmed.insert(dst, w);
                    }
                    None => {
                        self.programmed.remove(&dst);
                    }
                },
                Err(e) => {
                    self.dirty.insert(dst);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    /// Read the kernel's routes of our protocols and make them match the desired state
    /// (drift repair; after a restart, adoption): missing ones added, wrong ones replaced,
    /// unwanted ones removed once their source is in sync.
    pub async fn resync(&mut self) -> Result<Applied, DataplaneError> {
        let mut kernel: Vec<Route> = self.nl.routes(true).await?;
        kernel.extend(self.nl.routes(false).await?);
        let synced: BTreeSet<u8> = self.sources.iter().filter(|s| s.synced).map(|s| s.source.protocol).collect();
        let mut seen: BTreeMap<IpNet, Route> = BTreeMap::new();
        let mut out = Applied::default();
        kernel.retain(|r| self.owns(r.protocol));
        for r in kernel {
            let (want, _) = self.winner(&r.dst);
            match want {
                Some(w) if same(&w, &r) => {
                    seen.insert(r.dst, r);
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
        // Everything that should be there and is not.
        let wanted: BTreeSet<IpNet> = self.sources.iter().flat_map(|s| s.routes.keys().copied()).collect();
        for dst in wanted {
            if !seen.contains_key(&dst) {
                self.programmed.remove(&dst);
                self.dirty.insert(dst);
            }
        }
        self.programmed.retain(|d, _| seen.contains_key(d) || self.dirty.contains(d));
        for (d, r) in seen {
            self.programmed.insert(d, r);
        }
        let a = self.apply().await?;
        out.added += a.added;
        out.removed += a.removed;
        out.skipped += a.skipped;
        Ok(out)
    }
}
