//! UPDATE (RFC 4271 §4.3) with MP_REACH/MP_UNREACH (RFC 4760) and ADD-PATH path identifiers
//! (RFC 7911), decoded under RFC 7606.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::attrs::{self, *};
use super::{Codec, DecodeError, Family, HEADER_LEN, MAX_MESSAGE_LEN, Reader, update_error};

/// A prefix and, where ADD-PATH is in use for its family, its path identifier (0 otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nlri {
    pub prefix: IpNet,
    pub path_id: u32,
}

impl Nlri {
    pub fn new(prefix: IpNet) -> Nlri {
        Nlri { prefix, path_id: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpReach {
    pub family: Family,
    pub next_hop: IpAddr,
    /// An IPv6 next hop may come with the sender's link-local address as well.
    pub link_local: Option<Ipv6Addr>,
    pub nlri: Vec<Nlri>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<Nlri>,
}

/// What RFC 7606 made of an UPDATE that was not quite right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdateProblem {
    /// Its announcements must be handled as withdrawals.
    TreatAsWithdraw(String),
    /// One attribute was dropped; the routes stand.
    Discarded(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// IPv4 withdrawals in the classic field.
    pub withdrawn: Vec<Nlri>,
    /// None when the UPDATE carries no attributes (withdrawals, End-of-RIB).
    pub attrs: Option<Attrs>,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// IPv4 announcements in the classic field.
    pub nlri: Vec<Nlri>,
    /// Filled by the decoder only.
    pub problems: Vec<UpdateProblem>,
}

impl Update {
    /// The End-of-RIB marker for a family (RFC 4724 §2).
    pub fn end_of_rib(family: Family) -> Update {
        match family {
            Family::Ipv4Unicast => Update::default(),
            f => Update { mp_unreach: Some(MpUnreach { family: f, withdrawn: vec![] }), ..Default::default() },
        }
    }

    pub fn is_end_of_rib(&self) -> Option<Family> {
        let no_routes = self.withdrawn.is_empty() && self.nlri.is_empty() && self.mp_reach.is_none();
        match (&self.attrs, &self.mp_unreach) {
            (None, None) if no_routes => Some(Family::Ipv4Unicast),
            (_, Some(u))
                if no_routes
                    && u.withdrawn.is_empty()
                    && self.attrs.as_ref().is_none_or(|a| *a == Attrs::default()) =>
            {
                Some(u.family)
            }
            _ => None,
        }
    }

    pub fn treat_as_withdraw(&self) -> bool {
        self.problems.iter().any(|p| matches!(p, UpdateProblem::TreatAsWithdraw(_)))
    }

    /// Every announced prefix with its family's next hop.
    pub fn announced(&self) -> impl Iterator<Item = (&Nlri, Option<IpAddr>)> {
        let v4 = self.attrs.as_ref().and_then(|a| a.next_hop).map(IpAddr::V4);
        self.nlri
            .iter()
            .map(move |n| (n, v4))
            .chain(self.mp_reach.iter().flat_map(|m| m.nlri.iter().map(move |n| (n, Some(m.next_hop)))))
    }

    pub fn withdrawals(&self) -> impl Iterator<Item = &Nlri> {
        self.withdrawn.iter().chain(self.mp_unreach.iter().flat_map(|m| m.withdrawn.iter()))
    }

    /// The encoded size of one NLRI.
    pub fn nlri_len(n: &Nlri, add_path: bool) -> usize {
        (n.prefix.prefix_len() as usize).div_ceil(8) + 1 + if add_path { 4 } else { 0 }
    }

    /// Room for NLRI left in a message that carries `attrs` (including MP_REACH's fixed part).
    pub fn room(attrs: Option<&Attrs>, family: Family, codec: &Codec) -> usize {
        let mut a = Vec::new();
        if let Some(attrs) = attrs {
            attrs.encode(codec.four_octet_as, &mut a);
        }
        let mp_fixed = match family {
            Family::Ipv4Unicast => 0,
            // flags, type, 2-byte length, AFI/SAFI, next-hop length, 32-byte next hop, reserved
            Family::Ipv6Unicast => 4 + 3 + 1 + 32 + 1,
        };
        MAX_MESSAGE_LEN.saturating_sub(HEADER_LEN + 4 + a.len() + mp_fixed)
    }

    pub(super) fn encode(&self, codec: &Codec, out: &mut Vec<u8>) {
        let tx4 = codec.add_path_tx.contains(&Family::Ipv4Unicast);
        let mut w = Vec::new();
        for n in &self.withdrawn {
            put_nlri(n, tx4, &mut w);
        }
        out.extend_from_slice(&(w.len() as u16).to_be_bytes());
        out.extend_from_slice(&w);
        let mut a = Vec::new();
        if let Some(attrs) = &self.attrs {
            attrs.encode(codec.four_octet_as, &mut a);
        }
        if let Some(m) = &self.mp_reach {
            let mut v = Vec::new();
            let (afi, safi) = m.family.afi_safi();
            v.extend_from_slice(&afi.to_be_bytes());
            v.push(safi);
            let nh: Vec<u8> = match (m.next_hop, m.link_local) {
                (IpAddr::V4(a), _) => a.octets().to_vec(),
                (IpAddr::V6(a), None) => a.octets().to_vec(),
                (IpAddr::V6(a), Some(ll)) => [a.octets(), ll.octets()].concat(),
            };
            v.push(nh.len() as u8);
            v.extend_from_slice(&nh);
            v.push(0);
            let tx = codec.add_path_tx.contains(&m.family);
            for n in &m.nlri {
                put_nlri(n, tx, &mut v);
            }
            put(&mut a, OPTIONAL, MP_REACH, &v);
        }
        if let Some(m) = &self.mp_unreach {
            let mut v = Vec::new();
            let (afi, safi) = m.family.afi_safi();
            v.extend_from_slice(&afi.to_be_bytes());
            v.push(safi);
            let tx = codec.add_path_tx.contains(&m.family);
            for n in &m.withdrawn {
                put_nlri(n, tx, &mut v);
            }
            put(&mut a, OPTIONAL, MP_UNREACH, &v);
        }
        out.extend_from_slice(&(a.len() as u16).to_be_bytes());
        out.extend_from_slice(&a);
        for n in &self.nlri {
            put_nlri(n, tx4, out);
        }
    }

    pub(super) fn decode(body: &[u8], codec: &Codec) -> Result<Update, DecodeError> {
        let list_error = |why: String| DecodeError::fatal(update_error(1, vec![]), why);
        let mut r = Reader::new(body);
        let wlen =
            r.u16().ok_or_else(|| list_error("UPDATE shorter than its withdrawn-routes length".into()))? as usize;
        let w =
            r.take(wlen).ok_or_else(|| list_error(format!("withdrawn-routes length {wlen} runs past the message")))?;
        let alen = r.u16().ok_or_else(|| list_error("UPDATE has no path-attribute length".into()))? as usize;
        let a =
            r.take(alen).ok_or_else(|| list_error(format!("path-attribute length {alen} runs past the message")))?;
        let rx4 = codec.add_path_rx.contains(&Family::Ipv4Unicast);
        let mut u = Update {
            withdrawn: nlri_list(w, Family::Ipv4Unicast, rx4)?,
            nlri: nlri_list(r.buf, Family::Ipv4Unicast, rx4)?,
            ..Default::default()
        };
        if !a.is_empty() {
            u.attrs = Some(decode_attrs(a, codec, &mut u)?);
        }
        // Mandatory attributes for announcements (RFC 7606 §3 d: treat-as-withdraw).
        let announces = !u.nlri.is_empty() || u.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
        if announces {
            let attrs = u.attrs.get_or_insert_with(Attrs::default);
            let mut missing = Vec::new();
            if !seen(a, ORIGIN) {
                missing.push("ORIGIN");
            }
            if !seen(a, AS_PATH) {
                missing.push("AS_PATH");
            }
            if !u.nlri.is_empty() && attrs.next_hop.is_none() && !seen(a, NEXT_HOP) {
                missing.push("NEXT_HOP");
            }
            if !missing.is_empty() {
                u.problems.push(UpdateProblem::TreatAsWithdraw(format!("missing well-known {}", missing.join(", "))));
            }
        }
        Ok(u)
    }
}

/// Whether the (already validated) attribute block holds an attribute of type `code`.
fn seen(mut a: &[u8], code: u8) -> bool {
    while a.len() >= 3 {
        let ext = a[0] & EXTENDED != 0;
        let (len, head) =
            if ext && a.len() >= 4 { (u16::from_be_bytes([a[2], a[3]]) as usize, 4) } else { (a[2] as usize, 3) };
        if a[1] == code {
            return true;
        }
        a = a.get(head + len..).unwrap_or(&[]);
    }
    false
}

fn decode_attrs(mut a: &[u8], codec: &Codec, u: &mut Update) -> Result<Attrs, DecodeError> {
    let mut attrs = Attrs::default();
    let mut done = BTreeSet::new();
    let mut as4_path = None;
    let mut as4_aggregator = None;
    let width = if codec.four_octet_as { 4 } else { 2 };
    while !a.is_empty() {
        let overrun = || DecodeError::fatal(update_error(1, vec![]), "a path attribute runs past the attribute block");
        if a.len() < 3 {
            return Err(overrun());
        }
        let (flags, code) = (a[0], a[1]);
        let (len, head) = if flags & EXTENDED != 0 {
            if a.len() < 4 {
                return Err(overrun());
            }
            (u16::from_be_bytes([a[2], a[3]]) as usize, 4)
        } else {
            (a[2] as usize, 3)
        };
        let v = a.get(head..head + len).ok_or_else(overrun)?;
        let raw = a[..head + len].to_vec();
        a = &a[head + len..];
        let mp = code == MP_REACH || code == MP_UNREACH;
        if !done.insert(code) {
            if mp {
                return Err(DecodeError::fatal(update_error(1, vec![]), format!("attribute {code} appears twice")));
            }
            u.problems.push(UpdateProblem::Discarded(format!("a repeated attribute {code}")));
            continue;
        }
        let withdraw = |u: &mut Update, what: &str| {
            u.problems.push(UpdateProblem::TreatAsWithdraw(format!("malformed {what} ({len} bytes)")));
        };
        let Some(want) = expected_flags(code) else {
            if flags & OPTIONAL == 0 {
                return Err(DecodeError::fatal(
                    update_error(2, raw),
                    format!("unrecognized well-known attribute {code}"),
                ));
            }
            if flags & TRANSITIVE != 0 {
                attrs.other.push(RawAttr { flags: flags | PARTIAL, code, value: v.to_vec() });
            }
            continue;
        };
        if flags & (OPTIONAL | TRANSITIVE) != want {
            if mp {
                return Err(DecodeError::fatal(
                    update_error(4, raw),
                    format!("attribute {code} has flags {flags:#04x}"),
                ));
            }
            withdraw(u, &format!("flags {flags:#04x} on attribute {code}"));
            continue;
        }
        match code {
            ORIGIN => match decode_origin(v) {
                Some(o) => attrs.origin = o,
                None => withdraw(u, "ORIGIN"),
            },
            AS_PATH => match decode_path(v, width) {
                Some(p) => attrs.as_path = p,
                None => withdraw(u, "AS_PATH"),
            },
            NEXT_HOP => match ipv4(v) {
                Some(nh) if !nh.is_unspecified() && !nh.is_multicast() && !nh.is_broadcast() => {
                    attrs.next_hop = Some(nh)
                }
                _ => withdraw(u, "NEXT_HOP"),
            },
            MED => match u32_of(v) {
                Some(m) => attrs.med = Some(m),
                None => withdraw(u, "MULTI_EXIT_DISC"),
            },
            LOCAL_PREF => match u32_of(v) {
                Some(l) => attrs.local_pref = Some(l),
                None => withdraw(u, "LOCAL_PREF"),
            },
            ATOMIC_AGGREGATE if v.is_empty() => attrs.atomic_aggregate = true,
            ATOMIC_AGGREGATE => u.problems.push(UpdateProblem::Discarded("a malformed ATOMIC_AGGREGATE".into())),
            AGGREGATOR if v.len() == width + 4 => {
                let asn =
                    if width == 4 { u32_of(&v[..4]).unwrap_or(0) } else { u16::from_be_bytes([v[0], v[1]]) as u32 };
                attrs.aggregator = ipv4(&v[width..]).map(|ip| (asn, ip));
            }
            AGGREGATOR => u.problems.push(UpdateProblem::Discarded("a malformed AGGREGATOR".into())),
            COMMUNITIES if !v.is_empty() && v.len() % 4 == 0 => {
                attrs.communities = v.chunks(4).filter_map(u32_of).collect();
            }
            COMMUNITIES => withdraw(u, "COMMUNITIES"),
            LARGE_COMMUNITIES if !v.is_empty() && v.len() % 12 == 0 => {
                attrs.large_communities = v
                    .chunks(12)
                    .map(|c| [0, 4, 8].map(|i| u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]])))
                    .collect();
            }
            LARGE_COMMUNITIES => withdraw(u, "LARGE_COMMUNITY"),
            ORIGINATOR_ID => match ipv4(v) {
                Some(id) => attrs.originator_id = Some(id),
                None => withdraw(u, "ORIGINATOR_ID"),
            },
            CLUSTER_LIST if !v.is_empty() && v.len() % 4 == 0 => {
                attrs.cluster_list = v.chunks(4).filter_map(ipv4).collect()
            }
            CLUSTER_LIST => withdraw(u, "CLUSTER_LIST"),
            // A 4-octet session ignores AS4_* (RFC 6793 §4.1); malformed ones are discarded.
            AS4_PATH if !codec.four_octet_as => match decode_path(v, 4) {
                Some(p) => as4_path = Some(p),
                None => u.problems.push(UpdateProblem::Discarded("a malformed AS4_PATH".into())),
            },
            AS4_AGGREGATOR if !codec.four_octet_as && v.len() == 8 => {
                as4_aggregator = ipv4(&v[4..]).map(|ip| (u32_of(&v[..4]).unwrap_or(0), ip));
            }
            AS4_PATH | AS4_AGGREGATOR => {}
            MP_REACH => u.mp_reach = decode_mp_reach(v, codec)?,
            MP_UNREACH => u.mp_unreach = decode_mp_unreach(v, codec)?,
            _ => {}
        }
    }
    if let Some(p) = as4_path {
        attrs.as_path = attrs::merge_as4(std::mem::take(&mut attrs.as_path), p);
    }
    if let (Some(a4), Some((asn, _))) = (as4_aggregator, attrs.aggregator) {
        if asn == super::AS_TRANS as u32 {
            attrs.aggregator = Some(a4);
        }
    }
    Ok(attrs)
}

