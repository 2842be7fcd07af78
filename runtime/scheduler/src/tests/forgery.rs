//! Forgeries by an admitted but malicious node. Each test is one attack found in the review of
//! the scheduler at 63b73a8 (issue 11), where every one of them succeeded: a report's spec was
//! adopted (tombstones, 60 replicas, phantom workloads), a claim with a huge epoch beat every
//! real one, awards, revokes and tenders were taken from any sender, and bids were scored from
//! the bidder's own numbers. Here the state machine refuses each, counts it as a
//! [`Refusal`], and the honest replicas keep running.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use beemesh_manifest::workload::Spread;

use super::harness::{Cluster, claim, info, keys, spec, test_config};
use crate::message::{
    Award, Bid, Report, ReportedWorkload, Revoke, RevokeReason, SlotAward, Tender,
};
use crate::{
    Digest, Message, Millis, Refusal, ReplicaState, SchedulerConfig, Signature, WorkloadId,
    WorkloadRef, WorkloadSpec, award_message,
};

const ATTACKER: u32 = 5;

/// Five honest nodes and an attacker (a member with no capacity, so it holds nothing); a
/// workload of three replicas that the attacker does not coordinate, running.
fn running_mesh() -> (Cluster, WorkloadSpec) {
    let mut c = Cluster::new(
        6,
        |i| {
            if i == ATTACKER {
                info(0, 0, &[])
            } else {
                info(1000, 1000, &[])
            }
        },
        test_config(),
    );
    c.run_for(1_500);
    let name = (0..)
        .map(|i| format!("w{i}"))
        .find(|n| c.coordinator(&WorkloadId::new("default", n)) != ATTACKER)
        .unwrap();
    let w = spec(&name, 3, Spread::Node);
    c.submit(w.clone());
    c.run_for(2_000);
    c.assert_exact(&w.id);
    (c, w)
}

/// (node, index) of every running replica of `w`.
fn holders(c: &Cluster, w: &WorkloadId) -> BTreeSet<(u32, u32)> {
    c.running(w).into_iter().map(|r| (r.0, r.1)).collect()
}

fn report(r: WorkloadRef, replicas: Vec<crate::ReportedReplica<u32>>) -> Message<u32> {
    Message::Report(Report {
        seq: 1,
        workloads: vec![ReportedWorkload {
            workload: r,
            replicas,
        }],
    })
}

/// A workload name whose coordinator among the cluster's live nodes is `node`.
fn coordinated_by(c: &Cluster, node: u32) -> String {
    (0..)
        .map(|i| format!("x{i}"))
        .find(|n| c.coordinator(&WorkloadId::new("default", n)) == node)
        .unwrap()
}

#[test]
fn a_report_cannot_delete_multiply_or_replace_a_workload() {
    let (mut c, w) = running_mesh();
    let coord = c.coordinator(&w.id);
    let before = holders(&c, &w.id);
    // A newer generation the attacker made up (a tombstone, or 60 replicas): the coordinator
    // has not verified it, so it fetches it from the attacker, which has nothing to give.
    let forged = WorkloadRef {
        id: w.id.clone(),
        generation: w.generation + 1,
        content: Digest([0xee; 32]),
    };
    let many: Vec<_> = (0..60)
        .map(|i| claim(&w, i, 1, ATTACKER, ATTACKER, ReplicaState::Running))
        .collect();
    c.inject(ATTACKER, coord, report(forged, many.clone()));
    // The current generation with another content id: not the manifest that was verified.
    let mut other = WorkloadRef::of(&w);
    other.content = Digest([0xdd; 32]);
    c.inject(ATTACKER, coord, report(other, many.clone()));
    // The real generation, 60 replicas the attacker awarded itself.
    c.inject(ATTACKER, coord, report(WorkloadRef::of(&w), many));
    c.run_for(15_000);

    c.assert_exact(&w.id);
    assert_eq!(holders(&c, &w.id), before, "no replica moved");
    let st = c.sched(coord).status(&w.id);
    assert_eq!(
        (st.replicas, st.placed, st.generation),
        (3, 3, w.generation)
    );
    assert!(
        c.fetches
            .iter()
            .any(|f| f.1 == coord && f.2 == ATTACKER && f.3 == w.id),
        "the unverified generation was fetched, not adopted"
    );
    assert_eq!(c.sched(coord).deferred_count, 0, "dropped after the wait");
    assert!(c.refused(coord, ATTACKER, Refusal::ContentMismatch) >= 1);
    assert!(c.refused(coord, ATTACKER, Refusal::SelfAward) >= 60);
}

