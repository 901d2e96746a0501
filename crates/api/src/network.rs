//! Cluster networking kinds: IPPool, IPAMConfiguration, BGPConfiguration, BGPPeer, Node,
//! FelixConfiguration, ClusterInformation.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::enums::EncapMode;
use crate::object::{IntOrString, ObjectMeta, Spec};
use crate::validate::*;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IPPoolSpec {
    #[serde(default)]
    pub cidr: String,
    pub block_size: Option<u8>,
    pub ipip_mode: Option<EncapMode>,
    pub vxlan_mode: Option<EncapMode>,
    pub nat_outgoing: Option<bool>,
    pub disabled: Option<bool>,
    #[serde(rename = "disableBGPExport")]
    pub disable_bgp_export: Option<bool>,
    pub node_selector: Option<String>,
    pub namespace_selector: Option<String>,
    pub allowed_uses: Option<Vec<String>>,
    pub assignment_mode: Option<String>,
    /// Old v1 shape, converted on read.
    pub ipip: Option<Value>,
    #[serde(rename = "nat-outgoing")]
    pub nat_outgoing_v1: Option<bool>,
}

impl IPPoolSpec {
    pub fn net(&self) -> Option<IpNet> {
        self.cidr.parse().ok()
    }
    pub fn ipip(&self) -> EncapMode {
        self.ipip_mode.unwrap_or_default()
    }
    pub fn vxlan(&self) -> EncapMode {
        self.vxlan_mode.unwrap_or_default()
    }
    pub fn is_disabled(&self) -> bool {
        self.disabled == Some(true)
    }
    /// Whether nodes need a VXLAN (`vxlan`) or IPIP tunnel address for this pool: it is enabled
    /// and uses that encapsulation (IPv4 only, as Calico's tunnel allocator). Routes to addresses
    /// already in a disabled pool still follow the pool's modes.
    pub fn wants_vxlan_tunnel(&self) -> bool {
        !self.is_disabled() && self.vxlan().enabled() && self.net().is_some_and(|n| n.addr().is_ipv4())
    }
    pub fn wants_ipip_tunnel(&self) -> bool {
        !self.is_disabled() && self.ipip().enabled() && self.net().is_some_and(|n| n.addr().is_ipv4())
    }
    /// Traffic from this pool to outside every pool is masqueraded (disabled pools too: their
    /// pods still run).
    pub fn nat_outgoing(&self) -> bool {
        self.nat_outgoing == Some(true)
    }
}

