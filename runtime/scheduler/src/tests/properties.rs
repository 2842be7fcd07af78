//! One test (or more) per property of DESIGN.md section 4.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use beemesh_manifest::workload::Spread;

use super::harness::{Cluster, claim, info, scheduler, scheduler_with, spec, test_config};
use crate::hash::stable_hash;
use crate::members::node_ring;
use crate::{
    Input, LocalAssignments, Message, NodeKey, ReplicaState, RestoreError, WorkloadId, tiebreak,
};

fn uniform(n: u32) -> Cluster {
    Cluster::new(n, |_| info(1000, 1000, &[]), test_config())
}

fn settle(c: &mut Cluster) {
    c.run_for(1_500);
}

fn awarded(c: &Cluster) -> u64 {
    c.nodes
        .values()
        .map(|n| n.sched.stats().replicas_awarded)
        .sum()
}

// ---- 1. exactly `replicas`, honouring selector and spread ------------------------------

#[test]
fn p1_exactly_replicas_honouring_selector_and_spread() {
    let mut c = Cluster::new(
        10,
        |i| info(1000, 1000, &[("zone", if i < 6 { "a" } else { "b" })]),
        test_config(),
    );
    settle(&mut c);
    let mut w1 = spec("w1", 3, Spread::Node);
    w1.selector.insert("zone".into(), "a".into());
    let mut w2 = spec("w2", 5, Spread::None);
    w2.selector.insert("zone".into(), "b".into());
    let w3 = spec("w3", 1, Spread::Node);
    for s in [&w1, &w2, &w3] {
        c.submit(s.clone());
    }
    c.run_for(2_000);
    for s in [&w1, &w2, &w3] {
        c.assert_exact(&s.id);
    }
    // Never "every bidder wins": exactly the 9 replicas were awarded, although more
    // candidates bid and the losers were released.
    assert_eq!(awarded(&c), 9);
    assert!(c.count("release") > 0, "losing bidders are released");
    // The coordinator's view is the mesh's.
    let coord = c.coordinator(&w1.id);
    let st = c.sched(coord).status(&w1.id);
    assert!(st.authoritative);
    assert_eq!((st.replicas, st.placed, st.running), (3, 3, 3));
    assert!(
        st.placements
            .iter()
            .all(|p| p.state == ReplicaState::Running)
    );
    assert_eq!(st.unschedulable, None);
    // Steady state stays put.
    let before = c.running(&w1.id);
    c.run_for(30_000);
    assert_eq!(c.running(&w1.id), before);
    assert_eq!(awarded(&c), 9);
}

#[test]
fn p1_unschedulable_is_reported_and_retried_only_when_membership_grows() {
    let mut c = Cluster::new(4, |_| info(1000, 1000, &[("zone", "a")]), test_config());
    settle(&mut c);
    let mut mars = spec("mars", 1, Spread::Node);
    mars.selector.insert("zone".into(), "mars".into());
    let mut big = spec("big", 1, Spread::Node);
    big.resources.memory = 10_000;
    let wide = spec("wide", 6, Spread::Node);
    for s in [&mars, &big, &wide] {
        c.submit(s.clone());
    }
    c.run_for(2_000);
    let reason = |c: &Cluster, w: &WorkloadId| {
        let coord = c.coordinator(w);
        c.sched(coord).status(w).unschedulable.unwrap_or_default()
    };
    assert!(
        reason(&c, &mars.id).contains("matches selector"),
        "{}",
        reason(&c, &mars.id)
    );
    assert!(
        reason(&c, &big.id).contains("needs"),
        "{}",
        reason(&c, &big.id)
    );
    assert!(
        reason(&c, &wide.id).contains("spread"),
        "{}",
        reason(&c, &wide.id)
    );
    assert_eq!(c.running(&wide.id).len(), 4, "places what it can");
    // Any node explains a static reason, not only the coordinator.
    let other = (0..4).find(|&i| i != c.coordinator(&mars.id)).unwrap();
    assert!(c.sched(other).status(&mars.id).unschedulable.is_some());
    // No storm: a minute later, no more tenders than before.
    let tenders = c.count("tender");
    c.run_for(60_000);
    assert_eq!(
        c.count("tender"),
        tenders,
        "parked workloads are not retried"
    );
    // A node that fits joins: they are retried at once.
    c.add_node(4, info(1000, 100_000, &[("zone", "mars")]));
    c.add_node(5, info(1000, 1000, &[("zone", "a")]));
    c.run_for(3_000);
    assert_eq!(c.running(&mars.id).len(), 1);
    assert_eq!(c.running(&big.id).len(), 1);
    assert_eq!(c.running(&wide.id).len(), 6);
    c.assert_exact(&wide.id);
}

