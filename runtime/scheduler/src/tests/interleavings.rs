//! Interleavings: two tenders at once, lost awards and acceptances, a bidder or coordinator
//! dying at the worst moment, rollouts, deletions, failing replicas.

#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::collections::BTreeSet;
use std::rc::Rc;

use beemesh_manifest::workload::Spread;

use super::harness::{Cluster, claim, info, keys, scheduler, scheduler_with, spec, test_config};
use crate::message::{Award, Revoke, RevokeReason, SlotAward};
use crate::{
    Digest, Input, Message, Output, ReplicaState, Scheduler, SchedulerConfig, WorkloadRef,
    award_message,
};

fn uniform(n: u32) -> Cluster {
    Cluster::new(n, |_| info(1000, 1000, &[]), test_config())
}

fn settle(c: &mut Cluster) {
    c.run_for(1_500);
}

/// Steps until a message matching `pred` is in the log; returns it (time, from, to).
fn step_until(
    c: &mut Cluster,
    mut pred: impl FnMut(&(u64, u32, u32, Message<u32>)) -> bool,
) -> (u64, u32, u32) {
    for _ in 0..10_000 {
        if let Some(m) = c.log.iter().find(|m| pred(m)) {
            return (m.0, m.1, m.2);
        }
        c.run_for(1);
    }
    panic!("no such message");
}

#[test]
fn two_tenders_at_once_from_split_coordinators() {
    let mut c = uniform(6);
    settle(&mut c);
    let w = spec("w", 2, Spread::Node);
    let order = c.sched(0).status_sources(&w.id, 2);
    let (c1, c2) = (order[0], order[1]);
    // c1 and c2 cannot see each other: both believe they coordinate the workload.
    c.cut_link(c1, c2);
    c.submit(w.clone());
    assert!(c.sched(c1).is_coordinating(&w.id) && c.sched(c2).is_coordinating(&w.id));
    c.run_for(2_000);
    assert!(c.sched(c1).stats().tenders_opened >= 1 && c.sched(c2).stats().tenders_opened >= 1);
    // While the link is down each keeps what it knows (a replica c2 awarded itself is
    // invisible to c1); once views agree, the total order leaves exactly one per replica.
    c.run_for(6_000);
    c.heal();
    c.run_for(3_000);
    c.assert_exact(&w.id);
    assert!(!c.sched(c2).is_coordinating(&w.id));
}

#[test]
fn two_tenders_at_once_never_overcommit_a_node() {
    let mut c = Cluster::new(
        3,
        |i| {
            if i == 0 {
                info(1000, 1000, &[])
            } else {
                info(100, 1000, &[])
            }
        },
        test_config(),
    );
    settle(&mut c);
    // Two workloads that only node 0 could hold, one at a time.
    let mut w1 = spec("first", 1, Spread::Node);
    w1.resources.cpu = 600;
    let mut w2 = spec("second", 1, Spread::Node);
    w2.resources.cpu = 600;
    c.submit(w1.clone());
    c.submit(w2.clone());
    c.run_for(3_000);
    c.check_capacity().unwrap();
    let placed = c.running(&w1.id).len() + c.running(&w2.id).len();
    assert_eq!(placed, 1, "node 0's capacity was reserved by the first bid");
    let (winner, loser) = if c.running(&w1.id).is_empty() {
        (w2.clone(), w1.clone())
    } else {
        (w1.clone(), w2.clone())
    };
    let coord = c.coordinator(&loser.id);
    let reason = c.sched(coord).status(&loser.id).unschedulable.unwrap();
    assert!(reason.contains("no room"), "{reason}");
    // Deleting the winner frees the capacity; the loser gets it on its next retry.
    let mut tomb = winner.clone();
    tomb.generation += 1;
    tomb.deleted = true;
    c.submit(tomb);
    c.run_for(1);
    assert!(
        c.running(&winner.id).is_empty(),
        "a tombstone stops replicas at once"
    );
    c.run_for(20_000);
    c.assert_exact(&loser.id);
    c.check_capacity().unwrap();
}