impl Spec for IPPoolSpec {
    fn default_fields(&mut self, _meta: &ObjectMeta) {
        // The v1 shape: ipip {enabled, mode: always|cross-subnet}, nat-outgoing.
        if let Some(ipip) = self.ipip.take() {
            let enabled = ipip.get("enabled").and_then(Value::as_bool).unwrap_or(true);
            let mode = ipip.get("mode").and_then(Value::as_str).unwrap_or("always");
            if self.ipip_mode.is_none() {
                self.ipip_mode = Some(match (enabled, mode) {
                    (false, _) => EncapMode::Never,
                    (true, "cross-subnet") => EncapMode::CrossSubnet,
                    _ => EncapMode::Always,
                });
            }
        }
        if let Some(nat) = self.nat_outgoing_v1.take() {
            self.nat_outgoing.get_or_insert(nat);
        }
        let v6 = self.net().is_some_and(|n| n.addr().is_ipv6());
        self.block_size.get_or_insert(if v6 { 122 } else { 26 });
        self.ipip_mode.get_or_insert(EncapMode::Never);
        self.vxlan_mode.get_or_insert(EncapMode::Never);
        self.node_selector.get_or_insert_with(|| "all()".into());
        if self.allowed_uses.as_ref().is_none_or(Vec::is_empty) {
            self.allowed_uses = Some(vec!["Workload".into(), "Tunnel".into()]);
        }
        self.assignment_mode.get_or_insert_with(|| "Automatic".into());
    }

    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        if self.cidr.is_empty() {
            e.push(FieldError::new("spec.cidr", "a CIDR is required"));
        }
        let net = if self.cidr.is_empty() { None } else { check_cidr(&self.cidr, "spec.cidr", e) };
        if let Some(net) = net {
            if net.trunc() != net {
                e.push(FieldError::new(
                    "spec.cidr",
                    format!("{} has host bits set; did you mean {}?", self.cidr, net.trunc()),
                ));
            }
            let link_local: IpNet =
                if net.addr().is_ipv4() { "169.254.0.0/16" } else { "fe80::/10" }.parse().expect("constant");
            if link_local.contains(&net.network()) || net.contains(&link_local.network()) {
                e.push(FieldError::new(
                    "spec.cidr",
                    format!("{} overlaps the link-local range {link_local}", self.cidr),
                ));
            }
            let (lo, hi) = if net.addr().is_ipv4() { (20, 32) } else { (116, 128) };
            if let Some(bs) = self.block_size {
                if !(lo..=hi).contains(&bs) {
                    e.push(FieldError::new("spec.blockSize", format!("{bs} is outside {lo}..{hi}")));
                } else if net.prefix_len() > bs && self.disabled != Some(true) {
                    e.push(FieldError::new(
                        "spec.blockSize",
                        format!(
                            "{bs} is larger than the pool itself ({}); use a blockSize of at least /{}",
                            self.cidr,
                            net.prefix_len()
                        ),
                    ));
                }
            }
            if net.addr().is_ipv6() && self.ipip().enabled() {
                e.push(FieldError::new("spec.ipipMode", "IPIP is not supported on IPv6 pools; use vxlanMode"));
            }
        }
        if self.ipip().enabled() && self.vxlan().enabled() {
            e.push(FieldError::new(
                "spec.vxlanMode",
                "IPIP and VXLAN cannot both be enabled on one pool (ipipMode is also set)",
            ));
        }
        for (sel, path) in
            [(&self.node_selector, "spec.nodeSelector"), (&self.namespace_selector, "spec.namespaceSelector")]
        {
            if let Some(s) = sel {
                if s.len() > 1024 {
                    e.push(FieldError::new(path, "selector is longer than 1024 characters"));
                } else if check_selector(s, path, e).is_some_and(|p| p.uses_global()) {
                    e.push(FieldError::new(path, "global() is not allowed in an IPPool selector"));
                }
            }
        }
        let uses = self.allowed_uses.clone().unwrap_or_default();
        for (i, u) in uses.iter().enumerate() {
            check_enum(u, &["Workload", "Tunnel", "LoadBalancer"], &format!("spec.allowedUses[{i}]"), e);
        }
        if uses.iter().any(|u| u == "LoadBalancer") {
            if uses.len() > 1 {
                e.push(FieldError::new("spec.allowedUses", "LoadBalancer cannot be combined with Workload or Tunnel"));
            }
            if self.ipip().enabled() || self.vxlan().enabled() {
                e.push(FieldError::new("spec.allowedUses", "a LoadBalancer pool cannot use IPIP or VXLAN"));
            }
            if self.disable_bgp_export == Some(true) {
                e.push(FieldError::new("spec.disableBGPExport", "a LoadBalancer pool must be exported over BGP"));
            }
        }
        if let Some(m) = &self.assignment_mode {
            check_enum(m, &["Automatic", "Manual"], "spec.assignmentMode", e);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IPAMConfigSpec {
    pub strict_affinity: Option<bool>,
    pub auto_allocate_blocks: Option<bool>,
    pub max_blocks_per_host: Option<i64>,
    pub ip_cooldown_seconds: Option<i64>,
    #[serde(rename = "kubeVirtVMAddressPersistence")]
    pub kube_virt_vm_address_persistence: Option<String>,
}

impl Spec for IPAMConfigSpec {
    fn default_fields(&mut self, _meta: &ObjectMeta) {
        self.strict_affinity.get_or_insert(false);
        self.auto_allocate_blocks.get_or_insert(true);
        self.max_blocks_per_host.get_or_insert(0);
    }
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        if self.max_blocks_per_host.is_some_and(|m| m < 0) {
            e.push(FieldError::new("spec.maxBlocksPerHost", "must be 0 (unlimited) or positive"));
        }
        if let Some(c) = self.ip_cooldown_seconds.filter(|c| !(0..=1200).contains(c)) {
            e.push(FieldError::new("spec.ipCooldownSeconds", format!("{c} is outside 0..1200")));
        }
        if let Some(p) = &self.kube_virt_vm_address_persistence {
            check_enum(p, &["Enabled", "Disabled"], "spec.kubeVirtVMAddressPersistence", e);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrEntry {
    #[serde(default)]
    pub cidr: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Community {
    pub name: Option<String>,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefixAdvertisement {
    pub cidr: Option<String>,
    pub communities: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Password {
    pub secret_key_ref: Option<SecretKeyRef>,
}

const LOG_LEVELS: &[&str] = &["Trace", "Debug", "Info", "Warning", "Error", "Fatal", "None"];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPConfigurationSpec {
    pub log_severity_screen: Option<String>,
    pub node_to_node_mesh_enabled: Option<bool>,
    pub as_number: Option<IntOrString>,
    pub listen_port: Option<i64>,
    #[serde(rename = "serviceClusterIPs")]
    pub service_cluster_ips: Option<Vec<CidrEntry>>,
    #[serde(rename = "serviceExternalIPs")]
    pub service_external_ips: Option<Vec<CidrEntry>>,
    #[serde(rename = "serviceLoadBalancerIPs")]
    pub service_load_balancer_ips: Option<Vec<CidrEntry>>,
    pub service_load_balancer_aggregation: Option<String>,
    pub communities: Option<Vec<Community>>,
    pub prefix_advertisements: Option<Vec<PrefixAdvertisement>>,
    pub node_mesh_password: Option<Password>,
    pub node_mesh_max_restart_time: Option<String>,
    pub bind_mode: Option<String>,
    pub ignored_interfaces: Option<Vec<String>>,
    #[serde(rename = "localWorkloadPeeringIPV4")]
    pub local_workload_peering_ipv4: Option<String>,
    #[serde(rename = "localWorkloadPeeringIPV6")]
    pub local_workload_peering_ipv6: Option<String>,
    pub program_cluster_routes: Option<String>,
    pub ipv4_normal_route_priority: Option<i64>,
    pub ipv6_normal_route_priority: Option<i64>,
}

impl Spec for BGPConfigurationSpec {
    fn validate(&self, meta: &ObjectMeta, e: &mut Errors) {
        if meta.name != "default" && !meta.name.starts_with("node.") {
            e.push(FieldError::new(
                "metadata.name",
                format!("{:?}: BGPConfiguration is named \"default\" or \"node.<nodename>\"", meta.name),
            ));
        }
        if let Some(l) = &self.log_severity_screen {
            check_enum(l, LOG_LEVELS, "spec.logSeverityScreen", e);
        }
        if let Some(a) = &self.as_number {
            check_asn(a, "spec.asNumber", e);
        }
        if let Some(p) = self.listen_port {
            check_port_number(p, "spec.listenPort", e);
        }
        for (list, field) in [
            (&self.service_cluster_ips, "serviceClusterIPs"),
            (&self.service_external_ips, "serviceExternalIPs"),
            (&self.service_load_balancer_ips, "serviceLoadBalancerIPs"),
        ] {
            for (i, c) in list.iter().flatten().enumerate() {
                check_cidr(&c.cidr, &format!("spec.{field}[{i}].cidr"), e);
            }
        }
        for (i, c) in self.communities.iter().flatten().enumerate() {
            if let Some(v) = &c.value {
                check_community(v, &format!("spec.communities[{i}].value"), e);
            }
        }
        for (i, p) in self.prefix_advertisements.iter().flatten().enumerate() {
            if let Some(c) = &p.cidr {
                check_cidr(c, &format!("spec.prefixAdvertisements[{i}].cidr"), e);
            }
        }
        if self.node_mesh_password.is_some() && meta.name != "default" {
            e.push(FieldError::new("spec.nodeMeshPassword", "only allowed on the \"default\" BGPConfiguration"));
        }
        if let Some(d) = &self.node_mesh_max_restart_time {
            check_duration(d, "spec.nodeMeshMaxRestartTime", e);
        }
        if let Some(m) = &self.service_load_balancer_aggregation {
            check_enum(m, &["Enabled", "Disabled"], "spec.serviceLoadBalancerAggregation", e);
        }
        if let Some(m) = &self.bind_mode {
            check_enum(m, &["None", "NodeIP"], "spec.bindMode", e);
        }
        if let Some(m) = &self.program_cluster_routes {
            check_enum(
                m,
                &["Enabled", "Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly"],
                "spec.programClusterRoutes",
                e,
            );
        }
        for (v, f) in [
            (&self.local_workload_peering_ipv4, "localWorkloadPeeringIPV4"),
            (&self.local_workload_peering_ipv6, "localWorkloadPeeringIPV6"),
        ] {
            if let Some(ip) = v {
                check_ip(ip, &format!("spec.{f}"), e);
            }
        }
    }
}

/// A standard (aa:nn) or large (aa:nn:mm) community, or a community name reference.
fn check_community(v: &str, path: &str, e: &mut Errors) {
    let parts: Vec<&str> = v.split(':').collect();
    let ok = match parts.len() {
        2 => parts.iter().all(|p| p.parse::<u16>().is_ok()),
        3 => parts.iter().all(|p| p.parse::<u32>().is_ok()),
        _ => false,
    };
    if !ok {
        e.push(FieldError::new(path, format!("{v:?} is not a community (aa:nn or aa:nn:mm)")));
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPPeerSpec {
    pub node: Option<String>,
    pub node_selector: Option<String>,
    #[serde(rename = "peerIP")]
    pub peer_ip: Option<String>,
    pub as_number: Option<IntOrString>,
    pub peer_selector: Option<String>,
    #[serde(rename = "localASNumber")]
    pub local_as_number: Option<IntOrString>,
    pub keep_original_next_hop: Option<bool>,
    pub next_hop_mode: Option<String>,
    pub password: Option<Password>,
    pub source_address: Option<String>,
    pub max_restart_time: Option<String>,
    pub keepalive_time: Option<String>,
    #[serde(rename = "numAllowedLocalASNumbers")]
    pub num_allowed_local_as_numbers: Option<i64>,
    pub ttl_security: Option<i64>,
    pub reachable_by: Option<String>,
    pub filters: Option<Vec<String>>,
    pub local_workload_selector: Option<String>,
    pub reverse_peering: Option<String>,
}

/// `a.b.c.d`, `a.b.c.d:port`, `v6` or `[v6]:port` → (address, port).
pub fn parse_peer_ip(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bad = || format!("{s:?} is not an IP address, IP:port or [IPv6]:port");
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    let sa: std::net::SocketAddr = s.parse().map_err(|_| bad())?;
    if sa.port() == 0 {
        return Err(bad());
    }
    Ok((sa.ip(), Some(sa.port())))
}

impl Spec for BGPPeerSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        if self.node.as_deref().is_some_and(|n| !n.is_empty())
            && self.node_selector.as_deref().is_some_and(|s| !s.is_empty())
        {
            e.push(FieldError::new("spec.nodeSelector", "node and nodeSelector cannot both be set"));
        }
        if let Some(s) = &self.node_selector {
            check_selector(s, "spec.nodeSelector", e);
        }
        if let Some(s) = &self.peer_selector {
            check_selector(s, "spec.peerSelector", e);
            if self.peer_ip.is_some() || self.as_number.is_some() {
                e.push(FieldError::new(
                    "spec.peerSelector",
                    "peerIP and asNumber must be empty when peerSelector is set",
                ));
            }
        } else if self.peer_ip.is_none() {
            e.push(FieldError::new("spec.peerIP", "either peerIP (with asNumber) or peerSelector is required"));
        }
        if let Some(ip) = &self.peer_ip {
            if let Err(m) = parse_peer_ip(ip) {
                e.push(FieldError::new("spec.peerIP", m));
            }
            if self.as_number.is_none() {
                e.push(FieldError::new("spec.asNumber", "required when peerIP is set"));
            }
        }
        if let Some(a) = &self.as_number {
            check_asn(a, "spec.asNumber", e);
        }
        if let Some(a) = &self.local_as_number {
            check_asn(a, "spec.localASNumber", e);
        }
        if let Some(m) = &self.next_hop_mode {
            check_enum(m, &["Auto", "Self", "Keep"], "spec.nextHopMode", e);
        }
        if let Some(m) = &self.source_address {
            check_enum(m, &["UseNodeIP", "None"], "spec.sourceAddress", e);
        }
        if let Some(m) = &self.reverse_peering {
            check_enum(m, &["Auto", "Manual"], "spec.reversePeering", e);
        }
        for (d, f) in [(&self.max_restart_time, "maxRestartTime"), (&self.keepalive_time, "keepaliveTime")] {
            if let Some(d) = d {
                check_duration(d, &format!("spec.{f}"), e);
            }
        }
        if let Some(t) = self.ttl_security.filter(|t| !(0..=255).contains(t)) {
            e.push(FieldError::new("spec.ttlSecurity", format!("{t} is outside 0..255")));
        }
        if let Some(n) = self.num_allowed_local_as_numbers.filter(|n| !(0..=10).contains(n)) {
            e.push(FieldError::new("spec.numAllowedLocalASNumbers", format!("{n} is outside 0..10")));
        }
        if let Some(r) = &self.reachable_by {
            check_ip(r, "spec.reachableBy", e);
        }
        if let Some(s) = &self.local_workload_selector {
            check_selector(s, "spec.localWorkloadSelector", e);
        }
    }
}

/// BGPFilter: import and export rules per family, referred to by BGPPeer `filters`. The first
/// rule that matches decides; a route no rule matches is accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPFilterSpec {
    #[serde(rename = "exportV4")]
    pub export_v4: Option<Vec<BGPFilterRule>>,
    #[serde(rename = "importV4")]
    pub import_v4: Option<Vec<BGPFilterRule>>,
    #[serde(rename = "exportV6")]
    pub export_v6: Option<Vec<BGPFilterRule>>,
    #[serde(rename = "importV6")]
    pub import_v6: Option<Vec<BGPFilterRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPFilterRule {
    pub action: String,
    pub match_operator: Option<String>,
    pub cidr: Option<String>,
    pub prefix_length: Option<BGPFilterPrefixLength>,
    pub source: Option<String>,
    pub interface: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BGPFilterPrefixLength {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

impl Spec for BGPFilterSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        let lists = [
            (&self.export_v4, "exportV4", false),
            (&self.import_v4, "importV4", false),
            (&self.export_v6, "exportV6", true),
            (&self.import_v6, "importV6", true),
        ];
        for (rules, field, v6) in lists {
            for (i, r) in rules.iter().flatten().enumerate() {
                let path = format!("spec.{field}[{i}]");
                check_enum(&r.action, &["Accept", "Reject"], &format!("{path}.action"), e);
                if let Some(op) = &r.match_operator {
                    check_enum(op, &["Equal", "NotEqual", "In", "NotIn"], &format!("{path}.matchOperator"), e);
                }
                if r.cidr.is_some() != r.match_operator.is_some() {
                    e.push(FieldError::new(&path, "cidr and matchOperator go together"));
                }
                let max_len: i64 = if v6 { 128 } else { 32 };
                if let Some(c) = &r.cidr {
                    if let Some(net) = check_cidr(c, &format!("{path}.cidr"), e) {
                        if net.addr().is_ipv6() != v6 {
                            e.push(FieldError::new(
                                format!("{path}.cidr"),
                                format!("{c} is not an {} CIDR", if v6 { "IPv6" } else { "IPv4" }),
                            ));
                        }
                    }
                }
                if let Some(p) = &r.prefix_length {
                    if r.cidr.is_none() {
                        e.push(FieldError::new(format!("{path}.prefixLength"), "needs a cidr"));
                    }
                    for (v, f) in [(p.min, "min"), (p.max, "max")] {
                        if let Some(v) = v.filter(|v| !(0..=max_len).contains(v)) {
                            e.push(FieldError::new(
                                format!("{path}.prefixLength.{f}"),
                                format!("{v} is outside 0..{max_len}"),
                            ));
                        }
                    }
                    if let (Some(a), Some(b)) = (p.min, p.max) {
                        if a > b {
                            e.push(FieldError::new(
                                format!("{path}.prefixLength"),
                                format!("min {a} is above max {b}"),
                            ));
                        }
                    }
                }
                if let Some(s) = &r.source {
                    check_enum(s, &["RemotePeers"], &format!("{path}.source"), e);
                }
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBGPSpec {
    pub as_number: Option<IntOrString>,
    pub ipv4_address: Option<String>,
    pub ipv6_address: Option<String>,
    #[serde(rename = "ipv4IPIPTunnelAddr")]
    pub ipv4_ipip_tunnel_addr: Option<String>,
    #[serde(rename = "routeReflectorClusterID")]
    pub route_reflector_cluster_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrchRef {
    pub node_name: Option<String>,
    pub orchestrator: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAddress {
    pub address: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeWireguardSpec {
    pub interface_ipv4_address: Option<String>,
    pub interface_ipv6_address: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub bgp: Option<NodeBGPSpec>,
    #[serde(rename = "ipv4VXLANTunnelAddr")]
    pub ipv4_vxlan_tunnel_addr: Option<String>,
    #[serde(rename = "vxlanTunnelMACAddr")]
    pub vxlan_tunnel_mac_addr: Option<String>,
    #[serde(rename = "ipv6VXLANTunnelAddr")]
    pub ipv6_vxlan_tunnel_addr: Option<String>,
    #[serde(rename = "vxlanTunnelMACAddrV6")]
    pub vxlan_tunnel_mac_addr_v6: Option<String>,
    pub orch_refs: Option<Vec<OrchRef>>,
    pub wireguard: Option<NodeWireguardSpec>,
    pub addresses: Option<Vec<NodeAddress>>,
    pub interface_name: Option<String>,
}

fn check_mac(m: &str, path: &str, e: &mut Errors) {
    let parts: Vec<&str> = m.split(':').collect();
    if parts.len() != 6 || !parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()) {
        e.push(FieldError::new(path, format!("{m:?} is not a MAC address")));
    }
}

impl Spec for NodeSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        if let Some(b) = &self.bgp {
            if let Some(a) = &b.as_number {
                check_asn(a, "spec.bgp.asNumber", e);
            }
            for (v, f, v4) in [(&b.ipv4_address, "ipv4Address", true), (&b.ipv6_address, "ipv6Address", false)] {
                if let Some(addr) = v {
                    if let Some(n) = check_cidr(addr, &format!("spec.bgp.{f}"), e) {
                        if n.addr().is_ipv4() != v4 {
                            e.push(FieldError::new(
                                format!("spec.bgp.{f}"),
                                format!("{addr} is not an IPv{} address", if v4 { 4 } else { 6 }),
                            ));
                        }
                    }
                }
            }
            if let Some(t) = &b.ipv4_ipip_tunnel_addr {
                check_ip(t, "spec.bgp.ipv4IPIPTunnelAddr", e);
            }
            if let Some(id) = &b.route_reflector_cluster_id {
                if id.parse::<Ipv4Addr>().is_err() {
                    e.push(FieldError::new(
                        "spec.bgp.routeReflectorClusterID",
                        format!("{id:?} is not an IPv4-format cluster ID"),
                    ));
                }
            }
        }
        for (v, f) in [
            (&self.ipv4_vxlan_tunnel_addr, "ipv4VXLANTunnelAddr"),
            (&self.ipv6_vxlan_tunnel_addr, "ipv6VXLANTunnelAddr"),
        ] {
            if let Some(a) = v {
                check_ip(a, &format!("spec.{f}"), e);
            }
        }
        for (v, f) in [
            (&self.vxlan_tunnel_mac_addr, "vxlanTunnelMACAddr"),
            (&self.vxlan_tunnel_mac_addr_v6, "vxlanTunnelMACAddrV6"),
        ] {
            if let Some(m) = v {
                check_mac(m, &format!("spec.{f}"), e);
            }
        }
        for (i, r) in self.orch_refs.iter().flatten().enumerate() {
            if r.orchestrator.is_empty() {
                e.push(FieldError::new(format!("spec.orchRefs[{i}].orchestrator"), "required"));
            }
        }
        for (i, a) in self.addresses.iter().flatten().enumerate() {
            check_cidr(&a.address, &format!("spec.addresses[{i}].address"), e);
        }
    }
}

/// The FelixConfiguration fields the node agent uses (unknown ones are rejected).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FelixConfigurationSpec {
    pub ipip_enabled: Option<bool>,
    pub vxlan_enabled: Option<bool>,
    #[serde(rename = "ipipMTU")]
    pub ipip_mtu: Option<i64>,
    #[serde(rename = "vxlanMTU")]
    pub vxlan_mtu: Option<i64>,
    #[serde(rename = "vxlanMTUV6")]
    pub vxlan_mtu_v6: Option<i64>,
    pub vxlan_port: Option<i64>,
    #[serde(rename = "vxlanVNI")]
    pub vxlan_vni: Option<i64>,
    pub wireguard_enabled: Option<bool>,
    #[serde(rename = "wireguardMTU")]
    pub wireguard_mtu: Option<i64>,
    pub mtu_iface_pattern: Option<String>,
    pub default_endpoint_to_host_action: Option<String>,
    pub chain_insert_mode: Option<String>,
    pub iptables_backend: Option<String>,
    pub nftables_mode: Option<String>,
    pub bpf_enabled: Option<bool>,
    pub iptables_mark_mask: Option<i64>,
    pub nftables_mark_mask: Option<i64>,
    pub iptables_refresh_interval: Option<String>,
    pub route_refresh_interval: Option<String>,
    pub interface_refresh_interval: Option<String>,
    pub ipsets_refresh_interval: Option<String>,
    pub netlink_timeout: Option<String>,
    pub interface_prefix: Option<String>,
    pub interface_exclude: Option<String>,
    pub log_severity_screen: Option<String>,
    pub log_severity_file: Option<String>,
    pub log_file_path: Option<String>,
    pub health_enabled: Option<bool>,
    pub health_host: Option<String>,
    pub health_port: Option<i64>,
    pub prometheus_metrics_enabled: Option<bool>,
    pub prometheus_metrics_port: Option<i64>,
    pub failsafe_inbound_host_ports: Option<Vec<ProtoPort>>,
    pub failsafe_outbound_host_ports: Option<Vec<ProtoPort>>,
    pub kube_node_port_ranges: Option<Vec<IntOrString>>,
    pub nat_outgoing_address: Option<String>,
    pub nat_port_range: Option<IntOrString>,
    pub nat_outgoing_exclusions: Option<String>,
    pub device_route_protocol: Option<i64>,
    pub remove_external_routes: Option<bool>,
    pub route_source: Option<String>,
    pub program_cluster_routes: Option<String>,
    pub service_loop_prevention: Option<String>,
    pub workload_source_spoofing: Option<String>,
    pub ipv6_support: Option<bool>,
    pub xdp_enabled: Option<bool>,
    pub floating_i_ps: Option<String>,
    pub reporting_interval: Option<String>,
    pub reporting_ttl: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtoPort {
    pub protocol: String,
    pub port: i64,
    pub net: Option<String>,
}

impl Spec for FelixConfigurationSpec {
    fn validate(&self, meta: &ObjectMeta, e: &mut Errors) {
        if meta.name != "default" && !meta.name.starts_with("node.") {
            e.push(FieldError::new(
                "metadata.name",
                format!("{:?}: FelixConfiguration is named \"default\" or \"node.<nodename>\"", meta.name),
            ));
        }
        for (v, f) in [
            (&self.vxlan_port, "vxlanPort"),
            (&self.health_port, "healthPort"),
            (&self.prometheus_metrics_port, "prometheusMetricsPort"),
        ] {
            if let Some(p) = v {
                check_port_number(*p, &format!("spec.{f}"), e);
            }
        }
        if let Some(v) = self.vxlan_vni.filter(|v| !(1..=16_777_215).contains(v)) {
            e.push(FieldError::new("spec.vxlanVNI", format!("{v} is outside 1..16777215")));
        }
        for (v, f) in [
            (&self.ipip_mtu, "ipipMTU"),
            (&self.vxlan_mtu, "vxlanMTU"),
            (&self.vxlan_mtu_v6, "vxlanMTUV6"),
            (&self.wireguard_mtu, "wireguardMTU"),
        ] {
            if let Some(m) = v.filter(|m| *m != 0 && !(68..=65535).contains(m)) {
                e.push(FieldError::new(format!("spec.{f}"), format!("{m} is outside 68..65535 (0 = auto)")));
            }
        }
        if let Some(p) = self.device_route_protocol.filter(|p| !(0..=255).contains(p)) {
            e.push(FieldError::new("spec.deviceRouteProtocol", format!("{p} is outside 0..255")));
        }
        for (v, f, allowed) in [
            (&self.default_endpoint_to_host_action, "defaultEndpointToHostAction", &["Drop", "Return", "Accept"][..]),
            (&self.chain_insert_mode, "chainInsertMode", &["Insert", "Append", "insert", "append"][..]),
            (&self.nftables_mode, "nftablesMode", &["Enabled", "Disabled", "Auto"][..]),
            (&self.route_source, "routeSource", &["CalicoIPAM", "WorkloadIPs"][..]),
            (&self.service_loop_prevention, "serviceLoopPrevention", &["Drop", "Reject", "Disabled"][..]),
            (&self.log_severity_screen, "logSeverityScreen", LOG_LEVELS),
            (&self.nat_outgoing_exclusions, "natOutgoingExclusions", &["IPPoolsOnly", "IPPoolsAndHostIPs"][..]),
        ] {
            if let Some(v) = v {
                check_enum(v, allowed, &format!("spec.{f}"), e);
            }
        }
        for (v, f) in [
            (&self.iptables_refresh_interval, "iptablesRefreshInterval"),
            (&self.route_refresh_interval, "routeRefreshInterval"),
            (&self.interface_refresh_interval, "interfaceRefreshInterval"),
            (&self.ipsets_refresh_interval, "ipsetsRefreshInterval"),
            (&self.netlink_timeout, "netlinkTimeout"),
            (&self.reporting_interval, "reportingInterval"),
            (&self.reporting_ttl, "reportingTTL"),
        ] {
            if let Some(d) = v {
                check_duration(d, &format!("spec.{f}"), e);
            }
        }
        for (list, f) in [
            (&self.failsafe_inbound_host_ports, "failsafeInboundHostPorts"),
            (&self.failsafe_outbound_host_ports, "failsafeOutboundHostPorts"),
        ] {
            for (i, pp) in list.iter().flatten().enumerate() {
                check_enum(
                    &pp.protocol.to_ascii_uppercase(),
                    &["TCP", "UDP", "SCTP"],
                    &format!("spec.{f}[{i}].protocol"),
                    e,
                );
                check_port_number(pp.port, &format!("spec.{f}[{i}].port"), e);
            }
        }
        if let Some(a) = &self.nat_outgoing_address {
            check_ip(a, "spec.natOutgoingAddress", e);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterInformationSpec {
    #[serde(rename = "clusterGUID")]
    pub cluster_guid: Option<String>,
    pub cluster_type: Option<String>,
    pub calico_version: Option<String>,
    pub datastore_ready: Option<bool>,
    pub variant: Option<String>,
}

impl Spec for ClusterInformationSpec {
    fn validate(&self, _meta: &ObjectMeta, _e: &mut Errors) {}
}

/// Addresses (and ranges) IPAM never hands out by itself; an address asked for explicitly
/// (the `ipAddrs` annotation) may still be one of them, as in Calico.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IPReservationSpec {
    #[serde(rename = "reservedCIDRs")]
    pub reserved_cidrs: Option<Vec<String>>,
}

impl Spec for IPReservationSpec {
    fn validate(&self, _meta: &ObjectMeta, e: &mut Errors) {
        for (i, c) in self.reserved_cidrs.iter().flatten().enumerate() {
            // A single address is a /32 or /128.
            if c.parse::<std::net::IpAddr>().is_err() {
                check_cidr(c, &format!("spec.reservedCIDRs[{i}]"), e);
            }
        }
    }
}

impl IPReservationSpec {
    /// The reserved networks (single addresses as host prefixes); unreadable entries skipped
    /// (validation refuses them on the way in).
    pub fn nets(&self) -> Vec<ipnet::IpNet> {
        self.reserved_cidrs
            .iter()
            .flatten()
            .filter_map(|c| {
                c.parse::<ipnet::IpNet>().ok().or_else(|| c.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
            })
            .collect()
    }
}

/// Calico's KubeControllersConfiguration (`default`): what `gingham controllers run` reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeControllersConfigurationSpec {
    pub log_severity_screen: Option<String>,
    pub health_checks: Option<String>,
    pub etcd_v3_compaction_period: Option<String>,
    pub prometheus_metrics_port: Option<i64>,
    pub debug_profile_port: Option<i64>,
    pub controllers: Option<ControllersConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllersConfig {
    pub node: Option<NodeControllerConfig>,
    pub policy: Option<serde_json::Value>,
    pub workload_endpoint: Option<serde_json::Value>,
    pub service_account: Option<serde_json::Value>,
    pub namespace: Option<serde_json::Value>,
    pub load_balancer: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeControllerConfig {
    pub reconciler_period: Option<String>,
    pub sync_labels: Option<String>,
    pub host_endpoint: Option<serde_json::Value>,
    /// How long an allocation must look leaked before it is released (Calico: 15m; "0"
    /// turns the IPAM garbage collection off).
    pub leak_grace_period: Option<String>,
}

impl Spec for KubeControllersConfigurationSpec {
    fn validate(&self, meta: &ObjectMeta, e: &mut Errors) {
        if meta.name != "default" {
            e.push(FieldError::new(
                "metadata.name",
                format!("{:?}: KubeControllersConfiguration is named \"default\"", meta.name),
            ));
        }
        if let Some(n) = self.controllers.as_ref().and_then(|c| c.node.as_ref()) {
            for (v, f) in [(&n.reconciler_period, "reconcilerPeriod"), (&n.leak_grace_period, "leakGracePeriod")] {
                if let Some(d) = v {
                    check_duration(d, &format!("spec.controllers.node.{f}"), e);
                }
            }
        }
    }
}
