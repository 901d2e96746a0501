//! The BGP wire format (RFC 4271), with the extensions gingham speaks: MP-BGP (RFC 4760),
//! 4-octet AS numbers (RFC 6793), route refresh (RFC 2918), ADD-PATH (RFC 7911), graceful
//! restart (RFC 4724), route reflection attributes (RFC 4456) and RFC 7606 error handling.
//!
//! Our own thin types: the rest of the crate never sees bytes.

mod attrs;
mod error;
mod open;
mod update;

pub use attrs::{AsPathSegment, Attrs, Origin, RawAttr, SegmentKind};
pub use error::{DecodeError, Notification, cease, header_error, open_error, update_error};
pub use open::{AS_TRANS, AddPathMode, Capability, GracefulRestart, Open};
pub use update::{MpReach, MpUnreach, Nlri, Update, UpdateProblem};

use std::collections::BTreeSet;

/// The fixed header: 16 marker bytes of all ones, a 2-byte length, a type.
pub const HEADER_LEN: usize = 19;
/// Largest message without the extended-message capability (RFC 8654), which we do not offer.
pub const MAX_MESSAGE_LEN: usize = 4096;

const TYPE_OPEN: u8 = 1;
const TYPE_UPDATE: u8 = 2;
const TYPE_NOTIFICATION: u8 = 3;
const TYPE_KEEPALIVE: u8 = 4;
const TYPE_ROUTE_REFRESH: u8 = 5;

/// An address family and sub-family gingham routes: unicast IPv4 and IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ipv4Unicast,
    Ipv6Unicast,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4Unicast, Family::Ipv6Unicast];

    pub fn afi_safi(self) -> (u16, u8) {
        match self {
            Family::Ipv4Unicast => (1, 1),
            Family::Ipv6Unicast => (2, 1),
        }
    }

    /// None for families we do not route (they are ignored, not errors).
    pub fn from_afi_safi(afi: u16, safi: u8) -> Option<Family> {
        match (afi, safi) {
            (1, 1) => Some(Family::Ipv4Unicast),
            (2, 1) => Some(Family::Ipv6Unicast),
            _ => None,
        }
    }

    pub fn of(net: &ipnet::IpNet) -> Family {
        match net {
            ipnet::IpNet::V4(_) => Family::Ipv4Unicast,
            ipnet::IpNet::V6(_) => Family::Ipv6Unicast,
        }
    }
}

/// What both OPENs agreed, which changes how UPDATEs are read and written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Codec {
    /// AS numbers in AS_PATH and AGGREGATOR are 4 octets (both sides advertised RFC 6793).
    pub four_octet_as: bool,
    /// Families whose NLRI we receive with a path identifier (we said receive, they said send).
    pub add_path_rx: BTreeSet<Family>,
    /// Families whose NLRI we send with a path identifier.
    pub add_path_tx: BTreeSet<Family>,
}

/// ROUTE-REFRESH (RFC 2918): ask the peer to send its Adj-RIB-Out for one family again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRefresh {
    pub afi: u16,
    pub safi: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Open(_) => "OPEN",
            Message::Update(_) => "UPDATE",
            Message::Notification(_) => "NOTIFICATION",
            Message::Keepalive => "KEEPALIVE",
            Message::RouteRefresh(_) => "ROUTE-REFRESH",
        }
    }

    /// The message with its header. An UPDATE too large for one message is an error: the
    /// caller packs fewer prefixes (see `Update::split`).
    pub fn encode(&self, codec: &Codec) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![0xff; 16];
        out.extend_from_slice(&[0, 0, 0]);
        let kind = match self {
            Message::Open(o) => {
                o.encode(&mut out);
                TYPE_OPEN
            }
            Message::Update(u) => {
                u.encode(codec, &mut out);
                TYPE_UPDATE
            }
            Message::Notification(n) => {
                out.push(n.code);
                out.push(n.subcode);
                out.extend_from_slice(&n.data);
                TYPE_NOTIFICATION
            }
            Message::Keepalive => TYPE_KEEPALIVE,
            Message::RouteRefresh(r) => {
                out.extend_from_slice(&r.afi.to_be_bytes());
                out.push(0);
                out.push(r.safi);
                TYPE_ROUTE_REFRESH
            }
        };
        if out.len() > MAX_MESSAGE_LEN {
            return Err(EncodeError::TooLong(out.len()));
        }
        let len = out.len() as u16;
        out[16..18].copy_from_slice(&len.to_be_bytes());
        out[18] = kind;
        Ok(out)
    }

    /// The length of the first message in `buf` once all of it is there (None: read more).
    /// A bad marker or length is a header error: the session must close.
    pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[..16].iter().any(|b| *b != 0xff) {
            return Err(DecodeError::fatal(header_error(1, vec![]), "the header's marker is not all ones"));
        }
        let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
        if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(DecodeError::fatal(header_error(2, buf[16..18].to_vec()), format!("message length {len}")));
        }
        Ok((buf.len() >= len).then_some(len))
    }

    /// One whole message (as framed by `frame_len`).
    pub fn decode(msg: &[u8], codec: &Codec) -> Result<Message, DecodeError> {
        let Some(len) = Message::frame_len(msg)? else {
            return Err(DecodeError::fatal(header_error(2, vec![]), "truncated message"));
        };
        let kind = msg[18];
        let body = &msg[HEADER_LEN..len];
        let bad_len = || {
            DecodeError::fatal(
                header_error(2, (len as u16).to_be_bytes().to_vec()),
                format!("{len}-byte message of type {kind}"),
            )
        };
        match kind {
            TYPE_OPEN => Open::decode(body).map(Message::Open),
            TYPE_UPDATE => Update::decode(body, codec).map(Message::Update),
            TYPE_NOTIFICATION => {
                if body.len() < 2 {
                    return Err(bad_len());
                }
                Ok(Message::Notification(Notification { code: body[0], subcode: body[1], data: body[2..].to_vec() }))
            }
            TYPE_KEEPALIVE if body.is_empty() => Ok(Message::Keepalive),
            TYPE_KEEPALIVE => Err(bad_len()),
            TYPE_ROUTE_REFRESH if body.len() == 4 => {
                Ok(Message::RouteRefresh(RouteRefresh { afi: u16::from_be_bytes([body[0], body[1]]), safi: body[3] }))
            }
            TYPE_ROUTE_REFRESH => Err(bad_len()),
            other => Err(DecodeError::fatal(header_error(3, vec![other]), format!("unknown message type {other}"))),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("message of {0} bytes exceeds BGP's 4096")]
    TooLong(usize),
}

/// A cursor over a message body that turns running out of bytes into the caller's error.
pub(crate) struct Reader<'a> {
    pub buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests;
