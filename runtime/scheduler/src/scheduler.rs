//! The state machine: inputs in, outputs out, with an explicit `now`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::SchedulerConfig;
use crate::coord::Coord;
use crate::hash::stable_hash;
use crate::host::{Held, Reservation};
use crate::members::{MemberTable, Membership, Transition, node_ring};
use crate::message::{Message, ReportedWorkload};
use crate::types::{
    Millis, NodeInfo, NodeKey, Replica, ReplicaId, ReplicaIndex, ReplicaState, WorkloadId,
    WorkloadSpec,
};

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
    /// Desired state: a verified manifest generation, or a tombstone. Older generations than
    /// the one known are ignored.
    Workload(WorkloadSpec),
    /// A protocol message; `from` is the transport's authenticated peer.
    Message { from: I, msg: Message },
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
    Send { to: I, msg: Message },
    /// Start this replica with the local driver.
    Start { replica: Replica },
    /// Stop this replica and remove its container.
    Stop { replica: ReplicaId },
    /// Persist what this node must run (replaces the previous record); hand it to
    /// [`Scheduler::restore`] after a restart.
    Persist(LocalAssignments),
}

/// What this node must run: persisted by the node, restored after a restart so replicas come
/// back without any network (edge autonomy).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LocalAssignments {
    #[serde(default = "format_version")]
    pub version: u32,
    #[serde(default)]
    pub assignments: Vec<Assignment>,
}

fn format_version() -> u32 {
    LocalAssignments::VERSION
}

impl LocalAssignments {
    pub const VERSION: u32 = 1;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub spec: Arc<WorkloadSpec>,
    pub index: ReplicaIndex,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "persisted assignments have format version {found}; this version reads up to {}",
        LocalAssignments::VERSION
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
    pub tenders_opened: u64,
    pub awards: u64,
    pub replicas_awarded: u64,
    pub conflicts_resolved: u64,
    pub rescheduled: u64,
    pub reservations_expired: u64,
    pub unschedulable_checks: u64,
}

/// A report kept for later: (host, received at, its sequence number, its entries).
pub(crate) type EarlyReport<I> = (I, Millis, u64, Vec<ReportedWorkload>);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer<I> {
    Coord(WorkloadId),
    Reservation(I, WorkloadId, u64),
    Restart(WorkloadId, ReplicaIndex),
    Report,
    Rereport,
}

/// One node's scheduler. See the crate documentation for the protocol.
#[derive(Debug)]
pub struct Scheduler<I: NodeKey> {
    pub(crate) local: I,
    pub(crate) local_ring: u64,
    pub(crate) config: SchedulerConfig,
    pub(crate) members: Membership<I>,
    /// Whether the node has told us its own capacity.
    pub(crate) local_known: bool,
    pub(crate) desired: BTreeMap<WorkloadId, Arc<WorkloadSpec>>,
    pub(crate) desired_ring: BTreeMap<u64, BTreeSet<WorkloadId>>,
    pub(crate) coords: BTreeMap<WorkloadId, Coord<I>>,
    pub(crate) held: BTreeMap<WorkloadId, BTreeMap<ReplicaIndex, Held>>,
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
    pub(crate) loopback: VecDeque<Message>,
    pub(crate) persist_dirty: bool,
    pub(crate) stats: Stats,
}

impl<I: NodeKey> Scheduler<I> {
    /// A scheduler that knows only itself; feed it [`Input::NodeUp`] for itself (its capacity
    /// and labels) and for every peer.
    pub fn new(local: I, config: SchedulerConfig) -> Self {
        Self::with_members(local, config, Arc::new(MemberTable::new([])))
    }

    /// A scheduler whose membership view starts from a shared table (a simulator hands every
    /// node the same one; a node may build one from its peer list). The local node's entry,
    /// if present, is its own capacity.
    pub fn with_members(local: I, config: SchedulerConfig, table: Arc<MemberTable<I>>) -> Self {
        let mut members = Membership::new(table);
        let local_known = members.is_live(&local);
        if !local_known {
            members.up(&local, NodeInfo::default());
        }
        Self {
            local_ring: node_ring(&local),
            local,
            config,
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
        saved: LocalAssignments,
        now: Millis,
    ) -> Result<Vec<Output<I>>, RestoreError> {
        if saved.version > LocalAssignments::VERSION {
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
                Timer::Report => {
                    self.prune_early_reports(now);
                    self.report_all();
                    let next = now + self.config.report_interval;
                    self.timers.insert((next, Timer::Report));
                }
            }
        }
    }

    pub(crate) fn send(&mut self, to: &I, msg: Message) {
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
        let t = self.members.up(&node, info);
        match t {
            Transition::Same => return,
            Transition::Updated => {}
            Transition::Joined => {
                self.reassign_arc(&node, now);
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
        if let Some(d) = self.desired.get(&w)
            && d.generation >= spec.generation
        {
            return;
        }
        let known_before = self.desired.contains_key(&w)
            || self.coords.contains_key(&w)
            || self.held.contains_key(&w);
        let spec = Arc::new(spec);
        let ring = workload_ring(&w);
        self.desired.insert(w.clone(), spec.clone());
        self.desired_ring.entry(ring).or_default().insert(w.clone());
        if spec.deleted {
            self.host_tombstone(&spec);
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

    fn on_message(&mut self, from: I, msg: Message, now: Millis) {
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
            Message::Revoke(r) => self.on_revoke(&from, &r),
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
    pub fn local_assignments(&self) -> LocalAssignments {
        let mut assignments = Vec::new();
        for slots in self.held.values() {
            for (&index, h) in slots {
                assignments.push(Assignment {
                    spec: h.spec.clone(),
                    index,
                    epoch: h.epoch,
                });
            }
        }
        LocalAssignments {
            version: LocalAssignments::VERSION,
            assignments,
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
