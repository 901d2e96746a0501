//! OPEN (RFC 4271 §4.2) and the capabilities (RFC 5492) gingham advertises or understands.

use std::net::Ipv4Addr;

use super::{DecodeError, Family, Reader, open_error};

/// Stands in for a 4-octet AS in 2-octet fields (RFC 6793).
pub const AS_TRANS: u16 = 23456;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddPathMode {
    Receive,
    Send,
    Both,
}

impl AddPathMode {
    fn code(self) -> u8 {
        match self {
            AddPathMode::Receive => 1,
            AddPathMode::Send => 2,
            AddPathMode::Both => 3,
        }
    }
    pub fn receives(self) -> bool {
        matches!(self, AddPathMode::Receive | AddPathMode::Both)
    }
    pub fn sends(self) -> bool {
        matches!(self, AddPathMode::Send | AddPathMode::Both)
    }
}

/// Graceful restart (RFC 4724 §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The R bit: the sender has restarted and its peer should not wait for its End-of-RIB
    /// before sending its own.
    pub restarting: bool,
    /// Seconds the peer should keep our routes after the session drops (12 bits).
    pub time: u16,
    /// Families, each with whether forwarding state was kept over the restart (the F bit).
    pub families: Vec<(Family, bool)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol(Family),
    RouteRefresh,
    GracefulRestart(GracefulRestart),
    FourOctetAs(u32),
    AddPath(Vec<(Family, AddPathMode)>),
    /// Anything else, kept so it can be logged (or a family we do not route).
    Other {
        code: u8,
        data: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The 2-octet field (AS_TRANS for large AS numbers); `asn()` is the real one.
    pub my_as: u16,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    pub fn new(asn: u32, hold_time: u16, bgp_id: Ipv4Addr, mut capabilities: Vec<Capability>) -> Open {
        if !capabilities.iter().any(|c| matches!(c, Capability::FourOctetAs(_))) {
            capabilities.push(Capability::FourOctetAs(asn));
        }
        let my_as = u16::try_from(asn).unwrap_or(AS_TRANS);
        Open { my_as, hold_time, bgp_id, capabilities }
    }

    /// The sender's AS: its 4-octet capability if it sent one.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(self.my_as as u32)
    }

    pub fn four_octet_as(&self) -> bool {
        self.capabilities.iter().any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// Families offered by MP-BGP; a speaker without the capability means IPv4 unicast only.
    pub fn families(&self) -> Vec<Family> {
        let mp: Vec<Family> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol(f) => Some(*f),
                _ => None,
            })
            .collect();
        let any_mp = self
            .capabilities
            .iter()
            .any(|c| matches!(c, Capability::Multiprotocol(_)) || matches!(c, Capability::Other { code: 1, .. }));
        if any_mp { mp } else { vec![Family::Ipv4Unicast] }
    }

    pub fn add_path(&self, family: Family) -> Option<AddPathMode> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::AddPath(list) => list.iter().find(|(f, _)| *f == family).map(|(_, m)| *m),
            _ => None,
        })
    }

    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(g) => Some(g),
            _ => None,
        })
    }

    pub fn route_refresh(&self) -> bool {
        self.capabilities.iter().any(|c| matches!(c, Capability::RouteRefresh))
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(4);
        out.extend_from_slice(&self.my_as.to_be_bytes());
        out.extend_from_slice(&self.hold_time.to_be_bytes());
        out.extend_from_slice(&self.bgp_id.octets());
        let mut caps = Vec::new();
        for c in &self.capabilities {
            let (code, data) = encode_capability(c);
            caps.push(code);
            caps.push(data.len() as u8);
            caps.extend_from_slice(&data);
        }
        // One optional parameter of type 2 holding every capability.
        if caps.is_empty() {
            out.push(0);
        } else {
            out.push(caps.len() as u8 + 2);
            out.push(2);
            out.push(caps.len() as u8);
            out.extend_from_slice(&caps);
        }
    }

    pub(super) fn decode(body: &[u8]) -> Result<Open, DecodeError> {
        let short = || DecodeError::fatal(super::header_error(2, vec![]), "OPEN shorter than its fixed part");
        let mut r = Reader::new(body);
        let version = r.u8().ok_or_else(short)?;
        if version != 4 {
            return Err(DecodeError::fatal(open_error(1, vec![0, 4]), format!("BGP version {version}")));
        }
        let my_as = r.u16().ok_or_else(short)?;
        let hold_time = r.u16().ok_or_else(short)?;
        if hold_time == 1 || hold_time == 2 {
            return Err(DecodeError::fatal(open_error(6, vec![]), format!("hold time {hold_time} s")));
        }
        let id = r.take(4).ok_or_else(short)?;
        let bgp_id = Ipv4Addr::new(id[0], id[1], id[2], id[3]);
        if bgp_id.is_unspecified() || bgp_id.is_broadcast() || bgp_id.is_multicast() {
            return Err(DecodeError::fatal(open_error(3, id.to_vec()), format!("BGP identifier {bgp_id}")));
        }
        let opt_len = r.u8().ok_or_else(short)? as usize;
        let malformed =
            |why: &str| DecodeError::fatal(open_error(0, vec![]), format!("OPEN optional parameters: {why}"));
        if r.buf.len() != opt_len {
            return Err(malformed("their length does not match the message"));
        }
        let mut capabilities = Vec::new();
        while !r.is_empty() {
            let kind = r.u8().ok_or_else(|| malformed("truncated"))?;
            let len = r.u8().ok_or_else(|| malformed("truncated"))? as usize;
            let value = r.take(len).ok_or_else(|| malformed("a parameter runs past the end"))?;
            if kind != 2 {
                return Err(DecodeError::fatal(open_error(4, vec![]), format!("optional parameter type {kind}")));
            }
            let mut c = Reader::new(value);
            while !c.is_empty() {
                let code = c.u8().ok_or_else(|| malformed("truncated capability"))?;
                let len = c.u8().ok_or_else(|| malformed("truncated capability"))? as usize;
                let data = c.take(len).ok_or_else(|| malformed("a capability runs past its parameter"))?;
                capabilities.push(decode_capability(code, data).ok_or_else(|| {
                    DecodeError::fatal(open_error(0, vec![]), format!("capability {code} of {len} bytes is malformed"))
                })?);
            }
        }
        Ok(Open { my_as, hold_time, bgp_id, capabilities })
    }
}