#[test]
fn a_report_for_a_workload_nobody_signed_creates_nothing() {
    let (mut c, _) = running_mesh();
    let target = 0;
    let name = coordinated_by(&c, target);
    let phantom = spec(&name, 60, Spread::None);
    let r = WorkloadRef::of(&phantom);
    let claims = vec![claim(
        &phantom,
        0,
        1,
        ATTACKER,
        ATTACKER,
        ReplicaState::Running,
    )];
    c.inject(ATTACKER, target, report(r, claims));
    assert!(!c.sched(target).is_coordinating(&phantom.id));
    assert_eq!(
        c.sched(target).deferred_count,
        1,
        "it waits for its manifest"
    );
    assert_eq!(
        c.fetches.last().map(|f| f.3.clone()),
        Some(phantom.id.clone())
    );
    c.run_for(15_000);
    assert!(!c.sched(target).is_coordinating(&phantom.id));
    assert_eq!(c.sched(target).deferred_count, 0);
    assert_eq!(c.refused(target, ATTACKER, Refusal::Unverified), 1);
    assert!(c.running(&phantom.id).is_empty());
}

#[test]
fn a_huge_epoch_or_a_forged_award_takes_no_replica() {
    let (mut c, w) = running_mesh();
    let coord = c.coordinator(&w.id);
    let before = holders(&c, &w.id);
    let r = WorkloadRef::of(&w);
    // 1. The attacker awards itself replica 0, under the largest epoch there is, and under
    //    a plausible one.
    for epoch in [u64::MAX - 1, 2] {
        let own = claim(&w, 0, epoch, ATTACKER, ATTACKER, ReplicaState::Running);
        c.inject(ATTACKER, coord, report(r.clone(), vec![own]));
    }
    // 2. An award "by the coordinator" whose signature the attacker made up.
    let mut fake = claim(&w, 0, 3, ATTACKER, coord, ReplicaState::Running);
    fake.award.sig = Signature([7; 64]);
    c.inject(ATTACKER, coord, report(r.clone(), vec![fake]));
    // 3. The coordinator's real award of replica 0, presented by the attacker.
    let holder0 = before.iter().find(|h| h.1 == 0).unwrap().0;
    let real = c.nodes[&holder0]
        .sched
        .local_assignments()
        .assignments
        .into_iter()
        .find(|a| a.spec.id == w.id)
        .unwrap();
    let mut stolen = claim(&w, 0, real.epoch, ATTACKER, coord, ReplicaState::Running);
    stolen.award = real.award.clone().unwrap();
    c.inject(ATTACKER, coord, report(r.clone(), vec![stolen]));
    // 4. A colluding member's award, with a huge epoch and with a plausible one.
    let accomplice = (0..5).find(|n| *n != coord).unwrap();
    for epoch in [u64::MAX - 1, real.epoch + 1] {
        let mut bought = claim(&w, 0, epoch, ATTACKER, accomplice, ReplicaState::Running);
        bought.award.issuer = accomplice;
        c.inject(ATTACKER, coord, report(r.clone(), vec![bought]));
    }
    c.run_for(5_000);

    c.assert_exact(&w.id);
    assert_eq!(
        holders(&c, &w.id),
        before,
        "the real holders keep every replica"
    );
    assert_eq!(c.refused(coord, ATTACKER, Refusal::SelfAward), 1);
    assert_eq!(
        c.refused(coord, ATTACKER, Refusal::BadAward),
        2,
        "made up, and stolen"
    );
    assert_eq!(c.refused(coord, ATTACKER, Refusal::EpochOutOfBounds), 2);
    // The plausible accomplice's award is a valid claim, but it ranks below the
    // coordinator's own: the attacker is told to stop, the holder is not.
    let revoked: Vec<u32> = c
        .log
        .iter()
        .filter(|m| m.1 == coord && matches!(&m.3, Message::Revoke(v) if v.workload == w.id))
        .map(|m| m.2)
        .collect();
    assert!(revoked.iter().all(|to| *to == ATTACKER), "{revoked:?}");
}

#[test]
fn the_epoch_bound_is_a_step_above_the_highest_epoch_seen() {
    let (mut c, w) = running_mesh();
    let coord = c.coordinator(&w.id);
    let accomplice = (0..5).find(|n| *n != coord).unwrap();
    let highest = c.sched(coord).coords[&w.id].next_epoch - 1;
    let step = crate::coord::MAX_EPOCH_STEP;
    // A spare index (beyond `replicas`): an accepted claim there is only told to stop.
    for (epoch, accepted) in [(highest + step + 1, false), (highest + step, true)] {
        let mut b = claim(&w, 4, epoch, ATTACKER, accomplice, ReplicaState::Running);
        b.award.issuer = accomplice;
        let before = c.refused(coord, ATTACKER, Refusal::EpochOutOfBounds);
        c.inject(ATTACKER, coord, report(WorkloadRef::of(&w), vec![b]));
        let refused = c.refused(coord, ATTACKER, Refusal::EpochOutOfBounds) > before;
        assert_eq!(refused, !accepted, "epoch {epoch} (highest {highest})");
    }
}

