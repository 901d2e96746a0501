//! nftables netlink spoken directly: every transaction is encoded here and sent as one
//! batch (libnftables fetches and parses the whole table into its cache before each of its
//! transactions, which costs tens of milliseconds per change in a large table and most of a
//! full sync). libnftables stays for listing tables, in nft's own words. Also the ruleset
//! generation, which tells our commits from everyone else's.

use std::os::fd::{AsRawFd, OwnedFd};

use super::nft::{BaseChain, ChainType, Element, Family, Hook, Op, SetType, Table, check_ifname, check_name, render};
use super::nft_expr::{self as expr, AnonElement, AnonSet, Compiler};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
/// Elements per message (a message stays far below the socket buffer).
const CHUNK: usize = 512;

/// A netfilter netlink socket in the namespace it was opened in.
pub(crate) struct Wire {
    fd: OwnedFd,
    seq: u32,
    send_buffer: usize,
    /// Whether each set we wrote to is an interval set (its elements are encoded so).
    intervals: std::collections::HashMap<(Table, String), bool>,
    /// Batches sent, and a per-socket seed: together, each batch's anonymous set nonce.
    batches: u32,
    seed: u32,
}

fn family_code(f: Family) -> u8 {
    match f {
        Family::Inet => 1,
        Family::Ip => 2,
        Family::Ip6 => 10,
    }
}

