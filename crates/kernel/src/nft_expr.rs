//! Rules as nftables expressions: the bytecode libnftables would compile from the same rule
//! (dependencies it adds, one-element lists as plain comparisons, longer ones as anonymous
//! sets), so that `nft list` shows what the text form says.

use std::net::IpAddr;

use ipnet::IpNet;

use super::nft::{Addr, Family, Match, Rule, Statement, check_ifname, check_name};
use super::nft_wire::{attr, cstr, nested};

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// Registers: the verdict, the first 16-byte one, and the 4-byte ones concatenations use.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG32_00: u32 = 8;

// Verdict codes.
pub(crate) const NF_DROP: i32 = 0;
pub(crate) const NF_ACCEPT: i32 = 1;
pub(crate) const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

// meta keys.
const META_MARK: u32 = 3;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;

const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;

const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const RANGE_EQ: u32 = 0;
const RANGE_NEQ: u32 = 1;
const LOOKUP_F_INV: u32 = 1;
const CT_STATE: u32 = 0;
const CT_INVALID: u32 = 1;
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;
const MASQ_RANDOM_FULLY: u32 = 0x10;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// nft's datatype numbers, which `nft list` reads back from a set's key type.
pub(crate) const TYPE_IPADDR: u32 = 7;
pub(crate) const TYPE_IP6ADDR: u32 = 8;
pub(crate) const TYPE_INET_PROTOCOL: u32 = 12;
pub(crate) const TYPE_INET_SERVICE: u32 = 13;
pub(crate) const TYPE_ICMP6_TYPE: u32 = 29;
pub(crate) const TYPE_IFNAME: u32 = 41;
/// A concatenation's type: each field's type shifted in after the previous ones.
pub(crate) fn concat_type(types: &[u32]) -> u32 {
    types.iter().fold(0, |t, f| (t << 6) | f)
}

/// An element of an anonymous set: its key and whether it ends an interval.
pub(crate) type AnonElement = (Vec<u8>, bool);

/// An anonymous set a rule needs, created in the same batch just before the rule.
pub(crate) struct AnonSet {
    /// The batch-local ID the rule's lookup names it by.
    pub id: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub interval: bool,
    pub elements: Vec<AnonElement>,
}

/// What the rule so far has established: the network protocol, the transport protocol.
#[derive(Clone, Copy, Default)]
struct Context {
    v6: Option<bool>,
    l4: Option<u8>,
}

/// One rule being compiled: the expression list and the anonymous sets it uses.
pub(crate) struct Compiler<'a> {
    out: Vec<u8>,
    ctx: Context,
    pub sets: Vec<AnonSet>,
    next_id: &'a mut u32,
    /// An anonymous set's name from its ID.
    name: &'a dyn Fn(u32) -> String,
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

pub(crate) fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The address after the prefix's last one, or None past the top of the space.
fn after(n: &IpNet) -> Option<Vec<u8>> {
    match n {
        IpNet::V4(n) => u32::from(n.broadcast()).checked_add(1).map(|v| v.to_be_bytes().to_vec()),
        IpNet::V6(n) => u128::from(n.broadcast()).checked_add(1).map(|v| v.to_be_bytes().to_vec()),
    }
}

/// A prefix as interval elements: its start, and the end marker after it (none at the top).
pub(crate) fn net_interval(n: &IpNet) -> Vec<AnonElement> {
    let n = n.trunc();
    let mut v = vec![(ip_bytes(n.network()), false)];
    if let Some(end) = after(&n) {
        v.push((end, true));
    }
    v
}

/// An interface name as nft keys it: NUL-padded to IFNAMSIZ.
pub(crate) fn ifname_key(n: &str) -> Vec<u8> {
    let mut k = n.as_bytes().to_vec();
    k.resize(16, 0);
    k
}

/// A verdict as the data of an immediate or a map element.
pub(crate) fn verdict(buf: &mut Vec<u8>, code: i32, chain: Option<&str>) {
    nested(buf, NFTA_DATA_VERDICT, |b| {
        attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            attr(b, NFTA_VERDICT_CHAIN, &cstr(c));
        }
    });
}

