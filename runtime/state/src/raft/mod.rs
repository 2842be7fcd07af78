//! The `strong` consistency mode: one openraft group per workload, whose voters are the nodes
//! hosting the workload's replicas (DESIGN.md section 5).
//!
//! # What the node does with it
//!
//! The node owns one [`Groups`] (opened at start with [`Groups::open`], which restarts every
//! group found under `data_dir/raft/`) and one [`RaftTransport`] implementation over libp2p
//! request-response on [`wire::PROTOCOL`]. Incoming requests go to [`Groups::handle_rpc`].
//!
//! - First placement of a workload with `[consistency] mode = "strong"`: every host of a first
//!   replica calls [`Groups::create`] with the same voters (the hosts' peer ids).
//! - A replica moves from host C to host D: D calls [`Groups::join_as_learner`] (naming the
//!   current hosts as contacts), then any member calls [`Groups::change_voters`] with the new
//!   voter set (or [`Groups::promote`] and [`Groups::remove_voter`] step by step); C calls
//!   [`Groups::delete_group`] once it has been removed.
//! - The workload is deleted: every host calls [`Groups::delete_group`].
//! - A host is gone for good: [`Groups::quorum_check`] (or [`membership::quorum_lost`]) tells
//!   whether the group can still commit; if not, the workload is failed ("quorum lost: 2 of 3
//!   voters gone") and its group is never re-created empty.
//! - A replica's state endpoint serves [`Groups::get`], [`Groups::list`], [`Groups::put`] and
//!   [`Groups::delete`] on its own node: reads are linearizable (read index through the
//!   leader), writes on a follower are forwarded to the leader, conditional writes answer
//!   [`Error::PreconditionFailed`] (HTTP 412).
//! - `beemesh get workloads` and metrics read [`Groups::status`].
//!
//! # Design
//!
//! - Node ids: [`types::node_id`] hashes the peer id (SHA-256, first 8 bytes); the membership
//!   keeps the peer id in the node record ([`RaftPeer`]), which is how the leader reaches a
//!   member. A request whose vote names another node id than its authenticated sender is
//!   refused.
//! - Storage ([`store`]): one redb database per group under
//!   `data_dir/raft/<namespace>/<name>/raft.redb` with log, vote, state machine and current
//!   snapshot; the vote is fsynced before `save_vote` returns, appended entries are fsynced
//!   (in batches) before openraft is told they are flushed.
//! - State machine: key -> (value, revision) with a group-wide revision counter like etcd's;
//!   `if_revision` makes writes conditional (0: the key must not exist). The state is bounded
//!   by [`types::MAX_STATE_BYTES`], checked deterministically at apply time.
//! - Snapshots: the whole state machine, serialized from a consistent read transaction, sent
//!   in chunks below the RPC limit; a receiver refuses more than [`store::MAX_SNAPSHOT_BYTES`].
//! - Bounds: groups per node, message sizes (below the mesh's 1 MiB), forwarded requests in
//!   flight each way, members and voters per group, key, value and page sizes.
//! - Timing: see [`RaftConfig`].

pub mod config;
pub mod error;
mod groups;
pub mod membership;
pub mod memory;
pub mod network;
pub mod store;
pub mod types;
pub mod wire;

#[cfg(test)]
mod tests;

pub use config::RaftConfig;
pub use error::Error;
pub use groups::{GroupStatus, Groups, Participants, Role};
pub use membership::{QuorumLost, quorum_lost};
pub use memory::{MemoryNetwork, MemoryTransport};
pub use network::{RaftTransport, TransportError};
pub use types::{
    ApplyResult, GroupId, Item, KvCommand, ListPage, NodeId, Page, RaftPeer, TypeConfig, Versioned,
    node_id,
};
pub use wire::{MembershipView, PROTOCOL};
