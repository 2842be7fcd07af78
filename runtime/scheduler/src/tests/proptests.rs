//! Random histories of deaths, restarts (with and without network), partitions, cut links,
//! message loss and new generations; once the mesh is whole again, every workload runs
//! exactly `replicas` replicas and no node runs more than it has.

#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::rc::Rc;

use beemesh_manifest::workload::Spread;
use proptest::prelude::*;

use super::harness::{Cluster, info, spec, test_config};
use crate::hash::mix;
use crate::{Digest, WorkloadSpec};

const NODES: u32 = 7;

#[derive(Debug, Clone)]
enum Op {
    Kill(u32),
    Revive(u32, bool),
    Partition(u8),
    Cut(u32, u32),
    Heal,
    Lossy(bool),
    Advance(u64),
    NewGeneration(usize, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NODES).prop_map(Op::Kill),
        2 => (0..NODES, any::<bool>()).prop_map(|(n, net)| Op::Revive(n, net)),
        1 => (1u8..127).prop_map(Op::Partition),
        1 => (0..NODES, 0..NODES).prop_map(|(a, b)| Op::Cut(a, b)),
        2 => Just(Op::Heal),
        1 => any::<bool>().prop_map(Op::Lossy),
        4 => (1u64..8_000).prop_map(Op::Advance),
        1 => (0usize..3, 1u32..5).prop_map(|(w, r)| Op::NewGeneration(w, r)),
    ]
}

fn workloads() -> impl Strategy<Value = Vec<(u32, bool)>> {
    prop::collection::vec((1u32..5, any::<bool>()), 3)
}

fn run(ws: &[(u32, bool)], ops: &[Op]) -> Result<(), String> {
    let mut c = Cluster::new(NODES, |_| info(1000, 1000, &[]), test_config());
    c.keep_log = false;
    c.run_for(1_500);
    let mut specs: Vec<WorkloadSpec> = ws
        .iter()
        .enumerate()
        .map(|(i, &(r, node))| {
            spec(
                &format!("w{i}"),
                r,
                if node { Spread::Node } else { Spread::None },
            )
        })
        .collect();
    for s in &specs {
        c.submit(s.clone());
    }
    c.run_for(2_000);
    let counter = Rc::new(Cell::new(0u64));
    for op in ops {
        match *op {
            Op::Kill(n) => {
                // Keep enough nodes for `spread = "node"` with up to 4 replicas.
                if c.alive().len() > 4 && c.nodes[&n].alive {
                    c.kill(n);
                }
            }
            Op::Revive(n, net) => {
                if !c.nodes[&n].alive {
                    c.revive(n, net);
                }
            }
            Op::Partition(mask) => {
                let a: Vec<u32> = (0..NODES).filter(|i| mask & (1 << i) != 0).collect();
                let b: Vec<u32> = (0..NODES).filter(|i| mask & (1 << i) == 0).collect();
                c.partition(&[&a[..], &b[..]]);
            }
            Op::Cut(a, b) => {
                if a != b {
                    c.cut_link(a, b);
                }
            }
            Op::Heal => c.heal(),
            Op::Lossy(on) => {
                if on {
                    let k = counter.clone();
                    c.filter = Some(Box::new(move |_, _, _, _| {
                        k.set(k.get() + 1);
                        mix(k.get(), 7).is_multiple_of(10)
                    }));
                } else {
                    c.filter = None;
                }
            }
            Op::Advance(ms) => c.run_for(ms),
            Op::NewGeneration(i, r) => {
                let s = &mut specs[i];
                s.generation += 1;
                s.replicas = r;
                s.content = Digest([s.generation as u8; 32]);
                c.submit(s.clone());
            }
        }
        c.check_capacity()?;
    }
    // The mesh becomes whole again: every node back, every link up, no loss.
    c.filter = None;
    for n in 0..NODES {
        if !c.nodes[&n].alive {
            c.revive(n, true);
        }
        c.reconnect(n);
    }
    c.heal();
    c.run_for(40_000);
    c.check_capacity()?;
    for s in &specs {
        c.check_exact(&s.id)?;
    }
    Ok(())
}

proptest! {
    // BEEMESH_PROPTEST_CASES=5000 for a deeper search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("BEEMESH_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn exactly_replicas_after_any_history(ws in workloads(), ops in prop::collection::vec(op(), 1..14)) {
        if let Err(e) = run(&ws, &ops) {
            return Err(TestCaseError::fail(e));
        }
    }
}