// ---- 2. bids from real free capacity and prefer; reservations --------------------------

#[test]
fn p2_bids_score_free_capacity_and_prefer() {
    let mut c = Cluster::new(
        3,
        |i| match i {
            0 => info(4000, 4000, &[]),
            1 => info(1000, 1000, &[]),
            _ => info(2000, 2000, &[("power", "solar")]),
        },
        test_config(),
    );
    settle(&mut c);
    let plain = spec("plain", 1, Spread::Node);
    c.submit(plain.clone());
    c.run_for(1_000);
    assert_eq!(c.running(&plain.id)[0].0, 0, "the emptiest node wins");
    let mut sunny = spec("sunny", 1, Spread::Node);
    sunny.prefer.insert("power".into(), "solar".into());
    c.submit(sunny.clone());
    c.run_for(1_000);
    assert_eq!(c.running(&sunny.id)[0].0, 2, "the preferred node wins");
    // Tenders name the workload's generation (each node takes the count and the resources
    // from its own verified copy); bids carry distinct scores.
    let tenders: Vec<_> = c
        .log
        .iter()
        .filter_map(|m| match &m.3 {
            Message::Tender(t) if t.workload.id == plain.id => Some((m.1, t.clone())),
            _ => None,
        })
        .collect();
    assert!(!tenders.is_empty());
    assert!(tenders.iter().all(|(_, t)| t.wanted == 1
        && t.workload.generation == plain.generation
        && t.workload.content == plain.content));
    let tender = tenders[0].1.clone();
    let mut scores = BTreeSet::new();
    for n in 0..3u32 {
        // Node n with its capacity, asked by a coordinator of its own view.
        let coordinator = (10u32..)
            .find(|x| crate::coordinator_among(&plain.id, &[n, *x]) == Some(*x))
            .unwrap();
        let mut s = scheduler(n, test_config());
        s.handle(
            Input::NodeUp {
                node: n,
                info: c.nodes[&n].info.clone(),
            },
            0,
        );
        s.handle(
            Input::NodeUp {
                node: coordinator,
                info: info(1, 1, &[]),
            },
            0,
        );
        s.handle(Input::Workload(plain.clone()), 0);
        let out = s.handle(
            Input::Message {
                from: coordinator,
                msg: Message::Tender(tender.clone()),
            },
            0,
        );
        for o in out {
            if let crate::Output::Send {
                msg: Message::Bid(b),
                ..
            } = o
            {
                scores.insert(b.score);
            }
        }
    }
    assert_eq!(
        scores.len(),
        3,
        "each node's free capacity gives its own score: {scores:?}"
    );
}

#[test]
fn p2_prefer_finds_the_preferred_node_among_nodes_that_joined() {
    // Every node learns its mesh through NodeUp (as a real node does), so the preferred node
    // is not in any shared table's label pool; with 12 nodes a tender of two sampled
    // candidates would miss it most of the time if it were drawn from everyone.
    let mut c = Cluster::new(
        12,
        |i| match i {
            7 => info(4000, 4000, &[("power", "solar")]),
            _ => info(4000, 4000, &[]),
        },
        test_config(),
    );
    settle(&mut c);
    for k in 0..8 {
        let mut w = spec(&format!("sunny{k}"), 1, Spread::Node);
        w.prefer.insert("power".into(), "solar".into());
        c.submit(w.clone());
        c.run_for(1_000);
        assert_eq!(
            c.running(&w.id).iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![7],
            "{} goes to the preferred node, which has room",
            w.id
        );
    }
}

