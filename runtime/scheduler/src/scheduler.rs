//! The state machine: inputs in, outputs out, with an explicit `now`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::authority::{Authority, AwardProof, Keys};
use crate::config::SchedulerConfig;
use crate::coord::Coord;
use crate::hash::stable_hash;
use crate::host::{Held, Reservation};
use crate::members::{MemberTable, Membership, Transition, node_ring};
use crate::message::{Message, ReportedWorkload, WorkloadRef};
use crate::types::{
    Millis, NodeInfo, NodeKey, Replica, ReplicaId, ReplicaIndex, ReplicaState, WorkloadId,
    WorkloadSpec,
};

/// Most messages kept while the manifest they name is fetched, in all and per sender.
const MAX_DEFERRED: usize = 1024;
const MAX_DEFERRED_PER_SENDER: usize = 64;
/// How long a deferred message waits for its manifest.
const DEFER_TTL: Millis = 10_000;
/// One fetch per (workload, generation) at most this often; at most this many remembered.
const FETCH_EVERY: Millis = 5_000;
const MAX_FETCHING: usize = 256;
/// Former members remembered (whose awards still count): at most this many, this long.
const MAX_FORMER: usize = 4096;
/// Strong workloads remembered as formed (each is one of the verified desired state).
pub(crate) const MAX_FORMED: usize = 65_536;
const FORMER_TTL: Millis = 3_600_000;
/// Membership changes remembered for the takeover grace of [`Scheduler::may_command`].
const MAX_HANDOVERS: usize = 256;

/// What the node feeds the scheduler.
#[derive(Debug, Clone)]
pub enum Input<I> {
    /// A node announced itself (for the first time, or again after being down). The local
    /// node's own announcement sets the capacity and labels it bids with.
    NodeUp { node: I, info: NodeInfo },
    /// A live node's announcement changed (labels, capacity).
    NodeUpdated { node: I, info: NodeInfo },
    /// A node stopped announcing itself (the mesh's peer timeout).
    NodeDown { node: I },
    /// Desired state: a manifest generation, or a tombstone, that the node verified itself
    /// (the only source of specs). Older generations than the one known are ignored.
    Workload(WorkloadSpec),
    /// A protocol message; `from` is the transport's authenticated peer.
    Message { from: I, msg: Message<I> },
    /// The driver reports a replica running (and ready).
    ReplicaStarted { replica: ReplicaId },
    /// The driver could not start a replica, or it failed its health check.
    ReplicaFailed { replica: ReplicaId, reason: String },
    /// A replica stopped. Expected after [`Output::Stop`]; otherwise counted as a failure.
    ReplicaStopped { replica: ReplicaId },
    /// Nothing new: lets timers fire (call at [`Scheduler::next_deadline`]).
    Tick,
}

/// What the scheduler asks of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<I> {
    /// Deliver `msg` to `to` (request/response on [`crate::SCHEDULER_PROTOCOL`]; the answer
    /// is empty and may be ignored; a failed delivery needs no report, timers recover).
    Send { to: I, msg: Message<I> },
    /// Start this replica with the local driver.
    Start { replica: Replica },
    /// Stop this replica and remove its container.
    Stop { replica: ReplicaId },
    /// Persist what this node must run (replaces the previous record); hand it to
    /// [`Scheduler::restore`] after a restart.
    Persist(LocalAssignments<I>),
    /// A message named a manifest generation this node has not verified: fetch it from
    /// `from` (anti-entropy) and feed it as [`Input::Workload`] once verified. The message
    /// waits (bounded) and is handled then. Rate-limited per (workload, generation).
    Fetch { from: I, workload: WorkloadRef },
    /// This node accepted an award of a strong workload's first placement: `voters` (itself
    /// among them) form the workload's Raft group. Any other host of a strong workload joins
    /// the existing group instead; a group is never created a second time.
    Bootstrap {
        workload: WorkloadId,
        voters: Vec<I>,
    },
    /// A message was refused: count it and log it (at a bounded rate) with the sender.
    Refused {
        from: I,
        message: &'static str,
        reason: Refusal,
    },
}

