//! nftables netlink spoken directly, for the two things libnftables is slow at: reading the
//! ruleset generation, and changing set elements. libnftables fetches (and parses) the table
//! into its cache before every transaction, so a one-element change costs tens of
//! milliseconds in a large table; a batch of NEWSETELEM/DELSETELEM messages costs one round
//! trip. Everything else stays with libnftables.

use std::os::fd::{AsRawFd, OwnedFd};

use super::nft::{Element, Family, Table};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_GEN_ID: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
/// Elements per message (a message stays far below the socket buffer).
const CHUNK: usize = 512;

/// Element changes to one set, as one part of a batch.
#[derive(Clone, Debug)]
pub struct SetElements {
    pub table: Table,
    pub set: String,
    /// An interval set: each prefix is a start element and an end element (none when the
    /// range reaches the top of the address space), as libnftables writes them.
    pub interval: bool,
    pub add: bool,
    pub elements: Vec<Element>,
}

/// A netfilter netlink socket in the namespace it was opened in.
pub(crate) struct Wire {
    fd: OwnedFd,
    seq: u32,
}

fn family_code(f: Family) -> u8 {
    match f {
        Family::Inet => 1,
        Family::Ip => 2,
        Family::Ip6 => 10,
    }
}

/// Append one netlink attribute (padded to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend(((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// A nested attribute: `fill` writes its contents.
fn nested(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend([0u8; 4]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn ip_bytes(a: std::net::IpAddr) -> Vec<u8> {
    match a {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The address after the prefix's last one, or None past the top of the space.
fn after(n: &ipnet::IpNet) -> Option<Vec<u8>> {
    match n {
        ipnet::IpNet::V4(n) => u32::from(n.broadcast()).checked_add(1).map(|v| v.to_be_bytes().to_vec()),
        ipnet::IpNet::V6(n) => u128::from(n.broadcast()).checked_add(1).map(|v| v.to_be_bytes().to_vec()),
    }
}

/// The (key, flags) elements one element is on the wire; None for what this path does not
/// speak (verdict maps, interface names: libnftables keeps those).
fn keys(e: &Element, interval: bool) -> Option<Vec<(Vec<u8>, u32)>> {
    match e {
        Element::Net(n) if interval => {
            let n = n.trunc();
            let mut v = vec![(ip_bytes(n.network()), 0)];
            if let Some(end) = after(&n) {
                v.push((end, NFT_SET_ELEM_INTERVAL_END));
            }
            Some(v)
        }
        Element::Net(n) if n.prefix_len() == n.max_prefix_len() => Some(vec![(ip_bytes(n.addr()), 0)]),
        // A concatenation: each field in its own 4-byte-aligned slot.
        Element::ProtoPort(a, proto, port) if !interval => {
            let mut k = ip_bytes(*a);
            k.extend([*proto, 0, 0, 0]);
            k.extend(port.to_be_bytes());
            k.extend([0, 0]);
            Some(vec![(k, 0)])
        }
        _ => None,
    }
}

/// Whether every element of these changes can go over this path.
pub fn speaks(changes: &[SetElements]) -> bool {
    changes.iter().all(|c| c.elements.iter().all(|e| keys(e, c.interval).is_some()))
}

impl Wire {
    pub(crate) fn open() -> Result<Wire, String> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, setsockopt, sockopt,
        };
        let fd = nix::sys::socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| format!("netfilter netlink socket: {e}"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("netfilter netlink bind: {e}"))?;
        // Never wait on the kernel for long.
        setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(1, 0))
            .map_err(|e| format!("netfilter netlink timeout: {e}"))?;
        Ok(Wire { fd, seq: 0 })
    }

    fn message(&mut self, buf: &mut Vec<u8>, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &[u8]) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        buf.extend(((16 + 4 + attrs.len()) as u32).to_ne_bytes());
        buf.extend(kind.to_ne_bytes());
        buf.extend(flags.to_ne_bytes());
        buf.extend(self.seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes());
        buf.extend([family, 0]);
        buf.extend(res_id.to_be_bytes());
        buf.extend(attrs);
        self.seq
    }

    fn send(&self, buf: &[u8]) -> Result<(), String> {
        let n = nix::sys::socket::send(self.fd.as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty())
            .map_err(|e| format!("nftables netlink send: {e}"))?;
        if n != buf.len() { Err("nftables netlink: short send".into()) } else { Ok(()) }
    }

    /// Read replies, handing each (type, seq, payload) to `each` until it says done.
    fn receive(&self, mut each: impl FnMut(u16, u32, &[u8]) -> Option<Result<(), String>>) -> Result<(), String> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = nix::sys::socket::recv(self.fd.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())
                .map_err(|e| format!("nftables netlink receive: {e}"))?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                if len < 16 || at + len > n {
                    return Err("nftables netlink: a malformed reply".into());
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = u32::from_ne_bytes([buf[at + 8], buf[at + 9], buf[at + 10], buf[at + 11]]);
                if let Some(done) = each(kind, seq, &buf[at + 16..at + len]) {
                    return done;
                }
                at += len.next_multiple_of(4);
            }
        }
    }

    /// The namespace's ruleset generation: every committed transaction, by anyone, bumps it.
    pub(crate) fn generation(&mut self) -> Result<u32, String> {
        let mut buf = Vec::with_capacity(20);
        let seq = self.message(&mut buf, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, 0, 0, &[]);
        self.send(&buf)?;
        let mut found = None;
        self.receive(|kind, s, payload| {
            if s != seq {
                return None;
            }
            if kind == NLMSG_ERROR {
                return Some(Err(format!("NFT_MSG_GETGEN: {}", errno(payload))));
            }
            if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                return None;
            }
            // Attributes follow the 4-byte nfgenmsg.
            let mut a = 4;
            while a + 4 <= payload.len() {
                let alen = u16::from_ne_bytes([payload[a], payload[a + 1]]) as usize;
                let atype = u16::from_ne_bytes([payload[a + 2], payload[a + 3]]) & 0x3fff;
                if alen < 4 || a + alen > payload.len() {
                    break;
                }
                if atype == NFTA_GEN_ID && alen >= 8 {
                    found = Some(u32::from_be_bytes([payload[a + 4], payload[a + 5], payload[a + 6], payload[a + 7]]));
                }
                a += alen.next_multiple_of(4);
            }
            Some(Ok(()))
        })?;
        found.ok_or_else(|| "NFT_MSG_GETGEN: no generation in the reply".into())
    }

    /// Apply element changes as one transaction (all or nothing).
    pub(crate) fn elements(&mut self, changes: &[SetElements]) -> Result<(), String> {
        let mut buf = Vec::new();
        let subsys = NFNL_SUBSYS_NFTABLES;
        self.message(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, subsys, &[]);
        let mut waiting = std::collections::BTreeSet::new();
        for c in changes {
            let mut wire: Vec<(Vec<u8>, u32)> = Vec::new();
            for e in &c.elements {
                wire.extend(keys(e, c.interval).ok_or_else(|| format!("element {e} needs libnftables"))?);
            }
            let (msg, flags) = if c.add {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
            } else {
                (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
            };
            for chunk in wire.chunks(CHUNK) {
                let mut attrs = Vec::new();
                attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, &cstr(&c.table.name));
                attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &cstr(&c.set));
                nested(&mut attrs, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    for (key, fl) in chunk {
                        nested(b, NFTA_LIST_ELEM, |b| {
                            nested(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, key));
                            if *fl != 0 {
                                attr(b, NFTA_SET_ELEM_FLAGS, &fl.to_be_bytes());
                            }
                        });
                    }
                });
                let kind = (subsys << 8) | msg;
                waiting.insert(self.message(&mut buf, kind, flags, family_code(c.table.family), 0, &attrs));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        self.message(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, subsys, &[]);
        self.send(&buf)?;
        let mut failure = None;
        let r = self.receive(|kind, seq, payload| {
            if kind == NLMSG_ERROR && waiting.remove(&seq) {
                let code = errno(payload);
                if code != 0 && failure.is_none() {
                    failure = Some(code);
                }
            }
            // The first failure aborts the batch; the kernel may not answer the rest.
            (waiting.is_empty() || failure.is_some()).then_some(Ok(()))
        });
        match failure {
            Some(code) => {
                // Drain what else the kernel says about this batch before the next request.
                let _ = self.drain();
                Err(format!("set elements: {}", std::io::Error::from_raw_os_error(-code)))
            }
            None => r,
        }
    }

    /// Discard replies already queued (after a failed batch).
    fn drain(&self) -> Result<(), String> {
        use nix::sys::socket::{MsgFlags, recv};
        let mut buf = vec![0u8; 64 * 1024];
        while recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
        Ok(())
    }
}

