//! Tunnel addresses (reference §3.6): one address per node and encapsulation, from a pool that
//! allows Tunnel use, has that encapsulation on and selects the node; held under the handle
//! `ipip-tunnel-addr-<node>` / `vxlan-tunnel-addr-<node>` and written onto the Node resource.

use std::collections::BTreeMap;
use std::net::IpAddr;

use gingham_api::Kind;
use gingham_api::network::NodeSpec;
use gingham_store::StoreError;
use gingham_store::resources::ResourceError;

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

    fn wants(self, pool: &Pool) -> bool {
        let encap = match self {
            TunnelKind::Ipip => pool.spec.ipip().enabled(),
            TunnelKind::Vxlan | TunnelKind::VxlanV6 => pool.spec.vxlan().enabled(),
        };
        let tunnel_use =
            pool.spec.allowed_uses.as_ref().is_none_or(|u| u.is_empty() || u.iter().any(|x| x == "Tunnel"));
        encap && tunnel_use && !pool.disabled() && pool.v4() == self.v4()
    }
}

/// The node's current tunnel address of `kind`.
fn current_address(spec: &NodeSpec, kind: TunnelKind) -> Option<IpAddr> {
    match kind {
        TunnelKind::Ipip => spec.bgp.as_ref()?.ipv4_ipip_tunnel_addr.as_deref(),
        TunnelKind::Vxlan => spec.ipv4_vxlan_tunnel_addr.as_deref(),
        TunnelKind::VxlanV6 => spec.ipv6_vxlan_tunnel_addr.as_deref(),
    }?
    .parse()
    .ok()
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
        let spec: NodeSpec = obj
            .spec_as()
            .map_err(|e| IpamError::Corrupt { key: Kind::Node.key(None, node), message: e.to_string() })?;
        let current = current_address(&spec, kind);
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
        let text = addr.map(|a| a.to_string());
        self.resources()
            .modify(Kind::Node, None, node, false, |_, spec: &mut NodeSpec| {
                let field = match kind {
                    TunnelKind::Ipip => &mut spec.bgp.get_or_insert_with(Default::default).ipv4_ipip_tunnel_addr,
                    TunnelKind::Vxlan => &mut spec.ipv4_vxlan_tunnel_addr,
                    TunnelKind::VxlanV6 => &mut spec.ipv6_vxlan_tunnel_addr,
                };
                if *field == text {
                    return false;
                }
                *field = text.clone();
                true
            })
            .await
            .map(|_| ())
            .map_err(|e| match e {
                ResourceError::Store(StoreError::NotFound { .. }) => IpamError::NodeNotFound(node.to_string()),
                e => e.into(),
            })
    }
}
