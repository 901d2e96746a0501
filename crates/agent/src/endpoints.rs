//! The endpoint service behind the CNI plugin: ADD wires a pod the way Calico does (veth with the
//! host end `cali…` here and `eth0` created directly in the pod's namespace, /32 addresses,
//! 169.254.1.1 as gateway, proxy ARP, a host route per address) and records the
//! WorkloadEndpoint; every failure undoes what was done. DEL and GC take it all back. Requests for
//! one attachment run one at a time; a repeated ADD returns what the first one built.
//!
//! The pod's network namespace arrives as an open file from the plugin: its path is never
//! resolved here, as it may name nothing in the agent's mount namespace.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use gingham_api::policy::WorkloadEndpointSpec;
use gingham_api::{Kind, Object, ObjectMeta};
use gingham_cni::proto::{Attachment, Endpoint};
use gingham_cni::spec::{
    CniError, CniResult, Interface, IpConfig, RouteConf, code, host_veth_name, host_veth_name_for_container,
    workload_endpoint_name,
};
use gingham_ipam::{AutoAssign, IpamClient};

use crate::model::LocalEndpoint;
use gingham_kernel::{KernelError, Netlink, Route, is_own_netns, sysctl};
use gingham_store::resources::{now_rfc3339, parse_rfc3339};
use gingham_store::{ResourceStore, StoreError};
use ipnet::IpNet;

/// The MAC of every host-side veth (so pods see one gateway MAC everywhere).
pub const HOST_MAC: [u8; 6] = [0xee; 6];
pub const GATEWAY_V4: &str = "169.254.1.1";
pub use gingham_dataplane::workloads::WORKLOAD_PROTO as WORKLOAD_ROUTE_PROTO;
/// Plugin-specific error: the interface name is already used in the pod's namespace.
pub const ERR_INTERFACE_EXISTS: u32 = 101;
/// The CNI network an endpoint belongs to (its IPAM handle is `<network>.<containerID>`).
pub const NETWORK_ANNOTATION: &str = "gingham.dev/network";
pub use gingham_ipam::model::INTERFACE_GONE_ANNOTATION;
/// How often the agent looks for endpoints whose interface is gone.
pub const ORPHAN_SCAN: Duration = Duration::from_secs(5);

/// The IPv6 link-local address derived (EUI-64) from the host veth MAC.
pub fn host_link_local() -> Ipv6Addr {
    let m = HOST_MAC;
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m[0] ^ 2, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

fn internal(msg: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::INTERNAL, msg).details(e.to_string())
}

fn kernel(msg: &str, e: KernelError) -> CniError {
    CniError::new(code::INTERNAL, msg).details(e.to_string())
}

pub struct EndpointService {
    pub node: String,
    pub ipam: IpamClient,
    pub resources: ResourceStore,
    pub host: Netlink,
    /// The routing side's numbers; its pod MTU is used when the network config gives none.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// One request per attachment (IPAM handle) at a time.
    locks: KeyedLocks,
    /// This node's endpoints, from the agent's cache.
    locals: tokio::sync::watch::Receiver<crate::model::Locals>,
    programmed: Option<tokio::sync::watch::Receiver<crate::model::Programmed>>,
    /// DELs done locally while the datastore was unreachable, their datastore part to follow.
    pending_dels: std::sync::Mutex<Vec<Endpoint>>,
    /// Where that queue is kept across restarts.
    pending_file: Option<std::path::PathBuf>,
    /// Host veths renamed out of the way by a DEL, being deleted in the background (the kernel
    /// holds an unregister for an RCU grace period), by the attachment's handle.
    teardowns: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

/// Names of host veths a DEL renamed out of the way: `gdl` and 12 hex digits (only we make them;
/// left over after a crash, the next start deletes them).
pub const TEARDOWN_PREFIX: &str = "gdl";

fn teardown_name() -> String {
    format!("{TEARDOWN_PREFIX}{:012x}", random_u64() & 0xffff_ffff_ffff)
}

/// 64 bits no two calls share: std's randomly keyed hasher over a counter and the clock.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default(),
    );
    h.finish()
}

/// Whether a link name is one of our teardown names.
pub fn is_teardown_name(name: &str) -> bool {
    name.strip_prefix(TEARDOWN_PREFIX).is_some_and(|h| h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

fn lock_teardowns<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failed DEL step, and whether the datastore was unreachable (rather than refusing).
struct Unreachable(bool, CniError);

/// How long an ADD waits for its endpoint's policy to be programmed.
pub const POLICY_WAIT: Duration = Duration::from_secs(10);

/// How long a DEL waits for the datastore before completing locally.
pub const DATASTORE_WAIT: Duration = Duration::from_secs(5);

/// Identity of an attachment in Calico's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub workload: String,
    pub orchestrator: &'static str,
    pub wep_name: String,
    pub host_veth: String,
    pub profile: String,
}

/// Calico's identity rule: a Kubernetes pod only when both namespace and pod name were given;
/// otherwise (podman, plain CNI callers) the workload is the container ID and the profile is the
/// network's name — the runtime's container name never enters the endpoint's name.
pub fn identity(node: &str, ep: &Endpoint) -> Identity {
    let prefix = if ep.interface_prefix.is_empty() { "cali" } else { ep.interface_prefix.as_str() };
    match (&ep.namespace, &ep.pod) {
        (Some(ns), Some(pod)) => Identity {
            wep_name: workload_endpoint_name(node, "k8s", pod, &ep.ifname),
            host_veth: host_veth_name(prefix, ns, pod),
            profile: format!("kns.{ns}"),
            namespace: ns.clone(),
            workload: pod.clone(),
            orchestrator: "k8s",
        },
        _ => Identity {
            wep_name: workload_endpoint_name(node, "cni", &ep.container_id, &ep.ifname),
            host_veth: host_veth_name_for_container(prefix, &ep.container_id),
            profile: ep.network.clone(),
            namespace: "default".into(),
            workload: ep.container_id.clone(),
            orchestrator: "cni",
        },
    }
}

/// Per-key async locks whose entries go away when nobody holds or waits for them.
#[derive(Default)]
struct KeyedLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    fn entry(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone()
    }
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let guard = self.entry(key).lock_owned().await;
        KeyGuard { locks: self, key: key.to_string(), guard: Some(guard) }
    }
    fn try_lock(&self, key: &str) -> Option<KeyGuard<'_>> {
        let guard = self.entry(key).try_lock_owned().ok()?;
        Some(KeyGuard { locks: self, key: key.to_string(), guard: Some(guard) })
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.key);
        }
    }
}