/// The (negative) error code of an NLMSG_ERROR payload.
fn errno(payload: &[u8]) -> i32 {
    payload.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(-5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_encoded_as_libnftables_writes_them() {
        let net = |s: &str| Element::Net(s.parse().unwrap());
        assert_eq!(keys(&net("10.0.0.5/32"), true), Some(vec![(vec![10, 0, 0, 5], 0), (vec![10, 0, 0, 6], 1)]));
        assert_eq!(keys(&net("10.0.0.0/24"), true), Some(vec![(vec![10, 0, 0, 0], 0), (vec![10, 0, 1, 0], 1)]));
        // The top of the space has no end element.
        assert_eq!(keys(&net("255.255.255.0/24"), true), Some(vec![(vec![255, 255, 255, 0], 0)]));
        assert_eq!(keys(&net("10.0.0.5/32"), false), Some(vec![(vec![10, 0, 0, 5], 0)]));
        assert_eq!(keys(&net("10.0.0.0/24"), false), None, "a prefix needs an interval set");
        let pp = Element::ProtoPort("10.0.0.1".parse().unwrap(), 6, 8080);
        assert_eq!(keys(&pp, false), Some(vec![(vec![10, 0, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0], 0)]));
        assert_eq!(keys(&Element::IfJump("cali1".into(), "x".into()), false), None);
    }
}
