//! The host's side: every node bids from its real free capacity, holds reservations for open
//! bids, runs what it was awarded, restarts what fails, and reports its replicas to their
//! coordinators.

use std::collections::BTreeMap;
use std::sync::Arc;

use beemesh_manifest::workload::Spread;

use crate::authority::{AwardProof, Signature};
use crate::config::backoff;
use crate::members::node_ring;
use crate::message::{
    Award, Bid, Decline, DeclineReason, Message, Refuse, Report, ReportedReplica, ReportedWorkload,
    Revoke, SlotEpoch, Tender, WorkloadRef,
};
use crate::scheduler::{LocalAssignments, MAX_FORMED, Output, Refusal, Scheduler, Timer, Verified};
use crate::score;
use crate::types::{
    Millis, NodeKey, ReplicaId, ReplicaIndex, ReplicaState, Resources, WorkloadId, WorkloadSpec,
};

/// Most open reservations (bids awaiting award or release) for one coordinator, and in all.
pub(crate) const MAX_RESERVATIONS_PER_SENDER: usize = 256;
pub(crate) const MAX_RESERVATIONS: usize = 4096;

/// A replica this node runs.
#[derive(Debug, Clone)]
pub(crate) struct Held<I> {
    pub spec: Arc<WorkloadSpec>,
    pub epoch: u64,
    /// The award this replica rests on (presented in every report).
    pub award: AwardProof<I>,
    pub state: ReplicaState,
    pub failures: u32,
    pub restart_at: Option<Millis>,
}

impl<I: NodeKey> Held<I> {
    fn claim(&self, index: ReplicaIndex, relinquish: bool) -> ReportedReplica<I> {
        ReportedReplica {
            index,
            epoch: self.epoch,
            state: self.state,
            relinquish,
            award: self.award.clone(),
        }
    }
}

/// How far `issuer` sits after the workload on the ring (its coordinator is the live node
/// nearest after it): the smaller, the more authority its awards carry.
pub(crate) fn issuer_distance<I: NodeKey>(workload_ring: u64, issuer: &I) -> u64 {
    node_ring(issuer).wrapping_sub(workload_ring)
}

/// Capacity held for an open bid.
#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub resources: Resources,
    pub expires: Millis,
}

impl<I: NodeKey> Scheduler<I> {
    /// Allocatable minus what runs here minus what open bids hold.
    pub(crate) fn free(&self) -> Resources {
        let alloc = self
            .members
            .info(&self.local)
            .map_or(Resources::ZERO, |i| i.allocatable);
        let mut used = Resources::ZERO;
        for slots in self.held.values() {
            for h in slots.values() {
                used = used.saturating_add(&h.spec.resources);
            }
        }
        for r in self.reservations.values() {
            used = used.saturating_add(&r.resources);
        }
        alloc.saturating_sub(&used)
    }

    pub(crate) fn on_tender(&mut self, from: &I, t: Tender, now: Millis) {
        let w = t.workload.id.clone();
        let decline = |reason| {
            Message::Decline(Decline {
                round: t.round,
                workload: w.clone(),
                reason,
            })
        };
        if !self.may_command(from, &w, now) {
            self.refuse(from, "tender", Refusal::NotCoordinator);
            self.send(from, decline(DeclineReason::NotCoordinator));
            return;
        }
        let spec = match self.verified(&t.workload) {
            Verified::Yes(spec) => spec,
            Verified::Stale => {
                self.send(from, decline(DeclineReason::Stale));
                return;
            }
            Verified::Mismatch => {
                self.refuse(from, "tender", Refusal::ContentMismatch);
                return;
            }
            Verified::Unknown => {
                let r = t.workload.clone();
                self.defer(from, r, Message::Tender(t), now);
                return;
            }
        };
        if spec.deleted {
            return;
        }
        if !self.local_known {
            self.send(from, decline(DeclineReason::NotReady));
            return;
        }
        let Some(info) = self.members.info(&self.local).cloned() else {
            self.send(from, decline(DeclineReason::NotReady));
            return;
        };
        if !spec.selects(&info.labels) {
            self.send(from, decline(DeclineReason::Selector));
            return;
        }
        if spec.spread == Spread::Node && self.held.get(&w).is_some_and(|s| !s.is_empty()) {
            self.send(from, decline(DeclineReason::AlreadyHosts));
            return;
        }
        // A repeated tender re-bids from scratch.
        let key = (from.clone(), w.clone(), t.round);
        if let Some(old) = self.reservations.remove(&key) {
            self.disarm(
                old.expires,
                Timer::Reservation(key.0.clone(), key.1.clone(), key.2),
            );
        }
        // Open bids hold real capacity: bounded per coordinator and in all.
        let per_sender = self.reservations.keys().filter(|k| &k.0 == from).count();
        if per_sender >= MAX_RESERVATIONS_PER_SENDER || self.reservations.len() >= MAX_RESERVATIONS
        {
            self.refuse(from, "tender", Refusal::TooManyReservations);
            self.send(from, decline(DeclineReason::Busy));
            return;
        }
        let free = self.free();
        let cap = if spec.spread == Spread::Node {
            1
        } else {
            t.wanted.max(1)
        };
        let slots = spec.resources.copies_in(&free, cap);
        if slots == 0 {
            self.send(from, decline(DeclineReason::Capacity { free }));
            return;
        }
        let hold = if t.hold_ms == 0 {
            self.config.hold
        } else {
            t.hold_ms.min(self.config.hold.saturating_mul(4))
        };
        let expires = now + hold;
        self.reservations.insert(
            key.clone(),
            Reservation {
                resources: spec.resources.times(slots),
                expires,
            },
        );
        self.arm(expires, Timer::Reservation(key.0, key.1, key.2));
        let preferred = spec.preferred(&info.labels);
        let bid = Bid {
            round: t.round,
            workload: w,
            generation: spec.generation,
            slots,
            free,
            allocatable: info.allocatable,
            preferred,
            score: score(
                &free.saturating_sub(&spec.resources),
                &info.allocatable,
                preferred,
                spec.prefer.len(),
            ),
        };
        self.send(from, Message::Bid(bid));
    }