#[test]
fn revokes_awards_and_tenders_count_only_from_the_coordinator() {
    let (mut c, w) = running_mesh();
    let before = holders(&c, &w.id);
    // Revokes naming every real claim exactly.
    for &(node, index) in &before {
        let a = c.nodes[&node]
            .sched
            .local_assignments()
            .assignments
            .into_iter()
            .find(|a| a.spec.id == w.id && a.index == index)
            .unwrap();
        c.inject(
            ATTACKER,
            node,
            Message::Revoke(Revoke {
                workload: w.id.clone(),
                index,
                generation: a.spec.generation,
                epoch: a.epoch,
                reason: RevokeReason::NotWanted,
            }),
        );
        assert_eq!(c.refused(node, ATTACKER, Refusal::NotCoordinator), 1);
    }
    // An award to a node that holds nothing of the workload.
    let idle = (0..5u32)
        .find(|n| !before.iter().any(|h| h.0 == *n))
        .unwrap();
    let starts = c.nodes[&idle].starts;
    let sig = keys(ATTACKER).sign(&award_message(
        &w.id,
        w.generation,
        &w.content,
        0,
        99,
        &idle,
        &ATTACKER,
    ));
    c.inject(
        ATTACKER,
        idle,
        Message::Award(Award {
            round: 1,
            workload: WorkloadRef::of(&w),
            slots: vec![SlotAward {
                index: 0,
                epoch: 99,
                sig,
            }],
            bootstrap: Vec::new(),
        }),
    );
    // A tender: nothing is reserved for it.
    c.inject(
        ATTACKER,
        idle,
        Message::Tender(Tender {
            round: 1,
            workload: WorkloadRef::of(&w),
            wanted: 5,
            hold_ms: 60_000,
        }),
    );
    assert!(c.sched(idle).reservations.is_empty());
    assert_eq!(c.refused(idle, ATTACKER, Refusal::NotCoordinator), 2);
    // A node that is not a member at all is not heard.
    c.inject(
        99,
        idle,
        Message::Tender(Tender {
            round: 1,
            workload: WorkloadRef::of(&w),
            wanted: 1,
            hold_ms: 0,
        }),
    );
    assert_eq!(c.refused(idle, 99, Refusal::NotMember), 1);
    c.run_for(5_000);
    c.assert_exact(&w.id);
    assert_eq!(holders(&c, &w.id), before);
    assert_eq!(
        c.nodes[&idle].starts, starts,
        "the forged award started nothing"
    );
}

/// Makes the attacker bid on every tender (a decline becomes a bid), claiming a huge free
/// capacity and the best score.
fn inflate_bids(c: &mut Cluster, attacker: u32) {
    let huge = crate::Resources {
        cpu: 1 << 40,
        memory: 1 << 40,
    };
    c.tamper = Some(Box::new(move |from, _, m| {
        if from != attacker {
            return;
        }
        let bid = match m {
            Message::Bid(b) => Bid {
                free: huge,
                allocatable: huge,
                score: 2000,
                ..b.clone()
            },
            Message::Decline(d) => Bid {
                round: d.round,
                workload: d.workload.clone(),
                generation: 1,
                slots: 1,
                free: huge,
                allocatable: huge,
                preferred: 0,
                score: 2000,
            },
            _ => return,
        };
        *m = Message::Bid(bid);
    }));
}

#[test]
fn bids_count_what_the_bidder_announced_not_what_it_claims() {
    // Three honest nodes with room; the attacker announced little and bids as if it had all.
    let attacker = 3;
    let mut c = Cluster::new(
        4,
        |i| {
            if i == attacker {
                info(150, 150, &[])
            } else {
                info(1000, 1000, &[])
            }
        },
        test_config(),
    );
    inflate_bids(&mut c, attacker);
    c.run_for(1_500);
    let mut ws = Vec::new();
    for i in 0.. {
        let w = spec(&format!("b{i}"), 1, Spread::Node);
        if c.coordinator(&w.id) == attacker {
            continue;
        }
        c.submit(w.clone());
        c.run_for(500);
        ws.push(w);
        if ws.len() == 8 {
            break;
        }
    }
    c.run_for(3_000);
    let bids = c
        .log
        .iter()
        .filter(|m| m.1 == attacker && matches!(m.3, Message::Bid(_)))
        .count();
    assert!(bids >= 4, "the attacker took part in tenders ({bids} bids)");
    for w in &ws {
        c.assert_exact(&w.id);
        assert!(
            c.running(&w.id).iter().all(|r| r.0 != attacker),
            "{}: an honest node with more room (as announced) wins",
            w.id
        );
    }
}