impl<'a> Compiler<'a> {
    pub(crate) fn new(family: Family, next_id: &'a mut u32, name: &'a dyn Fn(u32) -> String) -> Compiler<'a> {
        let v6 = match family {
            Family::Ip => Some(false),
            Family::Ip6 => Some(true),
            Family::Inet => None,
        };
        Compiler { out: Vec::new(), ctx: Context { v6, l4: None }, sets: Vec::new(), next_id, name }
    }

    /// The NFTA_RULE_EXPRESSIONS payload for `rule`.
    pub(crate) fn rule(mut self, rule: &Rule) -> Result<(Vec<u8>, Vec<AnonSet>), String> {
        for m in &rule.matches {
            self.matches(m)?;
        }
        for s in &rule.statements {
            self.statement(s)?;
        }
        Ok((self.out, self.sets))
    }

    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
        nested(&mut self.out, NFTA_LIST_ELEM, |b| {
            attr(b, NFTA_EXPR_NAME, &cstr(name));
            nested(b, NFTA_EXPR_DATA, data);
        });
    }

    fn meta(&mut self, key: u32, reg: u32) {
        self.expr("meta", |b| {
            attr(b, 1, &be32(reg)); // NFTA_META_DREG
            attr(b, 2, &be32(key)); // NFTA_META_KEY
        });
    }

    fn meta_set(&mut self, key: u32) {
        self.expr("meta", |b| {
            attr(b, 2, &be32(key)); // NFTA_META_KEY
            attr(b, 3, &be32(REG_1)); // NFTA_META_SREG
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, reg: u32) {
        self.expr("payload", |b| {
            attr(b, 1, &be32(reg)); // DREG
            attr(b, 2, &be32(base)); // BASE
            attr(b, 3, &be32(offset)); // OFFSET
            attr(b, 4, &be32(len)); // LEN
        });
    }

    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            attr(b, 1, &be32(REG_1)); // SREG
            attr(b, 2, &be32(op)); // OP
            nested(b, 3, |b| attr(b, NFTA_DATA_VALUE, data)); // DATA
        });
    }

    fn range(&mut self, negate: bool, from: &[u8], to: &[u8]) {
        self.expr("range", |b| {
            attr(b, 1, &be32(REG_1)); // SREG
            attr(b, 2, &be32(if negate { RANGE_NEQ } else { RANGE_EQ })); // OP
            nested(b, 3, |b| attr(b, NFTA_DATA_VALUE, from)); // FROM_DATA
            nested(b, 4, |b| attr(b, NFTA_DATA_VALUE, to)); // TO_DATA
        });
    }

    /// `reg 1 = (reg 1 & mask) ^ xor`.
    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |b| {
            attr(b, 1, &be32(REG_1)); // SREG
            attr(b, 2, &be32(REG_1)); // DREG
            attr(b, 3, &be32(mask.len() as u32)); // LEN
            nested(b, 4, |b| attr(b, NFTA_DATA_VALUE, mask)); // MASK
            nested(b, 5, |b| attr(b, NFTA_DATA_VALUE, xor)); // XOR
        });
    }

    fn lookup_named(&mut self, set: &str, negate: bool, verdict_map: bool) {
        self.expr("lookup", |b| {
            attr(b, 1, &cstr(set)); // NFTA_LOOKUP_SET
            attr(b, 2, &be32(REG_1)); // SREG
            if verdict_map {
                attr(b, 3, &be32(REG_VERDICT)); // DREG
            }
            if negate {
                attr(b, 5, &be32(LOOKUP_F_INV)); // FLAGS
            }
        });
    }

    /// A lookup in a new anonymous set holding `elements`.
    fn lookup_anon(&mut self, key_type: u32, key_len: u32, interval: bool, elements: Vec<AnonElement>, negate: bool) {
        *self.next_id += 1;
        let id = *self.next_id;
        self.sets.push(AnonSet { id, key_type, key_len, interval, elements });
        let name = (self.name)(id);
        self.expr("lookup", |b| {
            attr(b, 1, &cstr(&name)); // NFTA_LOOKUP_SET
            attr(b, 2, &be32(REG_1));
            attr(b, 4, &be32(id)); // NFTA_LOOKUP_SET_ID
            if negate {
                attr(b, 5, &be32(LOOKUP_F_INV));
            }
        });
    }

    fn immediate(&mut self, code: i32, chain: Option<&str>) -> Result<(), String> {
        if let Some(c) = chain {
            check_name(c).map_err(|e| e.to_string())?;
        }
        self.expr("immediate", |b| {
            attr(b, 1, &be32(REG_VERDICT)); // DREG
            nested(b, 2, |b| verdict(b, code, chain)); // DATA
        });
        Ok(())
    }

    /// What libnftables adds before a network-header match in an inet table.
    fn need_family(&mut self, v6: bool) {
        if self.ctx.v6 != Some(v6) {
            self.meta(META_NFPROTO, REG_1);
            self.cmp(CMP_EQ, &[if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]);
            self.ctx.v6 = Some(v6);
        }
    }

    /// What libnftables adds before a protocol's header field (`tcp dport`, `icmp type`).
    fn need_l4(&mut self, proto: u8) {
        if self.ctx.l4 != Some(proto) {
            self.meta(META_L4PROTO, REG_1);
            self.cmp(CMP_EQ, &[proto]);
            self.ctx.l4 = Some(proto);
        }
    }

    fn addr_load(&mut self, addr: Addr, v6: bool, reg: u32) {
        self.need_family(v6);
        let (offset, len) = match (v6, addr) {
            (false, Addr::Source) => (12, 4),
            (false, Addr::Destination) => (16, 4),
            (true, Addr::Source) => (8, 16),
            (true, Addr::Destination) => (24, 16),
        };
        self.payload(PAYLOAD_NETWORK, offset, len, reg);
    }

    /// A loaded address against one prefix: a masked comparison unless it is one address.
    fn net_cmp(&mut self, net: &IpNet, negate: bool) {
        let net = net.trunc();
        if net.prefix_len() < net.max_prefix_len() {
            let mask = ip_bytes(net.netmask());
            self.bitwise(&mask, &vec![0; mask.len()]);
        }
        self.cmp(if negate { CMP_NEQ } else { CMP_EQ }, &ip_bytes(net.network()));
    }

    fn ports_load(&mut self, addr: Addr) {
        self.payload(PAYLOAD_TRANSPORT, if addr == Addr::Source { 0 } else { 2 }, 2, REG_1);
    }

    fn matches(&mut self, m: &Match) -> Result<(), String> {
        let op = |negate: bool| if negate { CMP_NEQ } else { CMP_EQ };
        match m {
            Match::AddrInSet { addr, v6, set, negate } => {
                check_name(set).map_err(|e| e.to_string())?;
                self.addr_load(*addr, *v6, REG_1);
                self.lookup_named(set, *negate, false);
            }
            Match::Addr { addr, net, negate } => {
                self.addr_load(*addr, net.addr().is_ipv6(), REG_1);
                self.net_cmp(net, *negate);
            }
            Match::UdpDport(p) | Match::TcpDport(p) => {
                self.need_l4(if matches!(m, Match::TcpDport(_)) { 6 } else { 17 });
                self.ports_load(Addr::Destination);
                self.cmp(CMP_EQ, &p.to_be_bytes());
            }
            Match::Iifname(n) | Match::Oifname(n) => {
                check_ifname(n).map_err(|e| e.to_string())?;
                self.meta(if matches!(m, Match::Iifname(_)) { META_IIFNAME } else { META_OIFNAME }, REG_1);
                self.cmp(CMP_EQ, &ifname_key(n));
            }
            Match::IifnamePrefix(n) | Match::OifnamePrefix(n) => {
                check_ifname(n).map_err(|e| e.to_string())?;
                self.meta(if matches!(m, Match::IifnamePrefix(_)) { META_IIFNAME } else { META_OIFNAME }, REG_1);
                self.cmp(CMP_EQ, n.as_bytes());
            }
            Match::CtEstablished | Match::CtInvalid => {
                let bits = if matches!(m, Match::CtInvalid) { CT_INVALID } else { CT_ESTABLISHED_RELATED };
                self.expr("ct", |b| {
                    attr(b, 1, &be32(REG_1)); // DREG
                    attr(b, 2, &be32(CT_STATE)); // KEY
                });
                self.bitwise(&bits.to_ne_bytes(), &[0; 4]);
                self.cmp(CMP_NEQ, &[0; 4]);
            }
            Match::NfProto { v6 } => {
                self.meta(META_NFPROTO, REG_1);
                self.cmp(CMP_EQ, &[if *v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]);
                self.ctx.v6 = Some(*v6);
            }
            Match::L4Proto { proto, negate } => {
                self.meta(META_L4PROTO, REG_1);
                self.cmp(op(*negate), &[*proto]);
                if !negate {
                    self.ctx.l4 = Some(*proto);
                }
            }
            Match::Ports { addr, ranges, negate } => {
                self.ports_load(*addr);
                match ranges.as_slice() {
                    [] => return Err("a port match without ports".into()),
                    [(lo, hi)] if lo == hi => self.cmp(op(*negate), &lo.to_be_bytes()),
                    [(lo, hi)] => self.range(*negate, &lo.to_be_bytes(), &hi.to_be_bytes()),
                    _ => {
                        let mut elements = Vec::new();
                        for (lo, hi) in merge_ranges(ranges) {
                            elements.push((lo.to_be_bytes().to_vec(), false));
                            if let Some(end) = hi.checked_add(1) {
                                elements.push((end.to_be_bytes().to_vec(), true));
                            }
                        }
                        self.lookup_anon(TYPE_INET_SERVICE, 2, true, elements, *negate);
                    }
                }
            }
            Match::AddrIn { addr, v6, nets, negate } => {
                if nets.is_empty() || nets.iter().any(|n| n.addr().is_ipv6() != *v6) {
                    return Err(format!("address list {nets:?} is empty or of the other family"));
                }
                self.addr_load(*addr, *v6, REG_1);
                let nets = IpNet::aggregate(nets);
                if let [net] = nets.as_slice() {
                    self.net_cmp(net, *negate);
                } else {
                    let (kind, len) = if *v6 { (TYPE_IP6ADDR, 16) } else { (TYPE_IPADDR, 4) };
                    let elements = nets.iter().flat_map(net_interval).collect();
                    self.lookup_anon(kind, len, true, elements, *negate);
                }
            }
            Match::AddrProtoPortInSet { addr, v6, set, negate } => {
                check_name(set).map_err(|e| e.to_string())?;
                self.addr_load(*addr, *v6, REG_1);
                let words = if *v6 { 4 } else { 1 };
                self.meta(META_L4PROTO, REG32_00 + words);
                let port = if *addr == Addr::Source { 0 } else { 2 };
                self.payload(PAYLOAD_TRANSPORT, port, 2, REG32_00 + words + 1);
                self.lookup_named(set, *negate, false);
            }
            Match::Icmp { v6, kind, code, negate } => {
                self.need_l4(if *v6 { 58 } else { 1 });
                match code {
                    None => {
                        self.payload(PAYLOAD_TRANSPORT, 0, 1, REG_1);
                        self.cmp(op(*negate), &[*kind]);
                    }
                    // Type and code are adjacent: one load, as libnftables merges them.
                    Some(c) => {
                        self.payload(PAYLOAD_TRANSPORT, 0, 2, REG_1);
                        self.cmp(op(*negate), &[*kind, *c]);
                    }
                }
            }
            Match::Icmpv6Types(types) => {
                self.need_l4(58);
                self.payload(PAYLOAD_TRANSPORT, 0, 1, REG_1);
                let mut types = types.clone();
                types.sort_unstable();
                types.dedup();
                match types.as_slice() {
                    [] => return Err("an ICMPv6 type list without types".into()),
                    [t] => self.cmp(CMP_EQ, &[*t]),
                    _ => {
                        let elements = types.iter().map(|t| (vec![*t], false)).collect();
                        self.lookup_anon(TYPE_ICMP6_TYPE, 1, false, elements, false);
                    }
                }
            }
            Match::Mark { bits, set } => {
                self.meta(META_MARK, REG_1);
                self.bitwise(&bits.to_ne_bytes(), &[0; 4]);
                self.cmp(CMP_EQ, &(if *set { *bits } else { 0 }).to_ne_bytes());
            }
        }
        Ok(())
    }

    fn statement(&mut self, s: &Statement) -> Result<(), String> {
        match s {
            Statement::Counter => self.expr("counter", |b| {
                attr(b, 1, &0u64.to_be_bytes()); // BYTES
                attr(b, 2, &0u64.to_be_bytes()); // PACKETS
            }),
            Statement::Accept => self.immediate(NF_ACCEPT, None)?,
            Statement::Drop => self.immediate(NF_DROP, None)?,
            Statement::Return => self.immediate(NFT_RETURN, None)?,
            Statement::Jump(c) => self.immediate(NFT_JUMP, Some(c))?,
            Statement::Goto(c) => self.immediate(NFT_GOTO, Some(c))?,
            Statement::Notrack => self.expr("notrack", |_| {}),
            Statement::Masquerade { fully_random } => self.expr("masq", |b| {
                if *fully_random {
                    attr(b, 1, &be32(MASQ_RANDOM_FULLY)); // NFTA_MASQ_FLAGS
                }
            }),
            Statement::MarkSet(bits) | Statement::MarkClear(bits) => {
                self.meta(META_MARK, REG_1);
                let xor = if matches!(s, Statement::MarkSet(_)) { *bits } else { 0 };
                self.bitwise(&(!bits).to_ne_bytes(), &xor.to_ne_bytes());
                self.meta_set(META_MARK);
            }
            Statement::Log(p) => {
                if p.len() > 127 || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b" -_:.".contains(&b)) {
                    return Err(format!("{p:?} is not a log prefix"));
                }
                self.expr("log", |b| attr(b, 2, &cstr(p))); // NFTA_LOG_PREFIX
            }
            Statement::IfnameVmap { input, map } => {
                check_name(map).map_err(|e| e.to_string())?;
                self.meta(if *input { META_IIFNAME } else { META_OIFNAME }, REG_1);
                self.lookup_named(map, false, true);
            }
        }
        Ok(())
    }
}

