//! Route changes in batches: hundreds of RTM_NEWROUTE/RTM_DELROUTE messages in one datagram
//! on a raw rtnetlink socket, only the last asking for an acknowledgement. The kernel handles
//! a datagram's messages in order, within the send, and answers every failure whatever the
//! flags, so the last one's ACK means all are done and the errors before it name theirs.
//! A full BGP table then costs a few hundred system calls instead of two per route.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::RouteMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::libc;

/// Messages per datagram (about 40 KB of routes; the socket's send buffer takes it).
pub(crate) const CHUNK: usize = 512;
/// How long the kernel may take to answer a datagram.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

pub(crate) struct RouteBatcher {
    sock: Socket,
    seq: u32,
}

impl RouteBatcher {
    /// A socket in the calling thread's namespace.
    pub(crate) fn new() -> io::Result<RouteBatcher> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        sock.set_rx_buf_sz(1 << 20)?;
        let tv = libc::timeval { tv_sec: ANSWER_WITHIN.as_secs() as libc::time_t, tv_usec: 0 };
        // SAFETY: a timeval option with its size, on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RouteBatcher { sock, seq: 1 })
    }

    /// Each change (true: add or replace; false: delete) with its result: for a deletion,
    /// whether the route was there.
    pub(crate) fn apply(&mut self, ops: &[(bool, RouteMessage)]) -> Vec<Result<bool, String>> {
        let mut out = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(CHUNK) {
            match self.chunk(chunk) {
                Ok(r) => out.extend(r),
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.to_string()))),
            }
        }
        out
    }

    fn chunk(&mut self, ops: &[(bool, RouteMessage)]) -> io::Result<Vec<Result<bool, String>>> {
        let base = self.seq;
        self.seq = self.seq.wrapping_add(ops.len() as u32);
        let mut buf = Vec::new();
        for (i, (replace, m)) in ops.iter().enumerate() {
            let mut h = NetlinkHeader::default();
            h.flags = NLM_F_REQUEST
                | if *replace { NLM_F_CREATE | NLM_F_REPLACE } else { 0 }
                | if i + 1 == ops.len() { NLM_F_ACK } else { 0 };
            h.sequence_number = base.wrapping_add(i as u32);
            let inner = if *replace {
                RouteNetlinkMessage::NewRoute(m.clone())
            } else {
                RouteNetlinkMessage::DelRoute(m.clone())
            };
            let mut msg = NetlinkMessage::new(h, NetlinkPayload::InnerMessage(inner));
            msg.finalize();
            let at = buf.len();
            buf.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut buf[at..]);
        }
        self.sock.send(&buf, 0)?;
        let mut results: Vec<Result<bool, String>> = vec![Ok(true); ops.len()];
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = self.sock.recv(&mut &mut rbuf[..], 0)?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes([rbuf[off], rbuf[off + 1], rbuf[off + 2], rbuf[off + 3]]) as usize;
                if len < 16 || off + len > n {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a truncated netlink answer"));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..off + len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                off += len.next_multiple_of(4);
                let NetlinkPayload::Error(e) = &msg.payload else { continue };
                let i = msg.header.sequence_number.wrapping_sub(base) as usize;
                if i >= ops.len() {
                    continue; // an answer to an earlier batch that timed out
                }
                if let Some(code) = e.code {
                    let errno = -code.get();
                    results[i] = if !ops[i].0 && errno == libc::ESRCH {
                        Ok(false)
                    } else {
                        Err(io::Error::from_raw_os_error(errno).to_string())
                    };
                }
                if i + 1 == ops.len() {
                    return Ok(results);
                }
            }
        }
    }
}
