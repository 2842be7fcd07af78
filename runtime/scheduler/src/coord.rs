//! The coordinator's side: one node per workload (the first live node at or after the
//! workload's ring position) keeps the table of its replica slots, tenders vacant slots to a
//! small sample of eligible nodes, awards them to the best bids, and reconciles the claims
//! hosts report by a total order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use beemesh_manifest::workload::Spread;

use crate::authority::{AwardProof, Signature, award_message};
use crate::config::backoff;
use crate::hash::{SplitMix, mix, tiebreak};
use crate::host::issuer_distance;
use crate::members::node_ring;
use crate::message::{
    Award, Bid, Decline, DeclineReason, Formed, Message, Refuse, Release, Report, ReportedReplica,
    ReportedWorkload, Revoke, RevokeReason, SlotAward, Tender, WorkloadRef,
};
use crate::scheduler::{
    MAX_FORMED, PlacementView, Refusal, Scheduler, Timer, Verified, WorkloadStatus, workload_ring,
};
use crate::score;
use crate::types::{
    Millis, NodeInfo, NodeKey, ReplicaIndex, ReplicaState, Resources, WorkloadId, WorkloadSpec,
};

/// Most nodes remembered per slot as having refused or given it back.
const MAX_AVOID: usize = 16;
/// Most reports kept for workloads this node may soon coordinate.
const MAX_EARLY_REPORTS: usize = 4096;
/// A report numbered below the last one applied from its host, arriving within this long of
/// it, was overtaken on the way; later, a lower number means the host restarted.
const REORDER_WINDOW: Millis = 5_000;
/// Most reports kept per host for workloads this node may soon coordinate.
const MAX_EARLY_REPORTS_PER_SENDER: usize = 256;
/// A claim's epoch may exceed the highest epoch this coordinator has seen for the workload
/// by at most this much: no claim is guessed into dominance with a huge epoch, and epochs
/// never approach overflow. Honest epochs grow by one per award round.
pub(crate) const MAX_EPOCH_STEP: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Coord<I> {
    pub spec: Arc<WorkloadSpec>,
    pub ring: u64,
    pub slots: BTreeMap<ReplicaIndex, Slot<I>>,
    /// Every epoch this coordinator hands out is above every epoch it has seen.
    pub next_epoch: u64,
    pub round: u64,
    pub tender: Option<Open<I>>,
    /// Unknown slots are not treated as missing before this (takeover grace).
    pub ready_at: Millis,
    /// The workload arrived new while this node coordinated: nothing of it can exist yet.
    pub fresh: bool,
    /// A strong workload of which no claim is known is not placed (and its Raft group not
    /// formed) before this. A coordinator that took it over from a live mesh cannot tell
    /// "never placed" from "its hosts have not told me yet" (they retarget their reports when
    /// their own view changes, which may lag this node's): it waits a full report interval,
    /// within which every live host has reported, rather than form a second group.
    pub bootstrap_at: Millis,
    pub retry_at: Millis,
    pub failed_rounds: u32,
    /// Cannot be placed with the current membership: retried only when it grows.
    pub parked: Option<String>,
    /// Could not be placed for lack of free capacity: retried with backoff.
    pub shortfall: Option<String>,
    /// A strong workload whose group was formed but of which no claim reached this
    /// coordinator: not placed (why, for the status).
    pub orphaned: Option<String>,
    pub wake: Option<Millis>,
    /// The last report applied from each host: its sequence number and when.
    pub last_report: BTreeMap<I, (u64, Millis)>,
}

#[derive(Debug)]
pub(crate) struct Slot<I> {
    /// The best claim known for this replica.
    pub holder: Option<Claim<I>>,
    /// An award not yet accepted.
    pub pending: Option<Pending<I>>,
    /// The holder's node has been down since.
    pub down_since: Option<Millis>,
    /// Nodes that refused or gave back this replica (not asked again for it).
    pub avoid: Vec<I>,
    /// Being replaced by a new generation (counts against `max_unavailable`).
    pub upgrading: bool,
}

