//! What a Kubernetes Pod (and its Namespace) asks of IPAM through Calico's annotations:
//! `cni.projectcalico.org/ipAddrs` (these exact addresses), `cni.projectcalico.org/ipv4pools` and
//! `ipv6pools` (only these pools; the Pod's win over its Namespace's, both over the CNI
//! configuration's). Pure: the caller reads the annotations.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub const IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";
pub const IPV4_POOLS: &str = "cni.projectcalico.org/ipv4pools";
pub const IPV6_POOLS: &str = "cni.projectcalico.org/ipv6pools";

/// What the annotations ask for (None: nothing, the CNI configuration decides).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    pub ips: Vec<IpAddr>,
    pub pools_v4: Option<Vec<String>>,
    pub pools_v6: Option<Vec<String>>,
}

fn list(value: &str, what: &str) -> Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(value)
        .map_err(|e| format!("annotation {what}: {value:?} is not a JSON list of strings ({e})"))
}

pub fn requested(pod: &BTreeMap<String, String>, namespace: &BTreeMap<String, String>) -> Result<Requested, String> {
    let pools = |key: &str| -> Result<Option<Vec<String>>, String> {
        match pod.get(key).map(|v| (v, "of the Pod")).or_else(|| namespace.get(key).map(|v| (v, "of the Namespace"))) {
            Some((v, whose)) => list(v, &format!("{key} {whose}")).map(Some),
            None => Ok(None),
        }
    };
    let mut r = Requested { pools_v4: pools(IPV4_POOLS)?, pools_v6: pools(IPV6_POOLS)?, ..Default::default() };
    if let Some(v) = pod.get(IP_ADDRS) {
        if pod.contains_key(IPV4_POOLS) || pod.contains_key(IPV6_POOLS) {
            return Err(format!("annotations {IP_ADDRS} and {IPV4_POOLS}/{IPV6_POOLS} cannot be used together"));
        }
        for (i, s) in list(v, IP_ADDRS)?.iter().enumerate() {
            let ip = s.split('/').next().unwrap_or(s);
            r.ips.push(ip.parse().map_err(|_| format!("annotation {IP_ADDRS}[{i}]: {s:?} is not an IP address"))?);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_pod_wins_over_its_namespace() {
        let ns = m(&[(IPV4_POOLS, r#"["ns-pool"]"#), (IPV6_POOLS, r#"["v6"]"#)]);
        let r = requested(&m(&[(IPV4_POOLS, r#"["pod-pool"]"#)]), &ns).unwrap();
        assert_eq!((r.pools_v4, r.pools_v6), (Some(vec!["pod-pool".into()]), Some(vec!["v6".into()])));
        assert_eq!(requested(&m(&[]), &m(&[])).unwrap(), Requested::default());
        let r = requested(&m(&[(IP_ADDRS, r#"["10.0.0.7", "fd00::7/128"]"#)]), &ns).unwrap();
        assert_eq!(r.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap(), "fd00::7".parse().unwrap()]);
    }

    #[test]
    fn bad_annotations_are_named() {
        let e = requested(&m(&[(IPV4_POOLS, "pool-a")]), &m(&[])).unwrap_err();
        assert!(e.contains(IPV4_POOLS) && e.contains("of the Pod"), "{e}");
        let e = requested(&m(&[(IP_ADDRS, r#"["x"]"#)]), &m(&[])).unwrap_err();
        assert!(e.contains("ipAddrs[0]"), "{e}");
        let both = m(&[(IP_ADDRS, r#"["10.0.0.1"]"#), (IPV4_POOLS, r#"["p"]"#)]);
        assert!(requested(&both, &m(&[])).unwrap_err().contains("cannot be used together"));
    }
}