fn mp_error(why: String) -> DecodeError {
    DecodeError::fatal(update_error(9, vec![]), why)
}

/// None for a family we do not route (ignored, RFC 4760 §7).
fn decode_mp_reach(v: &[u8], codec: &Codec) -> Result<Option<MpReach>, DecodeError> {
    let mut r = Reader::new(v);
    let short = || mp_error("MP_REACH_NLRI is truncated".into());
    let afi = r.u16().ok_or_else(short)?;
    let safi = r.u8().ok_or_else(short)?;
    let Some(family) = Family::from_afi_safi(afi, safi) else { return Ok(None) };
    let nh_len = r.u8().ok_or_else(short)? as usize;
    let nh = r.take(nh_len).ok_or_else(short)?;
    let (next_hop, link_local) = match (family, nh_len) {
        (Family::Ipv4Unicast, 4) => (IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3])), None),
        (Family::Ipv6Unicast, 16) => (IpAddr::V6(v6(&nh[..16])), None),
        (Family::Ipv6Unicast, 32) => (IpAddr::V6(v6(&nh[..16])), Some(v6(&nh[16..]))),
        _ => return Err(mp_error(format!("a {nh_len}-byte next hop for {family:?}"))),
    };
    r.u8().ok_or_else(short)?; // reserved
    let nlri = nlri_list(r.buf, family, codec.add_path_rx.contains(&family))?;
    Ok(Some(MpReach { family, next_hop, link_local, nlri }))
}

