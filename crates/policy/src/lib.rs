//! Network policy, pure: Calico's policy kinds and Kubernetes NetworkPolicy compiled once into a
//! typed rule model (`rules.rs`, `knp.rs`), an incremental index of which endpoints each
//! selector matches (`index.rs`), the ordered policies and profiles of each local endpoint
//! (`engine.rs`), and the verdict a packet gets from all of it (`trace.rs` — what
//! `gingham policy trace` prints and what the tests compare the kernel's behaviour with).
//! Nothing here touches the kernel or the datastore.

pub mod engine;
pub mod index;
pub mod knp;
pub mod labels;
pub mod load;
pub mod rules;
pub mod trace;

pub use engine::{EndpointPlan, Engine, Item, ItemKey, PolicyKey};
pub use rules::{Action, Entity, Icmp, Policy, Port, Profile, Rule};