/// Port ranges sorted, with overlapping and adjacent ones joined (interval elements may not
/// overlap).
fn merge_ranges(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut r: Vec<(u16, u16)> = ranges.iter().map(|&(a, b)| (a.min(b), a.max(b))).collect();
    r.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_concatenations_type() {
        assert_eq!(merge_ranges(&[(80, 80), (8000, 8080), (81, 90), (8081, 8081)]), vec![(80, 90), (8000, 8081)]);
        assert_eq!(merge_ranges(&[(65535, 65535), (1, 1)]), vec![(1, 1), (65535, 65535)]);
        assert_eq!(concat_type(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]), (((7 << 6) | 12) << 6) | 13);
    }

    #[test]
    fn dependencies_are_added_once() {
        let mut id = 0;
        let rule = Rule::new(
            vec![
                Match::Addr { addr: Addr::Source, net: "10.0.0.0/8".parse().unwrap(), negate: false },
                Match::Addr { addr: Addr::Destination, net: "10.1.0.1/32".parse().unwrap(), negate: false },
                Match::TcpDport(80),
            ],
            vec![Statement::Accept],
        );
        let (expr, sets) = Compiler::new(Family::Inet, &mut id, &|i| format!("a{i}")).rule(&rule).unwrap();
        assert!(sets.is_empty());
        let count = |name: &str| {
            expr.windows(name.len() + 1).filter(|w| w[..name.len()] == *name.as_bytes() && w[name.len()] == 0).count()
        };
        // nfproto + l4proto; two addresses and a port; their comparisons, one mask.
        assert_eq!(count("meta"), 2);
        assert_eq!(count("payload"), 3);
        assert_eq!(count("cmp"), 5);
        assert_eq!(count("bitwise"), 1);
        let (expr, _) = Compiler::new(Family::Ip, &mut id, &|i| format!("a{i}")).rule(&rule).unwrap();
        let count = |name: &str| {
            expr.windows(name.len() + 1).filter(|w| w[..name.len()] == *name.as_bytes() && w[name.len()] == 0).count()
        };
        assert_eq!(count("meta"), 1, "an ip table needs no family check");
        // A list of several ports is an anonymous interval set, named by a batch ID.
        let ports = Rule::new(
            vec![Match::Ports { addr: Addr::Destination, ranges: vec![(80, 80), (443, 443)], negate: true }],
            vec![Statement::Drop],
        );
        let (_, sets) = Compiler::new(Family::Inet, &mut id, &|i| format!("a{i}")).rule(&ports).unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(
            sets[0].elements,
            vec![
                (80u16.to_be_bytes().to_vec(), false),
                (81u16.to_be_bytes().to_vec(), true),
                (443u16.to_be_bytes().to_vec(), false),
                (444u16.to_be_bytes().to_vec(), true)
            ]
        );
        assert_eq!(sets[0].id, id);
    }
}
