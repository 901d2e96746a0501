//! The dataplane: what this node's kernel should look like, and the managers that make it so.

pub mod apply;
pub mod calc;
