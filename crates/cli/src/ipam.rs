//! `gingham ipam show | check | release`, in calicoctl's formats.

use std::net::IpAddr;

use anyhow::bail;
use gingham_ipam::check::{Leak, check, usage};
use gingham_ipam::{IpamClient, ReleaseGuard};

/// Go's `%.5g` for a count: plain up to 99999, then `1.0486e+06` style.
pub fn g5(n: u128) -> String {
    if n < 100_000 {
        return n.to_string();
    }
    let s = format!("{:.4e}", n as f64); // e.g. 1.0486e6
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    let exp: i32 = exp.parse().unwrap_or(0);
    format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

fn percent(part: u128, total: u128) -> String {
    if total == 0 { "0%".into() } else { format!("{:.0}%", part as f64 * 100.0 / total as f64) }
}

/// A box-drawn table: headers centred, `right` columns right-aligned, others left-aligned.
pub fn boxed(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let rule = format!("+{}+\n", w.iter().map(|n| "-".repeat(n + 2)).collect::<Vec<_>>().join("+"));
    let mut out = rule.clone();
    let cells: Vec<String> = header
        .iter()
        .zip(&w)
        .map(|(h, n)| {
            let left = (n - h.len()) / 2;
            format!(" {}{h}{} ", " ".repeat(left), " ".repeat(n - h.len() - left))
        })
        .collect();
    out.push_str(&format!("|{}|\n", cells.join("|")));
    out.push_str(&rule);
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&w)
            .zip(right)
            .map(|((c, n), right)| if *right { format!(" {c:>n$} ") } else { format!(" {c:<n$} ") })
            .collect();
        out.push_str(&format!("|{}|\n", cells.join("|")));
    }
    out.push_str(&rule);
    out
}

pub async fn show(ipam: &IpamClient, show_blocks: bool, ip: Option<IpAddr>, show_config: bool) -> anyhow::Result<()> {
    if let Some(ip) = ip {
        match ipam.holder(ip).await? {
            None => println!("IP {ip} is not assigned"),
            Some((handle, attrs)) => {
                println!("IP {ip} is in use");
                println!("Handle ID: {handle}");
                println!("Attributes:");
                for (k, v) in attrs {
                    println!("    {k}: {v}");
                }
            }
        }
        return Ok(());
    }
    if show_config {
        let s = ipam.settings().await?;
        let rows = vec![
            vec!["StrictAffinity".to_string(), s.strict_affinity.to_string()],
            vec!["AutoAllocateBlocks".to_string(), s.auto_allocate_blocks.to_string()],
            vec!["MaxBlocksPerHost".to_string(), s.max_blocks_per_host.to_string()],
        ];
        print!("{}", boxed(&["PROPERTY", "VALUE"], &rows, &[false, false]));
        return Ok(());
    }
    let row = |grouping: &str, cidr: String, total: u128, in_use: u128| {
        let free = total - in_use;
        vec![
            grouping.to_string(),
            cidr,
            g5(total),
            format!("{} ({})", g5(in_use), percent(in_use, total)),
            format!("{} ({})", g5(free), percent(free, total)),
        ]
    };
    let mut rows = Vec::new();
    for p in usage(ipam).await? {
        rows.push(row("IP Pool", p.cidr.to_string(), p.total, p.in_use));
        if show_blocks {
            rows.extend(p.blocks.iter().map(|b| row("Block", b.cidr.to_string(), b.total, b.in_use)));
        }
    }
    print!(
        "{}",
        boxed(&["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"], &rows, &[false, false, true, true, true])
    );
    Ok(())
}

/// What `ipam check -o` writes.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    version: String,
    #[serde(rename = "clusterGUID")]
    cluster_guid: Option<String>,
    #[serde(rename = "leakedIPs")]
    leaked_ips: Vec<Leak>,
    problems: Vec<String>,
}

async fn cluster_guid(ipam: &IpamClient) -> anyhow::Result<Option<String>> {
    let ci = ipam.resources().get(gingham_api::Kind::ClusterInformation, None, "default").await?;
    Ok(ci.and_then(|o| o.spec.get("clusterGUID").and_then(|v| v.as_str()).map(str::to_string)))
}

