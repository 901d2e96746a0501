//! Route filters of a session (Calico's BGPFilter): ordered rules per direction, the first
//! that matches a route decides, a route no rule matches is accepted. Rules name a prefix
//! (equal, not equal, inside or outside a CIDR with optional prefix lengths), may apply only
//! to routes from other peers, or to an interface — which no route of this speaker has (it
//! exports blocks, addresses and service ranges, never interface routes), so such a rule
//! never matches here.

use ipnet::IpNet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    Equal(IpNet),
    NotEqual(IpNet),
    /// Inside `net`, with a prefix length in `min..=max`.
    In {
        net: IpNet,
        min: u8,
        max: u8,
    },
    NotIn {
        net: IpNet,
        min: u8,
        max: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub accept: bool,
    /// The family the rule is for (Calico keeps separate lists).
    pub v6: bool,
    pub prefix: Option<Match>,
    /// Only routes learned from peers (Calico's `source: RemotePeers`).
    pub remote_only: bool,
    pub interface: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub import: Vec<Rule>,
    pub export: Vec<Rule>,
}

impl Filters {
    /// Whether a route the peer sent may enter our RIB.
    pub fn imports(&self, prefix: &IpNet) -> bool {
        decide(&self.import, prefix, true)
    }

    /// Whether a route may go to the peer; `remote`: it was learned from another peer.
    pub fn exports(&self, prefix: &IpNet, remote: bool) -> bool {
        decide(&self.export, prefix, remote)
    }
}

fn decide(rules: &[Rule], prefix: &IpNet, remote: bool) -> bool {
    let v6 = prefix.addr().is_ipv6();
    rules.iter().find(|r| r.v6 == v6 && matches(r, prefix, remote)).is_none_or(|r| r.accept)
}

fn matches(r: &Rule, prefix: &IpNet, remote: bool) -> bool {
    if r.interface.is_some() || (r.remote_only && !remote) {
        return false;
    }
    let inside = |net: &IpNet, min: u8, max: u8| net.contains(prefix) && (min..=max).contains(&prefix.prefix_len());
    match &r.prefix {
        None => true,
        Some(Match::Equal(n)) => prefix == n,
        Some(Match::NotEqual(n)) => prefix != n,
        Some(Match::In { net, min, max }) => inside(net, *min, *max),
        Some(Match::NotIn { net, min, max }) => !inside(net, *min, *max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn rule(accept: bool, prefix: Option<Match>) -> Rule {
        Rule { accept, v6: false, prefix, remote_only: false, interface: None }
    }

    #[test]
    fn the_first_matching_rule_decides_and_no_match_accepts() {
        let f = Filters {
            import: vec![
                rule(true, Some(Match::In { net: net("10.55.0.0/16"), min: 30, max: 32 })),
                rule(false, Some(Match::NotIn { net: net("10.44.0.0/16"), min: 16, max: 32 })),
            ],
            export: vec![
                Rule { remote_only: true, ..rule(false, None) },
                rule(false, Some(Match::Equal(net("10.9.0.0/26")))),
                Rule { interface: Some("*.calico".into()), ..rule(false, None) },
            ],
        };
        assert!(f.imports(&net("10.55.1.4/30")), "inside, long enough");
        assert!(!f.imports(&net("10.55.1.0/24")), "inside but too short: on to the next rule, outside 10.44/16");
        assert!(f.imports(&net("10.44.3.0/24")), "no rule matches: accepted");
        assert!(f.imports(&"fd00::/64".parse().unwrap()), "IPv4 rules say nothing of IPv6");
        assert!(!f.exports(&net("10.1.0.0/26"), true), "routes from other peers are not passed on");
        assert!(f.exports(&net("10.1.0.0/26"), false), "our own go");
        assert!(!f.exports(&net("10.9.0.0/26"), false), "except that one");
        assert!(f.exports(&net("10.9.0.0/27"), false), "Equal is exact");
    }
}