#[test]
fn a_lost_award_is_sent_again_without_a_second_start() {
    let mut c = uniform(5);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    let dropped = Rc::new(Cell::new(0u32));
    let d = dropped.clone();
    c.filter = Some(Box::new(move |_, _, _, m| {
        if matches!(m, Message::Award(_)) && d.get() == 0 {
            d.set(1);
            return true;
        }
        false
    }));
    c.submit(w.clone());
    c.run_for(3_000);
    assert_eq!(dropped.get(), 1);
    c.assert_exact(&w.id);
    // Awards were resent (one more than the winners), but every host started once.
    assert!(c.count("award") > 3 - 1);
    for (node, _, _) in c.running(&w.id) {
        assert_eq!(c.nodes[&node].starts, 1, "node {node}");
    }
}

/// Six nodes, every one asked in every tender, and a workload `w` of three replicas that the
/// returned node (not its coordinator) surely wins: it announced far more room than the rest.
fn a_sure_winner() -> (Cluster, crate::WorkloadSpec, u32) {
    let cfg = SchedulerConfig {
        min_candidates: 6,
        ..test_config()
    };
    let mut c = Cluster::new(6, |_| info(1000, 1000, &[]), cfg);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    let coord = c.coordinator(&w.id);
    let winner = (0..6).find(|&i| i != coord).unwrap();
    c.announce(winner, info(100_000, 100_000, &[]));
    (c, w, winner)
}

#[test]
fn every_award_lost_moves_the_replica_elsewhere() {
    // `deaf` surely wins; every award to it is lost.
    let (mut c, w, deaf) = a_sure_winner();
    c.filter = Some(Box::new(move |_, _, to, m| {
        to == deaf && matches!(m, Message::Award(_))
    }));
    c.submit(w.clone());
    c.run_for(5_000);
    c.assert_exact(&w.id);
    assert!(c.count("award") > 3, "awards to `deaf` were sent and lost");
    assert!(c.nodes[&deaf].running.is_empty());
    assert!(
        c.sched(deaf).reservations.is_empty(),
        "its reservation expired"
    );
}

#[test]
fn an_award_whose_every_acknowledgement_is_lost_is_revoked_when_placed_elsewhere() {
    // `mute` wins, runs the replica, and none of its reports reaches the coordinator until
    // after the award is given up (3 attempts of 300 ms) and the slot placed elsewhere.
    let (mut c, w, mute) = a_sure_winner();
    c.filter = Some(Box::new(move |now, from, _, m| {
        from == mute && matches!(m, Message::Report(_)) && now < 4_000
    }));
    c.submit(w.clone());
    step_until(&mut c, |m| matches!(m.3, Message::Award(_)) && m.2 == mute);
    c.run_for(2_500);
    // Well before the next periodic report (5 s), the replica it ran is gone.
    assert!(
        c.nodes[&mute].running.is_empty(),
        "the given-up award was revoked"
    );
    c.assert_exact(&w.id);
}

#[test]
fn a_lost_acceptance_does_not_start_twice() {
    let mut c = uniform(5);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    let seen: Rc<std::cell::RefCell<BTreeSet<u32>>> = Rc::default();
    let s = seen.clone();
    // The first report of every host is lost.
    c.filter = Some(Box::new(move |_, from, _, m| {
        matches!(m, Message::Report(_)) && s.borrow_mut().insert(from)
    }));
    c.submit(w.clone());
    c.run_for(3_000);
    c.assert_exact(&w.id);
    for (node, _, _) in c.running(&w.id) {
        assert_eq!(c.nodes[&node].starts, 1);
    }
}

#[test]
fn a_bidder_dying_after_winning_is_replaced() {
    let mut c = uniform(6);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    let coord = c.coordinator(&w.id);
    c.submit(w.clone());
    // It dies with the award in flight: the coordinator re-tenders at once.
    let (t, _, winner) = step_until(&mut c, |m| matches!(m.3, Message::Award(_)) && m.2 != coord);
    c.kill(winner);
    c.run_for(1_000);
    c.assert_exact(&w.id);
    assert!(
        c.now - t < w.reschedule_after,
        "no need to wait reschedule_after for an unaccepted award"
    );
    // Another dies after it accepted and started: replaced after reschedule_after.
    let host = c
        .running(&w.id)
        .into_iter()
        .map(|r| r.0)
        .find(|&h| h != coord)
        .unwrap();
    c.kill(host);
    c.run_for(1_000);
    assert_eq!(c.running(&w.id).len(), 2);
    c.run_for(w.reschedule_after);
    c.assert_exact(&w.id);
}

