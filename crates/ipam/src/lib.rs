//! Block-affinity IPAM the way Calico does it (reference §3): nodes own blocks of a pool,
//! allocate from them, claim new blocks when full, borrow from other nodes' blocks when allowed,
//! and release by handle — stored in Calico's etcd layout and JSON on any Datastore.

use std::net::IpAddr;

use gingham_store::StoreError;
use gingham_store::resources::ResourceError;

pub mod block;
pub mod check;
pub mod client;
pub mod model;
pub mod pools;
pub mod tunnel;
pub mod upgrade;

pub use client::{Assigned, AutoAssign, IpamClient, ReleaseGuard};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "no configured pools for node {node} ({family}): no enabled IPPool of that family selects it (check spec.nodeSelector, allowedUses and disabled)"
    )]
    NoPools { node: String, family: &'static str },
    #[error("the given pool ({pool}) does not exist, or is not enabled")]
    PoolNotFound { pool: String },
    #[error("pools exhausted: node {node} got only {got} of {wanted} {family} addresses from {}", pools.join(", "))]
    Exhausted { node: String, family: &'static str, wanted: usize, got: usize, pools: Vec<String> },
    #[error("block limit reached: node {node} already holds {limit} {family} blocks (maxBlocksPerHost) and they are full; got {got} of {wanted}{}",
        if *strict { "; strictAffinity forbids borrowing from other nodes" } else { " and no other node's block has room" })]
    BlockLimit { node: String, limit: u32, family: &'static str, wanted: usize, got: usize, strict: bool },
    #[error("{ip} is not in any enabled IPPool that allows this use")]
    NotInPool { ip: IpAddr },
    #[error("{ip} is already allocated (handle {handle})")]
    AlreadyAllocated { ip: IpAddr, handle: String },
    #[error("{ip} is in a block owned by {owner} and strictAffinity is on")]
    StrictAffinity { ip: IpAddr, owner: String },
    #[error("{ip} is held by handle {actual}, not {expected}: not released")]
    HandleMismatch { ip: IpAddr, expected: String, actual: String },
    #[error("{ip} was allocated at sequence number {actual:?}, not {expected}: it was reused, not released")]
    SequenceMismatch { ip: IpAddr, expected: u64, actual: Option<u64> },
    #[error("the IP pools, IPAM configuration or node labels kept changing while addresses were assigned")]
    ConfigChanged,
    #[error("gave up after repeated conflicting writes to {key}")]
    Contention { key: String },
    #[error("stored IPAM data at {key} is not readable: {message}")]
    Corrupt { key: String, message: String },
    #[error("node {0} does not exist")]
    NodeNotFound(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Resource(#[from] ResourceError),
}
