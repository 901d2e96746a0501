//! Writing sysctls under /proc/sys. Per-namespace keys (net.*) apply to the namespace of the
//! thread that opens the file, so namespaced writes go through [`crate::in_netns`].

use std::path::Path;

use crate::{KernelError, Result};

/// `net.ipv4.conf.cali1.proxy_arp` → `/proc/sys/net/ipv4/conf/cali1/proxy_arp`. Interface names
/// may contain dots, so callers pass the key as its path segments.
pub fn path(segments: &[&str]) -> String {
    format!("/proc/sys/{}", segments.join("/"))
}

/// Write one value.
pub fn write(segments: &[&str], value: &str) -> Result<()> {
    let p = path(segments);
    std::fs::write(&p, value).map_err(|e| KernelError::Sysctl { path: p, message: e.to_string() })
}

pub fn read(segments: &[&str]) -> Result<String> {
    let p = path(segments);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| KernelError::Sysctl { path: p, message: e.to_string() })
}

/// Write several values inside the namespace at `netns`.
pub fn write_in(netns: &Path, values: Vec<(Vec<String>, String)>) -> Result<()> {
    write_in_file(&crate::open_netns(netns)?, values)
}

/// Write several values inside the namespace `ns` (an open namespace file).
pub fn write_in_file(ns: &std::fs::File, values: Vec<(Vec<String>, String)>) -> Result<()> {
    crate::in_netns_file(ns, move || {
        for (segments, value) in values {
            let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
            write(&segs, &value)?;
        }
        Ok(())
    })?
}