pub async fn run_check(ipam: &IpamClient, output: Option<&std::path::Path>) -> anyhow::Result<()> {
    let report = check(ipam).await?;
    if let Some(path) = output {
        let r = Report {
            version: format!("gingham {}", env!("CARGO_PKG_VERSION")),
            cluster_guid: cluster_guid(ipam).await?,
            leaked_ips: report.leaked.clone(),
            problems: report.problems.clone(),
        };
        let text = serde_json::to_vec_pretty(&r)?;
        gingham_files::write_atomic(path, &text, 0o644)
            .map_err(|e| anyhow::anyhow!("{}: cannot write the report: {e}", path.display()))?;
    }
    for line in &report.progress {
        println!("{line}");
    }
    if !report.problems.is_empty() {
        println!("\nProblems:");
        for p in &report.problems {
            println!("  - {p}");
        }
    }
    println!("Check complete; found {} problems.", report.problems.len());
    if !report.problems.is_empty() {
        // Scripts and monitoring act on the exit status.
        bail!("ipam check found {} problems", report.problems.len());
    }
    Ok(())
}

pub async fn release(ipam: &IpamClient, ip: IpAddr) -> anyhow::Result<()> {
    let out = ipam.release_ips(&[ip], &ReleaseGuard::default()).await?;
    if out.iter().any(|(_, released)| *released) {
        println!("Successfully released IP {ip}");
        Ok(())
    } else {
        bail!("IP {ip} is not assigned: nothing to release")
    }
}

/// Release what a report found leaked — each address only if it is still leaked now by the
/// same allocation (so an address in use again, or reallocated, since the report is kept).
pub async fn release_from_report(ipam: &IpamClient, path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let report: Report = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a report of `gingham ipam check -o`: {e}", path.display()))?;
    let here = cluster_guid(ipam).await?;
    if let (Some(theirs), Some(ours)) = (&report.cluster_guid, &here) {
        if theirs != ours {
            bail!(
                "{}: the report is of cluster {theirs}, this datastore is cluster {ours}: nothing released",
                path.display()
            );
        }
    }
    let now = check(ipam).await?.leaked;
    let (mut released, mut kept) = (0, Vec::new());
    for leak in &report.leaked_ips {
        if !now.contains(leak) {
            kept.push(format!("{} (in use or reallocated since the report)", leak.ip));
            continue;
        }
        let guard = ReleaseGuard { handle: Some(leak.handle.clone()), sequence_number: leak.sequence_number };
        match ipam.release_ips(&[leak.ip], &guard).await {
            Ok(r) if r.iter().any(|(_, done)| *done) => released += 1,
            Ok(_) => kept.push(format!("{} (already free)", leak.ip)),
            Err(e) => kept.push(format!("{} ({e})", leak.ip)),
        }
    }
    println!("Released {released} of the report's {} leaked addresses.", report.leaked_ips.len());
    for k in &kept {
        println!("  kept {k}");
    }
    Ok(())
}

