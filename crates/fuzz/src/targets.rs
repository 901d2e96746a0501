//! The checks: each parses its input and, when the parser accepts it, exercises what callers do
//! next (print, reparse, evaluate, convert) and asserts the round trips hold. None may panic.

use std::collections::BTreeMap;

use gingham_api::Selector;
use gingham_cni::spec::{CniResult, Invocation, NetConf, SUPPORTED_VERSIONS};

pub fn selector(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let Ok(sel) = Selector::parse(&text) else { return };
    let labels: BTreeMap<String, String> = [("a", "b"), ("app", "web"), ("x", ""), ("k8s-app", "kube-dns")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let none = BTreeMap::<String, String>::new();
    // The canonical form means the same, and is stable once `!(!x)` has collapsed to `x`.
    let canonical = sel.to_string();
    match Selector::parse(&canonical) {
        Ok(again) => {
            for l in [&labels, &none] {
                assert_eq!(
                    again.matches(l),
                    sel.matches(l),
                    "canonical {canonical:?} of {text:?} means something else"
                );
            }
            let second = again.to_string();
            let third = Selector::parse(&second).map(|s| s.to_string());
            assert_eq!(third.as_deref(), Ok(second.as_str()), "the canonical form of {text:?} does not settle");
        }
        // Printing adds parentheses around every operator list, so a selector at the nesting
        // bound may print deeper than the parser accepts; any other failure is a bug.
        Err(e) => assert!(e.message.contains("nested deeper"), "canonical {canonical:?} of {text:?}: {e}"),
    }

    let _ = sel.unique_id();
    let _ = sel.uses_global();
}

pub fn cni(input: &[u8]) {
    // The bytes as the network configuration on stdin…
    if let Ok(conf) = NetConf::parse(input) {
        let _ = conf.labels();
        let _ = conf.requested_ips();
        if let Some(prev) = &conf.prev_result {
            if let Ok(r) = CniResult::from_value(prev) {
                for v in SUPPORTED_VERSIONS {
                    let shown = r.to_version(v);
                    let back = CniResult::from_value(&shown)
                        .unwrap_or_else(|e| panic!("a result printed as {v} does not read back: {e}: {shown}"));
                    assert_eq!(back.ips, r.ips, "{v}");
                }
            }
        }
        let _ = conf
            .other
            .get("cni.dev/valid-attachments")
            .map(|v| serde_json::from_value::<Vec<gingham_cni::proto::Attachment>>(v.clone()).map(|a| a.len()));
    }
    // …and as the environment a runtime sets.
    let text = String::from_utf8_lossy(input);
    let mut lines = text.split('\n');
    let (id, ifname, args) = (lines.next().unwrap_or(""), lines.next().unwrap_or("eth0"), lines.next().unwrap_or(""));
    for command in ["ADD", "DEL", "CHECK", "GC", ""] {
        let inv = Invocation::from_env(|k| match k {
            "CNI_COMMAND" => Some(command.to_string()),
            "CNI_CONTAINERID" => Some(id.to_string()),
            "CNI_NETNS" => Some("/run/netns/x".into()),
            "CNI_IFNAME" => Some(ifname.to_string()),
            "CNI_ARGS" => Some(args.to_string()),
            _ => None,
        });
        if let Ok(inv) = inv {
            assert!(inv.container_id.is_empty() || gingham_cni::spec::valid_id(&inv.container_id));
            assert!(!inv.container_id.contains('/') && !inv.container_id.contains(".."));
            let _ = inv.requested_ips();
            let _ = inv.kubernetes_pod();
        }
    }
}

pub fn documents(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let Ok(docs) = gingham_api::parse_documents_in("fuzz.yaml", &text, Some("default")) else { return };
    for d in docs {
        let o = &d.object;
        let kind = o.kind().unwrap_or_else(|| panic!("accepted an object of unknown kind {}", o.kind));
        // What is stored must read back as the same object.
        let stored: serde_json::Value = serde_json::from_slice(&o.to_stored_json()).expect("stored JSON");
        let again = kind.normalize(&stored).unwrap_or_else(|e| panic!("stored {kind} does not read back: {e:?}"));
        assert_eq!(again.spec, o.spec, "{kind} {}", o.name());
        let _ = gingham_api::object::check_update(o, &again);
    }
}