/// Why a message (or a part of one) was refused. Each is counted in
/// [`Stats::refused`] and reported as [`Output::Refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// The sender is not a live member in this node's view.
    NotMember,
    /// A tender, award or revoke from a node that is not the workload's coordinator here
    /// (nor was, within the takeover grace).
    NotCoordinator,
    /// The message names a generation whose content id differs from the verified one.
    ContentMismatch,
    /// A claim whose award signature does not verify (forged, altered, or for another host).
    BadAward,
    /// A claim the claimant awarded itself (or that a non-member awarded) for a replica this
    /// coordinator does not see it holding, after the takeover grace.
    SelfAward,
    /// A claim whose epoch is far above every epoch seen for the workload.
    EpochOutOfBounds,
    /// A bid from a node that already holds what it announced it can hold.
    OverCapacity,
    /// A message for an unverified manifest that could not wait: the deferral queue for
    /// this sender, or in all, is full.
    DeferFull,
    /// A message whose manifest generation was still not verified here when its wait ended
    /// (no signed manifest with that content id reached this node).
    Unverified,
    /// A tender that would exceed the open reservations allowed per coordinator or in all.
    TooManyReservations,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::NotMember => "not_member",
            Refusal::NotCoordinator => "not_coordinator",
            Refusal::ContentMismatch => "content_mismatch",
            Refusal::BadAward => "bad_award",
            Refusal::SelfAward => "self_award",
            Refusal::EpochOutOfBounds => "epoch_out_of_bounds",
            Refusal::OverCapacity => "over_capacity",
            Refusal::DeferFull => "defer_full",
            Refusal::Unverified => "unverified",
            Refusal::TooManyReservations => "too_many_reservations",
        }
    }
}

/// What this node must run: persisted by the node, restored after a restart so replicas come
/// back without any network (edge autonomy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub struct LocalAssignments<I> {
    #[serde(default = "format_version")]
    pub version: u32,
    #[serde(default = "Vec::new")]
    pub assignments: Vec<Assignment<I>>,
    /// Strong workloads whose Raft group this node heard was formed ([`Message::Formed`]):
    /// never formed again, even by a coordinator that hears no claim of them.
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub formed: Vec<WorkloadId>,
}

fn format_version() -> u32 {
    LOCAL_ASSIGNMENTS_VERSION
}

/// The format of [`LocalAssignments`]: 2 added the signed award of each replica (a version 1
/// record restores its replicas, whose claims then carry no award and are replaced).
pub const LOCAL_ASSIGNMENTS_VERSION: u32 = 2;

impl<I> Default for LocalAssignments<I> {
    fn default() -> Self {
        Self {
            version: LOCAL_ASSIGNMENTS_VERSION,
            assignments: Vec::new(),
            formed: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "I: Serialize", deserialize = "I: Deserialize<'de>"))]
pub struct Assignment<I> {
    /// The spec this node verified when it accepted the award (it runs with no network).
    pub spec: Arc<WorkloadSpec>,
    pub index: ReplicaIndex,
    pub epoch: u64,
    /// The award, signed by its coordinator (absent in version 1 records).
    #[serde(default = "Option::default")]
    pub award: Option<AwardProof<I>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "persisted assignments have format version {found}; this version reads up to {LOCAL_ASSIGNMENTS_VERSION}"
    )]
    Version { found: u32 },
}

/// A replica as `beemesh get workloads` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementView<I> {
    pub node: I,
    pub index: ReplicaIndex,
    pub generation: u64,
    pub state: ReplicaState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatus<I> {
    pub workload: WorkloadId,
    pub generation: u64,
    /// Desired replicas.
    pub replicas: u32,
    /// Replicas placed (awarded or held), and those running.
    pub placed: u32,
    pub running: u32,
    pub placements: Vec<PlacementView<I>>,
    /// Why some replicas are not placed, when they cannot be.
    pub unschedulable: Option<String>,
    /// True when this node coordinates the workload (its view is the mesh's); otherwise the
    /// view holds only this node's own replicas: ask [`Scheduler::status_sources`].
    pub authoritative: bool,
}

/// Request of [`crate::STATUS_PROTOCOL`]: the statuses of these workloads.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusQuery {
    #[serde(default)]
    pub workloads: Vec<WorkloadId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply<I> {
    #[serde(default = "Vec::new")]
    pub statuses: Vec<WorkloadStatus<I>>,
}

/// Counters for metrics and the simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub sent: u64,
    /// Messages (or claims within reports) refused: see [`Refusal`].
    pub refused: u64,
    /// Claims awarded by another coordinator that this one re-awarded under its own key.
    pub adopted: u64,
    pub tenders_opened: u64,
    pub awards: u64,
    pub replicas_awarded: u64,
    pub conflicts_resolved: u64,
    pub rescheduled: u64,
    pub reservations_expired: u64,
    pub unschedulable_checks: u64,
}

/// A report kept for later: (host, received at, its sequence number, its entries).
pub(crate) type EarlyReport<I> = (I, Millis, u64, Vec<ReportedWorkload<I>>);