#[test]
fn p2_capacity_is_reserved_while_bidding_and_released_or_expired_after() {
    let mut c = uniform(3);
    settle(&mut c);
    let mut w = spec("w", 1, Spread::Node);
    w.resources.cpu = 600;
    c.submit(w.clone());
    // Tenders left at t, arrive at t+5; bids are out at t+5.
    c.run_for(6);
    let reserved: Vec<u64> = (0..3).map(|i| c.sched(i).free().cpu).collect();
    assert_eq!(
        reserved,
        vec![400, 400, 400],
        "every candidate reserved its bid"
    );
    c.run_for(1_000);
    let host = c.running(&w.id)[0].0;
    for i in 0..3 {
        let want = if i == host { 400 } else { 1000 };
        assert_eq!(
            c.sched(i).free().cpu,
            want,
            "node {i}: losers were released"
        );
    }
    // With every release lost, reservations expire after the hold (a coordinator's release
    // to itself does not travel).
    c.filter = Some(Box::new(|_, _, _, m| matches!(m, Message::Release(_))));
    let mut w2 = spec("w2", 1, Spread::Node);
    w2.resources.cpu = 300;
    c.submit(w2.clone());
    c.run_for(1_000);
    let winner = c.running(&w2.id)[0].0;
    let coord = c.coordinator(&w2.id);
    let expect = (0..3u32).filter(|&i| i != winner && i != coord).count();
    let holding: usize = (0..3).map(|i| c.sched(i).reservations.len()).sum();
    assert!(expect > 0);
    assert_eq!(holding, expect, "losers still hold their reservation");
    c.run_for(2_000);
    let holding: usize = (0..3).map(|i| c.sched(i).reservations.len()).sum();
    assert_eq!(holding, 0, "the hold expired");
    let freed: u64 = (0..3).map(|i| c.sched(i).free().cpu).sum();
    assert_eq!(freed, 3000 - 600 - 300);
    let expired: u64 = c
        .nodes
        .values()
        .map(|n| n.sched.stats().reservations_expired)
        .sum();
    assert_eq!(expired as usize, expect);
}

// ---- 3. no node is special -----------------------------------------------------------

#[test]
fn p3_losing_the_coordinator_mid_tender_or_later_loses_nothing() {
    let mut c = uniform(8);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    c.submit(w.clone());
    let first = c.coordinator(&w.id);
    // Tenders are out; the coordinator dies before it can award.
    c.run_for(7);
    c.kill(first);
    c.run_for(2_000);
    c.assert_exact(&w.id);
    let second = c.coordinator(&w.id);
    assert_ne!(second, first);
    let st = c.sched(second).status(&w.id);
    assert!(st.authoritative && st.running == 3);
    // The new coordinator and a host die together: the next one rebuilds the table from
    // the hosts' reports and re-places the lost replica.
    let host = c
        .running(&w.id)
        .into_iter()
        .map(|r| r.0)
        .find(|&h| h != second)
        .unwrap();
    c.kill(second);
    c.kill(host);
    c.run_for(w.reschedule_after + 2_000);
    c.assert_exact(&w.id);
    let third = c.coordinator(&w.id);
    let st = c.sched(third).status(&w.id);
    assert_eq!((st.placed, st.running), (3, 3), "{st:?}");
    // The node the manifest was submitted to (node 0 here) is nothing special either.
    if c.nodes[&0].alive {
        c.kill(0);
    }
    c.run_for(w.reschedule_after + 2_000);
    c.assert_exact(&w.id);
}

// ---- 4. rescheduling within reschedule_after -----------------------------------------

#[test]
fn p4_replicas_of_a_vanished_node_move_within_reschedule_after() {
    let mut c = uniform(6);
    settle(&mut c);
    let w = spec("w", 3, Spread::Node);
    c.submit(w.clone());
    c.run_for(1_000);
    c.assert_exact(&w.id);
    let coord = c.coordinator(&w.id);
    let host = c
        .running(&w.id)
        .into_iter()
        .map(|r| r.0)
        .find(|&h| h != coord)
        .unwrap();
    // A blip shorter than reschedule_after moves nothing.
    let before = c.running(&w.id);
    let others: Vec<u32> = (0..6).filter(|&i| i != host).collect();
    c.partition(&[&[host][..], &others[..]]);
    c.run_for(1_000);
    c.heal();
    c.run_for(w.reschedule_after + 1_000);
    assert_eq!(c.running(&w.id), before, "a short absence moves nothing");
    // A real loss moves the replica, not before reschedule_after and soon after it.
    c.kill(host);
    c.run_for(w.reschedule_after - 100);
    assert_eq!(
        c.running(&w.id).len(),
        2,
        "nothing moves before reschedule_after"
    );
    let bound = 100 + c.config.bid_timeout + 4 * c.latency + c.start_delay;
    c.run_for(bound);
    c.assert_exact(&w.id);
}