#[test]
fn the_coordinator_dying_between_award_and_acceptance_loses_nothing() {
    let mut c = uniform(6);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    let coord = c.coordinator(&w.id);
    c.submit(w.clone());
    step_until(&mut c, |m| matches!(m.3, Message::Award(_)));
    c.kill(coord);
    c.run_for(3_000);
    c.assert_exact(&w.id);
    let next = c.coordinator(&w.id);
    let st = c.sched(next).status(&w.id);
    assert_eq!((st.placed, st.running), (3, 3), "{st:?}");
}

#[test]
fn a_stale_revoke_does_not_stop_a_newer_claim() {
    let mut s = scheduler(1u32, test_config());
    for node in [1, 2] {
        s.handle(
            Input::NodeUp {
                node,
                info: info(1000, 1000, &[]),
            },
            0,
        );
    }
    // A workload node 2 coordinates.
    let name = (0..)
        .map(|i| format!("w{i}"))
        .find(|n| s.coordinator(&crate::WorkloadId::new("default", n)) == Some(2))
        .unwrap();
    let w = spec(&name, 1, Spread::Node);
    s.handle(Input::Workload(w.clone()), 0);
    let sig = keys(2).sign(&award_message(
        &w.id,
        w.generation,
        &w.content,
        0,
        5,
        &1u32,
        &2u32,
    ));
    let out = s.handle(
        Input::Message {
            from: 2,
            msg: Message::Award(Award {
                round: 1,
                workload: WorkloadRef::of(&w),
                slots: vec![SlotAward {
                    index: 0,
                    epoch: 5,
                    sig,
                }],
                bootstrap: Vec::new(),
            }),
        },
        10,
    );
    assert!(out.iter().any(|o| matches!(o, Output::Start { .. })));
    let revoke = |epoch| Input::Message {
        from: 2,
        msg: Message::Revoke(Revoke {
            workload: w.id.clone(),
            index: 0,
            generation: 1,
            epoch,
            reason: RevokeReason::Conflict,
        }),
    };
    let out = s.handle(revoke(4), 20);
    assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. })));
    let out = s.handle(revoke(5), 30);
    assert!(out.iter().any(|o| matches!(o, Output::Stop { .. })));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Persist(p) if p.assignments.is_empty()))
    );
}

fn rollout(max_unavailable: u32) -> u32 {
    let mut c = uniform(5);
    settle(&mut c);
    let mut w = spec("w", 4, Spread::Node);
    w.max_unavailable = max_unavailable;
    c.submit(w.clone());
    c.run_for(2_000);
    c.assert_exact(&w.id);
    let mut g2 = w.clone();
    g2.generation = 2;
    g2.content = Digest([2; 32]);
    c.submit(g2.clone());
    let mut worst = 0;
    for _ in 0..500 {
        c.run_for(10);
        let unavailable = c
            .nodes
            .values()
            .filter(|n| n.alive)
            .flat_map(|n| n.sched.local_replicas())
            .filter(|(id, st)| id.workload == w.id && *st != ReplicaState::Running)
            .count() as u32;
        let running = c.running(&w.id).len() as u32;
        worst = worst.max(unavailable + 4u32.saturating_sub(running));
    }
    c.assert_exact(&g2.id);
    worst
}

#[test]
fn a_new_generation_rolls_out_max_unavailable_at_a_time() {
    assert_eq!(rollout(1), 1);
    assert_eq!(rollout(2), 2);
}

#[test]
fn scaling_down_revokes_the_highest_indexes() {
    let mut c = uniform(5);
    settle(&mut c);
    let w = spec("w", 4, Spread::Node);
    c.submit(w.clone());
    c.run_for(2_000);
    let mut g2 = w.clone();
    g2.generation = 2;
    g2.replicas = 2;
    c.submit(g2.clone());
    c.run_for(5_000);
    c.assert_exact(&g2.id);
    let idx: BTreeSet<u32> = c.running(&w.id).into_iter().map(|r| r.1).collect();
    assert_eq!(idx, [0, 1].into());
}

