//! Placement of BeeMesh workloads as a pure state machine: no I/O, no clock, no threads, no
//! randomness of its own. The node feeds [`Input`]s with an explicit `now` to
//! [`Scheduler::handle`] and carries out the [`Output`]s; a simulator drives thousands of
//! schedulers the same way.
//!
//! The protocol (docs/scheduling.md has the full account):
//! - every node knows the desired state and the membership; the **coordinator** of a workload
//!   is the first live node at or after the workload's position on a consistent-hashing ring,
//!   so every node agrees on it without messages, and when it vanishes the next node takes
//!   over;
//! - the coordinator **tenders** each missing replica to a few sampled eligible nodes
//!   (power of d choices, `d = 2`), never to the whole mesh;
//! - candidates **bid** from their real free capacity and `prefer` labels, reserving the
//!   capacity until the bid is settled or the hold expires;
//! - the coordinator **awards** exactly the missing replica indexes to the best bids (ties by
//!   a rendezvous hash, never by arrival order), each under a fresh epoch and signed with its
//!   key ([`authority`]); the losers are released;
//! - hosts **report** what they hold, each replica with its signed award; the coordinator keeps
//!   the best claim per replica by the total order (generation, the award's authority, epoch,
//!   rendezvous weight, node id) and **revokes** the others, which makes a healed partition
//!   converge to exactly one holder per replica;
//! - **authority**: messages name workloads by (namespace, name, generation, content id) and
//!   carry no spec; every decision takes its spec from a manifest the node verified itself
//!   ([`Input::Workload`]); tenders, awards and revokes count only from the workload's
//!   coordinator; what a peer's message cannot prove is refused ([`Output::Refused`]);
//! - a host persists its assignments ([`Output::Persist`]) and restarts them from
//!   [`Scheduler::restore`] with no network at all.

pub mod authority;
mod config;
mod coord;
mod hash;
mod host;
mod members;
mod message;
mod scheduler;
mod types;

#[cfg(test)]
mod tests;

pub use authority::{AWARD_CONTEXT, Authority, AwardProof, Signature, award_message};
pub use config::SchedulerConfig;
pub use hash::{stable_hash, tiebreak};
pub use members::MemberTable;
pub use message::{
    Award, Bid, Decline, DeclineReason, Formed, Message, Refuse, Release, Report, ReportedReplica,
    ReportedWorkload, Revoke, RevokeReason, SlotAward, SlotEpoch, Tender, WorkloadRef,
};
pub use scheduler::{
    Assignment, Input, LOCAL_ASSIGNMENTS_VERSION, LocalAssignments, Output, PlacementView, Refusal,
    RestoreError, Scheduler, Stats, StatusQuery, StatusReply, WorkloadStatus, coordinator_among,
};
pub use types::{
    Digest, Millis, NodeId, NodeInfo, NodeKey, Replica, ReplicaId, ReplicaIndex, ReplicaState,
    Resources, SpecError, WorkloadId, WorkloadSpec,
};

/// Request/response protocol carrying [`Message`]s between schedulers (answer: empty).
/// Version 2: messages name workloads by [`WorkloadRef`] instead of carrying specs, and claims
/// carry signed awards.
pub const SCHEDULER_PROTOCOL: &str = "/beemesh/sched/2";
/// Request/response protocol for [`StatusQuery`] → [`StatusReply`] (placements for the API of
/// a node that does not coordinate the workload).
pub const STATUS_PROTOCOL: &str = "/beemesh/placements/1";

/// The score of placing one more replica on a node, from 0 to 2000: up to 1000 for free
/// capacity after the placement (the scarcer of CPU and memory, as a fraction of allocatable:
/// emptier nodes first), plus up to 1000 for the fraction of `prefer` labels the node carries.
/// Integer arithmetic, so every node computes the same value.
pub fn score(
    free_after: &Resources,
    allocatable: &Resources,
    preferred: u32,
    prefer_total: usize,
) -> u64 {
    let frac = |free: u64, alloc: u64| -> u64 {
        if alloc == 0 {
            0
        } else {
            let f = u128::from(free.min(alloc)) * 1000 / u128::from(alloc);
            u64::try_from(f).unwrap_or(1000)
        }
    };
    let capacity =
        frac(free_after.cpu, allocatable.cpu).min(frac(free_after.memory, allocatable.memory));
    let prefer = if prefer_total == 0 {
        0
    } else {
        u64::from(preferred).min(prefer_total as u64) * 1000 / prefer_total as u64
    };
    capacity + prefer
}