fn encode_capability(c: &Capability) -> (u8, Vec<u8>) {
    let family = |f: &Family, d: &mut Vec<u8>| {
        let (afi, safi) = f.afi_safi();
        d.extend_from_slice(&afi.to_be_bytes());
        d.push(safi);
    };
    let mut d = Vec::new();
    let code = match c {
        Capability::Multiprotocol(f) => {
            let (afi, safi) = f.afi_safi();
            d.extend_from_slice(&afi.to_be_bytes());
            d.push(0);
            d.push(safi);
            1
        }
        Capability::RouteRefresh => 2,
        Capability::GracefulRestart(g) => {
            let head = (g.time & 0x0fff) | if g.restarting { 0x8000 } else { 0 };
            d.extend_from_slice(&head.to_be_bytes());
            for (f, forwarding) in &g.families {
                family(f, &mut d);
                d.push(if *forwarding { 0x80 } else { 0 });
            }
            64
        }
        Capability::FourOctetAs(a) => {
            d.extend_from_slice(&a.to_be_bytes());
            65
        }
        Capability::AddPath(list) => {
            for (f, m) in list {
                family(f, &mut d);
                d.push(m.code());
            }
            69
        }
        Capability::Other { code, data } => {
            d.extend_from_slice(data);
            *code
        }
    };
    (code, d)
}

/// None when a capability we understand is malformed.
fn decode_capability(code: u8, data: &[u8]) -> Option<Capability> {
    let other = || Capability::Other { code, data: data.to_vec() };
    Some(match code {
        1 => {
            if data.len() != 4 {
                return None;
            }
            match Family::from_afi_safi(u16::from_be_bytes([data[0], data[1]]), data[3]) {
                Some(f) => Capability::Multiprotocol(f),
                None => other(),
            }
        }
        2 if data.is_empty() => Capability::RouteRefresh,
        2 => return None,
        64 => {
            if data.len() < 2 || (data.len() - 2) % 4 != 0 {
                return None;
            }
            let head = u16::from_be_bytes([data[0], data[1]]);
            let families = data[2..]
                .chunks(4)
                .filter_map(|c| {
                    Family::from_afi_safi(u16::from_be_bytes([c[0], c[1]]), c[2]).map(|f| (f, c[3] & 0x80 != 0))
                })
                .collect();
            Capability::GracefulRestart(GracefulRestart {
                restarting: head & 0x8000 != 0,
                time: head & 0x0fff,
                families,
            })
        }
        65 if data.len() == 4 => Capability::FourOctetAs(u32::from_be_bytes([data[0], data[1], data[2], data[3]])),
        65 => return None,
        69 => {
            if data.len() % 4 != 0 {
                return None;
            }
            let mut list = Vec::new();
            for c in data.chunks(4) {
                let mode = match c[3] {
                    1 => AddPathMode::Receive,
                    2 => AddPathMode::Send,
                    3 => AddPathMode::Both,
                    _ => return None,
                };
                if let Some(f) = Family::from_afi_safi(u16::from_be_bytes([c[0], c[1]]), c[2]) {
                    list.push((f, mode));
                }
            }
            Capability::AddPath(list)
        }
        _ => other(),
    })
}