// ---- 5. offline autonomy -------------------------------------------------------------

#[test]
fn p5_restart_without_network_restarts_persisted_replicas() {
    let mut c = uniform(4);
    settle(&mut c);
    let ws = [
        spec("a", 2, Spread::Node),
        spec("b", 2, Spread::None),
        spec("c", 1, Spread::Node),
    ];
    for s in &ws {
        c.submit(s.clone());
    }
    c.run_for(2_000);
    let x = (0..4).max_by_key(|i| c.nodes[i].running.len()).unwrap();
    let had: Vec<_> = c.nodes[&x].running.keys().cloned().collect();
    assert!(!had.is_empty());
    assert!(
        c.nodes[&x]
            .persisted
            .as_ref()
            .is_some_and(|p| p.assignments.len() == had.len())
    );
    // Power cut, reboot with no network at all.
    c.kill(x);
    c.revive(x, false);
    let now: Vec<_> = c.nodes[&x].running.keys().cloned().collect();
    assert_eq!(now, had, "restored at once from its own state");
    c.run_for(30_000);
    let later: Vec<_> = c.nodes[&x].running.keys().cloned().collect();
    assert_eq!(
        later, had,
        "keeps running them, and takes on nothing else, while alone"
    );
    // Network returns: duplicates made by the others meanwhile resolve to exactly one.
    c.reconnect(x);
    c.run_for(5_000);
    for s in &ws {
        c.assert_exact(&s.id);
    }
}

#[test]
fn p5_restore_refuses_a_newer_format() {
    let mut s = scheduler(1u32, test_config());
    let err = s
        .restore(
            LocalAssignments {
                version: 99,
                assignments: vec![],
                formed: vec![],
            },
            0,
        )
        .unwrap_err();
    assert_eq!(err, RestoreError::Version { found: 99 });
}

// ---- 6. conflicts after a partition --------------------------------------------------

/// (node, replica index, epoch) of each holder.
type Holders = Vec<(u32, u32, u64)>;

fn partition_scenario() -> (Holders, Holders, u64) {
    let mut c = uniform(6);
    settle(&mut c);
    let a = spec("a", 2, Spread::Node);
    let b = spec("b", 3, Spread::None);
    c.submit(a.clone());
    c.submit(b.clone());
    c.run_for(2_000);
    c.partition(&[&[0, 1, 2], &[3, 4, 5]]);
    c.run_for(10_000);
    // Each side healed itself: together they run more than asked.
    assert!(c.running(&a.id).len() + c.running(&b.id).len() > 5);
    c.heal();
    c.run_for(10_000);
    c.assert_exact(&a.id);
    c.assert_exact(&b.id);
    let conflicts = c
        .nodes
        .values()
        .map(|n| n.sched.stats().conflicts_resolved)
        .sum();
    (c.running(&a.id), c.running(&b.id), conflicts)
}

#[test]
fn p6_a_healed_partition_converges_to_exactly_one_holder_per_replica_deterministically() {
    let first = partition_scenario();
    assert!(first.2 > 0, "conflicts were resolved");
    assert_eq!(
        partition_scenario(),
        first,
        "the same history gives the same outcome"
    );
}

// ---- 7. deterministic tie-breaks -----------------------------------------------------

fn tie_winners(latency: Option<Box<dyn Fn(u32, u32) -> u64>>) -> Vec<u32> {
    let cfg = crate::SchedulerConfig {
        min_candidates: 5,
        ..test_config()
    };
    let mut c = Cluster::new(5, |_| info(1000, 1000, &[]), cfg);
    c.latency_of = latency;
    settle(&mut c);
    let w = spec("tie", 2, Spread::Node);
    c.submit(w.clone());
    c.run_for(2_000);
    c.assert_exact(&w.id);
    let mut v: Vec<u32> = c.running(&w.id).into_iter().map(|r| r.0).collect();
    v.sort();
    v
}

