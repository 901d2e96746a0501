//! Path attributes (RFC 4271 §5, RFC 1997 communities, RFC 4456 reflection, RFC 6793 AS4_*,
//! RFC 8092 large communities), read with RFC 7606's rules: a malformed attribute costs the
//! routes of its UPDATE (treat-as-withdraw) or only itself (discard), never the session,
//! unless the message can no longer be parsed.

use std::net::Ipv4Addr;

use super::AS_TRANS;

pub(crate) const ORIGIN: u8 = 1;
pub(crate) const AS_PATH: u8 = 2;
pub(crate) const NEXT_HOP: u8 = 3;
pub(crate) const MED: u8 = 4;
pub(crate) const LOCAL_PREF: u8 = 5;
pub(crate) const ATOMIC_AGGREGATE: u8 = 6;
pub(crate) const AGGREGATOR: u8 = 7;
pub(crate) const COMMUNITIES: u8 = 8;
pub(crate) const ORIGINATOR_ID: u8 = 9;
pub(crate) const CLUSTER_LIST: u8 = 10;
pub(crate) const MP_REACH: u8 = 14;
pub(crate) const MP_UNREACH: u8 = 15;
pub(crate) const AS4_PATH: u8 = 17;
pub(crate) const AS4_AGGREGATOR: u8 = 18;
pub(crate) const LARGE_COMMUNITIES: u8 = 32;

pub(crate) const OPTIONAL: u8 = 0x80;
pub(crate) const TRANSITIVE: u8 = 0x40;
pub(crate) const PARTIAL: u8 = 0x20;
pub(crate) const EXTENDED: u8 = 0x10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    #[default]
    Igp,
    Egp,
    Incomplete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    Set,
    Sequence,
    ConfedSequence,
    ConfedSet,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AsPathSegment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

/// An attribute we do not interpret, carried on when it is optional transitive.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawAttr {
    pub flags: u8,
    pub code: u8,
    pub value: Vec<u8>,
}

/// Every attribute of a path except MP_REACH/MP_UNREACH, which belong to the UPDATE.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Attrs {
    pub origin: Origin,
    pub as_path: Vec<AsPathSegment>,
    /// The IPv4 NEXT_HOP attribute (IPv6 next hops travel in MP_REACH).
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<(u32, Ipv4Addr)>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub other: Vec<RawAttr>,
}

impl Attrs {
    /// AS_PATH length for best-path selection: a set counts one, confederation segments none.
    pub fn as_path_len(&self) -> usize {
        self.as_path
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
                _ => 0,
            })
            .sum()
    }

    /// The neighbouring AS the path came from (for MED comparison): the first AS of the path.
    pub fn neighbour_as(&self) -> Option<u32> {
        self.as_path.iter().find(|s| s.kind == SegmentKind::Sequence).and_then(|s| s.asns.first().copied())
    }

    pub fn contains_as(&self, asn: u32) -> usize {
        self.as_path.iter().flat_map(|s| s.asns.iter()).filter(|a| **a == asn).count()
    }

    /// Put `asn` in front of the path (sending over eBGP).
    pub fn prepend(&mut self, asn: u32) {
        match self.as_path.first_mut() {
            Some(s) if s.kind == SegmentKind::Sequence && s.asns.len() < 255 => s.asns.insert(0, asn),
            _ => self.as_path.insert(0, AsPathSegment { kind: SegmentKind::Sequence, asns: vec![asn] }),
        }
    }

    pub(crate) fn encode(&self, four_octet: bool, out: &mut Vec<u8>) {
        put(out, TRANSITIVE, ORIGIN, &[self.origin_code()]);
        let mut path = Vec::new();
        encode_path(&self.as_path, four_octet, &mut path);
        put(out, TRANSITIVE, AS_PATH, &path);
        if let Some(nh) = self.next_hop {
            put(out, TRANSITIVE, NEXT_HOP, &nh.octets());
        }
        if let Some(m) = self.med {
            put(out, OPTIONAL, MED, &m.to_be_bytes());
        }
        if let Some(l) = self.local_pref {
            put(out, TRANSITIVE, LOCAL_PREF, &l.to_be_bytes());
        }
        if self.atomic_aggregate {
            put(out, TRANSITIVE, ATOMIC_AGGREGATE, &[]);
        }
        if let Some((asn, ip)) = self.aggregator {
            let mut v = Vec::new();
            if four_octet {
                v.extend_from_slice(&asn.to_be_bytes());
            } else {
                v.extend_from_slice(&u16::try_from(asn).unwrap_or(AS_TRANS).to_be_bytes());
            }
            v.extend_from_slice(&ip.octets());
            put(out, OPTIONAL | TRANSITIVE, AGGREGATOR, &v);
            if !four_octet && asn > u16::MAX as u32 {
                let mut v = asn.to_be_bytes().to_vec();
                v.extend_from_slice(&ip.octets());
                put(out, OPTIONAL | TRANSITIVE, AS4_AGGREGATOR, &v);
            }
        }
        if !self.communities.is_empty() {
            let v: Vec<u8> = self.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
            put(out, OPTIONAL | TRANSITIVE, COMMUNITIES, &v);
        }
        if let Some(id) = self.originator_id {
            put(out, OPTIONAL, ORIGINATOR_ID, &id.octets());
        }
        if !self.cluster_list.is_empty() {
            let v: Vec<u8> = self.cluster_list.iter().flat_map(|c| c.octets()).collect();
            put(out, OPTIONAL, CLUSTER_LIST, &v);
        }
        if !four_octet && self.as_path.iter().any(|s| s.asns.iter().any(|a| *a > u16::MAX as u32)) {
            let mut v = Vec::new();
            encode_path(&self.as_path, true, &mut v);
            put(out, OPTIONAL | TRANSITIVE, AS4_PATH, &v);
        }
        if !self.large_communities.is_empty() {
            let v: Vec<u8> =
                self.large_communities.iter().flat_map(|c| c.iter().flat_map(|p| p.to_be_bytes())).collect();
            put(out, OPTIONAL | TRANSITIVE, LARGE_COMMUNITIES, &v);
        }
        for a in &self.other {
            put(out, a.flags & !EXTENDED, a.code, &a.value);
        }
    }

    fn origin_code(&self) -> u8 {
        match self.origin {
            Origin::Igp => 0,
            Origin::Egp => 1,
            Origin::Incomplete => 2,
        }
    }
}