/// Append one netlink attribute (padded to 4 bytes).
pub(crate) fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend(((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// A nested attribute: `fill` writes its contents.
pub(crate) fn nested(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend([0u8; 4]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One set element on the wire: key, flags, and the chain a verdict-map entry jumps to.
#[derive(Debug, PartialEq, Eq)]
struct WireElement {
    key: Vec<u8>,
    end: bool,
    jump: Option<String>,
}

/// The elements one element is on the wire, as libnftables writes them: an interval set's
/// prefix is a start element and an end element (none when it reaches the top of the space).
fn wire_elements(e: &Element, interval: bool) -> Result<Vec<WireElement>, String> {
    let plain = |key: Vec<u8>| vec![WireElement { key, end: false, jump: None }];
    Ok(match e {
        Element::Net(n) if interval => {
            expr::net_interval(n).into_iter().map(|(key, end)| WireElement { key, end, jump: None }).collect()
        }
        Element::Net(n) if n.prefix_len() == n.max_prefix_len() => plain(expr::ip_bytes(n.addr())),
        Element::Net(n) => return Err(format!("{n} is a prefix, and the set is not an interval set")),
        // A concatenation: each field in its own 4-byte-aligned slot.
        Element::ProtoPort(a, proto, port) => {
            let mut k = expr::ip_bytes(*a);
            k.extend([*proto, 0, 0, 0]);
            k.extend(port.to_be_bytes());
            k.extend([0, 0]);
            plain(k)
        }
        Element::Ifname(n) => {
            check_ifname(n).map_err(|e| e.to_string())?;
            plain(expr::ifname_key(n))
        }
        Element::IfJump(n, chain) => {
            check_ifname(n).map_err(|e| e.to_string())?;
            check_name(chain).map_err(|e| e.to_string())?;
            vec![WireElement { key: expr::ifname_key(n), end: false, jump: Some(chain.clone()) }]
        }
    })
}

/// nft's key type and length of a set type.
fn key_of(kind: SetType) -> (u32, u32) {
    use expr::{TYPE_INET_PROTOCOL as P, TYPE_INET_SERVICE as S, TYPE_IP6ADDR, TYPE_IPADDR, concat_type};
    match kind {
        SetType::Ipv4Addr => (TYPE_IPADDR, 4),
        SetType::Ipv6Addr => (TYPE_IP6ADDR, 16),
        SetType::Ifname => (expr::TYPE_IFNAME, 16),
        SetType::Ipv4ProtoPort => (concat_type(&[TYPE_IPADDR, P, S]), 12),
        SetType::Ipv6ProtoPort => (concat_type(&[TYPE_IP6ADDR, P, S]), 24),
    }
}

/// An anonymous set's name. The kernel would number `__set%d` itself, but finding a free
/// number walks every set of the table, for every new set: thousands of anonymous sets in one
/// batch then cost seconds. A name unique to the batch (its nonce) and the set costs nothing;
/// should one ever collide with a set still there, the batch fails whole and is retried.
fn anon_name(nonce: u32, id: u32) -> String {
    format!("__gs{nonce:08x}.{id}")
}

/// A batch being built: messages, and which operation each came from (for errors).
struct Batch {
    buf: Vec<u8>,
    /// (first sequence number, operation index), in order.
    origin: Vec<(u32, usize)>,
    op: usize,
    /// The last message's sequence number and offset.
    last: Option<(u32, usize)>,
    /// Batch-local set IDs handed out so far.
    anon_id: u32,
    /// Distinguishes this batch's anonymous set names from earlier batches'.
    nonce: u32,
}

impl Batch {
    fn ack_last(&mut self, at: usize) {
        let flags = u16::from_ne_bytes([self.buf[at + 6], self.buf[at + 7]]) | NLM_F_ACK;
        self.buf[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
    }

    /// The operation a message of this batch came from.
    fn op_of(&self, seq: u32) -> Option<usize> {
        let i = self.origin.partition_point(|(s, _)| *s <= seq);
        i.checked_sub(1).map(|i| self.origin[i].1)
    }
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
        // Never wait on the kernel for long (a batch is processed before send returns).
        setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(1, 0))
            .map_err(|e| format!("netfilter netlink timeout: {e}"))?;
        // Errors carry only the failed message's header: a batch of thousands of failing
        // messages then still fits the receive buffer.
        let one: nix::libc::c_int = 1;
        // SAFETY: an int option with its size, on a socket we own.
        let rc = unsafe {
            nix::libc::setsockopt(
                fd.as_raw_fd(),
                nix::libc::SOL_NETLINK,
                nix::libc::NETLINK_CAP_ACK,
                &one as *const nix::libc::c_int as *const nix::libc::c_void,
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(format!("netfilter netlink NETLINK_CAP_ACK: {}", std::io::Error::last_os_error()));
        }
        setsockopt(&fd, sockopt::RcvBuf, &(1usize << 20)).map_err(|e| format!("netfilter netlink buffer: {e}"))?;
        // Another process (an agent before a restart) may have named sets from its own batches.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
            ^ std::process::id().rotate_left(8);
        Ok(Wire { fd, seq: 0, send_buffer: 0, intervals: Default::default(), batches: 0, seed })
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

    /// One message of a batch, for the operation being encoded.
    fn add(&mut self, b: &mut Batch, msg: u16, flags: u16, t: &Table, attrs: &[u8]) {
        let at = b.buf.len();
        let seq = self.message(
            &mut b.buf,
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            family_code(t.family),
            0,
            attrs,
        );
        if b.origin.last().is_none_or(|(_, op)| *op != b.op) {
            b.origin.push((seq, b.op));
        }
        b.last = Some((seq, at));
    }

    fn send(&mut self, buf: &[u8]) -> Result<(), String> {
        use nix::sys::socket::{setsockopt, sockopt};
        // A full sync is one message of megabytes: the buffer must hold it whole.
        if buf.len() + 4096 > self.send_buffer {
            let want = (buf.len() + 64 * 1024).max(256 * 1024);
            setsockopt(&self.fd, sockopt::SndBufForce, &want)
                .or_else(|_| setsockopt(&self.fd, sockopt::SndBuf, &want))
                .map_err(|e| format!("nftables netlink send buffer: {e}"))?;
            self.send_buffer = want;
        }
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

    /// One request answered by one message of kind `answer`: its attributes.
    fn ask(&mut self, msg: u16, family: u8, attrs: &[u8], answer: u16) -> Result<Vec<(u16, Vec<u8>)>, String> {
        let mut buf = Vec::new();
        let seq = self.message(&mut buf, (NFNL_SUBSYS_NFTABLES << 8) | msg, NLM_F_REQUEST, family, 0, attrs);
        self.send(&buf)?;
        let mut found = None;
        self.receive(|kind, s, payload| {
            if s != seq {
                return None;
            }
            if kind == NLMSG_ERROR {
                return Some(Err(std::io::Error::from_raw_os_error(-errno(payload)).to_string()));
            }
            if kind != (NFNL_SUBSYS_NFTABLES << 8) | answer {
                return None;
            }
            found = Some(parse_attrs(payload.get(4..).unwrap_or_default()));
            Some(Ok(()))
        })?;
        found.ok_or_else(|| "nftables netlink: no answer".into())
    }

    /// The namespace's ruleset generation: every committed transaction, by anyone, bumps it.
    pub(crate) fn generation(&mut self) -> Result<u32, String> {
        let attrs = self.ask(NFT_MSG_GETGEN, 0, &[], NFT_MSG_NEWGEN).map_err(|e| format!("NFT_MSG_GETGEN: {e}"))?;
        attrs
            .iter()
            .find(|(k, v)| *k == NFTA_GEN_ID && v.len() >= 4)
            .map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or_else(|| "NFT_MSG_GETGEN: no generation in the reply".into())
    }

    /// Whether an existing set is an interval set (asked once, then remembered).
    fn is_interval(&mut self, t: &Table, set: &str) -> Result<bool, String> {
        let key = (t.clone(), set.to_string());
        if let Some(i) = self.intervals.get(&key) {
            return Ok(*i);
        }
        let mut attrs = Vec::new();
        attr(&mut attrs, 1, &cstr(&t.name)); // NFTA_SET_TABLE
        attr(&mut attrs, 2, &cstr(set)); // NFTA_SET_NAME
        let reply = self
            .ask(NFT_MSG_GETSET, family_code(t.family), &attrs, NFT_MSG_NEWSET)
            .map_err(|e| format!("set {t} {set}: {e}"))?;
        let flags = reply
            .iter()
            .find(|(k, v)| *k == 3 && v.len() >= 4) // NFTA_SET_FLAGS
            .map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            .unwrap_or(0);
        let interval = flags & NFT_SET_INTERVAL != 0;
        self.intervals.insert(key, interval);
        Ok(interval)
    }

    fn elements(&mut self, b: &mut Batch, t: &Table, set: &str, anon: Option<u32>, wire: &[WireElement], add: bool) {
        let (msg, flags) = if add { (NFT_MSG_NEWSETELEM, NLM_F_CREATE) } else { (NFT_MSG_DELSETELEM, 0) };
        for chunk in wire.chunks(CHUNK) {
            let mut attrs = Vec::new();
            attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, &cstr(&t.name));
            attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &cstr(set));
            if let Some(id) = anon {
                attr(&mut attrs, NFTA_SET_ELEM_LIST_SET_ID, &id.to_be_bytes());
            }
            nested(&mut attrs, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                for e in chunk {
                    nested(b, NFTA_LIST_ELEM, |b| {
                        nested(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, &e.key));
                        if e.end {
                            attr(b, NFTA_SET_ELEM_FLAGS, &NFT_SET_ELEM_INTERVAL_END.to_be_bytes());
                        }
                        if let Some(chain) = &e.jump {
                            nested(b, NFTA_SET_ELEM_DATA, |b| expr::verdict(b, expr::NFT_JUMP, Some(chain)));
                        }
                    });
                }
            });
            self.add(b, msg, flags, t, &attrs);
        }
    }

    fn new_set(&mut self, b: &mut Batch, t: &Table, name: &str, flags: u32, key: (u32, u32), id: Option<u32>) {
        let mut attrs = Vec::new();
        attr(&mut attrs, 1, &cstr(&t.name)); // TABLE
        attr(&mut attrs, 2, &cstr(name)); // NAME
        attr(&mut attrs, 3, &flags.to_be_bytes()); // FLAGS
        attr(&mut attrs, 4, &key.0.to_be_bytes()); // KEY_TYPE
        attr(&mut attrs, 5, &key.1.to_be_bytes()); // KEY_LEN
        if flags & NFT_SET_MAP != 0 {
            attr(&mut attrs, 6, &NFT_DATA_VERDICT.to_be_bytes()); // DATA_TYPE
        }
        if let Some(id) = id {
            attr(&mut attrs, 10, &id.to_be_bytes()); // NFTA_SET_ID
        }
        if flags & NFT_SET_ANONYMOUS == 0 {
            // nft reads the key's byte order from the set's user data (for listing): an
            // interface name is a host-order string, everything else network order.
            let order: u32 = if key.0 == expr::TYPE_IFNAME { 1 } else { 2 };
            let mut udata = vec![0u8, 4]; // NFTNL_UDATA_SET_KEYBYTEORDER, length
            udata.extend(order.to_ne_bytes());
            attr(&mut attrs, 13, &udata); // NFTA_SET_USERDATA
        }
        self.add(b, NFT_MSG_NEWSET, NLM_F_CREATE, t, &attrs);
    }

    fn anon_set(&mut self, b: &mut Batch, t: &Table, s: &AnonSet) {
        let flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | if s.interval { NFT_SET_INTERVAL } else { 0 };
        let name = anon_name(b.nonce, s.id);
        self.new_set(b, t, &name, flags, (s.key_type, s.key_len), Some(s.id));
        let wire: Vec<WireElement> = s
            .elements
            .iter()
            .map(|(key, end): &AnonElement| WireElement { key: key.clone(), end: *end, jump: None })
            .collect();
        self.elements(b, t, &name, Some(s.id), &wire, true);
    }

    fn encode(&mut self, b: &mut Batch, op: &Op) -> Result<(), String> {
        let named = |t: &Table, kind: u16, name: &str| -> Result<Vec<u8>, String> {
            check_name(&t.name).map_err(|e| e.to_string())?;
            check_name(name).map_err(|e| e.to_string())?;
            let mut a = Vec::new();
            attr(&mut a, 1, &cstr(&t.name));
            attr(&mut a, kind, &cstr(name));
            Ok(a)
        };
        match op {
            Op::AddTable(t) => {
                check_name(&t.name).map_err(|e| e.to_string())?;
                let mut a = Vec::new();
                attr(&mut a, 1, &cstr(&t.name)); // NFTA_TABLE_NAME
                self.add(b, NFT_MSG_NEWTABLE, NLM_F_CREATE, t, &a);
            }
            // Create-then-delete: deleting an absent table is then not an error.
            Op::DeleteTable(t) => {
                check_name(&t.name).map_err(|e| e.to_string())?;
                let mut a = Vec::new();
                attr(&mut a, 1, &cstr(&t.name));
                self.add(b, NFT_MSG_NEWTABLE, NLM_F_CREATE, t, &a);
                self.add(b, NFT_MSG_DELTABLE, 0, t, &a);
                self.intervals.retain(|(table, _), _| table != t);
            }
            Op::AddSet(t, s) => {
                named(t, 2, &s.name)?;
                if s.interval && matches!(s.kind, SetType::Ipv4ProtoPort | SetType::Ipv6ProtoPort) {
                    return Err(format!("set {}: a concatenation cannot be an interval set here", s.name));
                }
                b.anon_id += 1;
                let id = b.anon_id;
                self.new_set(b, t, &s.name, if s.interval { NFT_SET_INTERVAL } else { 0 }, key_of(s.kind), Some(id));
                self.intervals.insert((t.clone(), s.name.clone()), s.interval);
            }
            Op::FlushSet(t, s) => {
                let a = named(t, NFTA_SET_ELEM_LIST_SET, s)?;
                self.add(b, NFT_MSG_DELSETELEM, 0, t, &a);
            }
            Op::AddElements(t, s, e) | Op::DeleteElements(t, s, e) => {
                if e.is_empty() {
                    return Ok(());
                }
                named(t, 2, s)?;
                let interval = self.is_interval(t, s)?;
                let mut wire = Vec::with_capacity(e.len() * 2);
                for el in e {
                    wire.extend(wire_elements(el, interval)?);
                }
                self.elements(b, t, s, None, &wire, matches!(op, Op::AddElements(..)));
            }
            Op::AddChain(t, c, base) => {
                let mut a = named(t, 3, c)?; // NFTA_CHAIN_NAME
                if let Some(base) = base {
                    base_chain(&mut a, base);
                }
                self.add(b, NFT_MSG_NEWCHAIN, NLM_F_CREATE, t, &a);
            }
            Op::FlushChain(t, c) => {
                let a = named(t, 2, c)?; // NFTA_RULE_CHAIN
                self.add(b, NFT_MSG_DELRULE, 0, t, &a);
            }
            Op::AddRule(t, c, r) => {
                let mut a = named(t, 2, c)?;
                let nonce = b.nonce;
                let name = move |id| anon_name(nonce, id);
                let (exprs, sets) = Compiler::new(t.family, &mut b.anon_id, &name).rule(r)?;
                for s in &sets {
                    self.anon_set(b, t, s);
                }
                nested(&mut a, 4, |n| n.extend(&exprs)); // NFTA_RULE_EXPRESSIONS
                self.add(b, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, t, &a);
            }
            Op::DeleteChain(t, c) => {
                let a = named(t, 3, c)?;
                self.add(b, NFT_MSG_DELCHAIN, 0, t, &a);
            }
            Op::AddIfnameVmap(t, m) => {
                named(t, 2, m)?;
                b.anon_id += 1;
                let id = b.anon_id;
                self.new_set(b, t, m, NFT_SET_MAP, (expr::TYPE_IFNAME, 16), Some(id));
                self.intervals.insert((t.clone(), m.clone()), false);
            }
            Op::DeleteSet(t, s) => {
                let a = named(t, 2, s)?;
                self.add(b, NFT_MSG_DELSET, 0, t, &a);
                self.intervals.remove(&(t.clone(), s.clone()));
            }
        }
        Ok(())
    }

    /// Apply `ops` as one transaction: all of them or none. An error names the operation.
    pub(crate) fn transaction(&mut self, ops: &[Op]) -> Result<(), String> {
        let r = self.try_transaction(ops);
        if r.is_err() {
            // What we remembered of sets may describe a batch that did not land.
            self.intervals.clear();
        }
        r
    }

    fn try_transaction(&mut self, ops: &[Op]) -> Result<(), String> {
        self.batches = self.batches.wrapping_add(1);
        let nonce = self.batches ^ self.seed;
        let mut b = Batch { buf: Vec::new(), origin: Vec::new(), op: 0, last: None, anon_id: 0, nonce };
        let begin = self.message(&mut b.buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, &[]);
        for (i, op) in ops.iter().enumerate() {
            b.op = i;
            self.encode(&mut b, op)
                .map_err(|e| format!("{e}\nin: {}", render(std::slice::from_ref(op)).unwrap_or_default().trim()))?;
        }
        let Some((last, at)) = b.last else { return Ok(()) };
        // Errors come unasked; the last message's acknowledgement says the batch is done.
        b.ack_last(at);
        self.message(&mut b.buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, &[]);
        self.send(&b.buf)?;
        let mut failure: Option<(u32, i32)> = None;
        let r = self.receive(|kind, seq, payload| {
            if kind != NLMSG_ERROR || seq < begin || seq > last {
                return None;
            }
            let code = errno(payload);
            if code != 0 && failure.is_none() {
                failure = Some((seq, code));
            }
            // A failed commit is answered on the batch's first message, before the rest.
            (seq == last || (seq == begin && code != 0)).then_some(Ok(()))
        });
        if let Some((seq, code)) = failure {
            let _ = self.drain();
            let why = std::io::Error::from_raw_os_error(-code);
            let what = b
                .op_of(seq)
                .filter(|_| seq != begin)
                .and_then(|i| render(std::slice::from_ref(&ops[i])).ok())
                .map(|t| format!("\nin: {}", t.trim()))
                .unwrap_or_else(|| " (at commit)".into());
            return Err(format!("nftables: {why}{what}"));
        }
        if r.is_err() {
            let _ = self.drain();
        }
        r
    }

    /// Discard replies already queued (after a failed batch).
    fn drain(&self) -> Result<(), String> {
        use nix::sys::socket::{MsgFlags, recv};
        let mut buf = vec![0u8; 64 * 1024];
        while recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
        Ok(())
    }
}

fn base_chain(a: &mut Vec<u8>, base: &BaseChain) {
    let hook: u32 = match base.hook {
        Hook::Prerouting => 0,
        Hook::Input => 1,
        Hook::Forward => 2,
        Hook::Output => 3,
        Hook::Postrouting => 4,
    };
    nested(a, 4, |h| {
        attr(h, 1, &hook.to_be_bytes()); // NFTA_HOOK_HOOKNUM
        attr(h, 2, &base.priority.to_be_bytes()); // NFTA_HOOK_PRIORITY
    });
    let policy = if base.accept_by_default { expr::NF_ACCEPT } else { expr::NF_DROP };
    attr(a, 5, &policy.to_be_bytes()); // NFTA_CHAIN_POLICY
    attr(a, 7, &cstr(if base.kind == ChainType::Nat { "nat" } else { "filter" })); // NFTA_CHAIN_TYPE
}

/// A message's top-level attributes (kind without flags, payload).
fn parse_attrs(mut p: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while p.len() >= 4 {
        let len = u16::from_ne_bytes([p[0], p[1]]) as usize;
        let kind = u16::from_ne_bytes([p[2], p[3]]) & 0x3fff;
        if len < 4 || len > p.len() {
            break;
        }
        out.push((kind, p[4..len].to_vec()));
        p = &p[len.next_multiple_of(4).min(p.len())..];
    }
    out
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
        let keys = |e: &Element, interval: bool| {
            wire_elements(e, interval)
                .ok()
                .map(|v| v.into_iter().map(|w| (w.key, u32::from(w.end))).collect::<Vec<_>>())
        };
        assert_eq!(keys(&net("10.0.0.5/32"), true), Some(vec![(vec![10, 0, 0, 5], 0), (vec![10, 0, 0, 6], 1)]));
        assert_eq!(keys(&net("10.0.0.0/24"), true), Some(vec![(vec![10, 0, 0, 0], 0), (vec![10, 0, 1, 0], 1)]));
        // The top of the space has no end element.
        assert_eq!(keys(&net("255.255.255.0/24"), true), Some(vec![(vec![255, 255, 255, 0], 0)]));
        assert_eq!(keys(&net("10.0.0.5/32"), false), Some(vec![(vec![10, 0, 0, 5], 0)]));
        assert_eq!(keys(&net("10.0.0.0/24"), false), None, "a prefix needs an interval set");
        let pp = Element::ProtoPort("10.0.0.1".parse().unwrap(), 6, 8080);
        assert_eq!(keys(&pp, false), Some(vec![(vec![10, 0, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0], 0)]));
        let jump = wire_elements(&Element::IfJump("cali1".into(), "tw-cali1".into()), false).unwrap();
        assert_eq!(jump[0].key, b"cali1\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(jump[0].jump.as_deref(), Some("tw-cali1"));
        assert!(wire_elements(&Element::IfJump("cali1".into(), "x; flush ruleset".into()), false).is_err());
    }

    #[test]
    fn errors_name_the_operation_of_the_message() {
        let b =
            Batch { buf: Vec::new(), origin: vec![(2, 0), (5, 1), (9, 3)], op: 0, last: None, anon_id: 0, nonce: 0 };
        assert_eq!(b.op_of(1), None);
        assert_eq!(b.op_of(2), Some(0));
        assert_eq!(b.op_of(7), Some(1));
        assert_eq!(b.op_of(100), Some(3));
    }
}