/// Split a pool into `n` (a power of two) pools `split-<name>-<i>` with its settings, in one
/// transaction: the old pool goes and the new ones appear together, so no allocation ever
/// sees neither or both. Existing blocks and addresses stay where they are, inside the new
/// pools.
pub async fn split(ipam: &IpamClient, n: u32, name: Option<&str>, cidr: Option<ipnet::IpNet>) -> anyhow::Result<()> {
    use gingham_api::Kind;
    use gingham_store::resources::{BatchOp, WriteMode};
    if !n.is_power_of_two() || !(2..=64).contains(&n) {
        bail!("ipam split {n}: the number of pools must be a power of two from 2 to 64");
    }
    let res = ipam.resources();
    let pools = res.list(Kind::IPPool, None).await?;
    let old = pools
        .iter()
        .find(|p| match (name, cidr) {
            (Some(nm), _) => p.metadata.name == nm,
            (None, Some(c)) => {
                p.spec.get("cidr").and_then(|v| v.as_str()).and_then(|v| v.parse::<ipnet::IpNet>().ok()) == Some(c)
            }
            (None, None) => false,
        })
        .ok_or_else(|| match (name, cidr) {
            (Some(nm), _) => anyhow::anyhow!("no IPPool named {nm}"),
            (None, Some(c)) => anyhow::anyhow!("no IPPool with CIDR {c}"),
            (None, None) => anyhow::anyhow!("give --name or --cidr"),
        })?
        .clone();
    let old_cidr: ipnet::IpNet = old.spec["cidr"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("IPPool {}: spec.cidr is not readable", old.metadata.name))?;
    let bits = n.trailing_zeros() as u8;
    let new_len = old_cidr.prefix_len() + bits;
    let block = old.spec["blockSize"].as_u64().unwrap_or(if old_cidr.addr().is_ipv4() { 26 } else { 122 }) as u8;
    if new_len > block {
        bail!(
            "IPPool {} ({old_cidr}, blockSize {block}) cannot be split into {n}: each part (/{new_len}) would be smaller than one block",
            old.metadata.name
        );
    }
    let parts: Vec<ipnet::IpNet> = old_cidr.subnets(new_len).map_err(|e| anyhow::anyhow!("{e}"))?.collect();
    let mut ops = vec![BatchOp::Delete { kind: Kind::IPPool, namespace: None, name: old.metadata.name.clone() }];
    let mut created = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let mut o = old.clone();
        o.metadata = gingham_api::ObjectMeta { name: format!("split-{}-{i}", old.metadata.name), ..Default::default() };
        o.metadata.labels = old.metadata.labels.clone();
        let Some(spec) = o.spec.as_object_mut() else {
            bail!("IPPool {}: its stored spec is not an object", old.metadata.name);
        };
        spec.insert("cidr".into(), serde_json::Value::String(part.to_string()));
        created.push((o.metadata.name.clone(), *part));
        ops.push(BatchOp::Write(o, WriteMode::Create));
    }
    res.write_batch(&ops)
        .await
        .map_err(|e| anyhow::anyhow!("splitting IPPool {}: {} (nothing was changed)", old.metadata.name, e.error))?;
    println!("IP Pool {} was successfully split into {n} smaller pools.", old.metadata.name);
    for (nm, c) in created {
        println!("Created {nm} with CIDR {c}.");
    }
    Ok(())
}

pub async fn upgrade(ipam: &IpamClient, data_dir: &std::path::Path, network: &str, node: &str) -> anyhow::Result<()> {
    let r = ipam.upgrade_from_host_local(data_dir, network, node).await?;
    for (ip, h) in &r.imported {
        println!("imported {ip} (handle {h})");
    }
    for (ip, h) in &r.already {
        println!("already imported {ip} (handle {h})");
    }
    for (what, why) in &r.failed {
        println!("not imported {what}: {why}");
    }
    println!(
        "host-local upgrade of {}: {} imported, {} already imported, {} not imported",
        data_dir.join(network).display(),
        r.imported.len(),
        r.already.len(),
        r.failed.len()
    );
    if !r.failed.is_empty() {
        bail!("{} host-local addresses were not imported", r.failed.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_calicoctl() {
        assert_eq!(g5(65536), "65536");
        assert_eq!(g5(1_048_576), "1.0486e+06");
        assert_eq!(g5(100_000), "1e+05");
        assert_eq!(percent(5, 65536), "0%");
        assert_eq!(percent(5, 64), "8%");
        let t = boxed(
            &["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
            &[
                vec!["IP Pool".into(), "192.168.0.0/16".into(), "65536".into(), "5 (0%)".into(), "65531 (100%)".into()],
                vec!["Block".into(), "192.168.1.0/26".into(), "64".into(), "5 (8%)".into(), "59 (92%)".into()],
            ],
            &[false, false, true, true, true],
        );
        assert_eq!(
            t,
            "+----------+----------------+-----------+------------+--------------+\n\
             | GROUPING |      CIDR      | IPS TOTAL | IPS IN USE |   IPS FREE   |\n\
             +----------+----------------+-----------+------------+--------------+\n\
             | IP Pool  | 192.168.0.0/16 |     65536 |     5 (0%) | 65531 (100%) |\n\
             | Block    | 192.168.1.0/26 |        64 |     5 (8%) |     59 (92%) |\n\
             +----------+----------------+-----------+------------+--------------+\n"
        );
    }
}
