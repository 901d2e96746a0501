//! Tunnel addresses (reference §3.6): one address per node and encapsulation, from a pool that
//! allows Tunnel use, has that encapsulation on and selects the node; held under the handle
//! `ipip-tunnel-addr-<node>` / `vxlan-tunnel-addr-<node>` and written onto the Node resource.

use std::collections::BTreeMap;
use std::net::IpAddr;

use gingham_api::Kind;
use gingham_store::StoreError;
use gingham_store::resources::ResourceError;
use serde_json::{Value, json};

use crate::pools::Pool;
use crate::{AutoAssign, IpamClient, IpamError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelKind {
    Ipip,
    Vxlan,
    VxlanV6,
}

impl TunnelKind {
    pub fn handle(self, node: &str) -> String {
        match self {
            TunnelKind::Ipip => format!("ipip-tunnel-addr-{node}"),
            TunnelKind::Vxlan => format!("vxlan-tunnel-addr-{node}"),
            TunnelKind::VxlanV6 => format!("vxlan-v6-tunnel-addr-{node}"),
        }
    }

    fn attr_type(self) -> &'static str {
        match self {
            TunnelKind::Ipip => "ipipTunnelAddress",
            TunnelKind::Vxlan => "vxlanTunnelAddress",
            TunnelKind::VxlanV6 => "vxlanV6TunnelAddress",
        }
    }

    fn v4(self) -> bool {
        self != TunnelKind::VxlanV6
    }

    /// JSON pointer of the Node field holding the address.
    fn field(self) -> (&'static str, &'static str) {
        match self {
            TunnelKind::Ipip => ("/spec/bgp", "ipv4IPIPTunnelAddr"),
            TunnelKind::Vxlan => ("/spec", "ipv4VXLANTunnelAddr"),
            TunnelKind::VxlanV6 => ("/spec", "ipv6VXLANTunnelAddr"),
        }
    }

    fn wants(self, pool: &Pool) -> bool {
        let on = |m: &Option<String>| matches!(m.as_deref(), Some("Always" | "CrossSubnet"));
        let encap = match self {
            TunnelKind::Ipip => on(&pool.spec.ipip_mode),
            TunnelKind::Vxlan | TunnelKind::VxlanV6 => on(&pool.spec.vxlan_mode),
        };
        let tunnel_use =
            pool.spec.allowed_uses.as_ref().is_none_or(|u| u.is_empty() || u.iter().any(|x| x == "Tunnel"));
        encap && tunnel_use && !pool.disabled() && pool.v4() == self.v4()
    }
}

fn get_field(node: &Value, kind: TunnelKind) -> Option<IpAddr> {
    let (parent, name) = kind.field();
    node.pointer(parent)?.get(name)?.as_str()?.parse().ok()
}

fn set_field(node: &mut Value, kind: TunnelKind, addr: Option<IpAddr>) {
    let (parent, name) = kind.field();
    if node.pointer(parent).is_none() {
        if let Some(spec) = node.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("bgp".into(), json!({}));
        }
    }
    if let Some(obj) = node.pointer_mut(parent).and_then(Value::as_object_mut) {
        match addr {
            Some(a) => obj.insert(name.into(), Value::String(a.to_string())),
            None => obj.remove(name),
        };
    }
}

impl IpamClient {
    /// Make the node's tunnel address of `kind` right: keep it if still valid, else allocate
    /// one (or release it when no pool wants this encapsulation any more). Returns the address.
    pub async fn ensure_tunnel_address(&self, node: &str, kind: TunnelKind) -> Result<Option<IpAddr>, IpamError> {
        let handle = kind.handle(node);
        let Some(obj) = self.node(node).await? else {
            return Err(IpamError::NodeNotFound(node.to_string()));
        };
        let labels: BTreeMap<String, String> = obj.metadata.labels.clone();
        let pools: Vec<Pool> =
            self.pools().await?.into_iter().filter(|p| kind.wants(p)).filter(|p| p.selects_node(&labels)).collect();
        let current = get_field(&serde_json::to_value(&obj).unwrap_or_default(), kind);
        if let Some(ip) = current {
            let ours = self.holder(ip).await?.is_some_and(|(h, _)| h == handle);
            if ours && pools.iter().any(|p| p.cidr.contains(&ip)) {
                return Ok(Some(ip));
            }
        }
        // Stale or missing: give back whatever the handle holds, then allocate afresh.
        self.release_by_handle(&handle).await?;
        let addr = if pools.is_empty() {
            None
        } else {
            let req = AutoAssign {
                num_v4: usize::from(kind.v4()),
                num_v6: usize::from(!kind.v4()),
                handle: handle.clone(),
                attrs: [("node".to_string(), node.to_string()), ("type".to_string(), kind.attr_type().to_string())]
                    .into(),
                node: node.to_string(),
                pools_v4: if kind.v4() { pools.iter().map(|p| p.name.clone()).collect() } else { Vec::new() },
                pools_v6: if kind.v4() { Vec::new() } else { pools.iter().map(|p| p.name.clone()).collect() },
                tunnel: true,
                ..Default::default()
            };
            let got = self.auto_assign(&req).await?;
            got.v4.first().or(got.v6.first()).map(|n| n.addr())
        };
        if addr == current {
            return Ok(addr);
        }
        if let Err(e) = self.write_node_field(node, kind, addr).await {
            self.release_by_handle(&handle).await?;
            return Err(e);
        }
        Ok(addr)
    }

    async fn write_node_field(&self, node: &str, kind: TunnelKind, addr: Option<IpAddr>) -> Result<(), IpamError> {
        for _ in 0..20 {
            let Some(obj) = self.resources().get(Kind::Node, None, node).await? else {
                return Err(IpamError::NodeNotFound(node.to_string()));
            };
            let mut value = serde_json::to_value(&obj).unwrap_or_default();
            set_field(&mut value, kind, addr);
            let mut updated = Kind::Node.normalize(&value).map_err(|e| {
                IpamError::InvalidRequest(format!(
                    "Node {node}: {}",
                    e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
                ))
            })?;
            updated.metadata.resource_version = obj.metadata.resource_version.clone();
            match self.resources().update(updated).await {
                Ok(_) => return Ok(()),
                Err(ResourceError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention { key: Kind::Node.key(None, node) })
    }
}
