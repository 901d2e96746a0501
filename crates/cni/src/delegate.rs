//! Another IPAM plugin under gingham, as Calico's `ipam.type: host-local`: it is run the way
//! libcni runs a delegate (found on CNI_PATH, the same environment, the network configuration
//! on stdin), with host-local's `usePodCidr` / `usePodCidrIPv6` subnets first replaced by this
//! node's Kubernetes podCIDRs.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::Value;

use crate::spec::{CniError, CniResult, code};

/// host-local's placeholders for the node's IPv4 / IPv6 podCIDR.
pub const USE_POD_CIDR: &str = "usePodCidr";
pub const USE_POD_CIDR_V6: &str = "usePodCidrIPv6";

/// The IPAM types gingham's own agent serves; anything else is another plugin's.
pub fn is_own(kind: &str) -> bool {
    matches!(kind, "" | "gingham-ipam" | "calico-ipam")
}

/// Every `subnet` of the IPAM section: the top-level one and each range's.
fn subnets(ipam: &mut Value) -> Vec<&mut Value> {
    let mut out = Vec::new();
    let Some(obj) = ipam.as_object_mut() else { return out };
    let (top, ranges): (Vec<_>, Vec<_>) = obj.iter_mut().partition(|(k, _)| k.as_str() == "subnet");
    out.extend(top.into_iter().map(|(_, v)| v));
    for (k, v) in ranges {
        if k != "ranges" {
            continue;
        }
        for set in v.as_array_mut().into_iter().flatten() {
            for range in set.as_array_mut().into_iter().flatten() {
                if let Some(s) = range.get_mut("subnet") {
                    out.push(s);
                }
            }
        }
    }
    out
}

/// Whether the IPAM section names the node's podCIDR anywhere.
pub fn wants_pod_cidrs(ipam: &Value) -> bool {
    let mut copy = ipam.clone();
    subnets(&mut copy).iter().any(|s| matches!(s.as_str(), Some(USE_POD_CIDR | USE_POD_CIDR_V6)))
}

/// Replace the placeholders with the node's podCIDRs (the first of each family).
pub fn fill_pod_cidrs(ipam: &mut Value, node: &str, cidrs: &[IpNet]) -> Result<(), CniError> {
    let v4 = cidrs.iter().find(|c| c.addr().is_ipv4());
    let v6 = cidrs.iter().find(|c| c.addr().is_ipv6());
    for s in subnets(ipam) {
        let (want, family) = match s.as_str() {
            Some(USE_POD_CIDR) => (v4, "IPv4"),
            Some(USE_POD_CIDR_V6) => (v6, "IPv6"),
            _ => continue,
        };
        let Some(cidr) = want else {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!("ipam.subnet {:?}: node {node} has no {family} podCIDR yet", s.as_str().unwrap_or_default()),
            )
            .details(
                "Kubernetes assigns Node.spec.podCIDRs when the controller manager runs with --allocate-node-cidrs",
            ));
        };
        *s = Value::String(cidr.to_string());
    }
    Ok(())
}

/// The plugin binary `kind` on the `:`-separated CNI_PATH.
pub fn find(kind: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    if kind.is_empty() || kind.contains('/') || kind == "." || kind == ".." {
        return Err(CniError::new(code::INVALID_CONFIG, format!("ipam.type {kind:?} is not a plugin name")));
    }
    cni_path.split(':').filter(|d| !d.is_empty()).map(|d| Path::new(d).join(kind)).find(|p| p.is_file()).ok_or_else(
        || CniError::new(code::INVALID_CONFIG, format!("ipam.type {kind}: no such plugin on CNI_PATH {cni_path:?}")),
    )
}

