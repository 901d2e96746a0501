//! `gingham policy trace | show`: the compiled policy model, built from the datastore exactly as
//! the agents build theirs, asked about one packet or one endpoint.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use gingham_api::policy::{Protocol, WorkloadEndpointSpec};
use gingham_api::{Kind, Object};
use gingham_policy::engine::{Engine, Item, TierPlan};
use gingham_policy::index::{ItemData, NamedPort};
use gingham_policy::load;
use gingham_policy::trace::{Packet, Verdict, trace};
use gingham_store::Datastore;
use ipnet::IpNet;

/// A workload endpoint as the commands find it.
struct Wep {
    key: String,
    ips: Vec<IpNet>,
    interface: Option<String>,
    labels: BTreeMap<String, String>,
}

/// The model of the whole cluster (every endpoint counts as remote) and its endpoints by
/// `namespace/pod` (Kubernetes pods) and by endpoint name. Resources that do not compile are
/// reported on stderr and left out, as the agents do.
async fn model(store: &Arc<dyn Datastore>) -> anyhow::Result<(Engine, BTreeMap<String, Wep>)> {
    let mut engine = Engine::default();
    for k in load::KINDS {
        for kv in store.list(&k.prefix(None)).await?.items {
            match serde_json::from_slice::<Object>(&kv.value) {
                Ok(o) => {
                    if let Err(e) = load::put(&mut engine, &o) {
                        eprintln!("warning: {e} (left out, as the agents do)");
                    }
                }
                Err(e) => eprintln!("warning: {}: {e}", kv.key),
            }
        }
    }
    let mut weps = BTreeMap::new();
    for kv in store.list(&Kind::WorkloadEndpoint.prefix(None)).await?.items {
        let Ok(o) = serde_json::from_slice::<Object>(&kv.value) else { continue };
        let Ok(spec) = o.spec_as::<WorkloadEndpointSpec>() else { continue };
        let ns = o.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let key = format!("wep/{ns}/{}", o.metadata.name);
        let ips: Vec<IpNet> = spec.ip_networks.iter().flatten().filter_map(|n| n.parse().ok()).collect();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone(),
                    protocol: p.protocol.number(),
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect();
        let data = ItemData {
            labels: o.metadata.labels.clone(),
            profiles: spec.profiles.clone().unwrap_or_default(),
            nets: ips.clone(),
            ports,
        };
        engine.set_item(&key, Some(Item { data, local_interface: None }));
        let labels = engine.index().labels(&key).map(|l| (**l).clone()).unwrap_or_default();
        let wep = Wep { key, ips, interface: spec.interface_name.clone(), labels };
        if let Some(pod) = &spec.pod {
            weps.insert(
                format!("{ns}/{pod}"),
                Wep {
                    key: wep.key.clone(),
                    ips: wep.ips.clone(),
                    interface: wep.interface.clone(),
                    labels: wep.labels.clone(),
                },
            );
        }
        weps.insert(format!("{ns}/{}", o.metadata.name), wep);
    }
    Ok((engine, weps))
}

fn address(what: &str, weps: &BTreeMap<String, Wep>, v6: Option<bool>) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        return Ok(ip);
    }
    let w =
        weps.get(what).with_context(|| format!("{what}: neither an address nor a pod or endpoint (NAMESPACE/NAME)"))?;
    w.ips
        .iter()
        .map(|n| n.addr())
        .find(|a| v6.is_none_or(|v6| a.is_ipv6() == v6))
        .with_context(|| format!("{what} has no address of that family"))
}

