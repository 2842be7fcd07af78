//! Prometheus metrics served at `/metrics`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `api`, `gossip` or `sync`.
    pub source: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub source: String,
    /// `envelope`, `untrusted`, `rollback`, `too_large`, `storage`.
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The scheduler message: `tender`, `award`, `revoke`, `report`, `bid`...
    pub message: String,
    /// `beemesh_scheduler::Refusal::as_str`: `not_coordinator`, `bad_award`, ...
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    /// `namespace/name`.
    pub workload: String,
}

/// Per `eventual` store on this node (docs/consistency.md, Metrics).
#[derive(Debug, Clone, Default)]
pub struct StateMetrics {
    pub keys: Family<WorkloadLabels, Gauge>,
    pub tombstones: Family<WorkloadLabels, Gauge>,
    pub bytes: Family<WorkloadLabels, Gauge>,
    pub deltas_sent: Family<WorkloadLabels, Counter>,
    pub deltas_received: Family<WorkloadLabels, Counter>,
    pub records_applied: Family<WorkloadLabels, Counter>,
    pub reconciliations: Family<WorkloadLabels, Counter>,
    pub full_exchanges: Family<WorkloadLabels, Counter>,
    pub refused_timestamps: Family<WorkloadLabels, Counter>,
    pub refused_messages: Family<WorkloadLabels, Counter>,
    /// Strong workloads' Raft groups on this node.
    pub raft_commit_index: Family<WorkloadLabels, Gauge>,
    pub raft_term: Family<WorkloadLabels, Gauge>,
    pub raft_is_leader: Family<WorkloadLabels, Gauge>,
    pub raft_voters: Family<WorkloadLabels, Gauge>,
    pub raft_apply_lag: Family<WorkloadLabels, Gauge>,
    pub raft_leader_changes: Family<WorkloadLabels, Counter>,
}

impl StateMetrics {
    /// Drops the Raft series of a group no longer on this node.
    pub fn forget_group(&self, workload: &str) {
        let l = WorkloadLabels {
            workload: workload.to_owned(),
        };
        for f in [
            &self.raft_commit_index,
            &self.raft_term,
            &self.raft_is_leader,
            &self.raft_voters,
            &self.raft_apply_lag,
        ] {
            f.remove(&l);
        }
        self.raft_leader_changes.remove(&l);
    }

    /// Brings the series of `workload` to `now` (counters advance by what changed since
    /// `last`).
    pub fn observe(
        &self,
        workload: &str,
        now: &beemesh_state::eventual::Stats,
        last: &beemesh_state::eventual::Stats,
    ) {
        let l = WorkloadLabels {
            workload: workload.to_owned(),
        };
        let gauge = |f: &Family<WorkloadLabels, Gauge>, v: usize| {
            f.get_or_create(&l)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.keys, now.keys);
        gauge(&self.tombstones, now.tombstones);
        gauge(&self.bytes, now.bytes);
        let count = |f: &Family<WorkloadLabels, Counter>, now: u64, last: u64| {
            if now > last {
                f.get_or_create(&l).inc_by(now - last);
            }
        };
        count(&self.deltas_sent, now.deltas_sent, last.deltas_sent);
        count(
            &self.deltas_received,
            now.deltas_received,
            last.deltas_received,
        );
        count(
            &self.records_applied,
            now.records_applied,
            last.records_applied,
        );
        count(
            &self.reconciliations,
            now.reconciliations,
            last.reconciliations,
        );
        count(
            &self.full_exchanges,
            now.full_exchanges,
            last.full_exchanges,
        );
        count(
            &self.refused_timestamps,
            now.refused_timestamps,
            last.refused_timestamps,
        );
        count(
            &self.refused_messages,
            now.refused_messages,
            last.refused_messages,
        );
    }
}

