//! The VXLAN manager: Calico's `vxlan.calico` device (VNI 4096, port 4789, learning off, this
//! node's VTEP address and MAC) and, per peer node, a permanent neighbour entry for its VTEP and
//! an FDB entry sending its MAC to its node address. Peers change one at a time; a resync reads
//! the device's tables back and repairs them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use gingham_kernel::{KernelError, Netlink};
use ipnet::IpNet;

use crate::DataplaneError;
use crate::calc::VxlanPeer;

pub const VXLAN_DEVICE: &str = "vxlan.calico";
pub const VXLAN_VNI: u32 = 4096;
pub const VXLAN_PORT: u16 = 4789;

/// This node's end of the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtep {
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
}

pub struct VxlanManager {
    nl: Netlink,
    node_ip: Ipv4Addr,
    underlay: String,
    want: Option<Vtep>,
    peers: BTreeMap<String, VxlanPeer>,
    /// The device's index once it is right; None when it must be (re)checked.
    index: Option<u32>,
    device_dirty: bool,
    peers_dirty: bool,
}

impl VxlanManager {
    pub fn new(nl: Netlink, underlay: String, node_ip: Ipv4Addr) -> VxlanManager {
        VxlanManager {
            nl,
            node_ip,
            underlay,
            want: None,
            peers: BTreeMap::new(),
            index: None,
            device_dirty: true,
            peers_dirty: true,
        }
    }

    /// The device this node should have (None: none).
    pub fn set_vtep(&mut self, vtep: Option<Vtep>) {
        if self.want != vtep {
            self.want = vtep;
            self.device_dirty = true;
        }
    }

    pub fn set_peer(&mut self, node: &str, peer: Option<VxlanPeer>) {
        let changed = match peer {
            Some(p) => self.peers.insert(node.to_string(), p.clone()).as_ref() != Some(&p),
            None => self.peers.remove(node).is_some(),
        };
        self.peers_dirty |= changed;
    }

    /// The device's index, when it exists and is right.
    pub fn index(&self) -> Option<u32> {
        self.index
    }

    /// Something happened to the device behind our back: check it at the next apply.
    pub fn device_changed(&mut self) {
        self.device_dirty = true;
        self.peers_dirty = true;
    }

    /// Make the kernel match: the device (only when it changed), then the peer tables.
    pub async fn apply(&mut self) -> Result<(), DataplaneError> {
        if self.device_dirty {
            self.index = match self.want {
                Some(v) => Some(self.ensure_device(v).await?),
                None => {
                    self.nl.delete_link(VXLAN_DEVICE).await?;
                    None
                }
            };
            self.device_dirty = false;
            self.peers_dirty = true;
        }
        if self.peers_dirty {
            if let Some(index) = self.index {
                self.sync_peers(index).await?;
            }
            self.peers_dirty = false;
        }
        Ok(())
    }

    /// Check everything against the kernel.
    pub async fn resync(&mut self) -> Result<(), DataplaneError> {
        self.device_changed();
        self.apply().await
    }

    async fn ensure_device(&self, v: Vtep) -> Result<u32, DataplaneError> {
        let nl = &self.nl;
        let underlay = nl
            .link(&self.underlay)
            .await?
            .ok_or_else(|| KernelError::Netlink(format!("underlay interface {} not found", self.underlay)))?;
        let index =
            nl.ensure_vxlan(VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, self.node_ip, underlay.index, v.mac, v.mtu).await?;
        let vtep = IpNet::from(IpAddr::V4(v.addr));
        let addrs = nl.addresses(index).await?;
        // The new address first: a device left without an IPv4 address has every route
        // through it flushed by the kernel, without a notification.
        if !addrs.contains(&vtep) {
            nl.add_address(index, vtep).await?;
        }
        for stale in addrs.iter().filter(|a| a.addr().is_ipv4() && **a != vtep) {
            nl.delete_address(index, *stale).await?;
        }
        Ok(index)
    }

    /// Remove stale neighbour/FDB entries, write only the missing ones.
    async fn sync_peers(&self, index: u32) -> Result<(), DataplaneError> {
        let nl = &self.nl;
        let neigh: BTreeSet<(IpAddr, [u8; 6])> = self.peers.values().map(|p| (IpAddr::V4(p.vtep), p.mac)).collect();
        let fdb: BTreeSet<([u8; 6], IpAddr)> = self.peers.values().map(|p| (p.mac, p.node_ip)).collect();
        let mut have_neigh = BTreeSet::new();
        for n in nl.neighbours(index, false).await? {
            if let (Some(ip), Some(m)) = (n.ip, n.mac) {
                if neigh.contains(&(ip, m)) {
                    have_neigh.insert((ip, m));
                } else if ip.is_ipv4() {
                    nl.delete_neighbour(&n).await?;
                }
            }
        }
        let mut have_fdb = BTreeSet::new();
        for n in nl.neighbours(index, true).await? {
            if let (Some(dst), Some(m)) = (n.ip, n.mac) {
                if fdb.contains(&(m, dst)) {
                    have_fdb.insert((m, dst));
                } else {
                    nl.delete_neighbour(&n).await?;
                }
            }
        }
        for p in self.peers.values() {
            if !have_neigh.contains(&(IpAddr::V4(p.vtep), p.mac)) {
                nl.replace_neighbour(index, IpAddr::V4(p.vtep), p.mac).await?;
            }
            if !have_fdb.contains(&(p.mac, p.node_ip)) {
                nl.replace_fdb(index, p.mac, p.node_ip).await?;
            }
        }
        Ok(())
    }
}