/// Who coordinated an arc of the ring before a membership change, until when that node's
/// tenders, awards and revokes still count (the takeover grace).
#[derive(Debug, Clone)]
pub(crate) struct Handover<I> {
    /// The arc `(lo, hi]` of ring positions (wrapping when `lo >= hi`).
    pub lo: u64,
    pub hi: u64,
    pub prev: I,
    pub until: Millis,
}

impl<I> Handover<I> {
    fn covers(&self, pos: u64) -> bool {
        if self.lo < self.hi {
            pos > self.lo && pos <= self.hi
        } else {
            pos > self.lo || pos <= self.hi
        }
    }
}

/// How a message's [`WorkloadRef`] compares with this node's verified desired state.
pub(crate) enum Verified {
    /// Exactly the verified generation.
    Yes(Arc<WorkloadSpec>),
    /// This node verified a newer generation (or tombstone).
    Stale,
    /// Same generation, another content id: not the manifest this node verified.
    Mismatch,
    /// This node has not verified that generation yet.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer<I> {
    Coord(WorkloadId),
    Reservation(I, WorkloadId, u64),
    Restart(WorkloadId, ReplicaIndex),
    Report,
    Rereport,
    /// Deferred messages expire.
    Deferred,
}

/// One node's scheduler. See the crate documentation for the protocol.
#[derive(Debug)]
pub struct Scheduler<I: NodeKey> {
    pub(crate) local: I,
    pub(crate) local_ring: u64,
    pub(crate) config: SchedulerConfig,
    pub(crate) keys: Keys<I>,
    pub(crate) members: Membership<I>,
    /// Whether the node has told us its own capacity.
    pub(crate) local_known: bool,
    pub(crate) desired: BTreeMap<WorkloadId, Arc<WorkloadSpec>>,
    pub(crate) desired_ring: BTreeMap<u64, BTreeSet<WorkloadId>>,
    pub(crate) coords: BTreeMap<WorkloadId, Coord<I>>,
    pub(crate) held: BTreeMap<WorkloadId, BTreeMap<ReplicaIndex, Held<I>>>,
    pub(crate) report_target: BTreeMap<WorkloadId, I>,
    /// Reports that reached this node before it saw itself as coordinator (its failure
    /// detector lagged the host's): replayed when it takes over.
    pub(crate) early_reports: BTreeMap<WorkloadId, Vec<EarlyReport<I>>>,
    pub(crate) early_count: usize,
    /// Workloads whose coordinator changed, with the repeats left: reported again at half
    /// and at twice the takeover grace (a lost takeover report would otherwise wait for the
    /// periodic one).
    pub(crate) rereport: BTreeMap<WorkloadId, u8>,
    pub(crate) rereport_at: Option<Millis>,
    pub(crate) report_seq: u64,
    pub(crate) reservations: BTreeMap<(I, WorkloadId, u64), Reservation>,
    pub(crate) timers: BTreeSet<(Millis, Timer<I>)>,
    pub(crate) started_at: Option<Millis>,
    pub(crate) out: Vec<Output<I>>,
    pub(crate) loopback: VecDeque<Message<I>>,
    /// Messages naming a manifest generation this node has not verified yet, by that
    /// generation: handled once it is verified, dropped after [`DEFER_TTL`].
    pub(crate) deferred: BTreeMap<WorkloadRef, Vec<(I, Millis, Message<I>)>>,
    pub(crate) deferred_count: usize,
    pub(crate) deferred_by: BTreeMap<I, usize>,
    /// Fetches asked for, by (workload, generation), with when.
    pub(crate) fetching: BTreeMap<(WorkloadId, u64), Millis>,
    /// Nodes that were members, with when they went down: their awards still count.
    pub(crate) former: BTreeMap<I, Millis>,
    /// Recent coordinator changes (newest last).
    pub(crate) handovers: VecDeque<Handover<I>>,
    /// Strong workloads whose Raft group was formed (see [`Message::Formed`]); only
    /// workloads of the verified desired state (a tombstone removes its entry), persisted.
    pub(crate) formed: BTreeSet<WorkloadId>,
    pub(crate) persist_dirty: bool,
    pub(crate) stats: Stats,
}

impl<I: NodeKey> Scheduler<I> {
    /// A scheduler that knows only itself; feed it [`Input::NodeUp`] for itself (its capacity
    /// and labels) and for every peer. `keys` signs this node's awards and checks others'.
    pub fn new(local: I, config: SchedulerConfig, keys: Arc<dyn Authority<I>>) -> Self {
        Self::with_members(local, config, keys, Arc::new(MemberTable::new([])))
    }