#[test]
fn a_replica_failing_everywhere_it_starts_is_restarted_then_given_back() {
    let cfg = SchedulerConfig {
        max_restarts: 2,
        restart_min: 100,
        restart_max: 400,
        ..test_config()
    };
    let mut c = Cluster::new(
        3,
        |i| {
            if i == 0 {
                info(8000, 8000, &[])
            } else {
                info(1000, 1000, &[])
            }
        },
        cfg,
    );
    c.nodes.get_mut(&0).unwrap().broken = true;
    settle(&mut c);
    let w = spec("w", 1, Spread::Node);
    c.submit(w.clone());
    c.run_for(5_000);
    // It went to the roomiest node first, failed there three times, and moved.
    assert_eq!(c.nodes[&0].starts, 3);
    c.assert_exact(&w.id);
    assert!(c.nodes[&0].running.is_empty());
}

#[test]
fn an_overtaken_report_frees_nothing_but_a_restarted_hosts_report_does() {
    use crate::message::{Report, ReportedWorkload};
    use std::sync::Arc;
    // Node 0 coordinates the workload; node 1 holds its three replicas.
    let table = Arc::new(crate::MemberTable::new(
        (0u32..3).map(|i| (i, info(1000, 1000, &[]))),
    ));
    let probe = scheduler_with(0u32, test_config(), table.clone());
    let name = (0..)
        .map(|i| format!("w{i}"))
        .find(|n| probe.coordinator(&crate::WorkloadId::new("default", n)) == Some(0))
        .unwrap();
    let w = spec(&name, 3, Spread::None);
    let report = |seq, indexes: &[u32]| Input::Message {
        from: 1,
        msg: Message::Report(Report {
            seq,
            workloads: vec![ReportedWorkload {
                workload: WorkloadRef::of(&w),
                replicas: indexes
                    .iter()
                    .map(|&index| claim(&w, index, 1, 1, 0, ReplicaState::Running))
                    .collect(),
            }],
        }),
    };
    let held = |s: &Scheduler<u32>| {
        s.placements(&w.id)
            .into_iter()
            .map(|p| p.1)
            .collect::<BTreeSet<u32>>()
    };
    let mut s = scheduler_with(0u32, test_config(), table);
    s.handle(Input::Workload(w.clone()), 0);
    s.handle(report(7, &[0, 1, 2]), 100);
    // The host's previous report arrives late: slot 1 is not freed.
    s.handle(report(6, &[0, 2]), 150);
    assert_eq!(held(&s), [0, 1, 2].into());
    // Its next report no longer lists slot 1: freed.
    s.handle(report(8, &[0, 2]), 200);
    assert_eq!(held(&s), [0, 2].into());
    // The host restarted and numbers from 1 again: heard once the window has passed.
    s.handle(report(1, &[0]), 10_000);
    assert_eq!(held(&s), [0].into());
}

#[test]
fn coordinator_among_agrees_with_every_scheduler_view() {
    use std::sync::Arc;
    for n in [1u32, 2, 5, 17] {
        let nodes: Vec<u32> = (0..n).collect();
        let table = Arc::new(crate::MemberTable::new(
            nodes.iter().map(|&i| (i, info(1000, 1000, &[]))),
        ));
        let probe = scheduler_with(0u32, test_config(), table);
        for k in 0..200 {
            let w = crate::WorkloadId::new("default", format!("w{k}"));
            assert_eq!(
                crate::coordinator_among(&w, &nodes),
                probe.coordinator(&w),
                "{w} among {n} nodes"
            );
        }
    }
    assert_eq!(
        crate::coordinator_among::<u32>(&crate::WorkloadId::new("a", "b"), &[]),
        None
    );
}