#[test]
fn a_node_holding_what_it_announced_is_awarded_nothing_more() {
    // Node 0 coordinates and has no room; the attacker (1) announced room for one replica,
    // node 2 for one replica with less to spare.
    let attacker = 1;
    let cfg = SchedulerConfig {
        min_candidates: 2,
        ..test_config()
    };
    let mut c = Cluster::new(
        3,
        |i| match i {
            0 => info(0, 0, &[]),
            1 => info(150, 150, &[]),
            _ => info(120, 120, &[]),
        },
        cfg,
    );
    inflate_bids(&mut c, attacker);
    c.run_for(1_500);
    let names: Vec<String> = (0..)
        .map(|i| format!("c{i}"))
        .filter(|n| c.coordinator(&WorkloadId::new("default", n)) == 0)
        .take(2)
        .collect();
    let first = spec(&names[0], 1, Spread::Node);
    c.submit(first.clone());
    c.run_for(2_000);
    assert_eq!(
        c.running(&first.id)[0].0,
        attacker,
        "the emptier node wins the first"
    );
    let second = spec(&names[1], 1, Spread::Node);
    c.submit(second.clone());
    c.run_for(2_000);
    c.assert_exact(&second.id);
    assert_eq!(c.running(&second.id)[0].0, 2);
    let awarded = c
        .log
        .iter()
        .filter(|m| {
            m.2 == attacker && matches!(&m.3, Message::Award(a) if a.workload.id == second.id)
        })
        .count();
    assert_eq!(
        awarded, 0,
        "what it announced is taken: no award, however it bids"
    );
    assert!(c.refused(0, attacker, Refusal::OverCapacity) >= 1);
}

#[test]
fn floods_are_bounded() {
    let (mut c, _) = running_mesh();
    let target = 0;
    // Tenders for workloads nobody signed, from the node that would coordinate them.
    let mut sent = 0;
    for i in 0.. {
        let id = WorkloadId::new("flood", format!("t{i}"));
        if c.sched(target).coordinator(&id) != Some(ATTACKER) {
            continue;
        }
        let mut s = spec("x", 1, Spread::None);
        s.id = id;
        c.inject(
            ATTACKER,
            target,
            Message::Tender(Tender {
                round: 1,
                workload: WorkloadRef::of(&s),
                wanted: 1,
                hold_ms: 0,
            }),
        );
        sent += 1;
        if sent == 2_000 {
            break;
        }
    }
    let s = c.sched(target);
    assert!(s.deferred_count <= 64, "{} deferred", s.deferred_count);
    assert!(s.fetching.len() <= 256, "{} fetches", s.fetching.len());
    assert!(c.refused(target, ATTACKER, Refusal::DeferFull) >= 2_000 - 64);
    // Reports about workloads the target does not coordinate are kept for a takeover only
    // up to a bound per sender.
    for i in 0..2_000 {
        let mut s = spec(&format!("r{i}"), 1, Spread::None);
        s.id = WorkloadId::new("flood", format!("r{i}"));
        if c.sched(target).coordinator(&s.id) == Some(target) {
            continue;
        }
        let claims = vec![claim(&s, 0, 1, ATTACKER, ATTACKER, ReplicaState::Running)];
        c.inject(ATTACKER, target, report(WorkloadRef::of(&s), claims));
    }
    assert!(c.sched(target).early_count <= 256);
    // Open bids for a workload the attacker really coordinates: bounded per coordinator.
    let name = coordinated_by(&c, ATTACKER);
    let mut big = spec(&name, 1, Spread::None);
    big.resources = crate::Resources::ZERO;
    c.submit(big.clone());
    for round in 0..1_000 {
        c.inject(
            ATTACKER,
            target,
            Message::Tender(Tender {
                round: 1_000 + round,
                workload: WorkloadRef::of(&big),
                wanted: 1,
                hold_ms: 60_000,
            }),
        );
    }
    let held = c
        .sched(target)
        .reservations
        .keys()
        .filter(|k| k.0 == ATTACKER)
        .count();
    assert!(held <= 256, "{held} reservations");
    assert!(c.refused(target, ATTACKER, Refusal::TooManyReservations) >= 1);
}

