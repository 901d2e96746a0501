//! The workload manager: the host side of this node's pods — a route per pod address through
//! its `cali…` interface and the interface's sysctls (proxy ARP/NDP, no proxy delay,
//! forwarding). The CNI ADD sets them up first; this manager keeps them so: a pod route deleted
//! by hand comes back as soon as the kernel reports it. It only adds what is missing: an
//! interface it does not know (an ADD still in flight) is left alone.

use std::collections::{BTreeSet, HashMap};

use gingham_kernel::{Netlink, Route, sysctl};
use ipnet::IpNet;

use crate::DataplaneError;

/// Route protocol of workload routes (Felix's deviceRouteProtocol default: RTPROT_BOOT).
pub const WORKLOAD_PROTO: u8 = 3;

/// One local workload: its host interface and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub iface: String,
    pub ips: Vec<IpNet>,
}

/// The sysctls of a workload's host interface, as Calico sets them.
pub fn host_sysctls(iface: &str, v6: bool) -> Vec<([&str; 5], &'static str)> {
    let mut v = vec![
        (["net", "ipv4", "conf", iface, "proxy_arp"], "1"),
        (["net", "ipv4", "neigh", iface, "proxy_delay"], "0"),
        (["net", "ipv4", "conf", iface, "forwarding"], "1"),
    ];
    if v6 {
        v.extend([
            (["net", "ipv6", "conf", iface, "proxy_ndp"], "1"),
            (["net", "ipv6", "conf", iface, "forwarding"], "1"),
            (["net", "ipv6", "conf", iface, "accept_ra"], "0"),
        ]);
    }
    v
}

fn host_route(ip: &IpNet, oif: u32) -> Route {
    Route::device(IpNet::new(ip.addr(), ip.max_prefix_len()).unwrap_or(*ip), oif, WORKLOAD_PROTO)
}

pub struct WorkloadManager {
    nl: Netlink,
    want: HashMap<String, Workload>,
    dirty: BTreeSet<String>,
}

impl WorkloadManager {
    pub fn new(nl: Netlink) -> WorkloadManager {
        WorkloadManager { nl, want: HashMap::new(), dirty: BTreeSet::new() }
    }

    /// Workload `key` (its endpoint's namespace/name) is now `w` (None: gone).
    pub fn set(&mut self, key: &str, w: Option<Workload>) {
        let changed = match w {
            Some(w) => self.want.insert(key.to_string(), w.clone()).as_ref() != Some(&w),
            None => self.want.remove(key).is_some(),
        };
        if changed {
            self.dirty.insert(key.to_string());
        }
    }

    pub fn len(&self) -> usize {
        self.want.len()
    }

    pub fn is_empty(&self) -> bool {
        self.want.is_empty()
    }

    pub fn knows_key(&self, key: &str) -> bool {
        self.want.contains_key(key)
    }

    /// Whether `iface` is a workload interface we keep.
    pub fn knows_iface(&self, iface: &str) -> bool {
        self.want.values().any(|w| w.iface == iface)
    }

    /// A workload route or interface changed behind our back: check that workload again.
    pub fn touched(&mut self, dst: Option<&IpNet>, iface: Option<&str>) {
        for (k, w) in &self.want {
            if iface.is_some_and(|i| i == w.iface) || dst.is_some_and(|d| w.ips.iter().any(|ip| ip.addr() == d.addr()))
            {
                self.dirty.insert(k.clone());
            }
        }
    }

    /// Bring the changed workloads' routes and sysctls in place.
    pub async fn apply(&mut self) -> Result<usize, DataplaneError> {
        let keys = std::mem::take(&mut self.dirty);
        if keys.is_empty() {
            return Ok(0);
        }
        let mut added = 0;
        let mut keys = keys.into_iter();
        while let Some(k) = keys.next() {
            match self.apply_one(&k).await {
                Ok(n) => added += n,
                Err(e) => {
                    // Tried again at the next pass: this one and those not reached.
                    self.dirty.insert(k);
                    self.dirty.extend(keys);
                    return Err(e);
                }
            }
        }
        Ok(added)
    }

    /// One workload's host routes and sysctls; how many routes were put back.
    async fn apply_one(&self, k: &str) -> Result<usize, DataplaneError> {
        let Some(w) = self.want.get(k) else { return Ok(0) };
        let Some(link) = self.nl.link(&w.iface).await? else { return Ok(0) };
        let mut added = 0;
        for ip in &w.ips {
            let r = host_route(ip, link.index);
            // One lookup per address: a dump of the node's every route per new pod would grow
            // with the node.
            let have = self.nl.route_for(ip.addr()).await?;
            if !have.is_some_and(|h| h.dst == r.dst && h.oif == r.oif) {
                self.nl.replace_route(&r).await?;
                added += 1;
            }
        }
        let v6 = w.ips.iter().any(|n| n.addr().is_ipv6());
        for (key, value) in host_sysctls(&w.iface, v6) {
            if sysctl::read(&key).ok().as_deref() != Some(value) {
                // The interface may be going away right now; that is not an error here.
                let _ = sysctl::write(&key, value);
            }
        }
        Ok(added)
    }

    /// Check every workload.
    pub async fn resync(&mut self) -> Result<usize, DataplaneError> {
        self.dirty.extend(self.want.keys().cloned());
        self.apply().await
    }
}
