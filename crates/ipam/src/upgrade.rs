//! Migration from the host-local IPAM plugin (and so from Flannel), as Calico's
//! `calico-ipam -upgrade`: every address host-local handed out on this node (one file per
//! address under `<data-dir>/<network>/`, its first line the container ID) becomes an
//! allocation under the handle the CNI plugin uses for that container (`<network>.<id>`), so
//! the running pod keeps its address and its DEL releases it. An address in another node's
//! block is borrowed there, as any allocation outside the node's own blocks.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use crate::{IpamClient, IpamError};

/// What happened to each host-local address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpgradeReport {
    pub imported: Vec<(IpAddr, String)>,
    /// Already held by the same handle (an earlier run).
    pub already: Vec<(IpAddr, String)>,
    /// Not imported, and why (held by another handle, outside every pool, unreadable).
    pub failed: Vec<(String, String)>,
}

/// The largest address file read (host-local's hold an ID and an interface name).
const MAX_FILE: u64 = 4096;

/// The (address, container ID) records of host-local's directory; files that are not address
/// records (its lock, last_reserved_ip.*) are skipped, symlinks are not followed.
pub fn read_host_local(dir: &Path) -> Result<(Vec<(IpAddr, String)>, Vec<(String, String)>), String> {
    let mut records = Vec::new();
    let mut bad = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(ip) = name.parse::<IpAddr>() else { continue };
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.file_type().is_file() || meta.len() > MAX_FILE {
            bad.push((path.display().to_string(), "not a regular host-local record (skipped)".into()));
            continue;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                bad.push((path.display().to_string(), e.to_string()));
                continue;
            }
        };
        match text.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
            Some(id) => records.push((ip, id.to_string())),
            None => bad.push((path.display().to_string(), "holds no container ID".into())),
        }
    }
    records.sort();
    Ok((records, bad))
}

impl IpamClient {
    /// Import host-local's addresses for `network` from `data_dir` as `node`'s. Idempotent.
    pub async fn upgrade_from_host_local(
        &self,
        data_dir: &Path,
        network: &str,
        node: &str,
    ) -> Result<UpgradeReport, IpamError> {
        if network.is_empty() || network.contains('/') || network.starts_with('.') {
            return Err(IpamError::InvalidRequest(format!("{network:?} is not a CNI network name")));
        }
        let dir = data_dir.join(network);
        let (records, bad) = read_host_local(&dir).map_err(IpamError::InvalidRequest)?;
        let mut report = UpgradeReport { failed: bad, ..Default::default() };
        for (ip, id) in records {
            let handle = format!("{network}.{id}");
            let attrs: BTreeMap<String, String> =
                [("node".to_string(), node.to_string()), ("note".to_string(), "imported from host-local".to_string())]
                    .into();
            match self.assign_ip(ip, &handle, &attrs, node, false).await {
                Ok(_) => report.imported.push((ip, handle)),
                Err(IpamError::AlreadyAllocated { handle: h, .. }) if h == handle => report.already.push((ip, handle)),
                Err(IpamError::AlreadyAllocated { handle: h, .. }) => {
                    report.failed.push((ip.to_string(), format!("already held by handle {h}, not {handle}")))
                }
                Err(e @ (IpamError::NotInPool { .. } | IpamError::StrictAffinity { .. })) => {
                    report.failed.push((ip.to_string(), e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}