    /// A scheduler whose membership view starts from a shared table (a simulator hands every
    /// node the same one; a node may build one from its peer list). The local node's entry,
    /// if present, is its own capacity.
    pub fn with_members(
        local: I,
        config: SchedulerConfig,
        keys: Arc<dyn Authority<I>>,
        table: Arc<MemberTable<I>>,
    ) -> Self {
        let mut members = Membership::new(table);
        let local_known = members.is_live(&local);
        if !local_known {
            members.up(&local, NodeInfo::default());
        }
        Self {
            local_ring: node_ring(&local),
            local,
            config,
            keys: Keys(keys),
            members,
            local_known,
            desired: BTreeMap::new(),
            desired_ring: BTreeMap::new(),
            coords: BTreeMap::new(),
            held: BTreeMap::new(),
            report_target: BTreeMap::new(),
            early_reports: BTreeMap::new(),
            early_count: 0,
            rereport: BTreeMap::new(),
            rereport_at: None,
            report_seq: 0,
            reservations: BTreeMap::new(),
            timers: BTreeSet::new(),
            started_at: None,
            out: Vec::new(),
            loopback: VecDeque::new(),
            deferred: BTreeMap::new(),
            deferred_count: 0,
            deferred_by: BTreeMap::new(),
            fetching: BTreeMap::new(),
            former: BTreeMap::new(),
            handovers: VecDeque::new(),
            formed: BTreeSet::new(),
            persist_dirty: false,
            stats: Stats::default(),
        }
    }

