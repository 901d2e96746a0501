//! The CNI specification's data, gingham's network configuration, and the plugin ↔ agent protocol.

pub mod delegate;
pub mod plugin;
pub mod proto;
pub mod spec;

use serde_json::{Value, json};

/// The conflist `gingham cni install` writes: gingham first, then portmap and bandwidth, as
/// Calico's install-cni does.
pub fn conflist(name: &str, version: &str, mtu: u32, nodename: &str, socket: &str) -> Value {
    json!({
        "name": name,
        "cniVersion": version,
        "plugins": [
            {
                "type": "gingham",
                "log_level": "info",
                "datastore_type": "gingham-agent",
                "nodename": nodename,
                "mtu": mtu,
                "agent_socket": socket,
                "ipam": { "type": "gingham-ipam" },
                "policy": { "type": "k8s" }
            },
            { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } },
            { "type": "bandwidth", "capabilities": { "bandwidth": true } }
        ]
    })
}