impl EndpointService {
    pub fn new(
        node: String,
        ipam: IpamClient,
        resources: ResourceStore,
        host: Netlink,
        metrics: Arc<crate::metrics::Metrics>,
        locals: tokio::sync::watch::Receiver<crate::model::Locals>,
        programmed: Option<tokio::sync::watch::Receiver<crate::model::Programmed>>,
    ) -> Self {
        EndpointService {
            node,
            ipam,
            resources,
            host,
            metrics,
            locks: KeyedLocks::default(),
            locals,
            programmed,
            pending_dels: Default::default(),
            pending_file: None,
            teardowns: Default::default(),
        }
    }

    /// Take a host veth away from its name at once and delete it in the background: a DEL
    /// returns without waiting for the kernel's unregister, and the next pod of the same name
    /// finds the name free. Falls back to deleting in place when it cannot be renamed.
    async fn tear_down(&self, handle: &str, iface: &str) -> Result<(), gingham_kernel::KernelError> {
        let trash = teardown_name();
        match self.host.rename_link(iface, &trash).await {
            Ok(true) => {
                let task = tokio::spawn(async move {
                    if let Err(e) = Netlink::delete_link_detached(&trash).await {
                        eprintln!("gingham node agent: deleting {trash} (a removed pod's veth): {e}");
                    }
                });
                let mut t = lock_teardowns(&self.teardowns);
                t.retain(|_, task| !task.is_finished());
                t.insert(handle.to_string(), task);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(_) => Netlink::delete_link_detached(iface).await.map(|_| ()),
        }
    }

    /// A teardown of this attachment still running: wait for it (an ADD into the same pod
    /// namespace needs its interface name back).
    async fn await_teardown(&self, handle: &str) {
        let task = lock_teardowns(&self.teardowns).remove(handle);
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Delete what a previous run left renamed for teardown (it died before finishing).
    pub async fn sweep_teardowns(&self) {
        let Ok(links) = self.host.links().await else { return };
        for l in links.into_iter().filter(|l| is_teardown_name(&l.name)) {
            let _ = Netlink::delete_link_detached(&l.name).await;
        }
    }

    fn identity(&self, ep: &Endpoint) -> Identity {
        identity(&self.node, ep)
    }

    /// The namespace's labels and annotations (None: no Namespace object).
    async fn namespace_meta(&self, ns: &str) -> Option<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        self.resources
            .get(Kind::Namespace, None, ns)
            .await
            .ok()
            .flatten()
            .map(|o| (o.metadata.labels, o.metadata.annotations))
    }

    fn assign_request(&self, ep: &Endpoint, id: &Identity, ns_labels: Option<BTreeMap<String, String>>) -> AutoAssign {
        let yes = |v: &Option<String>, default: bool| v.as_deref().map_or(default, |s| s == "true");
        let mut attrs =
            BTreeMap::from([("node".to_string(), self.node.clone()), ("timestamp".to_string(), now_rfc3339())]);
        attrs.insert("namespace".into(), id.namespace.clone());
        attrs.insert("pod".into(), id.workload.clone());
        AutoAssign {
            num_v4: usize::from(yes(&ep.ipam.assign_ipv4, true)),
            num_v6: usize::from(yes(&ep.ipam.assign_ipv6, false)),
            handle: ep.handle(),
            attrs,
            node: self.node.clone(),
            pools_v4: ep.ipam.ipv4_pools.clone(),
            pools_v6: ep.ipam.ipv6_pools.clone(),
            namespace_labels: ns_labels,
            ..Default::default()
        }
    }

    /// Addresses for this attachment: the requested ones exactly, or auto-assigned.
    /// `ipam_only`: for another plugin's interface (no endpoint will record the addresses).
    async fn assign(&self, ep: &Endpoint, id: &Identity, ipam_only: bool) -> Result<gingham_ipam::Assigned, CniError> {
        if !ep.assigned.is_empty() {
            let (v4, v6) = ep.assigned.iter().partition(|n| n.addr().is_ipv4());
            return Ok(gingham_ipam::Assigned { v4, v6 });
        }
        let (ns_labels, ns_annotations) = match self.namespace_meta(&id.namespace).await {
            Some((l, a)) => (Some(l), a),
            None => (None, BTreeMap::new()),
        };
        let mut req = self.assign_request(ep, id, ns_labels);
        if ipam_only {
            let (k, v) = gingham_ipam::model::NO_ENDPOINT_ATTR;
            req.attrs.insert(k.into(), v.into());
        }
        // Calico's annotations (the Pod's only where the datastore is the Kubernetes API).
        let pod_annotations = match (&ep.namespace, &ep.pod) {
            (Some(ns), Some(pod)) => self
                .ipam
                .datastore()
                .workload_annotations(ns, pod)
                .await
                .map_err(|e| internal("reading the pod's annotations failed", e))?
                .unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        let asked = crate::annotations::requested(&pod_annotations, &ns_annotations)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, e))?;
        if let Some(p) = asked.pools_v4 {
            req.pools_v4 = p;
        }
        if let Some(p) = asked.pools_v6 {
            req.pools_v6 = p;
        }
        let ips = if ep.requested_ips.is_empty() { asked.ips } else { ep.requested_ips.clone() };
        if ips.is_empty() {
            return self.ipam.auto_assign(&req).await.map_err(|e| internal("IP address assignment failed", e));
        }
        self.ipam.assign_ips(&ips, &req.handle, &req.attrs, &self.node).await.map_err(|e| {
            CniError::new(code::INTERNAL, "the requested IP address cannot be assigned").details(e.to_string())
        })
    }