/// Run `plugin` for `command` with `conf` on stdin; the rest of the environment is the
/// runtime's, as for any delegate. Returns its result (ADD) or its error, named.
pub fn exec(plugin: &Path, command: &str, conf: &Value) -> Result<Option<Value>, CniError> {
    let name = plugin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let failed = |e: std::io::Error| {
        CniError::new(code::INTERNAL, format!("running the IPAM plugin {} failed", plugin.display()))
            .details(e.to_string())
    };
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(failed)?;
    let input = serde_json::to_vec(conf).map_err(|e| CniError::new(code::INTERNAL, e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&input).map_err(failed)?;
    }
    let out = child.wait_with_output().map_err(failed)?;
    let answer: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        let e = answer.as_ref().and_then(|a| serde_json::from_value::<CniError>(a.clone()).ok());
        return Err(match e {
            Some(e) => CniError::new(e.code, format!("{name}: {}", e.msg)).details(e.details),
            None => CniError::new(code::INTERNAL, format!("{name} {command} failed ({})", out.status))
                .details(String::from_utf8_lossy(&out.stdout).into_owned()),
        });
    }
    Ok(answer)
}

/// The addresses of a delegate's ADD result.
pub fn addresses(name: &str, result: Option<&Value>) -> Result<Vec<IpNet>, CniError> {
    let r = result
        .map(CniResult::from_value)
        .transpose()
        .map_err(|e| {
            CniError::new(code::DECODE_FAILURE, format!("{name} answered ADD without a CNI result")).details(e.msg)
        })?
        .unwrap_or_default();
    let ips: Vec<IpNet> = r.ips.iter().map(|i| i.address).collect();
    if ips.is_empty() {
        return Err(CniError::new(code::INTERNAL, format!("{name} gave no address")));
    }
    // One address per family: the pod has one interface and one default route per family.
    let per_family = |v4: bool| ips.iter().filter(|n| matches!(n.addr(), IpAddr::V4(_)) == v4).count();
    if per_family(true) > 1 || per_family(false) > 1 {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("{name} gave more than one address of a family: {ips:?}"),
        ));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_are_found_and_filled_in_both_forms() {
        let cidrs: Vec<IpNet> = vec!["10.244.3.0/24".parse().unwrap(), "fd00:3::/64".parse().unwrap()];
        let mut old = json!({"type": "host-local", "subnet": "usePodCidr"});
        assert!(wants_pod_cidrs(&old));
        fill_pod_cidrs(&mut old, "n1", &cidrs).unwrap();
        assert_eq!(old["subnet"], "10.244.3.0/24");
        let mut ranges = json!({"type": "host-local",
            "ranges": [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}], [{"subnet": "10.9.0.0/16"}]]});
        fill_pod_cidrs(&mut ranges, "n1", &cidrs).unwrap();
        assert_eq!(ranges["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(ranges["ranges"][1][0]["subnet"], "fd00:3::/64");
        assert_eq!(ranges["ranges"][2][0]["subnet"], "10.9.0.0/16", "a real subnet stays");
        assert!(!wants_pod_cidrs(&ranges));
    }

    #[test]
    fn a_missing_pod_cidr_is_a_retry_naming_the_node_and_family() {
        let mut v6 = json!({"type": "host-local", "ranges": [[{"subnet": "usePodCidrIPv6"}]]});
        let e = fill_pod_cidrs(&mut v6, "n1", &["10.244.3.0/24".parse().unwrap()]).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("n1") && e.msg.contains("IPv6"), "{e:?}");
    }

    #[test]
    fn plugin_names_cannot_leave_cni_path() {
        for bad in ["", "../bin/sh", "/bin/sh", ".."] {
            assert_eq!(find(bad, "/usr/lib/cni").unwrap_err().code, code::INVALID_CONFIG, "{bad}");
        }
        assert!(find("no-such-plugin", "/nonexistent:/also-not").unwrap_err().msg.contains("CNI_PATH"));
    }

    #[test]
    fn results_give_one_address_per_family() {
        let r = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.3.2/24"}, {"address": "fd00:3::2/64"}]});
        assert_eq!(addresses("host-local", Some(&r)).unwrap().len(), 2);
        let two = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.3.2/24"}, {"address": "10.244.3.3/24"}]});
        assert!(addresses("host-local", Some(&two)).is_err());
        assert!(addresses("host-local", None).is_err());
    }
}