#[test]
fn a_tender_that_outruns_its_manifest_waits_for_it() {
    let mut c = Cluster::new(5, |_| info(1000, 1000, &[]), test_config());
    c.run_for(1_500);
    let w = spec("late", 3, Spread::Node);
    let coord = c.coordinator(&w.id);
    // Only the coordinator has verified the manifest when it tenders.
    c.submit_to(w.clone(), &[coord]);
    c.run_for(3_000);
    c.assert_exact(&w.id);
    let fetched: BTreeSet<u32> = c
        .fetches
        .iter()
        .filter(|f| f.3 == w.id && f.2 == coord)
        .map(|f| f.1)
        .collect();
    assert!(fetched.len() >= 2, "candidates fetched it: {fetched:?}");
}

#[test]
fn a_new_coordinator_awards_its_predecessors_replicas_again() {
    let mut c = Cluster::new(6, |_| info(1000, 1000, &[]), test_config());
    c.run_for(1_500);
    // A workload whose coordinator holds none of its replicas.
    let mut w = spec("a0", 2, Spread::Node);
    for i in 0.. {
        w = spec(&format!("a{i}"), 2, Spread::Node);
        c.submit(w.clone());
        c.run_for(2_000);
        let coord = c.coordinator(&w.id);
        if c.running(&w.id).iter().all(|r| r.0 != coord) {
            break;
        }
    }
    let old = c.coordinator(&w.id);
    c.kill(old);
    c.run_for(3_000);
    c.assert_exact(&w.id);
    let new = c.coordinator(&w.id);
    assert!(c.sched(new).stats().adopted >= 2);
    for (node, _, _) in c.running(&w.id) {
        let a = c.nodes[&node].sched.local_assignments();
        let issuers: BTreeSet<u32> = a
            .assignments
            .iter()
            .filter(|a| a.spec.id == w.id)
            .map(|a| a.award.as_ref().unwrap().issuer)
            .collect();
        assert_eq!(
            issuers,
            [new].into(),
            "node {node} holds the new coordinator's award"
        );
    }
}

#[test]
fn a_host_that_never_runs_what_it_accepted_is_replaced() {
    let start_timeout: Millis = 4_000;
    let cfg = SchedulerConfig {
        start_timeout,
        ..test_config()
    };
    let mut c = Cluster::new(4, |_| info(1000, 1000, &[]), cfg);
    c.run_for(1_500);
    let w = spec("s", 1, Spread::Node);
    let first = {
        // Find the node that wins, then make it one that never starts anything.
        let mut probe = Cluster::new(4, |_| info(1000, 1000, &[]), c.config.clone());
        probe.run_for(1_500);
        probe.submit(w.clone());
        probe.run_for(2_000);
        probe.running(&w.id)[0].0
    };
    c.nodes.get_mut(&first).unwrap().stuck = true;
    c.submit(w.clone());
    c.run_for(2_000);
    assert_eq!(c.running(&w.id)[0].0, first, "accepted, never running");
    c.run_for(start_timeout + 2_000);
    let run = c.running(&w.id);
    assert_eq!(run.len(), 1, "{run:?}");
    assert_ne!(run[0].0, first, "moved off the host that never ran it");
}

#[test]
fn only_the_coordinator_can_say_a_group_was_formed() {
    let (mut c, _) = running_mesh();
    // A strong workload the attacker does not coordinate: it tells every node the group was
    // formed before the coordinator formed it (which would keep it from ever forming).
    let mut w = spec("ledger", 3, Spread::Node);
    w.strong = true;
    let w = (0..)
        .map(|i| {
            let mut w = w.clone();
            w.id.name = format!("ledger{i}").into();
            w
        })
        .find(|w| c.coordinator(&w.id) != ATTACKER)
        .unwrap();
    c.specs.insert(w.id.clone(), w.clone());
    let honest: Vec<u32> = c.alive().into_iter().filter(|n| *n != ATTACKER).collect();
    for &n in &honest {
        c.input(n, crate::Input::Workload(w.clone()));
        c.inject(
            ATTACKER,
            n,
            Message::Formed(crate::Formed {
                workload: WorkloadRef::of(&w),
            }),
        );
    }
    let coord = c.coordinator(&w.id);
    assert_eq!(c.refused(coord, ATTACKER, Refusal::NotCoordinator), 1);
    c.run_for(2_000);
    c.assert_exact(&w.id);
    assert_eq!(
        c.bootstraps.iter().filter(|b| b.2 == w.id).count(),
        3,
        "{:?}",
        c.bootstraps
    );
}
