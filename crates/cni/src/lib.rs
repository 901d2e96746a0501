pub mod proto;
pub mod spec;
