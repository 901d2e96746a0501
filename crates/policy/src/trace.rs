//! What the compiled model says about one packet: the policies and rules it meets leaving its
//! source and reaching its destination, and the verdict. `gingham policy trace` prints it; the
//! tests compare the kernel's behaviour with it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::engine::{Engine, TierPlan};
use crate::index::{Index, ItemData, ItemKey};
use crate::rules::{Action, Entity, Port, Rule};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
}

/// One side of the packet as policy sees it: its address and, if known, the endpoint it is.
pub struct Side<'a> {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub item: Option<(&'a ItemKey, &'a ItemData, &'a BTreeMap<String, String>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// What was met, in order, one line each.
    pub steps: Vec<String>,
    pub verdict: Verdict,
}

/// The endpoint, network set or host endpoint owning an address (endpoints first).
pub fn owner(index: &Index, ip: IpAddr) -> Option<(&ItemKey, &ItemData, &BTreeMap<String, String>)> {
    let mut best = None;
    for it in index.items() {
        if it.1.nets.iter().any(|n| n.contains(&ip)) {
            let rank = if it.0.starts_with("wep/") {
                0
            } else if it.0.starts_with("hep/") {
                1
            } else {
                2
            };
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, it));
            }
        }
    }
    best.map(|(_, it)| it)
}

fn port_matches(p: &Port, port: u16, protocol: u8, data: Option<&ItemData>) -> bool {
    match p {
        Port::Range(lo, hi) => (*lo..=*hi).contains(&port),
        Port::Named(n) => {
            data.is_some_and(|d| d.ports.iter().any(|np| &np.name == n && np.protocol == protocol && np.port == port))
        }
    }
}

fn entity_matches(e: &Entity, side: &Side, protocol: u8) -> bool {
    let labels = side.item.map(|(_, _, l)| l);
    let data = side.item.map(|(_, d, _)| d);
    (e.nets.is_empty() || e.nets.iter().any(|n| n.contains(&side.ip)))
        && !e.not_nets.iter().any(|n| n.contains(&side.ip))
        && e.selector.as_ref().is_none_or(|s| labels.is_some_and(|l| Index::matches(s, l)))
        && e.not_selector.as_ref().is_none_or(|s| !labels.is_some_and(|l| Index::matches(s, l)))
        && (e.ports.is_empty() || side.port.is_some_and(|p| e.ports.iter().any(|x| port_matches(x, p, protocol, data))))
        && !side.port.is_some_and(|p| e.not_ports.iter().any(|x| port_matches(x, p, protocol, data)))
}

pub fn rule_matches(r: &Rule, pkt: &Packet, src: &Side, dst: &Side) -> bool {
    let v = if pkt.src.is_ipv4() { 4 } else { 6 };
    let icmp = |m: &crate::rules::Icmp| pkt.icmp.is_some_and(|(t, c)| t == m.kind && m.code.is_none_or(|mc| mc == c));
    r.ip_version.is_none_or(|x| x == v)
        && r.protocol.is_none_or(|p| p == pkt.protocol)
        && r.not_protocol.is_none_or(|p| p != pkt.protocol)
        && r.icmp.as_ref().is_none_or(icmp)
        && !r.not_icmp.as_ref().is_some_and(icmp)
        && [(&r.source.nets, src), (&r.destination.nets, dst)].iter().all(|(nets, s)| {
            nets.iter().all(|n| n.addr().is_ipv4() == s.ip.is_ipv4()) || nets.iter().any(|n| n.contains(&s.ip))
        })
        && entity_matches(&r.source, src, pkt.protocol)
        && entity_matches(&r.destination, dst, pkt.protocol)
}

enum Outcome {
    Decided(Verdict),
    Pass,
}

fn run_rules(
    rules: &[Rule],
    what: &str,
    pkt: &Packet,
    src: &Side,
    dst: &Side,
    steps: &mut Vec<String>,
) -> Option<Outcome> {
    for (i, r) in rules.iter().enumerate() {
        if !rule_matches(r, pkt, src, dst) {
            continue;
        }
        match r.action {
            Action::Log => steps.push(format!("{what}rule {i}: Log (continues)")),
            Action::Allow => {
                steps.push(format!("{what}rule {i}: Allow"));
                return Some(Outcome::Decided(Verdict::Allow));
            }
            Action::Deny => {
                steps.push(format!("{what}rule {i}: Deny"));
                return Some(Outcome::Decided(Verdict::Deny));
            }
            Action::Pass => {
                steps.push(format!("{what}rule {i}: Pass"));
                return Some(Outcome::Pass);
            }
        }
    }
    None
}

/// One endpoint, one direction: tiers in order, then profiles.
fn direction(
    engine: &Engine,
    tiers: &[TierPlan],
    profiles: &[String],
    ingress: bool,
    pkt: &Packet,
    src: &Side,
    dst: &Side,
    steps: &mut Vec<String>,
) -> Verdict {
    'tiers: for t in tiers {
        for key in &t.policies {
            let Some(p) = engine.policy(key) else { continue };
            let rules = if ingress { p.ingress.as_deref() } else { p.egress.as_deref() }.unwrap_or_default();
            steps.push(format!(
                "  policy {key} (tier {}, order {})",
                t.name,
                p.order.map_or("none".to_string(), |o| o.to_string())
            ));
            match run_rules(rules, "    ", pkt, src, dst, steps) {
                Some(Outcome::Decided(v)) => return v,
                Some(Outcome::Pass) => continue 'tiers,
                None => {}
            }
        }
        if !t.pass_at_end {
            steps.push(format!("  end of tier {}: Deny (no policy allowed or passed it)", t.name));
            return Verdict::Deny;
        }
    }
    for name in profiles {
        let prof = engine.profile(name);
        steps.push(format!("  profile {name}"));
        let rules = if ingress { &prof.ingress } else { &prof.egress };
        if let Some(Outcome::Decided(v)) = run_rules(rules, "    ", pkt, src, dst, steps) {
            return v;
        }
    }
    steps.push("  no profile allowed it: Deny".into());
    Verdict::Deny
}