    pub fn local(&self) -> &I {
        &self.local
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Handles one input at `now` and returns what to do. Never blocks, never reads a clock.
    pub fn handle(&mut self, input: Input<I>, now: Millis) -> Vec<Output<I>> {
        self.begin(now);
        match input {
            Input::NodeUp { node, info } | Input::NodeUpdated { node, info } => {
                self.on_node_up(node, info, now)
            }
            Input::NodeDown { node } => self.on_node_down(node, now),
            Input::Workload(spec) => self.on_workload(spec, now),
            Input::Message { from, msg } => self.on_message(from, msg, now),
            Input::ReplicaStarted { replica } => self.on_replica_started(&replica, now),
            Input::ReplicaFailed { replica, reason } => {
                self.on_replica_failed(&replica, &reason, now)
            }
            Input::ReplicaStopped { replica } => self.on_replica_stopped(&replica, now),
            Input::Tick => {}
        }
        self.finish(now)
    }

    /// Restores what this node ran before a restart (from [`Output::Persist`]): its replicas
    /// are started at once, with or without network, and reported to their coordinators as
    /// soon as those are known.
    pub fn restore(
        &mut self,
        saved: LocalAssignments<I>,
        now: Millis,
    ) -> Result<Vec<Output<I>>, RestoreError> {
        if saved.version > LOCAL_ASSIGNMENTS_VERSION {
            return Err(RestoreError::Version {
                found: saved.version,
            });
        }
        self.begin(now);
        self.restore_assignments(saved, now);
        Ok(self.finish(now))
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.first().map(|(t, _)| *t)
    }

    fn begin(&mut self, now: Millis) {
        if self.started_at.is_none() {
            self.started_at = Some(now);
            let first = now + self.config.report_interval + self.local_ring % 1000;
            self.timers.insert((first, Timer::Report));
        }
        self.fire_timers(now);
    }

    fn finish(&mut self, now: Millis) -> Vec<Output<I>> {
        let mut guard = 0u32;
        while let Some(msg) = self.loopback.pop_front() {
            let from = self.local.clone();
            self.on_message(from, msg, now);
            guard += 1;
            if guard > 100_000 {
                break;
            }
        }
        if self.persist_dirty {
            self.persist_dirty = false;
            let saved = self.local_assignments();
            self.out.push(Output::Persist(saved));
        }
        std::mem::take(&mut self.out)
    }

    fn fire_timers(&mut self, now: Millis) {
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let Some((_, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Coord(w) => {
                    if let Some(c) = self.coords.get_mut(&w) {
                        c.wake = None;
                    }
                    self.drive(&w, now);
                }
                Timer::Reservation(from, w, round) => {
                    let key = (from, w, round);
                    if self
                        .reservations
                        .get(&key)
                        .is_some_and(|r| r.expires <= now)
                    {
                        self.reservations.remove(&key);
                        self.stats.reservations_expired += 1;
                    }
                }
                Timer::Restart(w, index) => self.restart_due(&w, index, now),
                Timer::Rereport => {
                    self.rereport_at = None;
                    self.rereport_due(now);
                }
                Timer::Deferred => self.prune_deferred(now),
                Timer::Report => {
                    self.prune_early_reports(now);
                    self.prune_deferred(now);
                    self.fetching
                        .retain(|_, at| now < at.saturating_add(FETCH_EVERY));
                    self.former
                        .retain(|_, at| now < at.saturating_add(FORMER_TTL));
                    self.report_all();
                    let next = now + self.config.report_interval;
                    self.timers.insert((next, Timer::Report));
                }
            }
        }
    }

    pub(crate) fn send(&mut self, to: &I, msg: Message<I>) {
        if *to == self.local {
            self.loopback.push_back(msg);
        } else {
            self.stats.sent += 1;
            self.out.push(Output::Send {
                to: to.clone(),
                msg,
            });
        }
    }

    pub(crate) fn settled(&self, now: Millis) -> bool {
        self.started_at
            .is_none_or(|s| now >= s.saturating_add(self.config.settle))
    }

    pub(crate) fn settle_end(&self) -> Millis {
        self.started_at
            .unwrap_or(0)
            .saturating_add(self.config.settle)
    }

    /// The coordinator of a workload in this node's view: the first live node at or after the
    /// workload's ring position.
    pub fn coordinator(&self, w: &WorkloadId) -> Option<I> {
        self.members
            .successors(workload_ring(w), 1)
            .into_iter()
            .next()
    }

    /// Whom to ask for a workload's placements, best first: its coordinator, then the nodes
    /// that take over if it vanishes.
    pub fn status_sources(&self, w: &WorkloadId, k: usize) -> Vec<I> {
        self.members.successors(workload_ring(w), k)
    }

    pub fn is_coordinating(&self, w: &WorkloadId) -> bool {
        self.coords.contains_key(w)
    }

    /// Live nodes in this node's view (itself included).
    pub fn live_nodes(&self) -> usize {
        self.members.live_count()
    }

    // ---- membership -------------------------------------------------------------------

    fn on_node_up(&mut self, node: I, info: NodeInfo, now: Millis) {
        if node == self.local {
            self.local_known = true;
        }
        let fits_some = |spec: &WorkloadSpec| {
            spec.selects(&info.labels) && spec.resources.fits_in(&info.allocatable)
        };
        let parked: Vec<WorkloadId> = self
            .coords
            .iter()
            .filter(|(_, c)| c.parked.is_some() && fits_some(&c.spec))
            .map(|(w, _)| w.clone())
            .collect();
        // The node that coordinated the arc the newcomer takes over (its live successor).
        let prev = if self.members.is_live(&node) {
            None
        } else {
            self.members
                .successors(node_ring(&node), 1)
                .into_iter()
                .next()
        };
        let t = self.members.up(&node, info);
        match t {
            Transition::Same => return,
            Transition::Updated => {}
            Transition::Joined => {
                self.former.remove(&node);
                if let Some(prev) = prev {
                    self.record_handover(&node, prev, now);
                }
                self.reassign_arc(&node, now);
                self.tell_formed(&node, now);
                let grace = now + self.config.takeover_grace;
                let ws: Vec<WorkloadId> = self.coords.keys().cloned().collect();
                for w in ws {
                    if let Some(c) = self.coords.get_mut(&w) {
                        // A node coming (back) may hold replicas this coordinator never
                        // heard of: give its report time to arrive.
                        if !c.fresh && (c.slots.len() as u32) < c.spec.wanted() {
                            c.ready_at = c.ready_at.max(grace);
                        }
                    }
                    if self.coords.get(&w).is_some_and(|c| c.references(&node)) {
                        self.drive(&w, now);
                    }
                }
                self.retarget_reports(now);
            }
        }
        for w in parked {
            if let Some(c) = self.coords.get_mut(&w) {
                c.unpark(now);
            }
            self.drive(&w, now);
        }
    }

    fn on_node_down(&mut self, node: I, now: Millis) {
        if node == self.local || !self.members.down(&node) {
            return;
        }
        if self.former.len() >= MAX_FORMER
            && let Some(oldest) = self
                .former
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(n, _)| n.clone())
        {
            self.former.remove(&oldest);
        }
        self.former.insert(node.clone(), now);
        self.record_handover(&node, node.clone(), now);
        self.reassign_arc(&node, now);
        let affected: Vec<WorkloadId> = self
            .coords
            .iter()
            .filter(|(_, c)| c.references(&node))
            .map(|(w, _)| w.clone())
            .collect();
        for w in affected {
            self.drive(&w, now);
        }
        // Capacity held for a coordinator that is gone will never be awarded.
        let stale: Vec<(I, WorkloadId, u64)> = self
            .reservations
            .keys()
            .filter(|k| k.0 == node)
            .cloned()
            .collect();
        for k in stale {
            self.reservations.remove(&k);
        }
        self.retarget_reports(now);
    }