    pub(crate) fn on_award(&mut self, from: &I, a: Award<I>, now: Millis) {
        let w = a.workload.id.clone();
        if a.slots.is_empty() {
            return;
        }
        let refuse_all = |reason| {
            Message::Refuse(Refuse {
                workload: w.clone(),
                generation: a.workload.generation,
                slots: a
                    .slots
                    .iter()
                    .map(|s| SlotEpoch {
                        index: s.index,
                        epoch: s.epoch,
                    })
                    .collect(),
                reason,
            })
        };
        if !self.may_command(from, &w, now) {
            self.refuse(from, "award", Refusal::NotCoordinator);
            self.send(from, refuse_all(DeclineReason::NotCoordinator));
            return;
        }
        let spec = match self.verified(&a.workload) {
            Verified::Yes(spec) => spec,
            Verified::Stale => {
                self.send(from, refuse_all(DeclineReason::Stale));
                return;
            }
            Verified::Mismatch => {
                self.refuse(from, "award", Refusal::ContentMismatch);
                return;
            }
            Verified::Unknown => {
                let r = a.workload.clone();
                self.defer(from, r, Message::Award(a), now);
                return;
            }
        };
        if spec.deleted {
            return;
        }
        let selects = self
            .members
            .info(&self.local)
            .is_some_and(|i| spec.selects(&i.labels));
        if !self.local_known || !selects {
            self.send(from, refuse_all(DeclineReason::Selector));
            return;
        }
        // The bid's reservation becomes this award's capacity.
        let key = (from.clone(), w.clone(), a.round);
        if let Some(r) = self.reservations.remove(&key) {
            self.disarm(r.expires, Timer::Reservation(key.0, key.1, key.2));
        }
        let mut accepted = false;
        let mut refused: Vec<SlotEpoch> = Vec::new();
        let mut reason = DeclineReason::Other;
        // Where this award's outputs begin: the group is formed before a replica starts.
        let first_output = self.out.len();
        for sa in a.slots {
            let free = self.free();
            let award = AwardProof {
                issuer: from.clone(),
                sig: sa.sig,
            };
            let slot = SlotEpoch {
                index: sa.index,
                epoch: sa.epoch,
            };
            let slots = self.held.entry(w.clone()).or_default();
            match slots.get_mut(&sa.index) {
                Some(h) if h.spec.generation == spec.generation => {
                    // A repeated award, a newer epoch for what already runs, or the current
                    // coordinator taking the replica over under its own award: no restart.
                    let newer = if h.award.issuer == *from {
                        sa.epoch > h.epoch
                    } else {
                        (h.award.sig, h.epoch) != (sa.sig, sa.epoch)
                    };
                    if newer {
                        h.epoch = sa.epoch;
                        h.award = award;
                        self.persist_dirty = true;
                    }
                    accepted = true;
                }
                Some(h) if h.spec.generation > spec.generation => {
                    refused.push(slot);
                    reason = DeclineReason::Stale;
                }
                Some(h) => {
                    // In place: the old generation's capacity is this one's.
                    let room = free.saturating_add(&h.spec.resources);
                    if spec.resources.fits_in(&room) {
                        let old = h.spec.replica(sa.index).id;
                        *h = Held {
                            spec: spec.clone(),
                            epoch: sa.epoch,
                            award,
                            state: ReplicaState::Starting,
                            failures: 0,
                            restart_at: None,
                        };
                        self.out.push(Output::Stop { replica: old });
                        self.out.push(Output::Start {
                            replica: spec.replica(sa.index),
                        });
                        self.persist_dirty = true;
                        accepted = true;
                    } else {
                        refused.push(slot);
                        reason = DeclineReason::Capacity { free: room };
                    }
                }
                None => {
                    if spec.spread == Spread::Node && !slots.is_empty() {
                        refused.push(slot);
                        reason = DeclineReason::AlreadyHosts;
                    } else if spec.resources.fits_in(&free) {
                        slots.insert(
                            sa.index,
                            Held {
                                spec: spec.clone(),
                                epoch: sa.epoch,
                                award,
                                state: ReplicaState::Starting,
                                failures: 0,
                                restart_at: None,
                            },
                        );
                        self.out.push(Output::Start {
                            replica: spec.replica(sa.index),
                        });
                        self.persist_dirty = true;
                        accepted = true;
                    } else {
                        refused.push(slot);
                        reason = DeclineReason::Capacity { free };
                    }
                }
            }
        }
        if self.held.get(&w).is_some_and(BTreeMap::is_empty) {
            self.held.remove(&w);
        }
        if accepted {
            if spec.strong && a.bootstrap.contains(&self.local) {
                self.out.insert(
                    first_output,
                    Output::Bootstrap {
                        workload: w.clone(),
                        voters: a.bootstrap.clone(),
                    },
                );
            }
            self.report_workload(&w, Some(from));
        }
        if !refused.is_empty() {
            self.send(
                from,
                Message::Refuse(Refuse {
                    workload: w,
                    generation: spec.generation,
                    slots: refused,
                    reason,
                }),
            );
        }
    }

