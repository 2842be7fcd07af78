//! Timers and sizes of the protocol. The defaults suit a LAN or WAN mesh whose round trips are
//! well under `bid_timeout`; docs/scheduling.md explains each.

use serde::{Deserialize, Serialize};

use crate::types::Millis;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Candidates asked per replica to place (the "d" of power-of-d-choices).
    pub choices: u32,
    /// Fewest candidates a tender asks (when eligible nodes allow).
    pub min_candidates: u32,
    /// Most candidates one tender asks, however many replicas it places and however often it
    /// failed before: the bound on messages per placement.
    pub max_candidates: u32,
    /// How long a coordinator collects bids (it closes earlier once every candidate answered).
    pub bid_timeout: Millis,
    /// How long a bidder holds capacity for an open bid.
    pub hold: Millis,
    /// How long a coordinator waits for an award's acceptance before sending it again.
    pub award_timeout: Millis,
    /// Sends of one award before the slot is tendered elsewhere.
    pub award_attempts: u32,
    /// After gaining a workload from another coordinator (it vanished, or this node just
    /// started), how long to wait for hosts' reports before treating an unknown replica as
    /// missing.
    pub takeover_grace: Millis,
    /// After start, how long this node waits for membership and desired state to arrive
    /// before it places anything.
    pub settle: Millis,
    /// Period of the anti-entropy report from every host to the coordinators of its replicas.
    pub report_interval: Millis,
    /// Backoff between tenders that could not place every replica (doubling, with jitter).
    pub retry_min: Millis,
    pub retry_max: Millis,
    /// Local restarts of a failed replica (doubling backoff) before the slot is given back.
    pub restart_min: Millis,
    pub restart_max: Millis,
    pub max_restarts: u32,
    /// A replica accepted but not reported running for this long (starting, or failing and
    /// restarting) is placed elsewhere: a host that takes awards and runs nothing is noticed.
    pub start_timeout: Millis,
    /// Whether a node that sees no peer at all may place replicas it has no record of (a
    /// single-node mesh). Off by default: a node restarting without network runs what it
    /// persisted and does not take on the whole mesh's workloads.
    pub solo: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            choices: 2,
            min_candidates: 3,
            max_candidates: 64,
            bid_timeout: 500,
            hold: 5_000,
            award_timeout: 1_000,
            award_attempts: 3,
            takeover_grace: 2_000,
            settle: 5_000,
            report_interval: 30_000,
            retry_min: 1_000,
            retry_max: 60_000,
            restart_min: 1_000,
            restart_max: 30_000,
            max_restarts: 5,
            start_timeout: 120_000,
            solo: false,
        }
    }
}

/// `base · 2^(n−1)` capped at `max` (n ≥ 1), plus up to a quarter of jitter from `salt`.
pub(crate) fn backoff(base: Millis, max: Millis, n: u32, salt: u64) -> Millis {
    let shift = n.saturating_sub(1).min(20);
    let d = base.saturating_mul(1 << shift).min(max);
    d + salt % (d / 4).max(1)
}
