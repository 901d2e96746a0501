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
}