#[test]
fn a_strong_workload_is_bootstrapped_once_by_its_first_hosts() {
    let mut c = uniform(5);
    settle(&mut c);
    let mut w = spec("db", 3, Spread::Node);
    w.strong = true;
    c.submit(w.clone());
    c.run_for(2_000);
    c.assert_exact(&w.id);
    let first: Vec<u32> = {
        let mut v: Vec<u32> = c.running(&w.id).into_iter().map(|r| r.0).collect();
        v.sort_unstable();
        v
    };
    // Every first host was told to form the group, with the same voters: the first hosts.
    let told: BTreeSet<u32> = c.bootstraps.iter().map(|b| b.1).collect();
    assert_eq!(told, first.iter().copied().collect());
    assert!(
        c.bootstraps.iter().all(|b| b.3 == first),
        "{:?}",
        c.bootstraps
    );
    // Each host formed the group before its replica started (the replica needs the group).
    assert!(c.late_bootstraps.is_empty(), "{:?}", c.late_bootstraps);
    // A host dies: its replacement joins the group, which is never formed a second time.
    let coord = c.coordinator(&w.id);
    let victim = *first.iter().find(|n| **n != coord).unwrap();
    c.kill(victim);
    c.run_for(8_000);
    c.assert_exact(&w.id);
    assert_eq!(c.bootstraps.len(), 3, "{:?}", c.bootstraps);
    // An eventual workload has no group.
    let e = spec("cache", 2, Spread::Node);
    c.submit(e.clone());
    c.run_for(2_000);
    c.assert_exact(&e.id);
    assert!(c.bootstraps.iter().all(|b| b.2 == w.id));
}

#[test]
fn a_coordinator_taking_over_before_the_hosts_notice_does_not_form_a_second_group() {
    let mut c = uniform(7);
    settle(&mut c);
    // A strong workload whose coordinator's successor hosts none of it (it would know its own
    // claims): its Raft group was formed once, by its first hosts.
    let formed =
        |c: &Cluster, w: &crate::WorkloadId| c.bootstraps.iter().filter(|b| b.2 == *w).count();
    let (w, old, next) = (0..20)
        .find_map(|i| {
            let mut w = spec(&format!("db{i}"), 3, Spread::Node);
            w.strong = true;
            c.submit(w.clone());
            c.run_for(2_000);
            c.assert_exact(&w.id);
            let order = c.sched(0).status_sources(&w.id, 2);
            let hosts: BTreeSet<u32> = c.running(&w.id).into_iter().map(|r| r.0).collect();
            (!hosts.contains(&order[1])).then_some((w, order[0], order[1]))
        })
        .unwrap();
    assert_eq!(formed(&c, &w.id), 3, "{:?}", c.bootstraps);
    // The coordinator dies; its successor notices at once, every other node (the hosts
    // among them) only after three takeover graces: the successor hears of no claim then.
    c.kill_noticed_by(old, &[next]);
    assert!(c.sched(next).is_coordinating(&w.id));
    let lag = 3 * c.config.takeover_grace;
    assert!(lag < c.config.report_interval);
    c.run_for(lag);
    assert_eq!(formed(&c, &w.id), 3, "formed again: {:?}", c.bootstraps);
    c.sync_views();
    c.run_for(c.config.report_interval * 2);
    c.assert_exact(&w.id);
    assert_eq!(formed(&c, &w.id), 3, "formed again: {:?}", c.bootstraps);
    // A strong workload the successor never heard a claim of is placed once the report
    // interval has passed: taking over delays it, never forgets it.
    let mut fresh = spec("db2", 3, Spread::Node);
    fresh.strong = true;
    let alive = c.alive();
    let coord2 = c.sched(alive[0]).status_sources(&fresh.id, 1)[0];
    let others: Vec<u32> = alive.iter().copied().filter(|n| *n != coord2).collect();
    // Only the coordinator-to-be's successor knows the manifest; then the coordinator dies.
    c.submit_to(fresh.clone(), &others);
    let heir = c.sched(others[0]).status_sources(&fresh.id, 2);
    assert_eq!(heir[0], coord2);
    c.kill(coord2);
    let gained = c.now;
    c.run_for(c.config.report_interval * 2);
    c.assert_exact(&fresh.id);
    let formed: Vec<u64> = c
        .bootstraps
        .iter()
        .filter(|b| b.2 == fresh.id)
        .map(|b| b.0)
        .collect();
    assert_eq!(formed.len(), 3, "{:?}", c.bootstraps);
    assert!(
        formed
            .iter()
            .all(|t| *t >= gained + c.config.report_interval)
    );
}