    /// Remembers that `prev` coordinated `node`'s arc of the ring until now (`node` joined in
    /// front of it, or `node` itself left), so that `prev`'s messages in flight still count
    /// for the takeover grace.
    fn record_handover(&mut self, node: &I, prev: I, now: Millis) {
        let hi = node_ring(node);
        let lo = self.members.predecessor(hi, node).unwrap_or(hi);
        if self.handovers.len() >= MAX_HANDOVERS {
            self.handovers.pop_front();
        }
        self.handovers.push_back(Handover {
            lo,
            hi,
            prev,
            until: now.saturating_add(self.config.takeover_grace),
        });
    }

    /// Whether `from` may tender, award or revoke for `w`: it is the workload's coordinator in
    /// this node's view, or was until a membership change within the takeover grace.
    pub(crate) fn may_command(&self, from: &I, w: &WorkloadId, now: Millis) -> bool {
        if self.coordinator(w).as_ref() == Some(from) {
            return true;
        }
        let pos = workload_ring(w);
        self.handovers
            .iter()
            .any(|h| now < h.until && &h.prev == from && h.covers(pos))
    }

    /// Whether `issuer`'s awards count: it is this node, a live member, or a member that went
    /// down recently (bounded memory).
    pub(crate) fn known_issuer(&self, issuer: &I) -> bool {
        *issuer == self.local || self.members.is_live(issuer) || self.former.contains_key(issuer)
    }

    /// Compares a message's workload generation with the verified desired state.
    pub(crate) fn verified(&self, r: &WorkloadRef) -> Verified {
        match self.desired.get(&r.id) {
            Some(d) if d.generation == r.generation && d.content == r.content => {
                Verified::Yes(d.clone())
            }
            Some(d) if d.generation > r.generation => Verified::Stale,
            Some(d) if d.generation == r.generation => Verified::Mismatch,
            _ => Verified::Unknown,
        }
    }

    /// Counts and reports a refused message.
    pub(crate) fn refuse(&mut self, from: &I, message: &'static str, reason: Refusal) {
        self.stats.refused += 1;
        self.out.push(Output::Refused {
            from: from.clone(),
            message,
            reason,
        });
    }

    /// Keeps `msg` until the manifest generation `r` is verified, and asks for it.
    pub(crate) fn defer(&mut self, from: &I, r: WorkloadRef, msg: Message<I>, now: Millis) {
        if self.deferred_count >= MAX_DEFERRED {
            self.prune_deferred(now);
        }
        let mine = self.deferred_by.get(from).copied().unwrap_or(0);
        if self.deferred_count >= MAX_DEFERRED || mine >= MAX_DEFERRED_PER_SENDER {
            self.refuse(from, msg.kind(), Refusal::DeferFull);
            return;
        }
        self.deferred_count += 1;
        *self.deferred_by.entry(from.clone()).or_default() += 1;
        self.fetch(from, &r, now);
        self.deferred
            .entry(r)
            .or_default()
            .push((from.clone(), now, msg));
        self.arm(now + DEFER_TTL, Timer::Deferred);
    }

    /// Asks the node to fetch a manifest generation from `from` (rate-limited).
    fn fetch(&mut self, from: &I, r: &WorkloadRef, now: Millis) {
        let key = (r.id.clone(), r.generation);
        if self
            .fetching
            .get(&key)
            .is_some_and(|at| now < at.saturating_add(FETCH_EVERY))
        {
            return;
        }
        if self.fetching.len() >= MAX_FETCHING {
            self.fetching
                .retain(|_, at| now < at.saturating_add(FETCH_EVERY));
            if self.fetching.len() >= MAX_FETCHING {
                return;
            }
        }
        self.fetching.insert(key, now);
        self.out.push(Output::Fetch {
            from: from.clone(),
            workload: r.clone(),
        });
    }