    /// IPAM only: addresses for another plugin's interface.
    pub async fn ipam_add(&self, ep: &Endpoint) -> Result<CniResult, CniError> {
        let _serial = self.locks.lock(&ep.handle()).await;
        let id = self.identity(ep);
        self.ipam
            .release_by_handle(&ep.handle())
            .await
            .map_err(|e| internal("releasing an earlier attempt's addresses failed", e))?;
        let got = self.assign(ep, &id, true).await?;
        // Main plugins such as ptp put the gateway on their host end: give them Calico's
        // link-local gateway so every pod sees the same one.
        let gateway = |n: &IpNet| {
            Some(if n.addr().is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 1, 1))
            } else {
                IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))
            })
        };
        let ips = got
            .v4
            .iter()
            .chain(&got.v6)
            .map(|n| IpConfig { address: *n, gateway: gateway(n), interface: None })
            .collect();
        Ok(CniResult { ips, ..Default::default() })
    }

    /// This node's Kubernetes podCIDRs (Calico Node `status.podCIDRs`), for host-local.
    pub async fn pod_cidrs(&self) -> Result<Vec<IpNet>, CniError> {
        let node = self.resources.get(Kind::Node, None, &self.node).await.map_err(|e| {
            CniError::new(code::TRY_AGAIN_LATER, "reading this node's Node failed").details(e.to_string())
        })?;
        let cidrs = node.as_ref().map(crate::cache::pod_cidrs_of).unwrap_or_default();
        if cidrs.is_empty() {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!("node {} has no podCIDR yet (ipam.subnet usePodCidr)", self.node),
            )
            .details(
                "Kubernetes assigns Node.spec.podCIDRs when the controller manager runs with --allocate-node-cidrs",
            ));
        }
        Ok(cidrs)
    }

    pub async fn ipam_del(&self, ep: &Endpoint) -> Result<(), CniError> {
        let _serial = self.locks.lock(&ep.handle()).await;
        self.ipam.release_by_handle(&ep.handle()).await.map_err(|e| internal("releasing addresses failed", e))?;
        Ok(())
    }

    pub async fn add(&self, ep: &Endpoint, ns_file: File) -> Result<CniResult, CniError> {
        let _serial = self.locks.lock(&ep.handle()).await;
        self.await_teardown(&ep.handle()).await;
        let id = self.identity(ep);
        if is_own_netns(&ns_file).map_err(|e| kernel("cannot read the pod's network namespace", e))? {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_NETNS {} is the node's own network namespace, not a pod's", ep.netns),
            ));
        }
        let pod = Netlink::in_namespace_file(&ns_file)
            .map_err(|e| kernel(&format!("cannot enter the pod's network namespace {}", ep.netns), e))?;
        if pod.link(&ep.ifname).await.map_err(|e| kernel("reading the pod's interfaces failed", e))?.is_some() {
            // The same ADD again (a runtime retrying): what the first one built is the answer.
            if let Some(r) = self.existing(ep, &id, &ns_file).await {
                return Ok(r);
            }
            return Err(CniError::new(
                ERR_INTERFACE_EXISTS,
                format!("interface {} already exists in network namespace {}", ep.ifname, ep.netns),
            ));
        }
        // Leftovers of an earlier attempt for this container (crash, SIGKILL) go first.
        self.ipam
            .release_by_handle(&ep.handle())
            .await
            .map_err(|e| internal("releasing an earlier attempt's addresses failed", e))?;
        let mut undo = Undo::default();
        match self.add_steps(ep, &id, &ns_file, &pod, &mut undo).await {
            Ok(r) => Ok(r),
            Err(e) => {
                undo.run(self, ep, &id).await;
                Err(e)
            }
        }
    }

    /// The kernel's part (veth pair, then addresses, routes, sysctls) runs in a task of its own
    /// beside the datastore's (IPAM, then the endpoint record and the wait for its policy): the
    /// pair is made while addresses are assigned, and the pod's addresses go on while its
    /// policy is programmed (its interface drops everything until then). The pod's MAC is
    /// chosen here, so the record needs nothing from the kernel.
    async fn add_steps(
        &self,
        ep: &Endpoint,
        id: &Identity,
        ns_file: &File,
        pod: &Netlink,
        undo: &mut Undo,
    ) -> Result<CniResult, CniError> {
        crate::steps::mark("lock and checks");
        let published = self.metrics.pod_mtu.load(std::sync::atomic::Ordering::Relaxed);
        let mtu = match (ep.mtu, published) {
            (0, 0) => 1500,
            (0, m) => m,
            (m, _) => m,
        };
        let plumbing = Plumbing {
            host: self.host.clone(),
            pod: pod.clone(),
            ns: ns_file.try_clone().map_err(|e| internal("cannot pass on the pod's network namespace", e))?,
            ifname: ep.ifname.clone(),
            host_veth: id.host_veth.clone(),
            mtu,
            mac: pod_mac(),
        };
        let mac = plumbing.mac;
        let (ips_tx, ips_rx) = tokio::sync::oneshot::channel();
        undo.veth = true;
        undo.ipam = true;
        let kernel = tokio::spawn(plumbing.run(ips_rx));
        // Whatever the datastore's part gives, the kernel's is awaited before anything is
        // undone (its task drops its work when the addresses never come).
        let recorded = self.record(ep, id, mac, ips_tx, undo).await;
        let plumbed = kernel.await.map_err(|e| internal("the kernel part of ADD failed", e)).and_then(|r| r);
        // A datastore error comes first (the kernel's part then only saw no addresses come).
        let ips = recorded?;
        let (host_link, pod_link, kernel_steps) = plumbed?;
        let ips =
            ips.ok_or_else(|| CniError::new(code::INTERNAL, "the kernel part of ADD ended without its addresses"))?;
        for (name, us) in kernel_steps {
            crate::steps::alongside(name, us);
        }
        crate::steps::mark("rest of the kernel part");
        Ok(result_for(ep, id, &host_link, &pod_link, &ips))
    }

    /// The datastore's part of an ADD: addresses assigned (and handed to the kernel's part),
    /// the endpoint recorded, its policy in place; the addresses — None when the kernel's part
    /// had already failed (nothing more is written; its error tells why).
    async fn record(
        &self,
        ep: &Endpoint,
        id: &Identity,
        mac: [u8; 6],
        ips_tx: tokio::sync::oneshot::Sender<gingham_ipam::Assigned>,
        undo: &mut Undo,
    ) -> Result<Option<Vec<IpNet>>, CniError> {
        let got = self.assign(ep, id, false).await?;
        crate::steps::mark("IPAM");
        if ips_tx.send(got.clone()).is_err() {
            return Ok(None);
        }
        undo.wep = true;
        self.write_endpoint(ep, id, &got, &Some(mac)).await?;
        crate::steps::mark("endpoint write");
        let ips: Vec<IpNet> = got.v4.iter().chain(&got.v6).copied().collect();
        self.policy_in_place(&id.host_veth, &ips).await?;
        crate::steps::mark("policy in place");
        Ok(Some(ips))
    }

    /// Wait until this node's agent has the endpoint's policy in the kernel, built for these
    /// addresses (until then its interface drops everything): the pod's first packet meets
    /// its rules, never a gap.
    async fn policy_in_place(&self, iface: &str, ips: &[IpNet]) -> Result<(), CniError> {
        let Some(mut rx) = self.programmed.clone() else { return Ok(()) };
        let mut want: Vec<IpNet> = ips.iter().map(|n| IpNet::new(n.addr(), n.max_prefix_len()).unwrap_or(*n)).collect();
        want.sort();
        let ready = |p: &crate::model::Programmed| {
            p.get(iface).is_some_and(|have| {
                let mut have = have.clone();
                have.sort();
                have == want
            })
        };
        match tokio::time::timeout(POLICY_WAIT, rx.wait_for(ready)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!("the policy of {iface} was not programmed within {} s", POLICY_WAIT.as_secs()),
            )),
        }
    }

    /// The result of an earlier ADD of this very attachment, if it is whole (its endpoint
    /// record, interfaces, addresses and routes all in place).
    async fn existing(&self, ep: &Endpoint, id: &Identity, ns: &File) -> Option<CniResult> {
        self.check_inner(ep, id, None, ns).await.ok()?;
        let wep = self.resources.get(Kind::WorkloadEndpoint, Some(&id.namespace), &id.wep_name).await.ok()??;
        let ips: Vec<IpNet> =
            wep.spec["ipNetworks"].as_array()?.iter().filter_map(|v| v.as_str()?.parse().ok()).collect();
        let host_link = self.host.link(&id.host_veth).await.ok()??;
        let pod = Netlink::in_namespace_file(ns).ok()?;
        let pod_link = pod.link(&ep.ifname).await.ok()??;
        Some(result_for(ep, id, &host_link, &pod_link, &ips))
    }

    async fn write_endpoint(
        &self,
        ep: &Endpoint,
        id: &Identity,
        got: &gingham_ipam::Assigned,
        mac: &Option<[u8; 6]>,
    ) -> Result<(), CniError> {
        let mut labels = ep.labels.clone();
        labels.insert("projectcalico.org/namespace".into(), id.namespace.clone());
        labels.insert("projectcalico.org/orchestrator".into(), id.orchestrator.into());
        let mut profiles = vec![id.profile.clone()];
        if let Some(sa) = &ep.service_account {
            labels.insert("projectcalico.org/serviceaccount".into(), sa.clone());
            profiles.push(format!("ksa.{}.{sa}", id.namespace));
        }
        let ports: Vec<gingham_api::policy::EndpointPort> = ep
            .named_ports
            .iter()
            .filter_map(|p| {
                Some(gingham_api::policy::EndpointPort {
                    name: p.name.clone(),
                    protocol: serde_json::from_value(serde_json::Value::String(p.protocol.clone())).ok()?,
                    port: p.port.into(),
                    ..Default::default()
                })
            })
            .collect();
        let spec = WorkloadEndpointSpec {
            orchestrator: Some(id.orchestrator.into()),
            workload: Some(id.workload.clone()),
            node: Some(self.node.clone()),
            container_id: Some(ep.container_id.clone()),
            pod: (id.orchestrator == "k8s").then(|| id.workload.clone()),
            endpoint: Some(ep.ifname.clone()),
            ip_networks: Some(
                got.v4
                    .iter()
                    .chain(&got.v6)
                    .map(|n| IpNet::new(n.addr(), n.max_prefix_len()).unwrap_or(*n).to_string())
                    .collect(),
            ),
            profiles: Some(profiles),
            service_account_name: ep.service_account.clone(),
            ports: (!ports.is_empty()).then_some(ports),
            interface_name: Some(id.host_veth.clone()),
            mac: mac.map(|m| format_mac(Some(m))),
            ..Default::default()
        };
        let obj = Object {
            api_version: Kind::WorkloadEndpoint.api_version().into(),
            kind: Kind::WorkloadEndpoint.kind_name().into(),
            metadata: ObjectMeta {
                name: id.wep_name.clone(),
                namespace: Some(id.namespace.clone()),
                labels,
                annotations: [(NETWORK_ANNOTATION.to_string(), ep.network.clone())].into(),
                ..Default::default()
            },
            spec: serde_json::to_value(&spec).map_err(|e| internal("encoding the endpoint failed", e))?,
            status: None,
        };
        let value = serde_json::to_value(&obj).map_err(|e| internal("encoding the endpoint failed", e))?;
        let obj = Kind::WorkloadEndpoint.normalize(&value).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "the workload endpoint is not valid")
                .details(e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })?;
        self.resources.apply(obj).await.map_err(|e| internal("recording the workload endpoint failed", e))?;
        Ok(())
    }

    /// Remove everything of this attachment; succeeds when it is already gone. With the
    /// datastore unreachable (or too slow) the DEL is completed locally — the veth goes, unless
    /// the cache says a newer container owns the name — and its datastore part is queued and
    /// retried until the datastore answers.
    pub async fn del(&self, ep: &Endpoint) -> Result<(), CniError> {
        let _serial = self.locks.lock(&ep.handle()).await;
        let id = self.identity(ep);
        match tokio::time::timeout(DATASTORE_WAIT, self.del_recorded(ep, &id, true)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(Unreachable(false, e))) => return Err(e),
            Ok(Err(Unreachable(true, _))) | Err(_) => {}
        }
        let theirs = self.locals.borrow().iter().any(|w| {
            w.namespace == id.namespace
                && w.name == id.wep_name
                && w.container_id.as_deref().is_some_and(|c| c != ep.container_id)
        });
        if !theirs {
            Netlink::delete_link_detached(&id.host_veth).await.map_err(|e| kernel("removing the veth failed", e))?;
        }
        let mut q = self.pending_dels.lock().unwrap_or_else(|p| p.into_inner());
        if !q.iter().any(|p| p.handle() == ep.handle()) {
            q.push(ep.clone());
        }
        self.save_pending(&q);
        Ok(())
    }

    /// Keep the queue of locally completed DELs on disk, so an agent restart resumes them.
    fn save_pending(&self, q: &[Endpoint]) {
        self.metrics.pending_dels.store(q.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let Some(path) = &self.pending_file else { return };
        let written = if q.is_empty() {
            gingham_files::remove_file_if_regular(path).map(|_| ())
        } else {
            gingham_files::write_atomic(path, &serde_json::to_vec(q).unwrap_or_default(), 0o600)
        };
        if let Err(e) = written {
            self.metrics.record_error(format!("saving pending DELs: {e}"));
        }
    }

    /// Resume the DELs a previous run of the agent completed locally.
    pub fn load_pending(&mut self, path: std::path::PathBuf) {
        if let Ok(text) = std::fs::read(&path) {
            match serde_json::from_slice::<Vec<Endpoint>>(&text) {
                Ok(q) => *self.pending_dels.get_mut().unwrap_or_else(|p| p.into_inner()) = q,
                Err(e) => self.metrics.record_error(format!("{}: unreadable, ignored: {e}", path.display())),
            }
        }
        self.pending_file = Some(path);
    }

    /// DEL's datastore part (and the veth, when `veth`): release, then the endpoint if it is
    /// still this container's. The error says whether the datastore was unreachable.
    async fn del_recorded(&self, ep: &Endpoint, id: &Identity, veth: bool) -> Result<(), Unreachable> {
        use gingham_store::resources::ResourceError as R;
        let store_down = |e: &R| matches!(e, R::Store(StoreError::Unavailable(_)));
        let unreachable = |what: &str, e: &R| Unreachable(store_down(e), internal(what, e));
        self.ipam.release_by_handle(&ep.handle()).await.map_err(|e| {
            let down = match &e {
                gingham_ipam::IpamError::Store(StoreError::Unavailable(_)) => true,
                gingham_ipam::IpamError::Resource(r) => store_down(r),
                _ => false,
            };
            Unreachable(down, internal("releasing addresses failed", e))
        })?;
        crate::steps::mark("IPAM release");
        // The endpoint (and its veth) only if it still belongs to this container: a newer pod
        // of the same name may have replaced it.
        let wep = self
            .resources
            .get(Kind::WorkloadEndpoint, Some(&id.namespace), &id.wep_name)
            .await
            .map_err(|e| unreachable("reading the endpoint failed", &e))?;
        let ours = wep.as_ref().is_none_or(|w| w.spec["containerID"].as_str() == Some(ep.container_id.as_str()));
        crate::steps::mark("endpoint read");
        if ours {
            if veth {
                self.tear_down(&ep.handle(), &id.host_veth)
                    .await
                    .map_err(|e| Unreachable(false, kernel("removing the veth failed", e)))?;
                crate::steps::mark("veth out of the way");
            }
            if let Some(w) = wep {
                let rv = w.metadata.resource_version.as_deref().and_then(|r| r.parse().ok());
                match self.resources.delete(Kind::WorkloadEndpoint, Some(&id.namespace), &id.wep_name, rv).await {
                    Ok(_) | Err(gingham_store::resources::ResourceError::Store(StoreError::NotFound { .. })) => {}
                    Err(e) => return Err(unreachable("removing the endpoint failed", &e)),
                }
                crate::steps::mark("endpoint delete");
            }
        }
        Ok(())
    }

    /// Finish the DELs that were completed locally while the datastore was unreachable.
    pub async fn retry_pending_dels(&self) {
        let queued: Vec<Endpoint> = self.pending_dels.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ep in queued {
            let Some(_serial) = self.locks.try_lock(&ep.handle()) else { continue };
            let id = self.identity(&ep);
            let done =
                matches!(tokio::time::timeout(DATASTORE_WAIT, self.del_recorded(&ep, &id, false)).await, Ok(Ok(())));
            if done {
                let mut q = self.pending_dels.lock().unwrap_or_else(|p| p.into_inner());
                q.retain(|p| p.handle() != ep.handle());
                self.save_pending(&q);
            }
        }
    }

    /// A real check: the endpoint, both interfaces, the addresses and routes are as recorded.
    pub async fn check(&self, ep: &Endpoint, prev: Option<&CniResult>, ns: File) -> Result<(), CniError> {
        let _serial = self.locks.lock(&ep.handle()).await;
        let id = self.identity(ep);
        self.check_inner(ep, &id, prev, &ns).await
    }

    async fn check_inner(
        &self,
        ep: &Endpoint,
        id: &Identity,
        prev: Option<&CniResult>,
        ns: &File,
    ) -> Result<(), CniError> {
        let fail = |m: String| Err(CniError::new(code::INTERNAL, m));
        let Some(wep) = self
            .resources
            .get(Kind::WorkloadEndpoint, Some(&id.namespace), &id.wep_name)
            .await
            .map_err(|e| internal("reading the endpoint failed", e))?
        else {
            return fail(format!("workload endpoint {}/{} does not exist", id.namespace, id.wep_name));
        };
        if wep.spec["containerID"].as_str() != Some(ep.container_id.as_str()) {
            return fail(format!("workload endpoint {} belongs to container {}", id.wep_name, wep.spec["containerID"]));
        }
        let Some(host_link) =
            self.host.link(&id.host_veth).await.map_err(|e| kernel("reading interfaces failed", e))?
        else {
            return fail(format!("host interface {} is missing", id.host_veth));
        };
        let pod = Netlink::in_namespace_file(ns).map_err(|e| {
            CniError::new(code::UNKNOWN_CONTAINER, "cannot enter the pod's network namespace").details(e.to_string())
        })?;
        let Some(pod_link) = pod.link(&ep.ifname).await.map_err(|e| kernel("reading interfaces failed", e))? else {
            return fail(format!("interface {} is missing in {}", ep.ifname, ep.netns));
        };
        let have = pod.addresses(pod_link.index).await.map_err(|e| kernel("reading addresses failed", e))?;
        let recorded: Vec<IpNet> =
            wep.spec["ipNetworks"].as_array().into_iter().flatten().filter_map(|v| v.as_str()?.parse().ok()).collect();
        for want in recorded.iter().chain(prev.into_iter().flat_map(|p| p.ips.iter().map(|i| &i.address))) {
            if !have.iter().any(|h| h.addr() == want.addr()) {
                return fail(format!("address {want} is missing from {} in {}", ep.ifname, ep.netns));
            }
        }
        let host_routes = self.host.routes(true).await.map_err(|e| kernel("reading routes failed", e))?;
        let mut host_routes6 = self.host.routes(false).await.map_err(|e| kernel("reading routes failed", e))?;
        host_routes6.extend(host_routes);
        for want in &recorded {
            if !host_routes6.iter().any(|r| {
                r.dst.addr() == want.addr()
                    && r.dst.prefix_len() == want.max_prefix_len()
                    && r.oif == Some(host_link.index)
            }) {
                return fail(format!("host route to {} via {} is missing", want.addr(), id.host_veth));
            }
        }
        if recorded.iter().any(|n| n.addr().is_ipv4()) {
            let pod_routes = pod.routes(true).await.map_err(|e| kernel("reading routes failed", e))?;
            if !pod_routes.iter().any(|r| r.dst.prefix_len() == 0 && r.gateway == GATEWAY_V4.parse().ok()) {
                return fail(format!("the default route via {GATEWAY_V4} is missing in {}", ep.netns));
            }
        }
        Ok(())
    }

    /// Release what this node holds for `network` that no valid attachment accounts for: its
    /// handles, and its endpoints on this node with their veths. Other networks are untouched.
    pub async fn gc(&self, network: &str, valid: &[Attachment]) -> Result<(), CniError> {
        let keep: std::collections::BTreeSet<String> =
            valid.iter().map(|a| format!("{network}.{}", a.container_id)).collect();
        let prefix = format!("{network}.");
        let handles = self
            .ipam
            .datastore()
            .list("/calico/ipam/v2/handle/")
            .await
            .map_err(|e| internal("listing handles failed", e))?;
        for kv in handles.items {
            let id = kv.key.trim_start_matches("/calico/ipam/v2/handle/").to_string();
            if !id.starts_with(&prefix) || keep.contains(&id) {
                continue;
            }
            // Only this node's allocations: another node's pods are its own GC's business.
            let ours = self.ipam.handle_nodes(&id).await.map_err(|e| internal("reading a handle failed", e))?;
            if !ours.iter().any(|n| n == &self.node) {
                continue;
            }
            let _serial = self.locks.lock(&id).await;
            self.ipam.release_by_handle(&id).await.map_err(|e| internal("releasing a stale handle failed", e))?;
        }
        for w in self.locals() {
            let Some(cid) = w.container_id.as_deref() else { continue };
            let handle = format!("{network}.{cid}");
            if keep.contains(&handle) || self.endpoint_network(&w).await.as_deref() != Some(network) {
                continue;
            }
            let _serial = self.locks.lock(&handle).await;
            if let Some(ifn) = &w.interface {
                Netlink::delete_link_detached(ifn).await.map_err(|e| kernel("removing a stale veth failed", e))?;
            }
            let _ = self.resources.delete(Kind::WorkloadEndpoint, Some(&w.namespace), &w.name, Some(w.revision)).await;
        }
        Ok(())
    }

    /// This node's endpoints, as the agent's cache last saw them.
    fn locals(&self) -> Vec<LocalEndpoint> {
        self.locals.borrow().to_vec()
    }

    /// The CNI network an endpoint was attached through: recorded on it by gingham, else read
    /// from the handle holding its first address.
    async fn endpoint_network(&self, w: &LocalEndpoint) -> Option<String> {
        if let Some(n) = &w.network {
            return Some(n.clone());
        }
        let cid = w.container_id.as_deref()?;
        let (handle, _) = self.ipam.holder(w.ips.first()?.addr()).await.ok()??;
        handle.strip_suffix(&format!(".{cid}")).map(str::to_string)
    }

    /// Endpoints whose host interface disappeared without a DEL (the agent was down, or the
    /// runtime forgot): marked on the endpoint at once, so `gingham ipam check` anywhere sees
    /// them, and released after `grace`. Runs forever, woken when a workload interface goes and
    /// every few seconds.
    pub async fn sweep_orphans(self: Arc<Self>, grace: Duration, wake: Arc<tokio::sync::Notify>) {
        loop {
            self.retry_pending_dels().await;
            if let Err(e) = self.sweep_once(grace).await {
                self.metrics.record_error(format!("orphaned endpoint sweep: {e}"));
            }
            let _ = tokio::time::timeout(ORPHAN_SCAN, wake.notified()).await;
        }
    }

    /// One pass of the orphan sweep; returns the endpoints it released.
    pub async fn sweep_once(&self, grace: Duration) -> Result<Vec<String>, CniError> {
        let now = parse_rfc3339(&now_rfc3339()).unwrap_or_default();
        let mut released = Vec::new();
        let mut pending = 0;
        for w in self.locals() {
            let (Some(ifn), Some(cid)) = (w.interface.clone(), w.container_id.clone()) else { continue };
            let link = |ifn| async move {
                self.host.link(ifn).await.map_err(|e| kernel("reading interfaces failed", e)).map(|l| l.is_some())
            };
            // The common case, an endpoint with its interface and no mark, costs one link lookup.
            if w.gone_since.is_none() && link(&ifn).await? {
                continue;
            }
            let Some(network) = self.endpoint_network(&w).await else { continue };
            let handle = format!("{network}.{cid}");
            // An ADD or DEL of this attachment is under way: it decides, not the sweep.
            let Some(_serial) = self.locks.try_lock(&handle) else { continue };
            let present = link(&ifn).await?;
            match (present, &w.gone_since) {
                (true, None) => {}
                (true, Some(_)) => self.mark_gone(&w, None).await,
                (false, None) => {
                    pending += 1;
                    self.mark_gone(&w, Some(now_rfc3339())).await
                }
                (false, Some(t)) if now - parse_rfc3339(t).unwrap_or(now) < grace.as_secs() as i64 => pending += 1,
                (false, Some(_)) => {
                    // Only the very version we saw: a newer one (a new ADD) is not an orphan.
                    let current = self
                        .resources
                        .get(Kind::WorkloadEndpoint, Some(&w.namespace), &w.name)
                        .await
                        .map_err(|e| internal("reading the endpoint failed", e))?;
                    if current.and_then(|c| c.metadata.resource_version) != Some(w.revision.to_string()) {
                        continue;
                    }
                    self.ipam
                        .release_by_handle(&handle)
                        .await
                        .map_err(|e| internal("releasing addresses failed", e))?;
                    if self
                        .resources
                        .delete(Kind::WorkloadEndpoint, Some(&w.namespace), &w.name, Some(w.revision))
                        .await
                        .is_ok()
                    {
                        self.metrics.orphans_released.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        released.push(w.name.clone());
                    }
                }
            }
        }
        self.metrics.orphans_pending.store(pending, std::sync::atomic::Ordering::Relaxed);
        Ok(released)
    }

    /// Set (Some) or clear (None) the interface-gone mark, only on the version we saw.
    async fn mark_gone(&self, w: &LocalEndpoint, since: Option<String>) {
        let Ok(Some(mut obj)) = self.resources.get(Kind::WorkloadEndpoint, Some(&w.namespace), &w.name).await else {
            return;
        };
        if obj.metadata.resource_version != Some(w.revision.to_string()) {
            return;
        }
        match since {
            Some(t) => obj.metadata.annotations.insert(INTERFACE_GONE_ANNOTATION.into(), t),
            None => obj.metadata.annotations.remove(INTERFACE_GONE_ANNOTATION),
        };
        let _ = self.resources.update(obj).await;
    }
}

