//! `gingham cni install`, and the plugin entry point (the plugin itself is
//! `gingham_cni::plugin`, shared with the small `gingham-cni` binary).

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;

/// Run as the CNI plugin (`ipam_mode`: as `gingham-ipam`).
pub fn main(ipam_mode: bool) -> ExitCode {
    gingham_cni::plugin::main(ipam_mode)
}

/// Install the plugin binaries (gingham, gingham-ipam; 0755) and the conflist (0644), each
/// written to a fresh temporary file and renamed into place, whatever the umask and whatever
/// symlinks were planted in those directories.
pub fn install(conf_dir: &std::path::Path, bin_dir: &std::path::Path, conf: &Value) -> anyhow::Result<Vec<PathBuf>> {
    // The plugin alone (`gingham-cni`, beside this binary) starts faster than all of gingham;
    // without it, this binary is the plugin too.
    let me = std::env::current_exe()?;
    let small = me.with_file_name("gingham-cni");
    let exe = if std::fs::symlink_metadata(&small).is_ok_and(|m| m.file_type().is_file()) { small } else { me };
    gingham_files::ensure_dir(bin_dir, 0o755)?;
    gingham_files::ensure_dir(conf_dir, 0o755)?;
    let mut written = Vec::new();
    for name in ["gingham", "gingham-ipam"] {
        let dst = bin_dir.join(name);
        gingham_files::copy_atomic(&exe, &dst, 0o755)?;
        written.push(dst);
    }
    let path = conf_dir.join("10-gingham.conflist");
    gingham_files::write_atomic(&path, (serde_json::to_string_pretty(conf)? + "\n").as_bytes(), 0o644)?;
    written.push(path);
    Ok(written)
}

/// A conflist from a Calico-style template (CNI_NETWORK_CONFIG): the placeholders filled in,
/// then checked to be a conflist before anything is written.
pub fn from_template(template: &str, nodename: &str, mtu: u32) -> anyhow::Result<Value> {
    let text = template
        .replace(gingham_manifests::NODENAME_PLACEHOLDER, nodename)
        .replace(gingham_manifests::MTU_PLACEHOLDER, &mtu.to_string());
    let conf: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("CNI_NETWORK_CONFIG: not valid JSON once its placeholders are filled in: {e}"))?;
    for field in ["name", "cniVersion"] {
        if !conf.get(field).is_some_and(Value::is_string) {
            anyhow::bail!("CNI_NETWORK_CONFIG: {field}: missing (a conflist needs name, cniVersion and plugins)");
        }
    }
    let plugins = conf.get("plugins").and_then(Value::as_array).filter(|p| !p.is_empty());
    let Some(plugins) = plugins else { anyhow::bail!("CNI_NETWORK_CONFIG: plugins: missing or empty") };
    if let Some(i) = plugins.iter().position(|p| !p.get("type").is_some_and(Value::is_string)) {
        anyhow::bail!("CNI_NETWORK_CONFIG: plugins[{i}].type: missing");
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use gingham_cni::proto::DEFAULT_SOCKET;

    #[test]
    fn conflist_shape() {
        let c = gingham_cni::conflist("k8s-pod-network", "1.0.0", 1440, "node-1", DEFAULT_SOCKET);
        assert_eq!(c["plugins"][0]["type"], "gingham");
        assert_eq!(c["plugins"][0]["ipam"]["type"], "gingham-ipam");
        assert_eq!(c["plugins"][1]["type"], "portmap");
        assert_eq!(c["plugins"][2]["type"], "bandwidth");
    }

    #[test]
    fn the_manifests_template_fills_in() {
        let docs = gingham_manifests::render(&gingham_manifests::Options::default());
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        let c = super::from_template(cm["data"]["cni_network_config"].as_str().unwrap(), "node-7", 1440).unwrap();
        assert_eq!(
            (c["plugins"][0]["nodename"].as_str(), c["plugins"][0]["mtu"].as_u64()),
            (Some("node-7"), Some(1440))
        );
        let e =
            super::from_template(r#"{"name": "n", "cniVersion": "1.0.0", "plugins": [{"mtu": __CNI_MTU__}]}"#, "x", 1)
                .unwrap_err();
        assert!(e.to_string().contains("plugins[0].type"), "{e}");
        assert!(super::from_template("{", "x", 1).unwrap_err().to_string().contains("not valid JSON"));
    }
}
