//! Per-workload consistency (DESIGN.md section 5): what a replica's state endpoint is backed
//! by.
//!
//! - `eventual` workloads: a CRDT map of last-writer-wins registers on hybrid logical clocks
//!   ([`hlc`], [`crdt`]), replicated as deltas on a per-workload gossip topic and repaired by
//!   set reconciliation between replica hosts ([`reconcile`]); the protocol core is
//!   [`eventual`], a pure state machine driven by inputs and `now`.
//! - `strong` workloads: one openraft group per workload whose voters are the nodes hosting
//!   its replicas ([`raft`]).
//! - [`lincheck`]: a linearizability checker (Wing and Gong's algorithm with Lowe's
//!   improvements, as in Porcupine) for the tests of the strong mode.
//!
//! The crate depends on neither the node nor the mesh: it reaches the network through traits
//! the node implements over libp2p.

pub mod crdt;
pub mod eventual;
pub mod hlc;
pub mod kv;
pub mod lincheck;
pub mod raft;
pub mod reconcile;
