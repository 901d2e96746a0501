//! Reading resource documents: multi-document YAML or JSON, `…List` wrappers, the operator's
//! CalicoNetwork mapped onto IPPool + BGPConfiguration, and errors that name file, document
//! index, kind/name and field path.

use std::fmt;

use serde_json::{Value, json};

use crate::object::{CALICO_API_VERSION, Kind, Object};
use crate::validate::FieldError;

/// One parsed, validated resource and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    pub source: String,
    /// 1-based position of the document in its file.
    pub index: usize,
    pub object: Object,
    /// Set when the object was derived from another kind (operator CalicoNetwork).
    pub mapped_from: Option<String>,
}

/// Everything wrong with one document.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentError {
    pub source: String,
    pub index: Option<usize>,
    /// `Kind name` when known.
    pub subject: Option<String>,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut head = self.source.clone();
        if let Some(i) = self.index {
            head.push_str(&format!(": document {i}"));
        }
        if let Some(s) = &self.subject {
            head.push_str(&format!(": {s}"));
        }
        for (n, e) in self.errors.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            write!(f, "{head}: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DocumentError {}

fn subject(v: &Value) -> Option<String> {
    let kind = v.get("kind").and_then(Value::as_str)?;
    let name = v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<no name>");
    let ns = v.pointer("/metadata/namespace").and_then(Value::as_str);
    Some(match ns {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    })
}

/// Parse every document in `text` (YAML or JSON). All documents are validated; on any error
/// every error is returned and nothing is usable, so callers write nothing.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Document>, Vec<DocumentError>> {
    parse_documents_in(source, text, None)
}

/// As [`parse_documents`]; namespaced resources that name no namespace get `default_namespace`
/// (calicoctl's `-n`), else `default`.
pub fn parse_documents_in(
    source: &str,
    text: &str,
    default_namespace: Option<&str>,
) -> Result<Vec<Document>, Vec<DocumentError>> {
    let values: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(v) => v,
        Err(e) => {
            let msg = e.to_string().lines().next().unwrap_or("malformed YAML").to_string();
            return Err(vec![DocumentError {
                source: source.into(),
                index: None,
                subject: None,
                errors: vec![FieldError::new("", format!("malformed YAML/JSON: {msg}"))],
            }]);
        }
    };
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let mut index = 0;
    for value in values {
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        index += 1;
        let fail = |errs: Vec<FieldError>, v: &Value| DocumentError {
            source: source.into(),
            index: Some(index),
            subject: subject(v),
            errors: errs,
        };
        match expand(value.clone()) {
            Ok(items) => {
                for (mut item, mapped_from) in items {
                    if let (Some(ns), Ok(kind)) = (default_namespace, kind_of(&item)) {
                        if kind.namespaced() && item.pointer("/metadata/namespace").is_none() {
                            if let Some(meta) = item.get_mut("metadata").and_then(Value::as_object_mut) {
                                meta.insert("namespace".into(), Value::String(ns.into()));
                            }
                        }
                    }
                    match normalize(&item) {
                        Ok(object) => docs.push(Document { source: source.into(), index, object, mapped_from }),
                        Err(errs) => errors.push(fail(errs, &item)),
                    }
                }
            }
            Err(errs) => errors.push(fail(errs, &value)),
        }
    }
    if errors.is_empty() { Ok(docs) } else { Err(errors) }
}

/// Validate one object value as its kind.
pub fn normalize(value: &Value) -> Result<Object, Vec<FieldError>> {
    let kind = kind_of(value)?;
    kind.normalize(value)
}

fn kind_of(value: &Value) -> Result<Kind, Vec<FieldError>> {
    let Some(map) = value.as_object() else {
        return Err(vec![FieldError::new("", "a resource must be a mapping with apiVersion, kind, metadata and spec")]);
    };
    let api = map.get("apiVersion").and_then(Value::as_str);
    let kind = map.get("kind").and_then(Value::as_str);
    match (api, kind) {
        (None, _) => Err(vec![FieldError::new("apiVersion", "missing (expected projectcalico.org/v3)")]),
        (_, None) => Err(vec![FieldError::new("kind", "missing")]),
        (Some(api), Some(kind)) => Kind::from_document(api, kind).ok_or_else(|| {
            let known: Vec<String> =
                Kind::ALL.iter().map(|k| format!("{} ({})", k.kind_name(), k.api_version())).collect();
            vec![FieldError::new(
                "kind",
                format!("unknown kind {kind:?} for apiVersion {api:?}; known kinds: {}", known.join(", ")),
            )]
        }),
    }
}