/// The whole path: egress policy of the source endpoint (if it is one), then ingress policy of
/// the destination endpoint (if it is one). Addresses that are no workload are not policed.
pub fn trace(engine: &Engine, pkt: &Packet) -> Trace {
    let ix = engine.index();
    let src = Side { ip: pkt.src, port: pkt.src_port, item: owner(ix, pkt.src) };
    let dst = Side { ip: pkt.dst, port: pkt.dst_port, item: owner(ix, pkt.dst) };
    let mut steps = Vec::new();
    for (ingress, side) in [(false, &src), (true, &dst)] {
        let Some((key, data, labels)) = side.item.filter(|(k, _, _)| k.starts_with("wep/")) else {
            steps.push(format!(
                "{} {}: not a workload endpoint, not policed",
                if ingress { "to" } else { "from" },
                side.ip
            ));
            continue;
        };
        steps.push(format!("{} {key} ({}):", if ingress { "ingress of" } else { "egress of" }, side.ip));
        let (i, e) = engine.tiers_for(&engine.selecting(labels));
        let tiers = if ingress { i } else { e };
        if tiers.is_empty() {
            steps.push("  no policy selects it in this direction".into());
        }
        if direction(engine, &tiers, &data.profiles, ingress, pkt, &src, &dst, &mut steps) == Verdict::Deny {
            return Trace { steps, verdict: Verdict::Deny };
        }
    }
    Trace { steps, verdict: Verdict::Allow }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Item;
    use crate::rules::network_policy;

    fn wep(e: &mut Engine, ns: &str, name: &str, labels: &[(&str, &str)], ip: &str) {
        let mut l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.insert("projectcalico.org/namespace".into(), ns.into());
        let data = ItemData {
            labels: l,
            profiles: vec![format!("kns.{ns}")],
            nets: vec![format!("{ip}/32").parse().unwrap()],
            ports: vec![crate::index::NamedPort { name: "http".into(), protocol: 6, port: 8080 }],
        };
        e.set_item(&format!("wep/{ns}/{name}"), Some(Item { data, local_interface: None }));
    }

    fn tcp(src: &str, dst: &str, port: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 6,
            src_port: Some(40000),
            dst_port: Some(port),
            icmp: None,
        }
    }

    #[test]
    fn verdicts_follow_calico_semantics() {
        let mut e = Engine::default();
        wep(&mut e, "a", "web", &[("app", "web")], "10.0.0.1");
        wep(&mut e, "a", "api", &[("app", "api")], "10.0.0.2");
        wep(&mut e, "b", "x", &[("app", "web")], "10.0.1.1");
        wep(&mut e, "a", "db", &[("app", "db")], "10.0.0.3");
        let v = |e: &Engine, s, d, p| trace(e, &tcp(s, d, p)).verdict;
        assert_eq!(v(&e, "10.0.0.1", "10.0.0.2", 80), Verdict::Allow, "no policy: the namespace profile allows");
        let p = |j: &str| network_policy(&serde_json::from_str(j).unwrap(), "a").unwrap();
        e.set_policy("a/allow-web", Some(p(r#"{"order":100,"selector":"app == 'api'","ingress":[{"action":"Allow","protocol":"TCP","source":{"selector":"app == 'web'"},"destination":{"ports":["http"]}}]}"#)));
        assert_eq!(v(&e, "10.0.0.1", "10.0.0.2", 8080), Verdict::Allow, "named port");
        assert_eq!(v(&e, "10.0.0.1", "10.0.0.2", 80), Verdict::Deny, "selected: default deny");
        assert_eq!(v(&e, "10.0.1.1", "10.0.0.2", 8080), Verdict::Deny, "same labels, other namespace");
        // Log continues, Deny before Allow by order, Pass goes to the profiles.
        e.set_policy("a/first", Some(p(r#"{"order":10,"selector":"app == 'api'","ingress":[{"action":"Log"},{"action":"Deny","source":{"nets":["10.0.0.1/32"]}}]}"#)));
        let t = trace(&e, &tcp("10.0.0.1", "10.0.0.2", 8080));
        assert_eq!(t.verdict, Verdict::Deny);
        assert!(t.steps.iter().any(|s| s.contains("Log")), "{:?}", t.steps);
        e.set_policy("a/first", Some(p(r#"{"order":10,"selector":"app == 'api'","ingress":[{"action":"Pass","source":{"notSelector":"app == 'web'"}}]}"#)));
        assert_eq!(v(&e, "10.0.0.3", "10.0.0.2", 80), Verdict::Allow, "notSelector matches, Pass → the profile allows");
        assert_eq!(
            v(&e, "10.1.1.1", "10.0.0.2", 80),
            Verdict::Deny,
            "a namespaced rule never matches outside its namespace"
        );
        assert_eq!(v(&e, "10.0.0.1", "10.0.0.2", 80), Verdict::Deny);
        // Egress of the source counts too.
        e.set_policy("a/egress", Some(p(r#"{"selector":"app == 'web'","types":["Egress"]}"#)));
        let t = trace(&e, &tcp("10.0.0.1", "10.0.0.2", 8080));
        assert_eq!(t.verdict, Verdict::Deny);
        assert!(t.steps.iter().any(|s| s.contains("egress of wep/a/web")));
    }
}