fn format_mac(m: Option<[u8; 6]>) -> String {
    m.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")).unwrap_or_default()
}

/// The CNI result of a wired attachment: host end, pod end, the /32 (/128) addresses on the pod
/// end, and a default route per family.
fn result_for(
    ep: &Endpoint,
    id: &Identity,
    host: &gingham_kernel::Link,
    pod: &gingham_kernel::Link,
    ips: &[IpNet],
) -> CniResult {
    let mut routes = Vec::new();
    if ips.iter().any(|n| n.addr().is_ipv4()) {
        routes.push(RouteConf { dst: IpNet::V4(ipnet::Ipv4Net::default()), gw: None });
    }
    if ips.iter().any(|n| n.addr().is_ipv6()) {
        routes.push(RouteConf { dst: IpNet::V6(ipnet::Ipv6Net::default()), gw: None });
    }
    let iface = |name: &str, l: &gingham_kernel::Link, sandbox: &str| Interface {
        name: name.to_string(),
        mac: format_mac(l.mac),
        mtu: Some(l.mtu),
        sandbox: sandbox.to_string(),
    };
    CniResult {
        interfaces: vec![iface(&id.host_veth, host, ""), iface(&ep.ifname, pod, &ep.netns)],
        ips: ips
            .iter()
            .map(|n| IpConfig {
                address: IpNet::new(n.addr(), n.max_prefix_len()).unwrap_or(*n),
                gateway: None,
                interface: Some(1),
            })
            .collect(),
        routes,
        dns: Default::default(),
    }
}