/// Unwrap `…List` documents and map operator kinds; returns (object, mapped-from) pairs.
fn expand(value: Value) -> Result<Vec<(Value, Option<String>)>, Vec<FieldError>> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let api = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
        let Some(items) = value.get("items").and_then(Value::as_array) else {
            return Err(vec![FieldError::new("items", "a List needs an items array")]);
        };
        return Ok(items.iter().cloned().map(|i| (i, None)).collect());
    }
    if api.starts_with("operator.tigera.io/") {
        return map_operator(&value, &kind);
    }
    Ok(vec![(value, None)])
}

/// The operator's CalicoNetwork (alone, or as Installation.spec.calicoNetwork) becomes the
/// IPPools and BGPConfiguration that say the same thing.
fn map_operator(value: &Value, kind: &str) -> Result<Vec<(Value, Option<String>)>, Vec<FieldError>> {
    let (net, base) = match kind {
        "CalicoNetwork" => (value.get("spec").cloned().unwrap_or(json!({})), "spec"),
        "Installation" => (value.pointer("/spec/calicoNetwork").cloned().unwrap_or(json!({})), "spec.calicoNetwork"),
        _ => {
            return Err(vec![FieldError::new(
                "kind",
                format!(
                    "{kind:?} (operator.tigera.io) is not supported; write the equivalent projectcalico.org/v3 resources (IPPool, BGPConfiguration, FelixConfiguration)"
                ),
            )]);
        }
    };
    let from = format!(
        "operator.tigera.io {kind} {}",
        value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("default")
    );
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let known = [
        "bgp",
        "ipPools",
        "mtu",
        "nodeAddressAutodetectionV4",
        "nodeAddressAutodetectionV6",
        "linuxDataplane",
        "hostPorts",
        "containerIPForwarding",
        "multiInterfaceMode",
        "bgpAddressing",
    ];
    for k in net.as_object().into_iter().flatten().map(|(k, _)| k) {
        if !known.contains(&k.as_str()) {
            errors.push(FieldError::new(
                format!("{base}.{k}"),
                "unknown field; it has no projectcalico.org/v3 equivalent here",
            ));
        }
    }
    let (mut v4, mut v6) = (0, 0);
    for (i, pool) in net.get("ipPools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let path = format!("{base}.ipPools[{i}]");
        let cidr = pool.get("cidr").and_then(Value::as_str).unwrap_or_default();
        let is_v6 = cidr.contains(':');
        let default_name = if is_v6 {
            v6 += 1;
            if v6 == 1 { "default-ipv6-ippool".to_string() } else { format!("default-ipv6-ippool-{v6}") }
        } else {
            v4 += 1;
            if v4 == 1 { "default-ipv4-ippool".to_string() } else { format!("default-ipv4-ippool-{v4}") }
        };
        let name = pool.get("name").and_then(Value::as_str).map(str::to_string).unwrap_or(default_name);
        let (ipip, vxlan) = match pool.get("encapsulation").and_then(Value::as_str).unwrap_or("IPIP") {
            "IPIP" => ("Always", "Never"),
            "IPIPCrossSubnet" => ("CrossSubnet", "Never"),
            "VXLAN" => ("Never", "Always"),
            "VXLANCrossSubnet" => ("Never", "CrossSubnet"),
            "None" => ("Never", "Never"),
            other => {
                errors.push(FieldError::new(
                    format!("{path}.encapsulation"),
                    format!("{other:?} is not one of IPIP, IPIPCrossSubnet, VXLAN, VXLANCrossSubnet, None"),
                ));
                continue;
            }
        };
        let nat = match pool.get("natOutgoing").and_then(Value::as_str).unwrap_or("Enabled") {
            "Enabled" => true,
            "Disabled" => false,
            other => {
                errors.push(FieldError::new(
                    format!("{path}.natOutgoing"),
                    format!("{other:?} is not Enabled or Disabled"),
                ));
                continue;
            }
        };
        let mut spec = json!({ "cidr": cidr, "ipipMode": ipip, "vxlanMode": vxlan, "natOutgoing": nat });
        for (from_key, to_key) in
            [("blockSize", "blockSize"), ("nodeSelector", "nodeSelector"), ("disableBGPExport", "disableBGPExport")]
        {
            if let Some(v) = pool.get(from_key) {
                spec[to_key] = v.clone();
            }
        }
        out.push((
            json!({ "apiVersion": CALICO_API_VERSION, "kind": "IPPool", "metadata": { "name": name }, "spec": spec }),
            Some(from.clone()),
        ));
    }
    if let Some(bgp) = net.get("bgp").and_then(Value::as_str) {
        match bgp {
            "Enabled" | "Disabled" => out.push((
                json!({ "apiVersion": CALICO_API_VERSION, "kind": "BGPConfiguration", "metadata": { "name": "default" },
                        "spec": { "nodeToNodeMeshEnabled": bgp == "Enabled" } }),
                Some(from.clone()),
            )),
            other => {
                errors.push(FieldError::new(format!("{base}.bgp"), format!("{other:?} is not Enabled or Disabled")))
            }
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> String {
        parse_documents("f.yaml", text).unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn defaults_are_filled() {
        let docs = parse_documents(
            "f.yaml",
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.1.0.0/16}\n",
        )
        .unwrap();
        let spec = &docs[0].object.spec;
        assert_eq!(spec["blockSize"], 26);
        assert_eq!(spec["nodeSelector"], "all()");
        assert_eq!(spec["ipipMode"], "Never");
        assert_eq!(spec["vxlanMode"], "Never");
        let v6 = parse_documents(
            "f",
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 'fd00::/48'}\n",
        )
        .unwrap();
        assert_eq!(v6[0].object.spec["blockSize"], 122);
        let pol = parse_documents("f", "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  egress: [{action: Allow}]\n").unwrap();
        assert_eq!(pol[0].object.spec["types"], json!(["Egress"]));
        assert_eq!(pol[0].object.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn errors_name_file_index_resource_and_path() {
        let text = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: ok}\nspec: {cidr: 10.0.0.0/16}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv4-ippool}\nspec: {cidr: 10.1.0.0/16, blockSize: 33}\n";
        assert_eq!(errs(text), "f.yaml: document 2: IPPool default-ipv4-ippool: spec.blockSize: 33 is outside 20..32");
        assert!(errs("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/16, bogus: 1}\n").contains("document 1: IPPool p: spec.bogus: unknown field `bogus`"));
        assert!(
            errs("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.300/16}\n")
                .contains("spec.cidr: \"10.0.0.300/16\" is not a valid CIDR")
        );
        assert!(
            errs("apiVersion: projectcalico.org/v3\nkind: Frobnicator\nmetadata: {name: p}\n")
                .contains("document 1: Frobnicator p: kind: unknown kind \"Frobnicator\"")
        );
        assert!(
            errs("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {}\nspec: {cidr: 10.0.0.0/16}\n")
                .contains("IPPool <no name>: metadata.name: a name is required")
        );
        assert!(errs("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: a = 'b'\n").contains("spec.selector: invalid selector"));
        assert!(errs("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {ports: [70000]}\n").contains("spec.ingress[0].destination.ports[0]: port 70000 is outside 0..65535"));
        assert!(errs("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress:\n  - action: Allow\n    protocol: TCPX\n").contains("spec.ingress[0].protocol: \"TCPX\" is not a protocol"));
        assert!(errs("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/16, ipipMode: Always, vxlanMode: Always}\n").contains("IPIP and VXLAN cannot both be enabled"));
        assert!(errs("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 4294967296}\n").contains("spec.asNumber: 4294967296 is not a valid AS number"));
        assert!(errs("key: [unclosed\n").starts_with("f.yaml: malformed YAML/JSON"));
    }

    #[test]
    fn lists_json_and_operator_mapping() {
        let json = r#"{"apiVersion":"projectcalico.org/v3","kind":"IPPoolList","items":[{"apiVersion":"projectcalico.org/v3","kind":"IPPool","metadata":{"name":"a"},"spec":{"cidr":"10.0.0.0/16"}}]}"#;
        assert_eq!(parse_documents("f.json", json).unwrap()[0].object.metadata.name, "a");
        let op = "apiVersion: operator.tigera.io/v1\nkind: CalicoNetwork\nmetadata: {name: default}\nspec:\n  bgp: Enabled\n  ipPools:\n  - {blockSize: 26, cidr: 192.168.0.0/16, encapsulation: VXLANCrossSubnet, natOutgoing: Enabled}\n";
        let docs = parse_documents("op.yaml", op).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].object.kind, "IPPool");
        assert_eq!(docs[0].object.spec["vxlanMode"], "CrossSubnet");
        assert_eq!(docs[0].object.spec["natOutgoing"], true);
        assert_eq!(docs[1].object.kind, "BGPConfiguration");
        assert!(docs[0].mapped_from.as_deref().unwrap().contains("CalicoNetwork"));
        let bad = "apiVersion: operator.tigera.io/v1\nkind: APIServer\nmetadata: {name: default}\n";
        assert!(errs(bad).contains("IPPool, BGPConfiguration"));
    }
}