    /// Stops a claim that lost, only if it is exactly the claim named (a stale revoke never
    /// stops a newer award).
    pub(crate) fn on_revoke(&mut self, from: &I, r: &Revoke, now: Millis) {
        if !self.may_command(from, &r.workload, now) {
            self.refuse(from, "revoke", Refusal::NotCoordinator);
            return;
        }
        let Some(slots) = self.held.get_mut(&r.workload) else {
            return;
        };
        let matches = slots
            .get(&r.index)
            .is_some_and(|h| h.spec.generation == r.generation && h.epoch == r.epoch);
        if !matches {
            return;
        }
        if let Some(h) = slots.remove(&r.index) {
            if slots.is_empty() {
                self.held.remove(&r.workload);
            }
            if let Some(at) = h.restart_at {
                self.disarm(at, Timer::Restart(r.workload.clone(), r.index));
            }
            self.out.push(Output::Stop {
                replica: h.spec.replica(r.index).id,
            });
            self.persist_dirty = true;
            // Tell the coordinator of our view what is left (the revoke may have come from
            // another one).
            let mut workloads = self.reported(&r.workload);
            if workloads.is_empty() {
                workloads.push(ReportedWorkload {
                    workload: WorkloadRef::of(&h.spec),
                    replicas: Vec::new(),
                });
            }
            if let Some(to) = self.coordinator(&r.workload)
                && &to != from
            {
                let seq = self.next_report_seq();
                self.send(&to, Message::Report(Report { seq, workloads }));
            }
        }
    }

    fn held_mut(&mut self, id: &ReplicaId) -> Option<&mut Held<I>> {
        self.held
            .get_mut(&id.workload)
            .and_then(|s| s.get_mut(&id.index))
            .filter(|h| h.spec.generation == id.generation)
    }

    pub(crate) fn on_replica_started(&mut self, id: &ReplicaId, _now: Millis) {
        let Some(h) = self.held_mut(id) else { return };
        if h.state == ReplicaState::Running {
            return;
        }
        h.state = ReplicaState::Running;
        h.failures = 0;
        self.report_workload(&id.workload, None);
    }

    pub(crate) fn on_replica_failed(&mut self, id: &ReplicaId, _reason: &str, now: Millis) {
        let max = self.config.max_restarts;
        let (min_b, max_b) = (self.config.restart_min, self.config.restart_max);
        let salt = self.local_ring;
        let Some(h) = self.held_mut(id) else { return };
        h.failures += 1;
        h.state = ReplicaState::Failed;
        if h.failures > max {
            self.relinquish(id);
            return;
        }
        let at = now + backoff(min_b, max_b, h.failures, salt ^ u64::from(id.index));
        let old = h.restart_at.replace(at);
        if let Some(old) = old {
            self.disarm(old, Timer::Restart(id.workload.clone(), id.index));
        }
        self.arm(at, Timer::Restart(id.workload.clone(), id.index));
        self.report_workload(&id.workload, None);
    }