impl<I> Default for Slot<I> {
    fn default() -> Self {
        Self {
            holder: None,
            pending: None,
            down_since: None,
            avoid: Vec::new(),
            upgrading: false,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Claim<I> {
    pub node: I,
    pub generation: u64,
    pub epoch: u64,
    pub state: ReplicaState,
    /// The award it rests on (verified when first seen).
    pub award: AwardProof<I>,
    /// The award's authority: [`TIER_OWN`], [`TIER_MEMBER`] or [`TIER_SELF`].
    pub tier: u8,
    /// The issuer's ring distance from the workload (smaller: more authority).
    pub distance: u64,
    /// Not running (starting or failed) since then, as the holder reported.
    pub not_running_since: Option<Millis>,
}

#[derive(Debug, Clone)]
pub(crate) struct Pending<I> {
    pub node: I,
    pub epoch: u64,
    pub sig: Signature,
    /// A strong workload's first voters, when this award is part of its first placement.
    pub bootstrap: Vec<I>,
    pub spec: Arc<WorkloadSpec>,
    pub round: u64,
    pub deadline: Millis,
    pub attempts: u32,
}

#[derive(Debug)]
pub(crate) struct Open<I> {
    pub round: u64,
    pub generation: u64,
    pub indexes: Vec<ReplicaIndex>,
    pub answers: BTreeMap<I, Answer>,
    pub deadline: Millis,
    /// Fewer candidates than asked for existed: every eligible node was asked.
    pub exhaustive: bool,
}

#[derive(Debug)]
pub(crate) enum Answer {
    Waiting,
    Bid(Bid),
    Declined(DeclineReason),
}

impl<I: NodeKey> Open<I> {
    fn complete(&self) -> bool {
        self.answers.values().all(|a| !matches!(a, Answer::Waiting))
    }
}

/// Claims awarded by this coordinator itself.
pub(crate) const TIER_OWN: u8 = 2;
/// Claims awarded by another node that is, or recently was, a member (a coordinator this one
/// took over from, or the other side's after a partition).
pub(crate) const TIER_MEMBER: u8 = 1;
/// Claims awarded by the claimant to itself, or by a node this one never knew as a member.
pub(crate) const TIER_SELF: u8 = 0;

/// The total order on claims to one replica: newer generation, then the award's authority
/// (this coordinator's own, then another member's, then one a node gave itself), then the
/// issuer nearest after the workload on the ring, then newer epoch, then the rendezvous
/// weight of (workload, index, node), then the node id. The greatest wins. Ranking the
/// authority before the epoch means that a node that awards itself a replica, whatever epoch
/// it picks, never beats an award of the coordinator or of any other member.
pub(crate) fn claim_key<I: NodeKey>(
    ring: u64,
    index: ReplicaIndex,
    c: &Claim<I>,
) -> (u64, u8, Reverse<u64>, u64, u64, &I) {
    (
        c.generation,
        c.tier,
        Reverse(c.distance),
        c.epoch,
        tiebreak(ring, index, node_ring(&c.node)),
        &c.node,
    )
}

impl<I: NodeKey> Coord<I> {
    pub fn new(
        spec: Arc<WorkloadSpec>,
        ready_at: Millis,
        fresh: bool,
        bootstrap_at: Millis,
    ) -> Self {
        Self {
            ring: workload_ring(&spec.id),
            spec,
            slots: BTreeMap::new(),
            next_epoch: 1,
            round: 0,
            tender: None,
            ready_at,
            fresh,
            bootstrap_at: bootstrap_at.max(ready_at),
            retry_at: 0,
            failed_rounds: 0,
            parked: None,
            shortfall: None,
            orphaned: None,
            wake: None,
            last_report: BTreeMap::new(),
        }
    }

    /// No claim of the workload was ever seen (every epoch seen raises `next_epoch`) and
    /// nothing is held or awarded.
    pub fn unclaimed(&self) -> bool {
        self.next_epoch == 1
            && self
                .slots
                .values()
                .all(|s| s.holder.is_none() && s.pending.is_none())
    }

    /// Whether anything of this workload involves `node`.
    pub fn references(&self, node: &I) -> bool {
        self.slots.values().any(|s| {
            s.holder.as_ref().is_some_and(|h| &h.node == node)
                || s.pending.as_ref().is_some_and(|p| &p.node == node)
        }) || self
            .tender
            .as_ref()
            .is_some_and(|t| t.answers.contains_key(node))
    }

    pub fn unpark(&mut self, now: Millis) {
        self.parked = None;
        self.failed_rounds = 0;
        self.retry_at = now;
    }

    pub fn status(&self, w: &WorkloadId) -> WorkloadStatus<I> {
        let wanted = self.spec.wanted();
        let mut placements = Vec::new();
        let mut placed = 0;
        let mut running = 0;
        for (&index, s) in &self.slots {
            if index < wanted && (s.holder.is_some() || s.pending.is_some()) {
                placed += 1;
            }
            if let Some(h) = &s.holder {
                if h.state == ReplicaState::Running {
                    running += 1;
                }
                placements.push(PlacementView {
                    node: h.node.clone(),
                    index,
                    generation: h.generation,
                    state: h.state,
                });
            }
            if let Some(p) = &s.pending
                && s.holder
                    .as_ref()
                    .is_none_or(|h| h.node != p.node || h.generation != p.spec.generation)
            {
                placements.push(PlacementView {
                    node: p.node.clone(),
                    index,
                    generation: p.spec.generation,
                    state: ReplicaState::Pending,
                });
            }
        }
        WorkloadStatus {
            workload: w.clone(),
            generation: self.spec.generation,
            replicas: wanted,
            placed,
            running,
            placements,
            unschedulable: self
                .orphaned
                .clone()
                .or_else(|| self.parked.clone())
                .or_else(|| self.shortfall.clone()),
            authoritative: true,
        }
    }
}

/// Collects the earliest of several deadlines.
#[derive(Default)]
struct Wake(Option<Millis>);

impl Wake {
    fn at(&mut self, t: Millis) {
        self.0 = Some(self.0.map_or(t, |w| w.min(t)));
    }
}

impl<I: NodeKey> Scheduler<I> {
    /// Starts coordinating a workload. `fresh`: it is new to this node while this node was
    /// settled, so no replica of it can exist and nothing needs to be waited for.
    pub(crate) fn gain(&mut self, spec: Arc<WorkloadSpec>, fresh: bool, now: Millis) {
        let w = spec.id.clone();
        let ready_at = if fresh {
            now
        } else {
            (now + self.config.takeover_grace).max(self.settle_end())
        };
        // Taken over while this node was settled (a coordinator left): hosts of the workload
        // learn of the change on their own schedule, so a group may exist that no report has
        // named yet. At start-up the settle window and every host's report on seeing this node
        // join cover the same ground.
        let bootstrap_at = if fresh || !self.settled(now) {
            ready_at
        } else {
            now.saturating_add(self.config.report_interval)
        };
        self.coords
            .insert(w.clone(), Coord::new(spec, ready_at, fresh, bootstrap_at));
        // This node's own replicas of the workload are claims like any other.
        let own: Vec<(WorkloadRef, ReportedReplica<I>)> = self
            .held
            .get(&w)
            .map(|slots| {
                slots
                    .iter()
                    .map(|(&index, h)| {
                        (
                            WorkloadRef::of(&h.spec),
                            ReportedReplica {
                                index,
                                epoch: h.epoch,
                                state: h.state,
                                relinquish: false,
                                award: h.award.clone(),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let local = self.local.clone();
        for (r, claim) in own {
            self.observe(&w, &local, &r, claim, now);
        }
        self.report_target.insert(w.clone(), local);
        if let Some(early) = self.early_reports.remove(&w) {
            self.early_count -= early.len();
            let fresh_enough = now.saturating_sub(self.config.report_interval);
            for (from, at, seq, groups) in early {
                if at < fresh_enough || !self.members.is_live(&from) {
                    continue;
                }
                // Checked like a report arriving now: its generations must be verified here.
                self.on_report(
                    &from,
                    Report {
                        seq,
                        workloads: groups,
                    },
                    now,
                );
            }
        }
        self.drive(&w, now);
    }

    /// A strong workload's group was formed, says `from`. Believed only from the workload's
    /// coordinator (in this node's view, or its predecessor within the takeover grace), for a
    /// strong workload of the verified desired state: a node that is not may not stop a
    /// group from forming.
    pub(crate) fn on_formed(&mut self, from: &I, f: Formed, now: Millis) {
        let w = f.workload.id.clone();
        if !self.may_command(from, &w, now) {
            self.refuse(from, "formed", Refusal::NotCoordinator);
            return;
        }
        match self.verified(&f.workload) {
            Verified::Yes(_) | Verified::Stale => {}
            Verified::Mismatch => {
                self.refuse(from, "formed", Refusal::ContentMismatch);
                return;
            }
            Verified::Unknown => {
                let r = f.workload.clone();
                self.defer(from, r, Message::Formed(f), now);
                return;
            }
        }
        let strong = self.desired.get(&w).is_some_and(|d| d.strong && !d.deleted);
        if strong && self.formed.len() < MAX_FORMED && self.formed.insert(w) {
            self.persist_dirty = true;
        }
    }

    /// Every member learns that `spec`'s group is being formed now (its first hosts were
    /// just awarded with `bootstrap`), this node first.
    fn announce_formed(&mut self, spec: &WorkloadSpec) {
        if self.formed.len() < MAX_FORMED {
            self.formed.insert(spec.id.clone());
            self.persist_dirty = true;
        }
        let workload = WorkloadRef::of(spec);
        let members: Vec<I> = self
            .members
            .live_nodes()
            .map(|(_, n, _)| n)
            .filter(|n| **n != self.local)
            .cloned()
            .collect();
        for m in members {
            self.send(
                &m,
                Message::Formed(Formed {
                    workload: workload.clone(),
                }),
            );
        }
    }

    /// Tells `node` (just joined) of the formed groups of the workloads this node coordinates
    /// or just handed to it: it may coordinate them one day.
    pub(crate) fn tell_formed(&mut self, node: &I, _now: Millis) {
        let tell: Vec<WorkloadRef> = self
            .formed
            .iter()
            .filter(|w| {
                self.coordinator(w)
                    .is_some_and(|c| c == self.local || &c == node)
            })
            .filter_map(|w| self.desired.get(w).map(|s| WorkloadRef::of(s)))
            .collect();
        for workload in tell {
            self.send(node, Message::Formed(Formed { workload }));
        }
    }

    pub(crate) fn prune_early_reports(&mut self, now: Millis) {
        let horizon = now.saturating_sub(self.config.report_interval);
        let mut count = 0;
        self.early_reports.retain(|_, v| {
            v.retain(|e| e.1 >= horizon);
            count += v.len();
            !v.is_empty()
        });
        self.early_count = count;
    }

    /// Stops coordinating a workload (another node is its coordinator now).
    pub(crate) fn lose(&mut self, w: &WorkloadId) {
        if let Some(c) = self.coords.remove(w) {
            if let Some(at) = c.wake {
                self.disarm(at, Timer::Coord(w.clone()));
            }
            if let Some(t) = c.tender {
                self.release_bidders(w, &t, None);
            }
        }
    }

    fn release_bidders(
        &mut self,
        w: &WorkloadId,
        t: &Open<I>,
        winners: Option<&BTreeMap<I, Vec<ReplicaIndex>>>,
    ) {
        for (node, a) in &t.answers {
            if matches!(a, Answer::Bid(_)) && winners.is_none_or(|win| !win.contains_key(node)) {
                self.send(
                    node,
                    Message::Release(Release {
                        round: t.round,
                        workload: w.clone(),
                    }),
                );
            }
        }
    }

    /// A newer generation (or tombstone) of a coordinated workload.
    pub(crate) fn update_spec(&mut self, w: &WorkloadId, spec: Arc<WorkloadSpec>, now: Millis) {
        let Some(mut c) = self.coords.remove(w) else {
            return;
        };
        if spec.generation > c.spec.generation {
            c.spec = spec;
            c.failed_rounds = 0;
            c.parked = None;
            c.shortfall = None;
            c.retry_at = now;
            for s in c.slots.values_mut() {
                s.avoid.clear();
            }
            // Bids were for the old generation's resources: start over.
            if let Some(t) = c.tender.take() {
                self.release_bidders(w, &t, None);
            }
        }
        self.coords.insert(w.clone(), c);
    }

    /// Brings one workload's table forward: expiries, retries, conflicts, and a tender for
    /// whatever is missing.
    pub(crate) fn drive(&mut self, w: &WorkloadId, now: Millis) {
        let Some(mut c) = self.coords.remove(w) else {
            return;
        };
        let mut wake = Wake::default();
        let mut outbox: Vec<(I, Message<I>)> = Vec::new();
        let keep = self.drive_coord(w, &mut c, now, &mut wake, &mut outbox);
        for (to, msg) in outbox {
            self.send(&to, msg);
        }
        // Whatever path drive_coord took, every pending award and every vanished holder
        // has a deadline to come back to.
        for s in c.slots.values() {
            if let Some(p) = &s.pending {
                wake.at(p.deadline);
            }
            if let Some(since) = s.down_since {
                wake.at(since.saturating_add(c.spec.reschedule_after));
            }
        }
        if let Some(t) = &c.tender {
            wake.at(t.deadline);
        }
        if !keep {
            if let Some(at) = c.wake {
                self.disarm(at, Timer::Coord(w.clone()));
            }
            return;
        }
        if c.wake != wake.0 {
            if let Some(old) = c.wake {
                self.disarm(old, Timer::Coord(w.clone()));
            }
            if let Some(new) = wake.0 {
                self.arm(new.max(now), Timer::Coord(w.clone()));
            }
            c.wake = wake.0.map(|t| t.max(now));
        }
        self.coords.insert(w.clone(), c);
    }

    fn drive_coord(
        &mut self,
        w: &WorkloadId,
        c: &mut Coord<I>,
        now: Millis,
        wake: &mut Wake,
        outbox: &mut Vec<(I, Message<I>)>,
    ) -> bool {
        let spec = c.spec.clone();
        if spec.deleted {
            for (&index, s) in &c.slots {
                if let Some(h) = &s.holder {
                    outbox.push((
                        h.node.clone(),
                        revoke(w, index, h.generation, h.epoch, RevokeReason::NotWanted),
                    ));
                }
                if let Some(p) = &s.pending {
                    outbox.push((
                        p.node.clone(),
                        revoke(
                            w,
                            index,
                            p.spec.generation,
                            p.epoch,
                            RevokeReason::NotWanted,
                        ),
                    ));
                }
            }
            if let Some(t) = c.tender.take() {
                self.release_bidders(w, &t, None);
            }
            return false;
        }
        let wanted = spec.wanted();
        let mut freed = false;

        // 1. Holders that vanished or never run, awards that were not accepted.
        for (&index, s) in c.slots.iter_mut() {
            if let Some(h) = &s.holder {
                let stuck = h
                    .not_running_since
                    .map(|t| t.saturating_add(self.config.start_timeout));
                if self.members.is_live(&h.node) && stuck.is_some_and(|t| now >= t) {
                    // Accepted, but not running for too long: placed elsewhere. A host that
                    // takes awards and runs nothing is noticed here.
                    outbox.push((
                        h.node.clone(),
                        revoke(w, index, h.generation, h.epoch, RevokeReason::NotRunning),
                    ));
                    let node = h.node.clone();
                    s.holder = None;
                    s.down_since = None;
                    s.upgrading = false;
                    avoid(s, node);
                    freed = true;
                    self.stats.rescheduled += 1;
                } else if self.members.is_live(&h.node) {
                    s.down_since = None;
                    if let Some(t) = stuck {
                        wake.at(t);
                    }
                } else {
                    let since = *s.down_since.get_or_insert(now);
                    let due = since.saturating_add(spec.reschedule_after);
                    if now >= due {
                        s.holder = None;
                        s.down_since = None;
                        s.upgrading = false;
                        freed = true;
                        self.stats.rescheduled += 1;
                    } else {
                        wake.at(due);
                    }
                }
            }
            let mut drop_pending = false;
            if let Some(p) = &mut s.pending {
                if !self.members.is_live(&p.node) {
                    drop_pending = true;
                } else if now >= p.deadline {
                    if p.attempts < self.config.award_attempts {
                        p.attempts += 1;
                        p.deadline = now + self.config.award_timeout;
                        wake.at(p.deadline);
                        outbox.push((
                            p.node.clone(),
                            Message::Award(Award {
                                round: p.round,
                                workload: WorkloadRef::of(&p.spec),
                                slots: vec![SlotAward {
                                    index,
                                    epoch: p.epoch,
                                    sig: p.sig,
                                }],
                                bootstrap: p.bootstrap.clone(),
                            }),
                        ));
                    } else {
                        drop_pending = true;
                    }
                } else {
                    wake.at(p.deadline);
                }
            }
            if drop_pending && let Some(p) = s.pending.take() {
                // Given up (not for a node that went down): if the award did arrive and only its
                // acknowledgements were lost, the replica must not outlive the decision to place
                // it elsewhere. The revoke names exactly this award, so it stops nothing else.
                let holds_it = s.holder.as_ref().is_some_and(|h| h.node == p.node);
                if self.members.is_live(&p.node) && !holds_it {
                    outbox.push((
                        p.node.clone(),
                        revoke(w, index, p.spec.generation, p.epoch, RevokeReason::Other),
                    ));
                }
                avoid(s, p.node);
                freed = true;
            }
        }

        // 2. Replicas beyond the count.
        let beyond: Vec<ReplicaIndex> = c.slots.range(wanted..).map(|(i, _)| *i).collect();
        for index in beyond {
            if let Some(s) = c.slots.remove(&index) {
                if let Some(h) = s.holder {
                    outbox.push((
                        h.node,
                        revoke(w, index, h.generation, h.epoch, RevokeReason::NotWanted),
                    ));
                }
                if let Some(p) = s.pending {
                    outbox.push((
                        p.node,
                        revoke(
                            w,
                            index,
                            p.spec.generation,
                            p.epoch,
                            RevokeReason::NotWanted,
                        ),
                    ));
                }
            }
        }

        // 3. `spread = "node"`: one replica per node; the lowest index keeps it.
        if spec.spread == Spread::Node {
            let mut seen: BTreeSet<I> = BTreeSet::new();
            for (&index, s) in c.slots.iter_mut() {
                let mut here: Vec<I> = Vec::new();
                if let Some(h) = &s.holder {
                    if seen.contains(&h.node) {
                        outbox.push((
                            h.node.clone(),
                            revoke(w, index, h.generation, h.epoch, RevokeReason::Spread),
                        ));
                        s.holder = None;
                        s.down_since = None;
                        freed = true;
                        self.stats.conflicts_resolved += 1;
                    } else {
                        here.push(h.node.clone());
                    }
                }
                if let Some(p) = &s.pending
                    && seen.contains(&p.node)
                {
                    outbox.push((
                        p.node.clone(),
                        revoke(w, index, p.spec.generation, p.epoch, RevokeReason::Spread),
                    ));
                    s.pending = None;
                    freed = true;
                } else if let Some(p) = &s.pending {
                    here.push(p.node.clone());
                }
                seen.extend(here);
            }
        }
        if freed {
            c.parked = None;
        }

        // 4. An open tender: close it when every candidate answered or time is up.
        if let Some(t) = &c.tender {
            if now >= t.deadline || t.complete() {
                self.close_tender(w, c, now, outbox);
            } else {
                wake.at(t.deadline);
                return true;
            }
        }

        // 5. What is missing.
        if now < c.ready_at {
            wake.at(c.ready_at);
            return true;
        }
        c.orphaned = None;
        if spec.strong && c.unclaimed() {
            if now < c.bootstrap_at {
                wake.at(c.bootstrap_at);
                return true;
            }
            if self.formed.contains(w) {
                // Placing it now would form its group again, empty, beside the real one.
                c.orphaned = Some(format!(
                    "its Raft group was formed, but none of its replicas has been reported to \
                     this coordinator for {} s: their nodes are down or out of reach. It is not \
                     placed again with an empty state; it resumes when one of them returns \
                     (delete the workload and apply it again to start over, empty)",
                    self.config.report_interval / 1000
                ));
                return true;
            }
        }
        let solo_block = !c.fresh && !self.config.solo && self.members.live_count() <= 1;
        let mut to_tender: Vec<ReplicaIndex> = Vec::new();
        for index in 0..wanted {
            match c.slots.get(&index) {
                None if !solo_block => to_tender.push(index),
                Some(s) if s.holder.is_none() && s.pending.is_none() => to_tender.push(index),
                _ => {}
            }
        }
        // Rolling replacement of an older generation, `max_unavailable` at a time.
        let budget = spec.transition_budget();
        let mut in_flight = c.slots.values().filter(|s| s.upgrading).count() as u32;
        let outdated: Vec<ReplicaIndex> = c
            .slots
            .iter()
            .filter(|(_, s)| {
                s.pending.is_none()
                    && s.holder
                        .as_ref()
                        .is_some_and(|h| h.generation < spec.generation)
            })
            .map(|(i, _)| *i)
            .collect();
        for index in outdated {
            let Some(s) = c.slots.get_mut(&index) else {
                continue;
            };
            if !s.upgrading {
                if in_flight >= budget {
                    continue;
                }
                in_flight += 1;
                s.upgrading = true;
            }
            let Some(h) = &s.holder else { continue };
            let in_place = !s.avoid.contains(&h.node)
                && self.members.info(&h.node).is_some_and(|info| {
                    spec.selects(&info.labels) && spec.resources.fits_in(&info.allocatable)
                });
            if in_place {
                let node = h.node.clone();
                let (msg, pending) =
                    self.award_next(&mut c.next_epoch, &spec, index, &node, c.round, now);
                s.pending = Some(pending);
                wake.at(now + self.config.award_timeout);
                outbox.push((node, msg));
                self.stats.awards += 1;
                self.stats.replicas_awarded += 1;
            } else {
                to_tender.push(index);
            }
        }
        // Replicas awarded by another coordinator (this node took the workload over) are
        // awarded again under this node's key: afterwards no node that follows this one on
        // the ring can outrank any of its replicas with an award of its own.
        for (&index, s) in c.slots.iter_mut() {
            let Some(h) = &s.holder else { continue };
            if s.pending.is_some()
                || h.award.issuer == self.local
                || s.avoid.contains(&h.node)
                || h.generation != spec.generation
                || !self.members.is_live(&h.node)
            {
                continue;
            }
            let node = h.node.clone();
            let (msg, pending) =
                self.award_next(&mut c.next_epoch, &spec, index, &node, c.round, now);
            s.pending = Some(pending);
            wake.at(now + self.config.award_timeout);
            outbox.push((node, msg));
            self.stats.adopted += 1;
        }
        to_tender.sort_unstable();
        to_tender.dedup();
        // A strong workload placed before moves one replica at a time: a replacement is
        // tendered only while every other replica runs (a strong replica runs once its host
        // is a voter of the workload's group, that is, caught up), so the group never has two
        // new members catching up at once.
        if spec.strong && c.next_epoch > 1 && !to_tender.is_empty() {
            let busy = c.slots.iter().any(|(i, s)| {
                !to_tender.contains(i)
                    && (s.pending.is_some()
                        || s.holder
                            .as_ref()
                            .is_some_and(|h| h.state != crate::types::ReplicaState::Running))
            });
            if busy {
                to_tender.clear();
            } else {
                to_tender.truncate(1);
            }
        }
        if to_tender.is_empty() {
            c.shortfall = None;
            return true;
        }
        if c.parked.is_some() {
            return true;
        }
        if now < c.retry_at {
            wake.at(c.retry_at);
            return true;
        }
        self.open_tender(c, to_tender, now, outbox);
        if let Some(t) = &c.tender {
            wake.at(t.deadline);
        }
        true
    }

    fn open_tender(
        &mut self,
        c: &mut Coord<I>,
        indexes: Vec<ReplicaIndex>,
        now: Millis,
        outbox: &mut Vec<(I, Message<I>)>,
    ) {
        let spec = c.spec.clone();
        c.round += 1;
        let wanted = u32::try_from(indexes.len()).unwrap_or(u32::MAX);
        let mut exclude: BTreeSet<I> = BTreeSet::new();
        if spec.spread == Spread::Node {
            for s in c.slots.values() {
                if let Some(h) = &s.holder {
                    exclude.insert(h.node.clone());
                }
                if let Some(p) = &s.pending {
                    exclude.insert(p.node.clone());
                }
            }
        }
        for i in &indexes {
            if let Some(s) = c.slots.get(i) {
                exclude.extend(s.avoid.iter().cloned());
            }
        }
        let cfg = &self.config;
        let per = u64::from(cfg.choices.max(1)) * u64::from(wanted);
        let size = (per << c.failed_rounds.min(6)).clamp(
            u64::from(cfg.min_candidates.max(1)),
            u64::from(cfg.max_candidates.max(1)),
        );
        let size = usize::try_from(size).unwrap_or(64);
        let mut rng = SplitMix::new(mix(mix(c.ring, c.round), self.local_ring));
        let eligible = |id: &I, info: &NodeInfo| {
            !exclude.contains(id)
                && spec.selects(&info.labels)
                && spec.resources.fits_in(&info.allocatable)
        };
        let mut cands: Vec<I> = Vec::with_capacity(size);
        // Half the sample among nodes carrying a preferred label, so a rare preference is
        // still found (best effort: no scan); the rest among all eligible nodes, drawn from
        // the rarest selector label, with a scan of that pool when sampling finds too few.
        if !spec.prefer.is_empty()
            && let Some((pool, n)) = self.members.rarest(spec.prefer.iter())
            && n > 0
        {
            let half = size.div_ceil(2);
            self.members.sample(
                &mut rng,
                half,
                Some(&pool),
                false,
                |id, info| eligible(id, info) && spec.preferred(&info.labels) > 0,
                &mut cands,
            );
        }
        let pool = self.members.rarest(spec.selector.iter()).map(|p| p.0);
        let rest = size.saturating_sub(cands.len());
        self.members
            .sample(&mut rng, rest, pool.as_ref(), true, eligible, &mut cands);
        if cands.is_empty() {
            self.no_room(c, indexes.len(), true, String::new(), now);
            return;
        }
        let exhaustive = cands.len() < size;
        let tender = Tender {
            round: c.round,
            workload: WorkloadRef::of(&spec),
            wanted,
            hold_ms: self.config.hold,
        };
        let mut answers = BTreeMap::new();
        for node in cands {
            outbox.push((node.clone(), Message::Tender(tender.clone())));
            answers.insert(node, Answer::Waiting);
        }
        self.stats.tenders_opened += 1;
        c.tender = Some(Open {
            round: c.round,
            generation: spec.generation,
            indexes,
            answers,
            deadline: now + self.config.bid_timeout,
            exhaustive,
        });
    }

    /// Awards the best bids of the open tender.
    fn close_tender(
        &mut self,
        w: &WorkloadId,
        c: &mut Coord<I>,
        now: Millis,
        outbox: &mut Vec<(I, Message<I>)>,
    ) {
        let Some(t) = c.tender.take() else { return };
        let spec = c.spec.clone();
        let wanted = spec.wanted();
        let need: Vec<ReplicaIndex> = t
            .indexes
            .iter()
            .copied()
            .filter(|i| {
                *i < wanted
                    && c.slots.get(i).is_none_or(|s| {
                        s.pending.is_none()
                            && s.holder
                                .as_ref()
                                .is_none_or(|h| h.generation < spec.generation)
                    })
            })
            .collect();
        // Nodes that hold a replica now (a report may have arrived during the tender).
        let mut occupied: BTreeSet<I> = BTreeSet::new();
        if spec.spread == Spread::Node {
            for s in c.slots.values() {
                if let Some(h) = &s.holder {
                    occupied.insert(h.node.clone());
                }
                if let Some(p) = &s.pending {
                    occupied.insert(p.node.clone());
                }
            }
        }
        struct Cand<'a, I> {
            node: &'a I,
            left: u32,
            free: Resources,
            allocatable: Resources,
            preferred: u32,
            weight: u64,
        }
        // Bids are scored from what the bidders announced in membership, not from the bids'
        // own numbers: a bid counts at most the announced allocatable minus what this
        // coordinator already placed there, and a node that holds all it announced gets
        // nothing more.
        let bidders: BTreeSet<&I> = t
            .answers
            .iter()
            .filter(|(_, a)| matches!(a, Answer::Bid(_)))
            .map(|(n, _)| n)
            .collect();
        let load = self.load_on(&bidders, c);
        let mut over: Vec<I> = Vec::new();
        let mut cands: Vec<Cand<'_, I>> = Vec::new();
        for (node, a) in &t.answers {
            let Answer::Bid(b) = a else { continue };
            if b.generation != t.generation
                || b.slots == 0
                || occupied.contains(node)
                || !self.members.is_live(node)
            {
                continue;
            }
            let Some(info) = self.members.info(node) else {
                continue;
            };
            let held = load.get(node).copied().unwrap_or(Resources::ZERO);
            let room = info.allocatable.saturating_sub(&held);
            if !spec.resources.fits_in(&room) {
                over.push(node.clone());
                continue;
            }
            cands.push(Cand {
                node,
                left: if spec.spread == Spread::Node {
                    1
                } else {
                    b.slots
                },
                free: Resources {
                    cpu: b.free.cpu.min(room.cpu),
                    memory: b.free.memory.min(room.memory),
                },
                allocatable: info.allocatable,
                preferred: spec.preferred(&info.labels),
                weight: tiebreak(c.ring, 0, node_ring(node)),
            });
        }
        let prefer_total = spec.prefer.len();
        let mut winners: BTreeMap<I, Vec<ReplicaIndex>> = BTreeMap::new();
        for &index in &need {
            // Highest score for one more replica, then rendezvous weight, then lowest id.
            let best = cands
                .iter_mut()
                .filter(|k| k.left > 0 && spec.resources.fits_in(&k.free))
                .max_by(|a, b| {
                    let sa = score(
                        &a.free.saturating_sub(&spec.resources),
                        &a.allocatable,
                        a.preferred,
                        prefer_total,
                    );
                    let sb = score(
                        &b.free.saturating_sub(&spec.resources),
                        &b.allocatable,
                        b.preferred,
                        prefer_total,
                    );
                    (sa, a.weight, Reverse(a.node)).cmp(&(sb, b.weight, Reverse(b.node)))
                });
            let Some(k) = best else { break };
            k.left -= 1;
            k.free = k.free.saturating_sub(&spec.resources);
            winners.entry(k.node.clone()).or_default().push(index);
        }
        drop(cands);
        for node in over {
            self.refuse(&node, "bid", Refusal::OverCapacity);
        }
        let placed: usize = winners.values().map(Vec::len).sum();
        if placed > 0 {
            // A strong workload placed for the first time: no claim of it was ever seen
            // (every epoch seen raises `next_epoch`), nothing was awarded before, and a
            // coordinator that took it over waited out the takeover grace for reports. This
            // round's hosts are its Raft group's first voters.
            let first =
                spec.strong && now >= c.bootstrap_at && c.unclaimed() && !self.formed.contains(w);
            let bootstrap: Vec<I> = if first {
                winners.keys().cloned().collect()
            } else {
                Vec::new()
            };
            let epoch = c.next_epoch;
            c.next_epoch = c.next_epoch.saturating_add(1);
            for (node, idxs) in &winners {
                let mut slots = Vec::with_capacity(idxs.len());
                for &index in idxs {
                    let (_, mut pending) = self.award(&spec, index, epoch, node, t.round, now);
                    pending.bootstrap = bootstrap.clone();
                    slots.push(SlotAward {
                        index,
                        epoch,
                        sig: pending.sig,
                    });
                    let s = c.slots.entry(index).or_default();
                    if s.holder
                        .as_ref()
                        .is_some_and(|h| h.generation < spec.generation)
                    {
                        s.upgrading = true;
                    }
                    s.pending = Some(pending);
                }
                outbox.push((
                    node.clone(),
                    Message::Award(Award {
                        round: t.round,
                        workload: WorkloadRef::of(&spec),
                        slots,
                        bootstrap: bootstrap.clone(),
                    }),
                ));
            }
            self.stats.awards += winners.len() as u64;
            self.stats.replicas_awarded += placed as u64;
            if first {
                self.announce_formed(&spec);
            }
        }
        self.release_bidders(w, &t, Some(&winners));
        let unfilled = need.len() - placed;
        if unfilled == 0 {
            c.failed_rounds = 0;
            c.shortfall = None;
            c.retry_at = now;
        } else if placed > 0 {
            // Progress: go on with the rest at once (the next sample excludes the winners).
            c.retry_at = now;
        } else {
            self.no_room(c, unfilled, t.exhaustive, answers_summary(&t), now);
        }
    }

    /// Some replicas found no taker: try a larger sample at once, or (after every eligible
    /// node was asked, or a few rounds) find out whether the mesh could ever take them.
    fn no_room(
        &mut self,
        c: &mut Coord<I>,
        unfilled: usize,
        exhaustive: bool,
        answers: String,
        now: Millis,
    ) {
        c.failed_rounds += 1;
        if !exhaustive && c.failed_rounds < 3 {
            c.retry_at = now;
            return;
        }
        self.stats.unschedulable_checks += 1;
        match self.static_check(&c.spec) {
            Err(reason) => {
                c.parked = Some(reason);
                c.shortfall = None;
            }
            Ok(n) => {
                // Nodes that refused a slot before get another chance after the backoff.
                for s in c.slots.values_mut() {
                    s.avoid.clear();
                }
                c.shortfall = Some(format!(
                    "{unfilled} of {} replicas not placed: no room for {} per replica among {n} eligible nodes{answers}; retrying",
                    c.spec.wanted(),
                    c.spec.resources
                ));
                c.retry_at = now
                    + backoff(
                        self.config.retry_min,
                        self.config.retry_max,
                        c.failed_rounds,
                        mix(c.ring, u64::from(c.failed_rounds)),
                    );
            }
        }
    }

    /// Whether the live membership could ever hold the workload, ignoring what runs now.
    pub(crate) fn static_check(&self, spec: &WorkloadSpec) -> Result<usize, String> {
        let wanted = spec.wanted();
        let (mut matching, mut fitting) = (0usize, 0usize);
        let mut largest = Resources::ZERO;
        for (_, _, info) in self.members.live_nodes() {
            if !spec.selects(&info.labels) {
                continue;
            }
            matching += 1;
            largest.cpu = largest.cpu.max(info.allocatable.cpu);
            largest.memory = largest.memory.max(info.allocatable.memory);
            if spec.resources.fits_in(&info.allocatable) {
                fitting += 1;
            }
        }
        if matching == 0 {
            return Err(if spec.selector.is_empty() {
                "no live node".to_owned()
            } else {
                format!(
                    "no live node matches selector {}",
                    show_labels(&spec.selector)
                )
            });
        }
        let which = if spec.selector.is_empty() {
            "live node"
        } else {
            "live node matching the selector"
        };
        if fitting == 0 {
            return Err(format!(
                "one replica needs {} but no {which} has that much allocatable (largest: {})",
                spec.resources, largest
            ));
        }
        if spec.spread == Spread::Node && fitting < wanted as usize {
            return Err(format!(
                "spread = \"node\" needs {wanted} nodes but only {fitting} {} the capacity",
                if spec.selector.is_empty() {
                    "live nodes have"
                } else {
                    "live nodes matching the selector have"
                }
            ));
        }
        Ok(fitting)
    }

    pub(crate) fn on_bid(&mut self, from: &I, b: Bid, now: Millis) {
        let w = b.workload.clone();
        let round = b.round;
        let mut done = false;
        let mut stale = true;
        if let Some(t) = self.coords.get_mut(&w).and_then(|c| c.tender.as_mut())
            && t.round == round
            && let Some(a) = t.answers.get_mut(from)
        {
            *a = Answer::Bid(b);
            done = t.complete();
            stale = false;
        }
        if stale {
            // The tender is over: free the bidder's reservation now rather than at expiry.
            self.send(from, Message::Release(Release { round, workload: w }));
        } else if done {
            self.drive(&w, now);
        }
    }

    pub(crate) fn on_decline(&mut self, from: &I, d: Decline, now: Millis) {
        let mut done = false;
        if let Some(t) = self
            .coords
            .get_mut(&d.workload)
            .and_then(|c| c.tender.as_mut())
            && t.round == d.round
            && let Some(a) = t.answers.get_mut(from)
        {
            *a = Answer::Declined(d.reason);
            done = t.complete();
        }
        if done {
            self.drive(&d.workload, now);
        }
    }

    pub(crate) fn on_refuse(&mut self, from: &I, r: Refuse, now: Millis) {
        let Some(c) = self.coords.get_mut(&r.workload) else {
            return;
        };
        for sa in &r.slots {
            if let Some(s) = c.slots.get_mut(&sa.index)
                && s.pending
                    .as_ref()
                    .is_some_and(|p| &p.node == from && p.epoch == sa.epoch)
            {
                s.pending = None;
                avoid(s, from.clone());
            }
        }
        self.drive(&r.workload, now);
    }

    /// Signs an award of one slot and returns the message and the pending record.
    pub(crate) fn award(
        &self,
        spec: &Arc<WorkloadSpec>,
        index: ReplicaIndex,
        epoch: u64,
        host: &I,
        round: u64,
        now: Millis,
    ) -> (Message<I>, Pending<I>) {
        let m = award_message(
            &spec.id,
            spec.generation,
            &spec.content,
            index,
            epoch,
            host,
            &self.local,
        );
        let sig = self.keys.0.sign(&m);
        let msg = Message::Award(Award {
            round,
            workload: WorkloadRef::of(spec),
            slots: vec![SlotAward { index, epoch, sig }],
            bootstrap: Vec::new(),
        });
        let pending = Pending {
            node: host.clone(),
            epoch,
            sig,
            bootstrap: Vec::new(),
            spec: spec.clone(),
            round,
            deadline: now + self.config.award_timeout,
            attempts: 1,
        };
        (msg, pending)
    }

    /// [`Self::award`] under the next epoch of the workload (taken from `next_epoch`).
    fn award_next(
        &self,
        next_epoch: &mut u64,
        spec: &Arc<WorkloadSpec>,
        index: ReplicaIndex,
        host: &I,
        round: u64,
        now: Millis,
    ) -> (Message<I>, Pending<I>) {
        let epoch = *next_epoch;
        *next_epoch = next_epoch.saturating_add(1);
        self.award(spec, index, epoch, host, round, now)
    }

    /// What this coordinator has placed on each of `nodes` (held or awarded), over every
    /// workload it coordinates, `current` (taken out of the table while it is driven)
    /// included.
    fn load_on(&self, nodes: &BTreeSet<&I>, current: &Coord<I>) -> BTreeMap<I, Resources> {
        let mut load: BTreeMap<I, Resources> = BTreeMap::new();
        if nodes.is_empty() {
            return load;
        }
        for c in self.coords.values().chain(std::iter::once(current)) {
            let per = c.spec.resources;
            for s in c.slots.values() {
                let holder = s.holder.as_ref().map(|h| &h.node);
                let pending = s.pending.as_ref().map(|p| &p.node);
                for node in [holder, pending.filter(|p| Some(*p) != holder)]
                    .into_iter()
                    .flatten()
                {
                    if nodes.contains(node) {
                        let l = load.entry(node.clone()).or_insert(Resources::ZERO);
                        *l = l.saturating_add(&per);
                    }
                }
            }
        }
        load
    }

    /// A host's report: check each claim's award, then adopt, update or revoke it.
    pub(crate) fn on_report(&mut self, from: &I, r: Report<I>, now: Millis) {
        // Per workload, the report lists every replica the host holds (by generation).
        let mut by_workload: BTreeMap<WorkloadId, Vec<ReportedWorkload<I>>> = BTreeMap::new();
        for rw in r.workloads {
            by_workload
                .entry(rw.workload.id.clone())
                .or_default()
                .push(rw);
        }
        for (w, groups) in by_workload {
            if self.coordinator(&w).is_none_or(|c| c != self.local) {
                // The host's view differs from ours: most likely its failure detector fired
                // before ours and we are about to take over. Keep the report (bounded, for
                // one report interval) and replay it then; if we never take over, it expires
                // and the host's periodic report finds the right coordinator.
                let mine = self
                    .early_reports
                    .values()
                    .flatten()
                    .filter(|e| &e.0 == from)
                    .count();
                if self.early_count < MAX_EARLY_REPORTS && mine < MAX_EARLY_REPORTS_PER_SENDER {
                    self.early_count += 1;
                    self.early_reports.entry(w).or_default().push((
                        from.clone(),
                        now,
                        r.seq,
                        groups,
                    ));
                }
                continue;
            }
            // Every generation named must be verified here: a newer one waits for its
            // manifest (fetched from the reporter), one that differs from the verified
            // manifest is refused. Claims on older generations need no spec: they are
            // replaced by the rollout.
            let newest = groups
                .iter()
                .map(|g| &g.workload)
                .max_by_key(|g| g.generation)
                .cloned();
            let Some(newest) = newest else { continue };
            let known = self.desired.get(&w).map(|d| d.generation);
            if known.is_none_or(|g| newest.generation > g) {
                let msg = Message::Report(Report {
                    seq: r.seq,
                    workloads: groups,
                });
                self.defer(from, newest, msg, now);
                continue;
            }
            let mut groups = groups;
            let before = groups.len();
            groups.retain(|g| !matches!(self.verified(&g.workload), Verified::Mismatch));
            for _ in groups.len()..before {
                self.refuse(from, "report", Refusal::ContentMismatch);
            }
            let Some(spec) = self.desired.get(&w).cloned() else {
                continue;
            };
            if spec.deleted {
                if !self.coords.contains_key(&w) {
                    for g in &groups {
                        for rr in &g.replicas {
                            let msg = revoke(
                                &w,
                                rr.index,
                                g.workload.generation,
                                rr.epoch,
                                RevokeReason::NotWanted,
                            );
                            self.send(from, msg);
                        }
                    }
                    continue;
                }
            } else if !self.coords.contains_key(&w) {
                self.gain(spec, false, now);
            }
            self.apply_report(&w, from, r.seq, groups, now);
            self.drive(&w, now);
        }
    }

    /// Applies one host's complete list of its replicas of `w`: its claims, and, unless the
    /// report was overtaken by a newer one from the same host, the end of the claims it no
    /// longer lists.
    pub(crate) fn apply_report(
        &mut self,
        w: &WorkloadId,
        from: &I,
        seq: u64,
        groups: Vec<ReportedWorkload<I>>,
        now: Millis,
    ) {
        let Some(c) = self.coords.get_mut(w) else {
            return;
        };
        let current = match c.last_report.get(from) {
            None => true,
            // A lower number long after the last report: the host restarted.
            Some(&(last, at)) => seq >= last || now >= at.saturating_add(REORDER_WINDOW),
        };
        if current {
            c.last_report.insert(from.clone(), (seq, now));
            let listed: BTreeSet<ReplicaIndex> = groups
                .iter()
                .flat_map(|g| g.replicas.iter())
                .filter(|r| !r.relinquish)
                .map(|r| r.index)
                .collect();
            for (index, s) in c.slots.iter_mut() {
                if s.holder
                    .as_ref()
                    .is_some_and(|h| &h.node == from && !listed.contains(index))
                {
                    s.holder = None;
                    s.down_since = None;
                    s.upgrading = false;
                    c.parked = None;
                }
            }
        }
        for g in groups {
            for rr in g.replicas {
                self.observe(w, from, &g.workload, rr, now);
            }
        }
    }

    /// Whether a claim's award is one this coordinator can count: signed by a node that is or
    /// was a member, for exactly this host, slot, epoch and generation, with an epoch within
    /// bounds. A claim identical to what the table already holds (or to the award this node
    /// issued and is waiting on) was checked before.
    fn check_award(
        &self,
        c: &Coord<I>,
        from: &I,
        r: &WorkloadRef,
        rr: &ReportedReplica<I>,
    ) -> Result<(), Refusal> {
        let s = c.slots.get(&rr.index);
        let known = s.is_some_and(|s| {
            s.holder.as_ref().is_some_and(|h| {
                &h.node == from
                    && h.generation == r.generation
                    && h.epoch == rr.epoch
                    && h.award == rr.award
            }) || s.pending.as_ref().is_some_and(|p| {
                &p.node == from
                    && p.spec.generation == r.generation
                    && p.epoch == rr.epoch
                    && rr.award.issuer == self.local
                    && p.sig == rr.award.sig
            })
        });
        if known {
            return Ok(());
        }
        let highest = c.next_epoch.saturating_sub(1);
        if rr.epoch > highest.saturating_add(MAX_EPOCH_STEP) {
            return Err(Refusal::EpochOutOfBounds);
        }
        let m = award_message(
            &r.id,
            r.generation,
            &r.content,
            rr.index,
            rr.epoch,
            from,
            &rr.award.issuer,
        );
        if !self.keys.0.verify(&rr.award.issuer, &m, &rr.award.sig) {
            return Err(Refusal::BadAward);
        }
        Ok(())
    }

    /// One claim from `from` on replica `rr.index` of generation `r`.
    pub(crate) fn observe(
        &mut self,
        w: &WorkloadId,
        from: &I,
        r: &WorkloadRef,
        rr: ReportedReplica<I>,
        now: Millis,
    ) {
        let Some(c) = self.coords.get(w) else {
            return;
        };
        let generation = r.generation;
        if rr.relinquish {
            let Some(c) = self.coords.get_mut(w) else {
                return;
            };
            if let Some(s) = c.slots.get_mut(&rr.index) {
                if s.holder.as_ref().is_some_and(|h| {
                    &h.node == from && h.generation == generation && h.epoch == rr.epoch
                }) {
                    s.holder = None;
                    s.down_since = None;
                    s.upgrading = false;
                    c.parked = None;
                }
                avoid(s, from.clone());
            }
            return;
        }
        let tier = if rr.award.issuer == self.local {
            TIER_OWN
        } else if &rr.award.issuer != from && self.known_issuer(&rr.award.issuer) {
            TIER_MEMBER
        } else {
            TIER_SELF
        };
        // A claim a node awarded itself fills a replica only while this coordinator rebuilds
        // its table after taking the workload over (an honest former coordinator's own
        // replica); afterwards vacant replicas are filled by this coordinator's tenders.
        let checked = self.check_award(c, from, r, &rr).and_then(|()| {
            let holds = c
                .slots
                .get(&rr.index)
                .and_then(|s| s.holder.as_ref())
                .is_some_and(|h| &h.node == from);
            if tier == TIER_SELF && !holds && now >= c.ready_at {
                Err(Refusal::SelfAward)
            } else {
                Ok(())
            }
        });
        if let Err(reason) = checked {
            // Not a claim this coordinator counts: the host is told to stop it (an honest
            // host whose award cannot be proven any more runs it nowhere unaccounted).
            self.refuse(from, "report", reason);
            self.send(
                from,
                revoke(w, rr.index, generation, rr.epoch, RevokeReason::Conflict),
            );
            return;
        }
        let Some(c) = self.coords.get_mut(w) else {
            return;
        };
        c.next_epoch = c.next_epoch.max(rr.epoch.saturating_add(1));
        let wanted = c.spec.wanted();
        let current = c.spec.generation;
        let ring = c.ring;
        let mut outbox: Vec<(I, Message<I>)> = Vec::new();
        if c.spec.deleted || rr.index >= wanted || generation > current {
            // Not wanted (or a generation this coordinator cannot judge yet: the report was
            // deferred until verified, so this means a tombstone won).
            if c.spec.deleted || rr.index >= wanted {
                outbox.push((
                    from.clone(),
                    revoke(w, rr.index, generation, rr.epoch, RevokeReason::NotWanted),
                ));
            }
        } else {
            let running = rr.state == ReplicaState::Running;
            let claim = Claim {
                node: from.clone(),
                generation,
                epoch: rr.epoch,
                state: rr.state,
                tier,
                distance: issuer_distance(ring, &rr.award.issuer),
                award: rr.award,
                not_running_since: (!running).then_some(now),
            };
            let s = c.slots.entry(rr.index).or_default();
            // The host holds the slot at the generation its award named: whichever award it
            // kept, the award is settled.
            if s.pending
                .as_ref()
                .is_some_and(|p| &p.node == from && p.spec.generation == generation)
            {
                s.pending = None;
            }
            match &mut s.holder {
                None => s.holder = Some(claim),
                Some(h) if &h.node == from => {
                    // The host says which award it keeps (it takes the current coordinator's):
                    // only an older generation or epoch from the same issuer is stale.
                    let stale = generation < h.generation
                        || (generation == h.generation
                            && claim.award.issuer == h.award.issuer
                            && rr.epoch < h.epoch);
                    if !stale {
                        let since = if running {
                            None
                        } else {
                            h.not_running_since.or(Some(now))
                        };
                        *h = claim;
                        h.not_running_since = since;
                        s.down_since = None;
                    }
                }
                Some(h) => {
                    if claim_key(ring, rr.index, &claim) > claim_key(ring, rr.index, h) {
                        let reason = if generation > h.generation {
                            RevokeReason::Replaced
                        } else {
                            RevokeReason::Conflict
                        };
                        outbox.push((
                            h.node.clone(),
                            revoke(w, rr.index, h.generation, h.epoch, reason),
                        ));
                        *h = claim;
                        s.down_since = None;
                    } else {
                        outbox.push((
                            from.clone(),
                            revoke(w, rr.index, generation, rr.epoch, RevokeReason::Conflict),
                        ));
                    }
                    self.stats.conflicts_resolved += 1;
                }
            }
            if s.holder
                .as_ref()
                .is_some_and(|h| h.generation == current && h.state == ReplicaState::Running)
            {
                s.upgrading = false;
                s.avoid.clear();
            }
        }
        for (to, msg) in outbox {
            self.send(&to, msg);
        }
    }
}

/// What the candidates of a tender answered, for an unschedulable reason.
fn answers_summary<I: NodeKey>(t: &Open<I>) -> String {
    let (mut bids, mut capacity, mut other, mut silent) = (0, 0, 0, 0);
    for a in t.answers.values() {
        match a {
            Answer::Bid(_) => bids += 1,
            Answer::Declined(DeclineReason::Capacity { .. }) => capacity += 1,
            Answer::Declined(_) => other += 1,
            Answer::Waiting => silent += 1,
        }
    }
    format!(
        " (last tender: {} asked, {bids} bid, {capacity} full, {other} declined, {silent} silent)",
        t.answers.len()
    )
}

fn avoid<I: NodeKey>(s: &mut Slot<I>, node: I) {
    if !s.avoid.contains(&node) {
        if s.avoid.len() >= MAX_AVOID {
            s.avoid.remove(0);
        }
        s.avoid.push(node);
    }
}

fn revoke<I>(
    w: &WorkloadId,
    index: ReplicaIndex,
    generation: u64,
    epoch: u64,
    reason: RevokeReason,
) -> Message<I> {
    Message::Revoke(Revoke {
        workload: w.clone(),
        index,
        generation,
        epoch,
        reason,
    })
}

fn show_labels(l: &BTreeMap<String, String>) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in l.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{k} = {v:?}");
    }
    s.push('}');
    s
}
