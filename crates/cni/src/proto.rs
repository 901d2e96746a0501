//! The plugin ↔ node agent protocol: one JSON request line, one JSON response line, over the
//! agent's unix socket. The plugin itself opens no datastore connection.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::{CniError, CniResult, IpamConf, code};

/// Where the agent listens unless the network config says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/gingham/agent.sock";

/// What the plugin knows about one attachment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The network name (CNI config `name`), part of the IPAM handle.
    pub network: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// Kubernetes namespace/pod when CNI_ARGS carry them.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub mtu: u32,
    pub interface_prefix: String,
    pub ipam: IpamConf,
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CniResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CniError>,
}

/// Send one request to the agent and wait for its answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Option<CniResult>, CniError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        CniError::new(code::TRY_AGAIN_LATER, format!("the gingham node agent is not reachable at {}", socket.display()))
            .details(format!("{e}; start it with `gingham node run --nodename <node>`"))
    })?;
    let io = |e: std::io::Error| {
        CniError::new(code::IO_FAILURE, "talking to the gingham node agent failed").details(e.to_string())
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| CniError::new(code::INTERNAL, e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    let resp: Response = serde_json::from_str(&answer).map_err(|e| {
        CniError::new(code::IO_FAILURE, "the gingham node agent's answer is unreadable").details(e.to_string())
    })?;
    match resp.error {
        Some(e) => Err(e),
        None => Ok(resp.result),
    }
}