    pub(crate) fn on_replica_stopped(&mut self, id: &ReplicaId, now: Millis) {
        // Stops this node asked for concern replicas it no longer holds.
        let unexpected = self
            .held_mut(id)
            .is_some_and(|h| h.state != ReplicaState::Failed);
        if unexpected {
            self.on_replica_failed(id, "stopped", now);
        }
    }

    /// Gives a replica that keeps failing here back to its coordinator.
    fn relinquish(&mut self, id: &ReplicaId) {
        let Some(slots) = self.held.get_mut(&id.workload) else {
            return;
        };
        let Some(h) = slots.remove(&id.index) else {
            return;
        };
        if slots.is_empty() {
            self.held.remove(&id.workload);
        }
        if let Some(at) = h.restart_at {
            self.disarm(at, Timer::Restart(id.workload.clone(), id.index));
        }
        self.out.push(Output::Stop {
            replica: id.clone(),
        });
        self.persist_dirty = true;
        let mut workloads = self.reported(&id.workload);
        let mut given_back = h.claim(id.index, true);
        given_back.state = ReplicaState::Failed;
        match workloads
            .iter_mut()
            .find(|rw| rw.workload.generation == h.spec.generation)
        {
            Some(rw) => rw.replicas.push(given_back),
            None => workloads.push(ReportedWorkload {
                workload: WorkloadRef::of(&h.spec),
                replicas: vec![given_back],
            }),
        }
        if let Some(to) = self.coordinator(&id.workload) {
            let seq = self.next_report_seq();
            self.send(&to, Message::Report(Report { seq, workloads }));
        }
    }

    pub(crate) fn restart_due(&mut self, w: &WorkloadId, index: ReplicaIndex, now: Millis) {
        let Some(h) = self.held.get_mut(w).and_then(|s| s.get_mut(&index)) else {
            return;
        };
        if h.state != ReplicaState::Failed || h.restart_at.is_none_or(|t| t > now) {
            return;
        }
        h.restart_at = None;
        h.state = ReplicaState::Starting;
        let replica = h.spec.replica(index);
        self.out.push(Output::Start { replica });
    }

    pub(crate) fn next_report_seq(&mut self) -> u64 {
        self.report_seq += 1;
        self.report_seq
    }

    /// What this node holds of one workload, as report entries (one per generation held).
    fn reported(&self, w: &WorkloadId) -> Vec<ReportedWorkload<I>> {
        let mut by_gen: BTreeMap<u64, ReportedWorkload<I>> = BTreeMap::new();
        if let Some(slots) = self.held.get(w) {
            for (&index, h) in slots {
                by_gen
                    .entry(h.spec.generation)
                    .or_insert_with(|| ReportedWorkload {
                        workload: WorkloadRef::of(&h.spec),
                        replicas: Vec::new(),
                    })
                    .replicas
                    .push(h.claim(index, false));
            }
        }
        by_gen.into_values().collect()
    }

    /// Reports one workload to its coordinator (and to `also`, the awarder, if different).
    pub(crate) fn report_workload(&mut self, w: &WorkloadId, also: Option<&I>) {
        let workloads = self.reported(w);
        if workloads.is_empty() {
            return;
        }
        let target = self.coordinator(w);
        let seq = self.next_report_seq();
        if let Some(t) = &target {
            self.report_target.insert(w.clone(), t.clone());
            self.send(
                t,
                Message::Report(Report {
                    seq,
                    workloads: workloads.clone(),
                }),
            );
        }
        if let Some(a) = also
            && target.as_ref() != Some(a)
        {
            self.send(a, Message::Report(Report { seq, workloads }));
        }
    }

    fn send_reports(&mut self, ws: Vec<WorkloadId>) {
        let mut by_target: BTreeMap<I, Vec<ReportedWorkload<I>>> = BTreeMap::new();
        for w in ws {
            let Some(t) = self.coordinator(&w) else {
                continue;
            };
            let entries = self.reported(&w);
            if entries.is_empty() {
                continue;
            }
            self.report_target.insert(w, t.clone());
            by_target.entry(t).or_default().extend(entries);
        }
        for (t, workloads) in by_target {
            let seq = self.next_report_seq();
            self.send(&t, Message::Report(Report { seq, workloads }));
        }
    }

