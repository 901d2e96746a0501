//! gingham's BGP speaker.
//!
//! Laid out like holo-bgp: `packet` is the wire codec, `fsm` the RFC 4271 neighbour state
//! machine (sans-I/O: events in, actions out), `rib` the Adj-RIBs-In, Loc-RIB and best-path
//! selection with route reflection. Nothing here touches the kernel or the datastore: peer
//! configurations and local routes come in, route updates go out as values.

pub mod filter;
pub mod fsm;
pub mod packet;
pub mod rib;
pub mod tasks;