/// The scheduler's counters, shared with the placement task.
#[derive(Debug, Clone, Default)]
pub struct SchedulerMetrics {
    log: Arc<Mutex<RefusalLog>>,
    /// Scheduler messages (or claims within reports) refused, by message and reason.
    pub refused: Family<RefusalLabels, Counter>,
    /// Peers' scheduler messages dropped because the scheduler's queue was full.
    pub dropped: Counter,
    /// Manifests fetched from a peer because a message named a generation not verified here.
    pub fetches: Counter,
}

impl SchedulerMetrics {
    /// Counts a refused scheduler message from `peer` and logs it, at most once per peer every
    /// [`REFUSAL_LOG_EVERY`] (the next line says how many were not logged).
    pub fn refused(&self, peer: &str, message: &str, reason: &str) {
        self.refused
            .get_or_create(&RefusalLabels {
                message: message.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(suppressed) = log.due(peer) {
            tracing::warn!(
                peer,
                message,
                reason,
                suppressed,
                "refused a scheduler message"
            );
        }
    }
}

/// Refusals are logged at most once per peer in this long (the rest are counted).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Peers whose refusals are remembered for rate-limited logging.
const REFUSAL_LOG_PEERS: usize = 1024;

/// Per peer: when its last refusal was logged, and how many were not logged since.
#[derive(Debug, Default)]
struct RefusalLog {
    peers: BTreeMap<String, (Instant, u64)>,
}

impl RefusalLog {
    /// Whether to log a refusal from `peer` now; if so, how many were suppressed before it.
    fn due(&mut self, peer: &str) -> Option<u64> {
        let now = Instant::now();
        if !self.peers.contains_key(peer) && self.peers.len() >= REFUSAL_LOG_PEERS {
            self.peers
                .retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_EVERY);
            if self.peers.len() >= REFUSAL_LOG_PEERS {
                return None;
            }
        }
        match self.peers.get_mut(peer) {
            Some((at, more)) if now.duration_since(*at) < REFUSAL_LOG_EVERY => {
                *more += 1;
                None
            }
            Some((at, more)) => {
                *at = now;
                Some(std::mem::take(more))
            }
            None => {
                self.peers.insert(peer.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub scheduler: SchedulerMetrics,
    pub state: StateMetrics,
    pub manifests_accepted: Family<SourceLabels, Counter>,
    pub manifests_rejected: Family<RejectLabels, Counter>,
    pub peers: Gauge,
    pub workloads: Gauge,
    pub peers_rejected: Counter,
    /// Admitted peers not tracked because the membership view was full.
    pub members_refused: Counter,
    pub syncs: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("beemesh");
        let manifests_accepted = Family::<SourceLabels, Counter>::default();
        let manifests_rejected = Family::<RejectLabels, Counter>::default();
        let peers = Gauge::default();
        let workloads = Gauge::default();
        let peers_rejected = Counter::default();
        let members_refused = Counter::default();
        registry.register(
            "members_refused",
            "Admitted peers' announcements not tracked because the membership view was full",
            members_refused.clone(),
        );
        let syncs = Counter::default();
        let scheduler = SchedulerMetrics::default();
        let state = StateMetrics::default();
        for (name, help, family) in [
            (
                "state_keys",
                "Keys (tombstones included) of each eventual store on this node",
                &state.keys,
            ),
            (
                "state_tombstones",
                "Tombstones of each eventual store on this node",
                &state.tombstones,
            ),
            (
                "state_bytes",
                "Bytes (keys, values, overhead) of each eventual store on this node",
                &state.bytes,
            ),
            (
                "raft_commit_index",
                "Commit index of each strong workload's Raft group, as this node knows it",
                &state.raft_commit_index,
            ),
            (
                "raft_term",
                "Current term of each strong workload's Raft group on this node",
                &state.raft_term,
            ),
            (
                "raft_is_leader",
                "1 when this node leads the strong workload's Raft group",
                &state.raft_is_leader,
            ),
            (
                "raft_voters",
                "Voters of each strong workload's Raft group",
                &state.raft_voters,
            ),
            (
                "raft_apply_lag",
                "Committed entries not yet applied to this node's copy of the state",
                &state.raft_apply_lag,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "state_deltas_sent",
                "Deltas published by each eventual store",
                &state.deltas_sent,
            ),
            (
                "state_deltas_received",
                "Deltas received by each eventual store",
                &state.deltas_received,
            ),
            (
                "state_records_applied",
                "Records from peers that changed each eventual store",
                &state.records_applied,
            ),
            (
                "state_reconciliations",
                "Completed anti-entropy reconciliations of each eventual store",
                &state.reconciliations,
            ),
            (
                "state_full_exchanges",
                "Reconciliations that walked the whole map (after a long separation)",
                &state.full_exchanges,
            ),
            (
                "state_refused_timestamps",
                "Records refused for a timestamp beyond the drift bound",
                &state.refused_timestamps,
            ),
            (
                "state_refused_messages",
                "Deltas and reconciliation messages refused (not a host, malformed, rate)",
                &state.refused_messages,
            ),
            (
                "raft_leader_changes",
                "Leader changes this node saw in each strong workload's Raft group",
                &state.raft_leader_changes,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "scheduler_refused",
            "Scheduler messages refused (forged, unauthorised or unbounded), by message and reason",
            scheduler.refused.clone(),
        );
        registry.register(
            "scheduler_dropped",
            "Peers' scheduler messages dropped because the scheduler's queue was full",
            scheduler.dropped.clone(),
        );
        registry.register(
            "scheduler_fetches",
            "Manifests fetched because a scheduler message named a generation not verified here",
            scheduler.fetches.clone(),
        );
        registry.register(
            "manifests_accepted",
            "Signed manifests verified and stored, by source",
            manifests_accepted.clone(),
        );
        registry.register(
            "manifests_rejected",
            "Manifests refused, by source and reason",
            manifests_rejected.clone(),
        );
        registry.register("peers", "Admitted peers currently up", peers.clone());
        registry.register(
            "workloads",
            "Workloads in the desired state (tombstones included)",
            workloads.clone(),
        );
        registry.register(
            "peers_rejected",
            "Peers refused admission",
            peers_rejected.clone(),
        );
        registry.register(
            "anti_entropy_syncs",
            "Completed anti-entropy syncs with a peer",
            syncs.clone(),
        );
        Self {
            registry,
            scheduler,
            state,
            manifests_accepted,
            manifests_rejected,
            peers,
            workloads,
            peers_rejected,
            members_refused,
            syncs,
        }
    }

    pub fn accepted(&self, source: &str) {
        self.manifests_accepted
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    pub fn rejected(&self, source: &str, reason: &str) {
        self.manifests_rejected
            .get_or_create(&RejectLabels {
                source: source.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_always_and_logged_once_per_peer_and_period() {
        let mut log = RefusalLog::default();
        assert_eq!(log.due("a"), Some(0));
        assert_eq!(log.due("a"), None);
        assert_eq!(log.due("a"), None);
        assert_eq!(log.due("b"), Some(0), "another peer is logged");
        // The period has passed for "a": logged, with the two it held back.
        if let Some(e) = log.peers.get_mut("a") {
            e.0 -= REFUSAL_LOG_EVERY;
        }
        assert_eq!(log.due("a"), Some(2));
        // Bounded: peers beyond the limit are counted, not logged or remembered.
        for i in 0..REFUSAL_LOG_PEERS {
            log.due(&format!("p{i}"));
        }
        assert!(log.peers.len() <= REFUSAL_LOG_PEERS);
        let m = SchedulerMetrics::default();
        m.refused("x", "report", "bad_award");
        m.refused("x", "report", "bad_award");
        let n = m
            .refused
            .get_or_create(&RefusalLabels {
                message: "report".into(),
                reason: "bad_award".into(),
            })
            .get();
        assert_eq!(n, 2);
    }
}
