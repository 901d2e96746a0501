//! The plugin ↔ node agent protocol: one JSON request line, one JSON response line, over the
//! agent's unix socket. The plugin itself opens no datastore connection. The pod's network
//! namespace travels as an open file descriptor (SCM_RIGHTS) beside the request: the plugin opens
//! CNI_NETNS in the runtime's mount namespace, so the agent never resolves a path that may not
//! exist in its own.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::spec::{CniError, CniResult, IpamConf, code};

/// Where the agent listens unless the network config says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/gingham/agent.sock";

/// The longest request line the agent reads (a real one is a few KiB).
pub const MAX_REQUEST: usize = 1 << 20;

/// The plugin waits this much longer than the deadline it gives the agent, so that the agent's
/// own verdict (done, or undone because it came too late) always arrives before the plugin gives up.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// What the plugin knows about one attachment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The network name (CNI config `name`), part of the IPAM handle.
    pub network: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// Kubernetes namespace/pod: both set for a Kubernetes call, neither otherwise.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub mtu: u32,
    pub interface_prefix: String,
    pub ipam: IpamConf,
    /// Specific addresses asked for (CNI_ARGS `IP=`, runtimeConfig `ips`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requested_ips: Vec<IpAddr>,
    /// Named ports (runtimeConfig `namedPorts`: what Kubernetes gives as container ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
    /// The pod's service account (runtimeConfig `serviceAccount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Addresses another IPAM plugin (host-local) already gave this attachment: used as they
    /// are, gingham's IPAM left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assigned: Vec<ipnet::IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    pub port: u16,
}

impl Endpoint {
    /// The IPAM handle: `<network>.<containerID>`, as Calico.
    pub fn handle(&self) -> String {
        format!("{}.{}", self.network, self.container_id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Add(Endpoint),
    Del(Endpoint),
    Check {
        endpoint: Endpoint,
        prev: Option<CniResult>,
    },
    /// IPAM only (the plugin acting as `gingham-ipam` under another main plugin).
    IpamAdd(Endpoint),
    IpamDel(Endpoint),
    /// Release everything of `network` on this node that is not in `valid`.
    Gc {
        network: String,
        valid: Vec<Attachment>,
    },
    Status,
    /// This node's Kubernetes podCIDRs (for host-local's `usePodCidr`), in `Response::pod_cidrs`.
    PodCidrs,
}

/// One request with the time (ms since the epoch) after which its caller has given up: the agent
/// does not start it after that, and undoes an ADD that finishes after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub deadline_ms: u64,
    pub request: Request,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CniResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CniError>,
    /// How long each of the agent's steps took (µs), for the CNI benchmark.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

/// With this set, the plugin prints one line per request on stderr: the socket round trip and
/// the agent's steps (`gingham-cni steps {json}`).
pub const TIMINGS_ENV: &str = "GINGHAM_CNI_TIMINGS";

/// Send one request (with the pod's network namespace, if given) to the agent and wait for its
/// answer. The agent gets `timeout` to finish; the plugin waits a little longer.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    netns: Option<&std::fs::File>,
) -> Result<Option<CniResult>, CniError> {
    exchange(socket, req, timeout, netns).map(|r| r.result)
}

/// As [`call`], with the agent's whole answer.
pub fn exchange(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    netns: Option<&std::fs::File>,
) -> Result<Response, CniError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        CniError::new(code::TRY_AGAIN_LATER, format!("the gingham node agent is not reachable at {}", socket.display()))
            .details(format!("{e}; start it with `gingham node run --nodename <node>`"))
    })?;
    let io = |e: std::io::Error| {
        CniError::new(code::IO_FAILURE, "talking to the gingham node agent failed").details(e.to_string())
    };
    stream.set_read_timeout(Some(timeout + DEADLINE_GRACE)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let msg = Message { deadline_ms: now_ms() + timeout.as_millis() as u64, request: req.clone() };
    let started = std::time::Instant::now();
    let mut line = serde_json::to_vec(&msg).map_err(|e| CniError::new(code::INTERNAL, e.to_string()))?;
    line.push(b'\n');
    let fds: Vec<RawFd> = netns.iter().map(|f| f.as_raw_fd()).collect();
    let sent = send_with_fds(&stream, &line, &fds).map_err(io)?;
    stream.write_all(&line[sent..]).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(|e| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            CniError::new(code::TRY_AGAIN_LATER, "the gingham node agent did not answer in time")
                .details(format!("waited {:?}", timeout + DEADLINE_GRACE))
        } else {
            io(e)
        }
    })?;
    let resp: Response = serde_json::from_str(&answer).map_err(|e| {
        CniError::new(code::IO_FAILURE, "the gingham node agent's answer is unreadable").details(e.to_string())
    })?;
    if std::env::var_os(TIMINGS_ENV).is_some() {
        let t = serde_json::json!({ "round_trip_us": started.elapsed().as_micros() as u64, "agent": resp.steps });
        eprintln!("gingham-cni steps {t}");
    }
    match resp.error {
        Some(e) => Err(e),
        None => Ok(resp),
    }
}

/// Write the start of `data` with `fds` attached; returns how much of `data` went out.
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One non-blocking read from a unix socket into `buf`, collecting any descriptors passed with
/// it (close-on-exec). `Ok((0, _))` is end of stream.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT)
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us; nothing
            // else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other("too many file descriptors were passed with the request"));
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_travel_with_the_request() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        let line = b"{\"x\":1}\n";
        assert_eq!(send_with_fds(&a, line, &[f.as_raw_fd()]).unwrap(), line.len());
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], line);
        assert_eq!(fds.len(), 1);
        use std::os::unix::fs::MetadataExt;
        let got = std::fs::File::from(fds.into_iter().next().unwrap()).metadata().unwrap();
        assert_eq!(got.ino(), f.metadata().unwrap().ino(), "the same namespace arrives");
        drop(a);
        assert_eq!(recv_with_fds(b.as_raw_fd(), &mut buf).unwrap().0, 0);
    }
}
