//! TCP-MD5 signatures (RFC 2385) for BGP sessions. No crate wraps the socket option, so the
//! kernel's `struct tcp_md5sig` is declared here. The key goes on the listening socket (per
//! peer, before the peer's SYN) and on a connecting socket before `connect`.

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use nix::libc;

/// The kernel's longest key (TCP_MD5SIG_MAXKEYLEN).
pub const MAX_KEY_LEN: usize = 80;

#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefix_len: u8,
    key_len: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY_LEN],
}

/// Set the key for `peer` on `fd`; None removes it.
pub fn set_md5_key(fd: RawFd, peer: IpAddr, key: Option<&[u8]>) -> io::Result<()> {
    let key = key.unwrap_or_default();
    if key.len() > MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a TCP-MD5 key is at most {MAX_KEY_LEN} bytes"),
        ));
    }
    // SAFETY: all-zero bytes are a valid sockaddr_storage and a valid key buffer.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let socket_family = socket_family(fd)?;
    match (peer, socket_family) {
        (IpAddr::V4(a), libc::AF_INET) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(a).to_be();
        }
        (a, libc::AF_INET6) => {
            // An IPv4 peer of a dual-stack socket is keyed by its mapped address.
            let v6 = match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = v6.octets();
        }
        (IpAddr::V6(_), _) => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "an IPv6 peer on an IPv4 socket"));
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket")),
    }
    sig.key_len = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` is a fully initialised tcp_md5sig that outlives the call; the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Removing a key that was never set is not an error.
        if key.is_empty() && e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

fn socket_family(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: getsockname writes at most `len` bytes into the zeroed storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ss.ss_family as libc::c_int)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::fd::AsRawFd;

    #[test]
    fn keys_are_set_and_removed_and_bounded() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let peer = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        set_md5_key(l.as_raw_fd(), peer, Some(b"secret")).unwrap();
        set_md5_key(l.as_raw_fd(), peer, None).unwrap();
        set_md5_key(l.as_raw_fd(), peer, None).unwrap();
        assert!(set_md5_key(l.as_raw_fd(), peer, Some(&[b'x'; 81])).is_err());
        assert!(set_md5_key(l.as_raw_fd(), "::1".parse().unwrap(), Some(b"k")).is_err());
    }
}

/// TTL security (RFC 5082) on `fd`: send with TTL (hop limit) 255, drop what arrives with
/// less than `min_ttl`.
pub fn set_ttl_security(fd: RawFd, min_ttl: u8) -> io::Result<()> {
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: an int option, its address and size; the value outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    };
    match socket_family(fd)? {
        libc::AF_INET => {
            set(libc::IPPROTO_IP, libc::IP_TTL, 255)?;
            set(libc::IPPROTO_IP, libc::IP_MINTTL, min_ttl.into())
        }
        libc::AF_INET6 => {
            // A dual-stack socket carries IPv4 peers too: both families' options.
            set(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)?;
            set(libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT, min_ttl.into())?;
            let _ = set(libc::IPPROTO_IP, libc::IP_TTL, 255);
            let _ = set(libc::IPPROTO_IP, libc::IP_MINTTL, min_ttl.into());
            Ok(())
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket")),
    }
}