#[test]
fn a_strong_workload_whose_hosts_all_vanished_is_not_formed_again_empty() {
    let mut c = uniform(7);
    settle(&mut c);
    let formed =
        |c: &Cluster, w: &crate::WorkloadId| c.bootstraps.iter().filter(|b| b.2 == *w).count();
    // A workload whose coordinator hosts none of it, nor does the coordinator's successor.
    let (w, hosts, old) = (0..40)
        .find_map(|i| {
            let mut w = spec(&format!("db{i}"), 3, Spread::Node);
            w.strong = true;
            c.submit(w.clone());
            c.run_for(2_000);
            c.assert_exact(&w.id);
            let order = c.sched(0).status_sources(&w.id, 2);
            let hosts: BTreeSet<u32> = c.running(&w.id).into_iter().map(|r| r.0).collect();
            (!hosts.contains(&order[0]) && !hosts.contains(&order[1]))
                .then_some((w, hosts, order[0]))
        })
        .unwrap();
    assert_eq!(formed(&c, &w.id), 3, "{:?}", c.bootstraps);
    // Every member was told, and remembers it across a restart.
    for n in c.alive() {
        assert!(
            c.sched(n).local_assignments().formed.contains(&w.id),
            "node {n} was not told"
        );
    }
    // The coordinator and every host die at once: the successor hears no claim, ever.
    c.kill(old);
    for h in &hosts {
        c.kill(*h);
    }
    let next = c.coordinator(&w.id);
    c.run_for(c.config.report_interval * 3);
    assert_eq!(
        formed(&c, &w.id),
        3,
        "formed again, empty: {:?}",
        c.bootstraps
    );
    assert!(c.running(&w.id).is_empty(), "{:?}", c.running(&w.id));
    let why = c
        .sched(next)
        .status(&w.id)
        .unschedulable
        .unwrap_or_default();
    assert!(why.contains("its Raft group was formed"), "{why}");
    // One host comes back with its replica: the group resumes, the others are replaced
    // (they join it; it is not formed again) and the reason goes.
    let back = *hosts.iter().next().unwrap();
    c.revive(back, true);
    c.run_for(c.config.report_interval * 2);
    c.assert_exact(&w.id);
    assert_eq!(formed(&c, &w.id), 3, "formed again: {:?}", c.bootstraps);
    assert_eq!(
        c.sched(c.coordinator(&w.id)).status(&w.id).unschedulable,
        None
    );
}

#[test]
fn a_strong_workloads_replicas_are_replaced_one_at_a_time() {
    // Two hosts of each workload die at once; a replica takes 2 s to run.
    for strong in [true, false] {
        let mut c = uniform(7);
        c.start_delay = 2_000;
        settle(&mut c);
        let mut w = spec(if strong { "db" } else { "web" }, 3, Spread::Node);
        w.strong = strong;
        c.submit(w.clone());
        c.run_for(4_000);
        c.assert_exact(&w.id);
        let coord = c.coordinator(&w.id);
        let hosts: BTreeSet<u32> = c.running(&w.id).into_iter().map(|r| r.0).collect();
        let victims: Vec<u32> = hosts
            .iter()
            .copied()
            .filter(|n| *n != coord)
            .take(2)
            .collect();
        assert_eq!(victims.len(), 2, "hosts {hosts:?}, coordinator {coord}");
        let killed_at = c.now;
        for v in &victims {
            c.kill(*v);
        }
        c.run_for(30_000);
        c.assert_exact(&w.id);
        // When each replacement was started (the first start of each slot after the kill).
        let mut first = std::collections::BTreeMap::new();
        for (at, node, id) in &c.started {
            if *at >= killed_at && id.workload == w.id && !hosts.contains(node) {
                first.entry(id.index).or_insert(*at);
            }
        }
        assert_eq!(first.len(), 2, "{:?}", c.started);
        let times: Vec<u64> = first.values().copied().collect();
        let gap = times[1].abs_diff(times[0]);
        if strong {
            // The second replacement is placed only once the first runs.
            assert!(gap >= c.start_delay, "started {gap} ms apart: {first:?}");
        } else {
            assert!(gap < c.start_delay, "an eventual workload waits: {first:?}");
        }
    }
}