/// A pod's MAC: random, unicast, locally administered (as the kernel picks one).
fn pod_mac() -> [u8; 6] {
    let b = random_u64().to_be_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// What the kernel's part of an ADD needs, owned (it runs in a task of its own).
struct Plumbing {
    host: Netlink,
    pod: Netlink,
    ns: File,
    ifname: String,
    host_veth: String,
    mtu: u32,
    mac: [u8; 6],
}

/// Steps of the kernel's part, timed in its task: (name, µs).
type KernelSteps = Vec<(&'static str, u64)>;

impl Plumbing {
    /// The veth pair, then — once IPAM's addresses arrive on `ips` — addresses, routes and
    /// sysctls on both ends; the two links. Ends at once, with an error, if they never come.
    async fn run(
        self,
        ips: tokio::sync::oneshot::Receiver<gingham_ipam::Assigned>,
    ) -> Result<(gingham_kernel::Link, gingham_kernel::Link, KernelSteps), CniError> {
        let t = std::time::Instant::now();
        // A stale host end with this name (an earlier pod of the same name) is replaced.
        self.host
            .delete_link(&self.host_veth)
            .await
            .map_err(|e| kernel("removing a stale host interface failed", e))?;
        self.host
            .add_veth_with_macs(&self.host_veth, &self.ifname, &self.ns, self.mtu, Some(HOST_MAC), Some(self.mac))
            .await
            .map_err(|e| kernel("creating the veth pair failed", e))?;
        let host_link = self
            .host
            .link(&self.host_veth)
            .await
            .map_err(|e| kernel("reading the host interface failed", e))?
            .ok_or_else(|| CniError::new(code::INTERNAL, "the host interface vanished"))?;
        let pod_link = self
            .pod
            .link(&self.ifname)
            .await
            .map_err(|e| kernel("reading the pod interface failed", e))?
            .ok_or_else(|| CniError::new(code::INTERNAL, "the pod interface vanished"))?;
        let veth_us = t.elapsed().as_micros() as u64;
        let got = ips.await.map_err(|_| CniError::new(code::INTERNAL, "no addresses were assigned"))?;
        let t = std::time::Instant::now();
        self.addresses(&got, &host_link, &pod_link).await?;
        let steps = vec![("veth", veth_us), ("addresses, routes, sysctls", t.elapsed().as_micros() as u64)];
        Ok((host_link, pod_link, steps))
    }

    async fn addresses(
        &self,
        got: &gingham_ipam::Assigned,
        host_link: &gingham_kernel::Link,
        pod_link: &gingham_kernel::Link,
    ) -> Result<(), CniError> {
        let (host, pod) = (&self.host, &self.pod);
        let has_v6 = !got.v6.is_empty();
        // Host side: proxy ARP/NDP answers for the gateway; no delay on the first packet.
        for (key, value) in gingham_dataplane::workloads::host_sysctls(&self.host_veth, has_v6) {
            sysctl::write(&key, value).map_err(|e| kernel("setting a host interface sysctl failed", e))?;
        }
        if has_v6 {
            let ifn = self.ifname.clone();
            sysctl::write_in_file(
                &self.ns,
                vec![
                    (vec!["net".into(), "ipv6".into(), "conf".into(), ifn.clone(), "accept_dad".into()], "0".into()),
                    (vec!["net".into(), "ipv6".into(), "conf".into(), ifn, "disable_ipv6".into()], "0".into()),
                ],
            )
            .map_err(|e| kernel("setting a pod interface sysctl failed", e))?;
        }
        // Pod side: /32 (/128) addresses, the link-local gateway, default routes.
        for n in got.v4.iter().chain(&got.v6) {
            let host_net = IpNet::new(n.addr(), n.max_prefix_len()).unwrap_or(*n);
            pod.add_address(pod_link.index, host_net).await.map_err(|e| kernel("adding the pod address failed", e))?;
        }
        pod.set_up(pod_link.index).await.map_err(|e| kernel("bringing the pod interface up failed", e))?;
        host.set_up(host_link.index).await.map_err(|e| kernel("bringing the host interface up failed", e))?;
        let gw4: IpAddr = GATEWAY_V4.parse().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 1, 1)));
        if !got.v4.is_empty() {
            pod.replace_route(&Route::device(
                IpNet::new(gw4, 32).unwrap_or_default(),
                pod_link.index,
                WORKLOAD_ROUTE_PROTO,
            ))
            .await
            .map_err(|e| kernel("adding the gateway route failed", e))?;
            pod.replace_route(&Route::via(
                IpNet::V4(ipnet::Ipv4Net::default()),
                gw4,
                pod_link.index,
                WORKLOAD_ROUTE_PROTO,
            ))
            .await
            .map_err(|e| kernel("adding the default route failed", e))?;
        }
        if has_v6 {
            let gw6 = IpAddr::V6(host_link_local());
            pod.replace_route(&Route::via(
                IpNet::V6(ipnet::Ipv6Net::default()),
                gw6,
                pod_link.index,
                WORKLOAD_ROUTE_PROTO,
            ))
            .await
            .map_err(|e| kernel("adding the IPv6 default route failed", e))?;
        }
        // Host routes to each pod address through its veth.
        for n in got.v4.iter().chain(&got.v6) {
            let dst = IpNet::new(n.addr(), n.max_prefix_len()).unwrap_or(*n);
            host.replace_route(&Route::device(dst, host_link.index, WORKLOAD_ROUTE_PROTO))
                .await
                .map_err(|e| kernel("adding the host route failed", e))?;
        }
        Ok(())
    }
}

/// What an ADD has done so far, to take back if a later step fails.
#[derive(Default)]
struct Undo {
    ipam: bool,
    veth: bool,
    wep: bool,
}

impl Undo {
    async fn run(&self, svc: &EndpointService, ep: &Endpoint, id: &Identity) {
        if self.wep {
            let _ = svc.resources.delete(Kind::WorkloadEndpoint, Some(&id.namespace), &id.wep_name, None).await;
        }
        if self.veth {
            let _ = Netlink::delete_link_detached(&id.host_veth).await;
        }
        if self.ipam {
            let _ = svc.ipam.release_by_handle(&ep.handle()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn link_local_of_the_host_mac() {
        assert_eq!(super::host_link_local().to_string(), "fe80::ecee:eeff:feee:eeee");
    }
}