#[test]
fn p7_equal_bids_are_decided_by_rendezvous_hash_not_arrival_order() {
    let a = tie_winners(None);
    let b = tie_winners(Some(Box::new(|_, to| 1 + u64::from(to) * 7)));
    let c = tie_winners(Some(Box::new(|_, to| 1 + u64::from(4 - to.min(4)) * 7)));
    assert_eq!(a, b);
    assert_eq!(a, c);
    // And they are the two highest rendezvous weights.
    let w = WorkloadId::new("default", "tie");
    let ring = stable_hash(&w.key_bytes());
    let mut all: Vec<u32> = (0..5).collect();
    all.sort_by_key(|n| std::cmp::Reverse(tiebreak(ring, 0, stable_hash(&n.key_bytes()))));
    let mut top: Vec<u32> = all[..2].to_vec();
    top.sort();
    assert_eq!(a, top);
}

#[test]
fn p7_equal_claims_are_decided_by_rendezvous_hash_not_report_order() {
    use crate::message::{Report, ReportedWorkload};
    // A workload node 0 coordinates among nodes 0..3.
    let table = std::sync::Arc::new(crate::MemberTable::new(
        (0u32..3).map(|i| (i, info(1000, 1000, &[]))),
    ));
    let probe = scheduler_with(0u32, test_config(), table.clone());
    let name = (0..)
        .map(|i| format!("w{i}"))
        .find(|n| probe.coordinator(&WorkloadId::new("default", n)) == Some(0))
        .unwrap();
    let w = spec(&name, 1, Spread::Node);
    // Two hosts hold equal awards of node 0 (the same epoch, as after a partition).
    let report = |host, epoch| {
        Message::Report(Report {
            seq: 0,
            workloads: vec![ReportedWorkload {
                workload: crate::WorkloadRef::of(&w),
                replicas: vec![claim(&w, 0, epoch, host, 0, ReplicaState::Running)],
            }],
        })
    };
    let holder = |order: [u32; 2]| {
        let mut s = scheduler_with(0u32, test_config(), table.clone());
        s.handle(Input::Workload(w.clone()), 0);
        let mut revoked = Vec::new();
        for from in order {
            for o in s.handle(
                Input::Message {
                    from,
                    msg: report(from, 7),
                },
                10,
            ) {
                if let crate::Output::Send {
                    to,
                    msg: Message::Revoke(_),
                } = o
                {
                    revoked.push(to);
                }
            }
        }
        let st = s.status(&w.id);
        (
            st.placements.iter().map(|p| p.node).collect::<Vec<_>>(),
            revoked,
        )
    };
    let (h1, r1) = holder([1, 2]);
    let (h2, r2) = holder([2, 1]);
    assert_eq!(h1, h2, "same winner whichever report came first");
    assert_eq!(r1, r2, "same loser revoked");
    let ring = stable_hash(&w.id.key_bytes());
    let winner = if tiebreak(ring, 0, node_ring(&1u32)) > tiebreak(ring, 0, node_ring(&2u32)) {
        1
    } else {
        2
    };
    assert_eq!(h1, vec![winner]);
}

// ---- 8. cost per placement -----------------------------------------------------------

fn messages_per_replica(n: u32) -> (f64, usize) {
    let mut c = Cluster::with_table(n, |_| info(4000, 4000, &[]), test_config());
    c.run_for(1_500);
    let before = c.sent;
    let mut ids = Vec::new();
    for i in 0..20 {
        let s = spec(&format!("w{i}"), 3, Spread::Node);
        ids.push(s.id.clone());
        c.submit(s);
    }
    c.run_for(1_500);
    for w in &ids {
        c.assert_exact(w);
    }
    let per = (c.sent - before) as f64 / 60.0;
    // The widest tender: distinct nodes one workload's tenders reached.
    let widest = ids
        .iter()
        .map(|w| {
            c.log
                .iter()
                .filter(|m| matches!(&m.3, Message::Tender(t) if &t.workload.id == w))
                .map(|m| m.2)
                .collect::<BTreeSet<u32>>()
                .len()
        })
        .max()
        .unwrap_or(0);
    (per, widest)
}

#[test]
fn p8_messages_per_placement_do_not_grow_with_the_mesh() {
    let (small, small_widest) = messages_per_replica(30);
    let (large, large_widest) = messages_per_replica(600);
    assert!(
        small <= 10.0 && large <= 10.0,
        "{small} and {large} messages per replica"
    );
    assert!(
        large <= small * 1.25 + 0.5,
        "{small} → {large}: grows with the mesh"
    );
    assert!(
        small_widest <= 6 && large_widest <= 6,
        "tenders reach 2·replicas nodes"
    );
}