    /// Drops (and refuses) deferred messages that waited their time.
    pub(crate) fn prune_deferred(&mut self, now: Millis) {
        let horizon = now.saturating_sub(DEFER_TTL);
        let by = &mut self.deferred_by;
        let mut count = 0;
        let mut expired: Vec<(I, &'static str)> = Vec::new();
        self.deferred.retain(|_, v| {
            v.retain(|(from, at, msg)| {
                let keep = *at > horizon;
                if !keep {
                    expired.push((from.clone(), msg.kind()));
                    if let Some(n) = by.get_mut(from) {
                        *n = n.saturating_sub(1);
                    }
                }
                keep
            });
            count += v.len();
            !v.is_empty()
        });
        by.retain(|_, n| *n > 0);
        self.deferred_count = count;
        for (from, kind) in expired {
            self.refuse(&from, kind, Refusal::Unverified);
        }
    }

    /// The deferred messages that a newly verified generation of `w` settles (that one, and
    /// older ones, which are now stale).
    fn take_deferred(&mut self, w: &WorkloadId, generation: u64) -> Vec<(I, Message<I>)> {
        let keys: Vec<WorkloadRef> = self
            .deferred
            .keys()
            .filter(|r| r.id == *w && r.generation <= generation)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for k in keys {
            for (from, _, msg) in self.deferred.remove(&k).unwrap_or_default() {
                self.deferred_count = self.deferred_count.saturating_sub(1);
                if let Some(n) = self.deferred_by.get_mut(&from) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.deferred_by.remove(&from);
                    }
                }
                out.push((from, msg));
            }
        }
        out
    }

    /// After `node` joined or left, re-decides who coordinates the workloads in its arc of the
    /// ring (between its live predecessor and itself).
    fn reassign_arc(&mut self, node: &I, now: Millis) {
        let pos = node_ring(node);
        let pred = self.members.predecessor(pos, node);
        let mut ws: BTreeSet<WorkloadId> = BTreeSet::new();
        let mut collect = |lo: u64, hi: u64, ring: &BTreeMap<u64, BTreeSet<WorkloadId>>| {
            for (_, set) in ring.range(lo..=hi) {
                ws.extend(set.iter().cloned());
            }
        };
        match pred {
            None => collect(0, u64::MAX, &self.desired_ring),
            Some(p) if p < pos => collect(p + 1, pos, &self.desired_ring),
            Some(p) => {
                if p < u64::MAX {
                    collect(p + 1, u64::MAX, &self.desired_ring);
                }
                collect(0, pos, &self.desired_ring);
            }
        }
        // Workloads known only from reports are not in the ring index.
        let in_arc = |r: u64| match pred {
            None => true,
            Some(p) if p < pos => r > p && r <= pos,
            Some(p) => r > p || r <= pos,
        };
        ws.extend(
            self.coords
                .iter()
                .filter(|(_, c)| in_arc(c.ring))
                .map(|(w, _)| w.clone()),
        );
        for w in ws {
            self.check_ownership(&w, now);
        }
    }

    /// Starts or stops coordinating `w` according to the ring.
    pub(crate) fn check_ownership(&mut self, w: &WorkloadId, now: Millis) {
        let mine = self.coordinator(w).is_some_and(|c| c == self.local);
        let have = self.coords.contains_key(w);
        if mine && !have {
            if let Some(spec) = self.desired.get(w).cloned()
                && !spec.deleted
            {
                self.gain(spec, false, now);
            }
        } else if !mine && have {
            self.lose(w);
        }
    }

    // ---- desired state ----------------------------------------------------------------

    fn on_workload(&mut self, spec: WorkloadSpec, now: Millis) {
        let w = spec.id.clone();
        let generation = spec.generation;
        if let Some(d) = self.desired.get(&w)
            && d.generation >= spec.generation
        {
            return;
        }
        self.accept_workload(spec, now);
        // Messages that waited for this manifest (or named an older one) are handled now.
        for (from, msg) in self.take_deferred(&w, generation) {
            self.on_message(from, msg, now);
        }
    }

    fn accept_workload(&mut self, spec: WorkloadSpec, now: Millis) {
        let w = spec.id.clone();
        let known_before = self.desired.contains_key(&w)
            || self.coords.contains_key(&w)
            || self.held.contains_key(&w);
        let spec = Arc::new(spec);
        let ring = workload_ring(&w);
        self.desired.insert(w.clone(), spec.clone());
        self.desired_ring.entry(ring).or_default().insert(w.clone());
        if spec.deleted {
            self.host_tombstone(&spec);
            if self.formed.remove(&w) {
                self.persist_dirty = true;
            }
        }
        let mine = self.coordinator(&w).is_some_and(|c| c == self.local);
        if !mine {
            return;
        }
        if self.coords.contains_key(&w) {
            self.update_spec(&w, spec, now);
            self.drive(&w, now);
        } else if !spec.deleted {
            let fresh = !known_before && self.settled(now);
            self.gain(spec, fresh, now);
        }
    }

    // ---- messages ---------------------------------------------------------------------

    fn on_message(&mut self, from: I, msg: Message<I>, now: Millis) {
        // Only members take part; the transport authenticated `from`.
        if from != self.local && !self.members.is_live(&from) {
            self.refuse(&from, msg.kind(), Refusal::NotMember);
            return;
        }
        match msg {
            Message::Tender(t) => self.on_tender(&from, t, now),
            Message::Bid(b) => self.on_bid(&from, b, now),
            Message::Decline(d) => self.on_decline(&from, d, now),
            Message::Award(a) => self.on_award(&from, a, now),
            Message::Release(r) => {
                self.reservations.remove(&(from, r.workload, r.round));
            }
            Message::Refuse(r) => self.on_refuse(&from, r, now),
            Message::Report(r) => self.on_report(&from, r, now),
            Message::Revoke(r) => self.on_revoke(&from, &r, now),
            Message::Formed(f) => self.on_formed(&from, f, now),
        }
    }

    // ---- status -----------------------------------------------------------------------

    /// Placements of a workload as this node knows them: every replica when this node
    /// coordinates it, otherwise its own.
    pub fn placements(&self, w: &WorkloadId) -> Vec<(I, ReplicaIndex, ReplicaState)> {
        self.status(w)
            .placements
            .into_iter()
            .map(|p| (p.node, p.index, p.state))
            .collect()
    }

    pub fn status(&self, w: &WorkloadId) -> WorkloadStatus<I> {
        if let Some(c) = self.coords.get(w) {
            return c.status(w);
        }
        let spec = self.desired.get(w);
        let mut placements = Vec::new();
        if let Some(slots) = self.held.get(w) {
            for (&index, h) in slots {
                placements.push(PlacementView {
                    node: self.local.clone(),
                    index,
                    generation: h.spec.generation,
                    state: h.state,
                });
            }
        }
        let running = placements
            .iter()
            .filter(|p| p.state == ReplicaState::Running)
            .count() as u32;
        WorkloadStatus {
            workload: w.clone(),
            generation: spec.map_or(0, |s| s.generation),
            replicas: spec.map_or(0, |s| s.wanted()),
            placed: placements.len() as u32,
            running,
            placements,
            unschedulable: spec.and_then(|s| self.static_check(s).err()),
            authoritative: false,
        }
    }

    /// Answers a [`StatusQuery`] from another node's API.
    pub fn answer(&self, q: &StatusQuery) -> StatusReply<I> {
        StatusReply {
            statuses: q
                .workloads
                .iter()
                .take(1024)
                .map(|w| self.status(w))
                .collect(),
        }
    }

    /// What this node must run (what [`Output::Persist`] carries).
    pub fn local_assignments(&self) -> LocalAssignments<I> {
        let mut assignments = Vec::new();
        for slots in self.held.values() {
            for (&index, h) in slots {
                assignments.push(Assignment {
                    spec: h.spec.clone(),
                    index,
                    epoch: h.epoch,
                    award: Some(h.award.clone()),
                });
            }
        }
        LocalAssignments {
            version: LOCAL_ASSIGNMENTS_VERSION,
            assignments,
            formed: self.formed.iter().cloned().collect(),
        }
    }

    /// Replicas this node runs (or is starting).
    pub fn local_replicas(&self) -> Vec<(ReplicaId, ReplicaState)> {
        let mut v = Vec::new();
        for (w, slots) in &self.held {
            for (&index, h) in slots {
                v.push((
                    ReplicaId {
                        workload: w.clone(),
                        index,
                        generation: h.spec.generation,
                    },
                    h.state,
                ));
            }
        }
        v
    }

    pub(crate) fn arm(&mut self, at: Millis, timer: Timer<I>) {
        self.timers.insert((at, timer));
    }

    pub(crate) fn disarm(&mut self, at: Millis, timer: Timer<I>) {
        self.timers.remove(&(at, timer));
    }
}

/// Ring position of a workload.
pub(crate) fn workload_ring(w: &WorkloadId) -> u64 {
    stable_hash(&w.key_bytes())
}

/// The coordinator of `w` when exactly `live` are the live nodes: what
/// [`Scheduler::coordinator`] answers on a node whose membership view is `live`. For tools
/// and tests that want to know which node tenders a workload.
pub fn coordinator_among<'a, I: NodeKey + 'a>(
    w: &WorkloadId,
    live: impl IntoIterator<Item = &'a I>,
) -> Option<I> {
    let pos = workload_ring(w);
    live.into_iter()
        .min_by_key(|id| {
            let ring = crate::members::node_ring(*id);
            // Nodes at or after `pos` first, then the wrapped ones; ties by ring then id.
            (ring < pos, ring, *id)
        })
        .cloned()
}