pub async fn trace_cmd(
    store: &Arc<dyn Datastore>,
    src: &str,
    dst: &str,
    port: Option<u16>,
    protocol: &str,
) -> anyhow::Result<()> {
    let (engine, weps) = model(store).await?;
    let protocol: Protocol = serde_json::from_value(serde_json::Value::String(protocol.into()))
        .map_err(|_| anyhow::anyhow!("--protocol {protocol}: TCP, UDP, SCTP, ICMP, ICMPv6 or a number"))?;
    let s = address(src, &weps, None)?;
    let d = address(dst, &weps, Some(s.is_ipv6()))?;
    if s.is_ipv6() != d.is_ipv6() {
        bail!("{src} and {dst} are of different address families");
    }
    let ported = protocol.has_ports();
    let pkt = Packet {
        src: s,
        dst: d,
        protocol: protocol.number(),
        src_port: ported.then_some(40000),
        dst_port: if ported { Some(port.unwrap_or(80)) } else { None },
        icmp: protocol.is_icmp().then_some((if s.is_ipv6() { 128 } else { 8 }, 0)),
    };
    let what = match pkt.dst_port {
        Some(p) => format!("{s} → {d}:{p} {protocol}"),
        None => format!("{s} → {d} {protocol}"),
    };
    println!("packet {what}");
    let t = trace(&engine, &pkt);
    for step in &t.steps {
        println!("{step}");
    }
    println!("verdict: {}", if t.verdict == Verdict::Allow { "Allow" } else { "Deny" });
    Ok(())
}

fn tiers(out: &mut String, what: &str, tiers: &[TierPlan]) {
    if tiers.is_empty() {
        out.push_str(&format!("{what}: no policy (profiles decide)\n"));
    }
    for t in tiers {
        out.push_str(&format!("{what}: tier {}: {}\n", t.name, t.policies.join(", ")));
    }
}

pub async fn show_cmd(store: &Arc<dyn Datastore>, endpoint: &str) -> anyhow::Result<()> {
    let (engine, weps) = model(store).await?;
    let w = weps.get(endpoint).with_context(|| format!("{endpoint}: no such pod or endpoint (NAMESPACE/NAME)"))?;
    let (ingress, egress) = engine.tiers_for(&engine.selecting(&w.labels));
    let mut out =
        format!("endpoint {} ({})\n", w.key, w.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
    tiers(&mut out, "ingress", &ingress);
    tiers(&mut out, "egress", &egress);
    let profiles = engine.index().item(&w.key).map(|d| d.profiles.join(", ")).unwrap_or_default();
    out.push_str(&format!("profiles: {profiles}\n"));
    print!("{out}");
    // On the endpoint's own node: the rules as programmed, with their packet counters.
    let Some(iface) = &w.interface else { return Ok(()) };
    let Ok(nft) = gingham_kernel::nft::Nft::current() else { return Ok(()) };
    let t = gingham_dataplane::policy::table();
    let mut chains = vec![
        gingham_dataplane::policy::endpoint_chain(iface, true),
        gingham_dataplane::policy::endpoint_chain(iface, false),
    ];
    for (plan, ingress) in [(&ingress, true), (&egress, false)] {
        for p in plan.iter().flat_map(|t| &t.policies) {
            chains.push(gingham_dataplane::policy::policy_chain(p, ingress));
        }
    }
    let mut shown = false;
    let mut queue: std::collections::VecDeque<String> = chains.into();
    while let Some(c) = queue.pop_front() {
        if let Ok(Some(text)) = nft.list_chain(&t, &c).await {
            if !shown {
                println!("\nprogrammed on this node (nft, with counters):");
                shown = true;
            }
            let lines: Vec<&str> =
                text.lines().filter(|l| !l.trim_start().starts_with("table") && l.trim() != "}").collect();
            // A workload's chain ends in a goto to the policy chain it shares with its
            // replicas: show that one next.
            if let Some(shared) = lines.iter().rev().find_map(|l| l.trim().strip_prefix("goto ")) {
                queue.push_front(shared.trim().to_string());
            }
            for line in lines {
                println!("{line}");
            }
        }
    }
    if !shown {
        println!("\n(not programmed in this network namespace: run on the endpoint's node for counters)");
    }
    Ok(())
}
