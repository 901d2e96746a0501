//! calicoctl's output formats: `ps`/`wide` tables (Go tabwriter: min width 5, padding 3),
//! YAML and JSON for one object or a `<Kind>List`.

use std::collections::BTreeMap;

use gingham_api::network::{BGPConfigurationSpec, NodeSpec};
use gingham_api::object::IntOrString;
use gingham_api::validate::parse_asn;
use gingham_api::{Kind, Object};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Ps,
    Wide,
    Yaml,
    Json,
}

/// Render rows like Go's tabwriter with minwidth 5 and padding 3 (the last column unpadded).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut widths = vec![0usize; cols];
    for row in std::iter::once(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>()).chain(rows) {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cols {
                l.push_str(cell);
            } else {
                let w = (widths[i] + 3).max(5);
                l.push_str(&format!("{cell:<w$}"));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn labels(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Context some columns need (the cluster's default AS number for Node ASN).
#[derive(Default)]
pub struct TableContext {
    pub default_asn: Option<u32>,
}

/// Columns and one row per object, for `get -o ps|wide`.
pub fn columns(
    kind: Kind,
    wide: bool,
    objects: &[Object],
    ctx: &TableContext,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let name = |o: &Object| o.metadata.name.clone();
    let sp = |o: &Object, f: &str| s(&o.spec[f]);
    let (header, row): (Vec<&'static str>, Box<dyn Fn(&Object) -> Vec<String>>) = match (kind, wide) {
        (Kind::IPPool, false) => {
            (vec!["NAME", "CIDR", "SELECTOR"], Box::new(move |o| vec![name(o), sp(o, "cidr"), sp(o, "nodeSelector")]))
        }
        (Kind::IPPool, true) => (
            vec!["NAME", "CIDR", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED", "SELECTOR"],
            Box::new(move |o| {
                let mode = |f: &str| {
                    if o.spec[f].is_null() { "Never".to_string() } else { sp(o, f) }
                };
                let flag = |f: &str| o.spec[f].as_bool().unwrap_or(false).to_string();
                vec![
                    name(o),
                    sp(o, "cidr"),
                    flag("natOutgoing"),
                    mode("ipipMode"),
                    mode("vxlanMode"),
                    flag("disabled"),
                    sp(o, "nodeSelector"),
                ]
            }),
        ),
        (Kind::Node, false) => (vec!["NAME"], Box::new(move |o| vec![name(o)])),
        (Kind::Node, true) => {
            let default_asn = ctx.default_asn.unwrap_or(64512);
            (
                vec!["NAME", "ASN", "IPV4", "IPV6"],
                Box::new(move |o| {
                    let spec: NodeSpec = o.spec_as().unwrap_or_default();
                    let bgp = spec.bgp.unwrap_or_default();
                    let asn = match &bgp.as_number {
                        Some(a) => parse_asn(a).map(|n| n.to_string()).unwrap_or_else(|_| a.to_string()),
                        None => format!("({default_asn})"),
                    };
                    vec![name(o), asn, bgp.ipv4_address.unwrap_or_default(), bgp.ipv6_address.unwrap_or_default()]
                }),
            )
        }
        (Kind::BGPPeer, _) => (
            vec!["NAME", "PEERIP", "NODE", "ASN"],
            Box::new(move |o| {
                let node = match (o.spec["node"].as_str(), o.spec["nodeSelector"].as_str()) {
                    (Some(n), _) if !n.is_empty() => n.to_string(),
                    (_, Some(sel)) if !sel.is_empty() => sel.to_string(),
                    _ => "(global)".to_string(),
                };
                vec![name(o), sp(o, "peerIP"), node, sp(o, "asNumber")]
            }),
        ),
        (Kind::BGPConfiguration, _) => {
            (
                vec!["NAME", "LOGSEVERITY", "MESHENABLED", "ASNUMBER"],
                Box::new(move |o| {
                    let spec: BGPConfigurationSpec = o.spec_as().unwrap_or_default();
                    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                    vec![
                        name(o),
                        dash(spec.log_severity_screen),
                        dash(spec.node_to_node_mesh_enabled.map(|b| b.to_string())),
                        dash(spec.as_number.as_ref().map(|a: &IntOrString| {
                            parse_asn(a).map(|n| n.to_string()).unwrap_or_else(|_| a.to_string())
                        })),
                    ]
                }),
            )
        }
        (Kind::WorkloadEndpoint, false) => (
            vec!["WORKLOAD", "NODE", "NETWORKS", "INTERFACE"],
            Box::new(move |o| vec![sp(o, "workload"), sp(o, "node"), sp(o, "ipNetworks"), sp(o, "interfaceName")]),
        ),
        (Kind::WorkloadEndpoint, true) => (
            vec!["NAME", "WORKLOAD", "NODE", "NETWORKS", "INTERFACE", "PROFILES", "NATS"],
            Box::new(move |o| {
                let nats: Vec<String> = o.spec["ipNATs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| format!("{}:{}", s(&n["internalIP"]), s(&n["externalIP"])))
                    .collect();
                vec![
                    name(o),
                    sp(o, "workload"),
                    sp(o, "node"),
                    sp(o, "ipNetworks"),
                    sp(o, "interfaceName"),
                    sp(o, "profiles"),
                    nats.join(","),
                ]
            }),
        ),
        (Kind::HostEndpoint, false) => (vec!["NAME", "NODE"], Box::new(move |o| vec![name(o), sp(o, "node")])),
        (Kind::HostEndpoint, true) => (
            vec!["NAME", "NODE", "INTERFACE", "IPS", "PROFILES"],
            Box::new(move |o| {
                vec![name(o), sp(o, "node"), sp(o, "interfaceName"), sp(o, "expectedIPs"), sp(o, "profiles")]
            }),
        ),
        (Kind::NetworkPolicy | Kind::GlobalNetworkPolicy, false) => (vec!["NAME"], Box::new(move |o| vec![name(o)])),
        (Kind::NetworkPolicy | Kind::GlobalNetworkPolicy, true) => {
            (vec!["NAME", "ORDER", "SELECTOR"], Box::new(move |o| vec![name(o), sp(o, "order"), sp(o, "selector")]))
        }
        (Kind::Profile | Kind::Namespace, true) => (
            vec!["NAME", "LABELS"],
            Box::new(move |o| {
                let l = if kind == Kind::Profile {
                    o.spec["labelsToApply"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
                        .unwrap_or_default()
                } else {
                    labels(&o.metadata.labels)
                };
                vec![name(o), l]
            }),
        ),
        (Kind::NetworkSet | Kind::GlobalNetworkSet, true) => {
            (vec!["NAME", "NETS"], Box::new(move |o| vec![name(o), sp(o, "nets")]))
        }
        (Kind::ClusterInformation, _) => (
            vec!["NAME", "CLUSTERGUID", "CLUSTERTYPE", "CALICOVERSION", "DATASTOREREADY"],
            Box::new(move |o| {
                vec![
                    name(o),
                    sp(o, "clusterGUID"),
                    sp(o, "clusterType"),
                    sp(o, "calicoVersion"),
                    sp(o, "datastoreReady"),
                ]
            }),
        ),
        (Kind::IPAMConfiguration, false) => (
            vec!["NAME", "STRICTAFFINITY", "AUTOALLOCATEBLOCKS"],
            Box::new(move |o| vec![name(o), sp(o, "strictAffinity"), sp(o, "autoAllocateBlocks")]),
        ),
        (Kind::IPAMConfiguration, true) => (
            vec!["NAME", "STRICTAFFINITY", "AUTOALLOCATEBLOCKS", "MAXBLOCKSPERHOST"],
            Box::new(move |o| {
                vec![name(o), sp(o, "strictAffinity"), sp(o, "autoAllocateBlocks"), sp(o, "maxBlocksPerHost")]
            }),
        ),
        (Kind::KubernetesNetworkPolicy, _) => (
            vec!["NAME", "PODSELECTOR", "POLICYTYPES"],
            Box::new(move |o| {
                let sel: gingham_api::k8s::LabelSelector =
                    serde_json::from_value(o.spec["podSelector"].clone()).unwrap_or_default();
                vec![name(o), sel.to_calico(), sp(o, "policyTypes")]
            }),
        ),
        _ => (vec!["NAME"], Box::new(move |o| vec![name(o)])),
    };
    (header, objects.iter().map(|o| row(o)).collect())
}

/// YAML/JSON for a single object, or a `<Kind>List` (as calicoctl prints listings).
pub fn document(kind: Kind, objects: &[Object], as_list: bool, revision: Option<i64>) -> Value {
    if !as_list && objects.len() == 1 {
        return serde_json::to_value(&objects[0]).unwrap_or(Value::Null);
    }
    let items: Vec<Value> = objects.iter().map(|o| serde_json::to_value(o).unwrap_or(Value::Null)).collect();
    let mut meta = json!({});
    if let Some(r) = revision {
        meta["resourceVersion"] = json!(r.to_string());
    }
    json!({ "apiVersion": kind.api_version(), "items": items, "kind": format!("{}List", kind.kind_name()), "metadata": meta })
}

pub fn render(value: &Value, format: Format) -> String {
    match format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(value).unwrap_or_default()),
        _ => serde_saphyr::to_string(value).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tabwriter_layout_matches_calicoctl() {
        let t = table(
            &["NAME", "CIDR", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED", "SELECTOR"],
            &[vec!["default-ipv4-ippool", "172.20.0.0/16", "true", "Always", "Never", "false", "all()"]
                .into_iter()
                .map(String::from)
                .collect()],
        );
        assert_eq!(
            t,
            "NAME                  CIDR            NAT    IPIPMODE   VXLANMODE   DISABLED   SELECTOR\n\
             default-ipv4-ippool   172.20.0.0/16   true   Always     Never       false      all()\n"
        );
        // Minimum width 5 applies to narrow columns.
        assert_eq!(table(&["A", "B"], &[vec!["x".into(), "y".into()]]), "A    B\nx    y\n");
    }
}