/// One attribute: flags, type, length (extended when it needs two bytes), value.
pub(crate) fn put(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend_from_slice(&[flags | EXTENDED, code]);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags & !EXTENDED, code, value.len() as u8]);
    }
    out.extend_from_slice(value);
}

fn encode_path(path: &[AsPathSegment], four_octet: bool, out: &mut Vec<u8>) {
    for s in path {
        for chunk in s.asns.chunks(255) {
            out.push(match s.kind {
                SegmentKind::Set => 1,
                SegmentKind::Sequence => 2,
                SegmentKind::ConfedSequence => 3,
                SegmentKind::ConfedSet => 4,
            });
            out.push(chunk.len() as u8);
            for a in chunk {
                if four_octet {
                    out.extend_from_slice(&a.to_be_bytes());
                } else {
                    out.extend_from_slice(&u16::try_from(*a).unwrap_or(AS_TRANS).to_be_bytes());
                }
            }
        }
    }
}

/// AS_PATH or AS4_PATH; None when malformed.
pub(crate) fn decode_path(mut v: &[u8], width: usize) -> Option<Vec<AsPathSegment>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        if v.len() < 2 {
            return None;
        }
        let kind = match v[0] {
            1 => SegmentKind::Set,
            2 => SegmentKind::Sequence,
            3 => SegmentKind::ConfedSequence,
            4 => SegmentKind::ConfedSet,
            _ => return None,
        };
        let n = v[1] as usize;
        if n == 0 || v.len() < 2 + n * width {
            return None;
        }
        let asns = v[2..2 + n * width]
            .chunks(width)
            .map(|c| {
                if width == 4 {
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    u16::from_be_bytes([c[0], c[1]]) as u32
                }
            })
            .collect();
        out.push(AsPathSegment { kind, asns });
        v = &v[2 + n * width..];
    }
    Some(out)
}

/// RFC 6793 §4.2.3: a 2-octet speaker's AS_PATH, completed from AS4_PATH where that is
/// consistent (not longer than AS_PATH); otherwise AS4_PATH is ignored.
pub(crate) fn merge_as4(path: Vec<AsPathSegment>, as4: Vec<AsPathSegment>) -> Vec<AsPathSegment> {
    let count = |p: &[AsPathSegment]| -> usize {
        p.iter().map(|s| if s.kind == SegmentKind::Sequence { s.asns.len() } else { 1 }).sum()
    };
    let (n, n4) = (count(&path), count(&as4));
    if n4 > n {
        return path;
    }
    // Keep the first n - n4 ASes of AS_PATH, then all of AS4_PATH.
    let mut keep = n - n4;
    let mut out = Vec::new();
    for s in path {
        if keep == 0 {
            break;
        }
        if s.kind == SegmentKind::Sequence {
            let take = keep.min(s.asns.len());
            out.push(AsPathSegment { kind: s.kind, asns: s.asns[..take].to_vec() });
            keep -= take;
        } else {
            out.push(s);
            keep -= 1;
        }
    }
    out.extend(as4);
    out
}

pub(crate) fn decode_origin(v: &[u8]) -> Option<Origin> {
    match v {
        [0] => Some(Origin::Igp),
        [1] => Some(Origin::Egp),
        [2] => Some(Origin::Incomplete),
        _ => None,
    }
}

pub(crate) fn ipv4(v: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from)
}

pub(crate) fn u32_of(v: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(v).ok().map(u32::from_be_bytes)
}

/// The flags a known attribute must carry (optional and transitive bits), or None if unknown.
pub(crate) fn expected_flags(code: u8) -> Option<u8> {
    Some(match code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF | ATOMIC_AGGREGATE => TRANSITIVE,
        MED | ORIGINATOR_ID | CLUSTER_LIST | MP_REACH | MP_UNREACH => OPTIONAL,
        AGGREGATOR | COMMUNITIES | AS4_PATH | AS4_AGGREGATOR | LARGE_COMMUNITIES => OPTIONAL | TRANSITIVE,
        _ => return None,
    })
}