    /// Anti-entropy: every replica to its coordinator, one message per coordinator.
    pub(crate) fn report_all(&mut self) {
        let ws: Vec<WorkloadId> = self.held.keys().cloned().collect();
        self.send_reports(ws);
    }

    /// After a membership change: reports to coordinators that changed, and once more a
    /// little later.
    pub(crate) fn retarget_reports(&mut self, now: Millis) {
        let mut changed = Vec::new();
        for w in self.held.keys() {
            let now_target = self.coordinator(w);
            if now_target.as_ref() != self.report_target.get(w) {
                changed.push(w.clone());
            }
        }
        self.report_target.retain(|w, _| self.held.contains_key(w));
        if !changed.is_empty() {
            for w in &changed {
                self.rereport.insert(w.clone(), 2);
            }
            self.arm_rereport(now + (self.config.takeover_grace / 2).max(1));
            self.send_reports(changed);
        }
    }

    fn arm_rereport(&mut self, at: Millis) {
        match self.rereport_at {
            Some(t) if t <= at => {}
            other => {
                if let Some(t) = other {
                    self.disarm(t, Timer::Rereport);
                }
                self.rereport_at = Some(at);
                self.arm(at, Timer::Rereport);
            }
        }
    }

    pub(crate) fn rereport_due(&mut self, now: Millis) {
        let mut ws = Vec::new();
        let mut again = false;
        let pending = std::mem::take(&mut self.rereport);
        for (w, left) in pending {
            if !self.held.contains_key(&w) {
                continue;
            }
            ws.push(w.clone());
            if left > 1 {
                self.rereport.insert(w, left - 1);
                again = true;
            }
        }
        if again {
            self.arm_rereport(now + self.config.takeover_grace.saturating_mul(3) / 2);
        }
        self.send_reports(ws);
    }

    /// A tombstone: stop every replica of the workload at once, coordinator or not.
    pub(crate) fn host_tombstone(&mut self, spec: &WorkloadSpec) {
        let w = &spec.id;
        if let Some(slots) = self.held.remove(w) {
            for (index, h) in slots {
                if h.spec.generation > spec.generation {
                    self.held.entry(w.clone()).or_default().insert(index, h);
                    continue;
                }
                if let Some(at) = h.restart_at {
                    self.disarm(at, Timer::Restart(w.clone(), index));
                }
                self.out.push(Output::Stop {
                    replica: h.spec.replica(index).id,
                });
                self.persist_dirty = true;
            }
        }
        let keys: Vec<(I, WorkloadId, u64)> = self
            .reservations
            .keys()
            .filter(|k| &k.1 == w)
            .cloned()
            .collect();
        for k in keys {
            if let Some(r) = self.reservations.remove(&k) {
                self.disarm(r.expires, Timer::Reservation(k.0, k.1, k.2));
            }
        }
    }

    pub(crate) fn restore_assignments(&mut self, saved: LocalAssignments<I>, _now: Millis) {
        // Bounded by the desired state once it arrives: a tombstone removes an entry.
        for w in saved.formed.into_iter().take(MAX_FORMED) {
            if !self.desired.get(&w).is_some_and(|d| d.deleted) {
                self.formed.insert(w);
            }
        }
        let mut touched: Vec<WorkloadId> = Vec::new();
        for a in saved.assignments {
            if a.spec.deleted
                || self
                    .desired
                    .get(&a.spec.id)
                    .is_some_and(|d| d.deleted && d.generation >= a.spec.generation)
            {
                continue;
            }
            let w = a.spec.id.clone();
            let slots = self.held.entry(w.clone()).or_default();
            if let Some(h) = slots.get(&a.index)
                && (h.spec.generation, h.epoch) >= (a.spec.generation, a.epoch)
            {
                continue;
            }
            let spec = a.spec;
            let Some(slots) = self.held.get_mut(&w) else {
                continue;
            };
            // A version 1 record has no award: the claim cannot be proven and the mesh will
            // replace it, but the replica runs meanwhile (edge autonomy).
            let award = a.award.unwrap_or_else(|| AwardProof {
                issuer: self.local.clone(),
                sig: Signature::default(),
            });
            slots.insert(
                a.index,
                Held {
                    spec: spec.clone(),
                    epoch: a.epoch,
                    award,
                    state: ReplicaState::Starting,
                    failures: 0,
                    restart_at: None,
                },
            );
            self.out.push(Output::Start {
                replica: spec.replica(a.index),
            });
            touched.push(w);
        }
        touched.dedup();
        self.send_reports(touched);
    }
}
