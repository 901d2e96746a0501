//! How the agent finds its node's address (Calico's IP autodetection methods).

use std::net::{IpAddr, Ipv4Addr};

use gingham_kernel::Netlink;
use ipnet::IpNet;

/// How to find this node's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Autodetect {
    /// A fixed address with prefix.
    Given(IpNet),
    /// The first global IPv4 address on an interface that is not gingham's or a container's.
    FirstFound,
    /// The first IPv4 address on an interface whose name matches (Calico's `interface=REGEX`).
    Interface(String),
}

/// Find the node address and the interface it is on.
pub async fn detect_address(nl: &Netlink, how: &Autodetect) -> Result<(String, IpNet), String> {
    let pattern = match how {
        // Anchored, as Calico matches the whole interface name.
        Autodetect::Interface(p) => Some(
            regex_lite::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| format!("interface={p}: not a valid regular expression: {e}"))?,
        ),
        _ => None,
    };
    let links = nl.links().await.map_err(|e| e.to_string())?;
    let skip = ["lo", "docker", "cali", "vxlan", "tunl", "virbr", "kube-ipvs", "cni", "veth", "br-"];
    for l in &links {
        let eligible = match how {
            Autodetect::FirstFound => !skip.iter().any(|p| l.name.starts_with(p)),
            Autodetect::Interface(_) => pattern.as_ref().is_some_and(|r| r.is_match(&l.name)),
            Autodetect::Given(_) => true,
        };
        if !eligible {
            continue;
        }
        for a in nl.addresses(l.index).await.map_err(|e| e.to_string())? {
            let IpAddr::V4(v4) = a.addr() else { continue };
            match how {
                Autodetect::Given(want) if want.addr() == a.addr() => return Ok((l.name.clone(), *want)),
                Autodetect::Given(_) => {}
                _ if !v4.is_loopback() && !v4.is_link_local() => return Ok((l.name.clone(), a)),
                _ => {}
            }
        }
    }
    Err(match how {
        Autodetect::Given(a) => format!("no interface has the address {a}"),
        Autodetect::FirstFound => "no interface has a usable IPv4 address (first-found)".into(),
        Autodetect::Interface(p) => format!("no interface matching {p:?} has an IPv4 address"),
    })
}

pub fn ipv4(n: &IpNet) -> Option<Ipv4Addr> {
    match n.addr() {
        IpAddr::V4(a) => Some(a),
        _ => None,
    }
}
