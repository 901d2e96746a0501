//! This node's dataplane: the pure, incremental calculation of what it should be ([`calc`]),
//! and one manager per kernel area that owns its objects and reconciles desired against actual
//! — routes from several sources ([`routes`]), the VXLAN device and its peers ([`vxlan`]),
//! NAT outgoing ([`nat`]), and the host side of local workloads ([`workloads`]). Managers take
//! changes as they come and re-apply their whole desired state from memory on a resync; none
//! of them reads the datastore.

pub mod calc;
pub mod nat;
pub mod policy;
pub mod routes;
pub mod vxlan;
pub mod workloads;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Kernel(#[from] gingham_kernel::KernelError),
    #[error("{0}")]
    Msg(String),
}