fn decode_mp_unreach(v: &[u8], codec: &Codec) -> Result<Option<MpUnreach>, DecodeError> {
    let mut r = Reader::new(v);
    let short = || mp_error("MP_UNREACH_NLRI is truncated".into());
    let afi = r.u16().ok_or_else(short)?;
    let safi = r.u8().ok_or_else(short)?;
    let Some(family) = Family::from_afi_safi(afi, safi) else { return Ok(None) };
    let withdrawn = nlri_list(r.buf, family, codec.add_path_rx.contains(&family))?;
    Ok(Some(MpUnreach { family, withdrawn }))
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(b);
    Ipv6Addr::from(o)
}

fn put_nlri(n: &Nlri, add_path: bool, out: &mut Vec<u8>) {
    if add_path {
        out.extend_from_slice(&n.path_id.to_be_bytes());
    }
    let len = n.prefix.prefix_len();
    out.push(len);
    let bytes = (len as usize).div_ceil(8);
    match n.prefix {
        IpNet::V4(p) => out.extend_from_slice(&p.network().octets()[..bytes]),
        IpNet::V6(p) => out.extend_from_slice(&p.network().octets()[..bytes]),
    }
}

/// A run of prefixes; any fault in it is fatal (RFC 7606 §5.3: the NLRI cannot be trusted).
fn nlri_list(mut v: &[u8], family: Family, add_path: bool) -> Result<Vec<Nlri>, DecodeError> {
    let bad = |why: String| DecodeError::fatal(update_error(10, vec![]), why);
    let max = match family {
        Family::Ipv4Unicast => 32,
        Family::Ipv6Unicast => 128,
    };
    let mut out = Vec::new();
    while !v.is_empty() {
        let mut path_id = 0;
        if add_path {
            if v.len() < 4 {
                return Err(bad("a path identifier is truncated".into()));
            }
            path_id = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            v = &v[4..];
        }
        let Some(&len) = v.first() else { return Err(bad("a prefix length is missing".into())) };
        if len > max {
            return Err(bad(format!("prefix length {len} for {family:?}")));
        }
        let bytes = (len as usize).div_ceil(8);
        let Some(addr) = v.get(1..1 + bytes) else { return Err(bad(format!("a /{len} prefix is truncated"))) };
        let mut full = [0u8; 16];
        full[..bytes].copy_from_slice(addr);
        let prefix = match family {
            Family::Ipv4Unicast => IpNet::V4(
                Ipv4Net::new(Ipv4Addr::new(full[0], full[1], full[2], full[3]), len).expect("length checked").trunc(),
            ),
            Family::Ipv6Unicast => IpNet::V6(Ipv6Net::new(Ipv6Addr::from(full), len).expect("length checked").trunc()),
        };
        out.push(Nlri { prefix, path_id });
        v = &v[1 + bytes..];
    }
    Ok(out)
}
