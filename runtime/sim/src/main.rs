//! `beemesh-sim`: a discrete-event simulation driving one real [`Scheduler`] per simulated
//! node through a network with latency and loss, printing the figures of docs/benchmarks.md.
//!
//! What is simulated and what is not:
//! - every node runs the real state machine; every protocol message travels through the
//!   simulated network (one-way latency 1 ms plus an exponential tail, independent loss);
//! - a driver reports a replica running a few hundred milliseconds after it was started;
//! - membership: all nodes start from one shared table (the state after the mesh formed);
//!   failures reach each survivor as `NodeDown` after a detection delay drawn per node
//!   (the mesh declares a peer down after `peer_timeout` = 8 s without announcements, sent
//!   every 2 s, so 6 to 8 s after the death);
//! - desired state: the mesh gossips every manifest to every node; the schedulers that act on
//!   one are its coordinator and the nodes that take over from it, so the simulator hands
//!   each workload to the first three nodes of its ring (after a gossip delay of three
//!   network hops) and does not spend memory on the 9,997 inert copies. A node that receives a
//!   message about a manifest it has not verified asks for it (`Output::Fetch`); the
//!   simulator answers after a round trip, as the anti-entropy sync with the sender would (in
//!   the mesh, gossip has usually delivered it long before). When a failure also kills a
//!   workload's first three ring nodes, the simulator hands the workload to its new
//!   coordinator, whose store would hold it.
//! - awards are signed and checked with real Ed25519 keys derived from the node ids
//!   (`SeededKeys`): the CPU figures include the signatures.
//!
//! Debugging: `BEEMESH_SIM_TRACE=1` prints progress every 5 s of the failure phase with the
//! first workloads not yet exact; `BEEMESH_SIM_WATCH=w123` prints every message, start, stop
//! and coordinator view of workload `w123`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use beemesh_manifest::workload::Spread;
use beemesh_scheduler::authority::testing::SeededKeys;
use beemesh_scheduler::{
    Digest, Input, MemberTable, Message, Millis, NodeInfo, Output, ReplicaId, Resources, Scheduler,
    SchedulerConfig, WorkloadId, WorkloadSpec,
};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Parser)]
#[command(about = "Drives real BeeMesh schedulers through a simulated network")]
struct Args {
    /// Mesh sizes to simulate, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    nodes: Vec<u32>,
    /// Workloads submitted at once.
    #[arg(long, default_value_t = 10_000)]
    workloads: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mean one-way latency in milliseconds (1 ms plus an exponential tail).
    #[arg(long, default_value_t = 10.0)]
    latency_ms: f64,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Mean time for the driver to start a replica, in milliseconds (±30 %).
    #[arg(long, default_value_t = 500)]
    start_ms: u64,
    /// Fraction of nodes killed once everything runs.
    #[arg(long, default_value_t = 0.1)]
    kill: f64,
    /// Failure detection: a survivor learns of a death after this many milliseconds plus up
    /// to `detect_spread_ms`.
    #[arg(long, default_value_t = 6_000)]
    detect_ms: u64,
    #[arg(long, default_value_t = 2_000)]
    detect_spread_ms: u64,
}

enum Ev {
    Msg {
        from: u32,
        to: u32,
        msg: Box<Message<u32>>,
    },
    Timer {
        node: u32,
    },
    Desired {
        node: u32,
        spec: Arc<WorkloadSpec>,
    },
    Started {
        node: u32,
        id: ReplicaId,
    },
    Down {
        node: u32,
        dead: Arc<Vec<u32>>,
    },
}

/// One running (or starting) replica instance, as the simulated drivers see it.
#[derive(Clone, Copy)]
struct Instance {
    node: u32,
    index: u32,
    generation: u64,
    running: bool,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    sent: u64,
    lost: u64,
    by_kind: [u64; 8],
    /// Messages refused (none in an honest mesh), and manifests fetched.
    refused: u64,
    fetched: u64,
}

const KINDS: [&str; 8] = [
    "tender", "bid", "decline", "award", "release", "refuse", "report", "revoke",
];

struct Sim {
    now: Millis,
    /// Events by delivery time; first in, first out within one millisecond.
    queue: BTreeMap<Millis, VecDeque<Ev>>,
    nodes: Vec<Scheduler<u32>>,
    alive: Vec<bool>,
    info: Vec<NodeInfo>,
    wake: Vec<Millis>,
    specs: Vec<Arc<WorkloadSpec>>,
    schedulable: Vec<bool>,
    inst: Vec<Vec<Instance>>,
    on_node: Vec<Vec<(u32, u32)>>,
    satisfied: Vec<bool>,
    /// When each workload first ran exactly its replicas.
    first_ok: Vec<Option<Millis>>,
    satisfied_count: usize,
    schedulable_count: usize,
    rng: StdRng,
    latency_ms: f64,
    loss: f64,
    start_ms: u64,
    counts: Counts,
    handled: u64,
    /// BEEMESH_SIM_WATCH=w123: print every message and event about that workload.
    watch: Option<String>,
}

fn mentions(msg: &Message<u32>, name: &str) -> bool {
    match msg {
        Message::Tender(t) => &*t.workload.id.name == name,
        Message::Bid(b) => &*b.workload.name == name,
        Message::Decline(d) => &*d.workload.name == name,
        Message::Award(a) => &*a.workload.id.name == name,
        Message::Release(r) => &*r.workload.name == name,
        Message::Refuse(r) => &*r.workload.name == name,
        Message::Report(r) => r.workloads.iter().any(|w| &*w.workload.id.name == name),
        Message::Revoke(r) => &*r.workload.name == name,
        Message::Formed(f) => &*f.workload.id.name == name,
    }
}

fn workload_index(w: &WorkloadId) -> Option<usize> {
    w.name.strip_prefix('w').and_then(|n| n.parse().ok())
}

impl Sim {
    fn push(&mut self, at: Millis, ev: Ev) {
        self.queue.entry(at).or_default().push_back(ev);
    }

    fn pop(&mut self) -> Option<(Millis, Ev)> {
        let mut first = self.queue.first_entry()?;
        let at = *first.key();
        let ev = first.get_mut().pop_front();
        if first.get().is_empty() {
            first.remove();
        }
        ev.map(|e| (at, e))
    }

    fn latency(&mut self) -> Millis {
        let tail = (self.latency_ms - 1.0).max(0.0);
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let l = 1.0 - tail * u.ln();
        l.min(self.latency_ms * 20.0) as Millis
    }

    fn input(&mut self, node: u32, input: Input<u32>) {
        let n = node as usize;
        if !self.alive[n] {
            return;
        }
        let now = self.now;
        let outs = self.nodes[n].handle(input, now);
        self.handled += 1;
        if let Some(wn) = &self.watch {
            let w = WorkloadId::new("default", wn);
            let st = self.nodes[n].status(&w);
            if st.authoritative {
                println!(
                    "    [{now}] n{node} coordinates: {:?}",
                    st.placements
                        .iter()
                        .map(|p| (p.node, p.index, p.state))
                        .collect::<Vec<_>>()
                );
            }
        }
        self.apply(node, outs);
        self.rearm(node);
    }

    fn rearm(&mut self, node: u32) {
        let n = node as usize;
        if let Some(d) = self.nodes[n].next_deadline() {
            let d = d.max(self.now);
            if d < self.wake[n] {
                self.wake[n] = d;
                self.push(d, Ev::Timer { node });
            }
        }
    }

    fn apply(&mut self, node: u32, outs: Vec<Output<u32>>) {
        for o in outs {
            match o {
                Output::Send { to, msg } => {
                    if let Some(wn) = &self.watch
                        && mentions(&msg, wn)
                    {
                        println!("    [{}] n{node} -> n{to}: {msg:?}", self.now);
                    }
                    self.counts.sent += 1;
                    if let Some(k) = KINDS.iter().position(|k| *k == msg.kind()) {
                        self.counts.by_kind[k] += 1;
                    }
                    if self.rng.random_bool(self.loss) {
                        self.counts.lost += 1;
                        continue;
                    }
                    let at = self.now + self.latency();
                    self.push(
                        at,
                        Ev::Msg {
                            from: node,
                            to,
                            msg: Box::new(msg),
                        },
                    );
                }
                Output::Start { replica } => {
                    if self.watch.as_deref() == Some(&*replica.id.workload.name) {
                        println!("    [{}] n{node} START {}", self.now, replica.id);
                    }
                    let Some(w) = workload_index(&replica.id.workload) else {
                        continue;
                    };
                    self.inst[w].push(Instance {
                        node,
                        index: replica.id.index,
                        generation: replica.id.generation,
                        running: false,
                    });
                    self.on_node[node as usize].push((w as u32, replica.id.index));
                    self.update(w);
                    let jitter = self.rng.random_range(0.7..1.3);
                    let at = self.now + (self.start_ms as f64 * jitter) as Millis;
                    self.push(
                        at,
                        Ev::Started {
                            node,
                            id: replica.id,
                        },
                    );
                }
                Output::Stop { replica } => {
                    if self.watch.as_deref() == Some(&*replica.workload.name) {
                        println!("    [{}] n{node} STOP {}", self.now, replica);
                    }
                    let Some(w) = workload_index(&replica.workload) else {
                        continue;
                    };
                    let before = self.inst[w].len();
                    self.inst[w].retain(|i| {
                        !(i.node == node
                            && i.index == replica.index
                            && i.generation == replica.generation)
                    });
                    if self.inst[w].len() != before {
                        let list = &mut self.on_node[node as usize];
                        if let Some(p) = list
                            .iter()
                            .position(|&(ww, ix)| ww as usize == w && ix == replica.index)
                        {
                            list.swap_remove(p);
                        }
                    }
                    self.update(w);
                }
                Output::Persist(_) | Output::Bootstrap { .. } => {}
                Output::Fetch { workload, .. } => {
                    self.counts.fetched += 1;
                    if let Some(w) = workload_index(&workload.id) {
                        let at = self.now + self.latency() + self.latency();
                        let spec = self.specs[w].clone();
                        self.push(at, Ev::Desired { node, spec });
                    }
                }
                Output::Refused {
                    from,
                    message,
                    reason,
                } => {
                    self.counts.refused += 1;
                    if self.watch.is_some() {
                        println!(
                            "    [{}] n{node} refused a {message} from n{from}: {}",
                            self.now,
                            reason.as_str()
                        );
                    }
                }
            }
        }
    }

    /// Recomputes whether workload `w` runs exactly its replicas.
    fn update(&mut self, w: usize) {
        let spec = &self.specs[w];
        let want = spec.replicas as usize;
        let inst = &self.inst[w];
        let mut ok = inst.len() == want
            && inst
                .iter()
                .all(|i| i.running && i.generation == spec.generation);
        if ok {
            let mut idx: Vec<u32> = inst.iter().map(|i| i.index).collect();
            idx.sort_unstable();
            ok = idx.iter().enumerate().all(|(k, &i)| i as usize == k);
            if ok && spec.spread == Spread::Node {
                let mut nodes: Vec<u32> = inst.iter().map(|i| i.node).collect();
                nodes.sort_unstable();
                nodes.dedup();
                ok = nodes.len() == want;
            }
        }
        if ok && self.first_ok[w].is_none() {
            self.first_ok[w] = Some(self.now);
        }
        if ok != self.satisfied[w] {
            self.satisfied[w] = ok;
            if self.schedulable[w] {
                if ok {
                    self.satisfied_count += 1;
                } else {
                    self.satisfied_count -= 1;
                }
            }
        }
    }

    fn converged(&self) -> bool {
        self.satisfied_count == self.schedulable_count
    }

    fn step(&mut self) -> bool {
        let Some((at, ev)) = self.pop() else {
            return false;
        };
        self.now = self.now.max(at);
        match ev {
            Ev::Msg { from, to, msg } => {
                if let Some(wn) = &self.watch
                    && mentions(&msg, wn)
                {
                    println!(
                        "    [{}] deliver n{from} -> n{to}: {}",
                        self.now,
                        msg.kind()
                    );
                }
                if self.alive[from as usize] && self.alive[to as usize] {
                    self.input(to, Input::Message { from, msg: *msg });
                }
            }
            Ev::Timer { node } => {
                let n = node as usize;
                if self.wake[n] == at {
                    self.wake[n] = Millis::MAX;
                    self.input(node, Input::Tick);
                }
            }
            Ev::Desired { node, spec } => {
                self.input(node, Input::Workload((*spec).clone()));
            }
            Ev::Started { node, id } => {
                let Some(w) = workload_index(&id.workload) else {
                    return true;
                };
                if !self.alive[node as usize] {
                    return true;
                }
                let mut found = false;
                for i in &mut self.inst[w] {
                    if i.node == node && i.index == id.index && i.generation == id.generation {
                        i.running = true;
                        found = true;
                    }
                }
                if found {
                    self.update(w);
                    self.input(node, Input::ReplicaStarted { replica: id });
                }
            }
            Ev::Down { node, dead } => {
                if self.alive[node as usize] {
                    for &d in dead.iter() {
                        self.input(node, Input::NodeDown { node: d });
                    }
                }
            }
        }
        true
    }

    /// Runs until `done` holds (checked after every event) or simulated time passes `until`.
    fn run_while(&mut self, until: Millis, mut done: impl FnMut(&Sim) -> bool) -> Option<Millis> {
        while let Some((&at, _)) = self.queue.first_key_value() {
            if at > until {
                break;
            }
            self.step();
            if done(self) {
                return Some(self.now);
            }
        }
        self.now = self.now.max(until);
        None
    }

    fn kill(&mut self, node: u32) {
        let n = node as usize;
        self.alive[n] = false;
        let held = std::mem::take(&mut self.on_node[n]);
        let mut touched: Vec<usize> = Vec::new();
        for (w, _) in held {
            let w = w as usize;
            self.inst[w].retain(|i| i.node != node);
            touched.push(w);
        }
        touched.sort_unstable();
        touched.dedup();
        for w in touched {
            self.update(w);
        }
    }

    /// Prints what is wrong with up to `k` workloads that are not exact.
    fn explain(&self, k: usize) {
        let bad = (0..self.specs.len()).filter(|&w| self.schedulable[w] && !self.satisfied[w]);
        for w in bad.take(k) {
            let spec = &self.specs[w];
            let coord = self.nodes[0].coordinator(&spec.id).unwrap_or(0);
            let st = self.nodes[coord as usize].status(&spec.id);
            let inst: Vec<String> = self.inst[w]
                .iter()
                .map(|i| {
                    format!(
                        "n{}#{}{}",
                        i.node,
                        i.index,
                        if i.running { "" } else { "(starting)" }
                    )
                })
                .collect();
            println!(
                "  {} replicas {} {:?} selector {:?} res {}: running [{}]; coordinator n{coord}: {st:?}",
                spec.id,
                spec.replicas,
                spec.spread,
                spec.selector,
                spec.resources,
                inst.join(" ")
            );
        }
    }

    /// Replicas placed on a node beyond its allocatable (must be none).
    fn overcommitted(&self) -> usize {
        let mut used = vec![Resources::ZERO; self.nodes.len()];
        for (w, list) in self.inst.iter().enumerate() {
            for i in list {
                let u = &mut used[i.node as usize];
                *u = u.saturating_add(&self.specs[w].resources);
            }
        }
        used.iter()
            .zip(&self.info)
            .filter(|(u, i)| !u.fits_in(&i.allocatable))
            .count()
    }
}

fn node_info(rng: &mut StdRng, i: u32) -> NodeInfo {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("zone".to_owned(), format!("z{}", rng.random_range(0..10)));
    let solar = rng.random_bool(0.2);
    labels.insert(
        "power".to_owned(),
        if solar { "solar" } else { "grid" }.to_owned(),
    );
    if rng.random_bool(0.02) {
        labels.insert("tier".to_owned(), "gpu".to_owned());
    }
    NodeInfo {
        name: format!("node-{i}"),
        labels,
        allocatable: Resources {
            cpu: 8_000 + 4_000 * rng.random_range(0..7u64),
            memory: (16u64 << 30) * rng.random_range(1..9u64),
        },
    }
}

/// The workload mix; the last three cannot be placed (and say why).
fn workload(rng: &mut StdRng, i: u32, total: u32) -> (WorkloadSpec, bool) {
    let replicas = match rng.random_range(0..100) {
        0..30 => 1,
        30..50 => 2,
        50..85 => 3,
        _ => 5,
    };
    let mut s = WorkloadSpec {
        id: WorkloadId::new("default", format!("w{i}")),
        generation: 1,
        content: Digest([(i % 251) as u8; 32]),
        deleted: false,
        replicas,
        spread: if rng.random_bool(0.8) {
            Spread::Node
        } else {
            Spread::None
        },
        selector: Default::default(),
        prefer: Default::default(),
        resources: Resources {
            cpu: 50 * rng.random_range(1..=15u64),
            memory: (32u64 << 20) * rng.random_range(1..=32u64),
        },
        reschedule_after: 10_000,
        max_unavailable: 1,
        strong: false,
    };
    let r: u32 = rng.random_range(0..100);
    if r < 25 {
        s.selector
            .insert("zone".into(), format!("z{}", rng.random_range(0..10)));
    } else if r < 26 {
        s.selector.insert("tier".into(), "gpu".into());
    }
    if rng.random_bool(0.3) {
        s.prefer.insert("power".into(), "solar".into());
    }
    let mut schedulable = true;
    if i + 3 >= total {
        schedulable = false;
        match total - i {
            3 => {
                s.selector = [("zone".to_owned(), "mars".to_owned())].into();
            }
            2 => s.resources.memory = 1 << 40,
            _ => {
                s.selector = [("tier".to_owned(), "gpu".to_owned())].into();
                s.spread = Spread::Node;
                s.replicas = 5_000;
            }
        }
    }
    (s, schedulable)
}

/// CPU time this process has used (user + system), from /proc/self/stat, in seconds: the
/// figure that survives a machine shared with other work. Assumes USER_HZ = 100 (Linux on
/// x86 and arm64).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn pct(sorted: &[Millis], p: f64) -> Millis {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn run(args: &Args, n: u32) {
    let wall_start = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed ^ u64::from(n).rotate_left(32));
    let cfg = SchedulerConfig::default();
    let info: Vec<NodeInfo> = (0..n).map(|i| node_info(&mut rng, i)).collect();
    let table = Arc::new(MemberTable::new(
        (0..n).map(|i| (i, info[i as usize].clone())),
    ));
    let keys = SeededKeys::cache();
    let nodes: Vec<Scheduler<u32>> = (0..n)
        .map(|i| Scheduler::with_members(i, cfg.clone(), SeededKeys::of(&i, &keys), table.clone()))
        .collect();
    let total = args.workloads.max(4);
    let mut specs = Vec::new();
    let mut schedulable = Vec::new();
    for i in 0..total {
        let (s, ok) = workload(&mut rng, i, total);
        specs.push(Arc::new(s));
        schedulable.push(ok);
    }
    let schedulable_count = schedulable.iter().filter(|s| **s).count();
    let replicas_total: u64 = specs
        .iter()
        .zip(&schedulable)
        .filter(|(_, ok)| **ok)
        .map(|(s, _)| u64::from(s.replicas))
        .sum();
    let mut sim = Sim {
        now: 0,
        queue: BTreeMap::new(),
        alive: vec![true; n as usize],
        wake: vec![Millis::MAX; n as usize],
        nodes,
        info,
        inst: vec![Vec::new(); specs.len()],
        on_node: vec![Vec::new(); n as usize],
        satisfied: vec![false; specs.len()],
        first_ok: vec![None; specs.len()],
        satisfied_count: 0,
        schedulable_count,
        specs,
        schedulable,
        rng,
        latency_ms: args.latency_ms,
        loss: args.loss,
        start_ms: args.start_ms,
        counts: Counts::default(),
        handled: 0,
        watch: std::env::var("BEEMESH_SIM_WATCH").ok(),
    };
    for i in 0..n {
        sim.input(i, Input::Tick);
    }
    let setup_wall = wall_start.elapsed();
    println!(
        "== {n} nodes, {total} workloads ({replicas_total} replicas to place, plus 3 unschedulable workloads), seed {} ==",
        args.seed
    );
    println!(
        "network: one-way latency 1 ms + exponential tail, mean {} ms; loss {:.1} %; replica start {} ms ±30 %",
        args.latency_ms,
        args.loss * 100.0,
        args.start_ms
    );

    // Phase 1: the mesh has settled; every workload is submitted at once.
    let submit = cfg.settle + 1_000;
    sim.run_while(submit, |_| false);
    for w in 0..sim.specs.len() {
        let spec = sim.specs[w].clone();
        let holders = sim.nodes[0].status_sources(&spec.id, 3);
        for h in holders {
            let delay: Millis = (0..3).map(|_| sim.latency()).sum();
            sim.push(
                submit + delay,
                Ev::Desired {
                    node: h,
                    spec: spec.clone(),
                },
            );
        }
    }
    let before = sim.counts;
    let handled_before = sim.handled;
    let wall = Instant::now();
    let cpu = cpu_seconds();
    let converged = sim.run_while(submit + 600_000, Sim::converged);
    let place_wall = wall.elapsed();
    let place_cpu = cpu_seconds() - cpu;
    let placed_msgs = sim.counts.sent - before.sent;
    let Some(t_conv) = converged else {
        println!(
            "did not converge within 10 minutes: {} of {} workloads exact",
            sim.satisfied_count, sim.schedulable_count
        );
        sim.explain(5);
        return;
    };
    let conv = t_conv - submit;
    let mut latencies: Vec<Millis> = sim
        .first_ok
        .iter()
        .zip(&sim.schedulable)
        .filter(|(_, ok)| **ok)
        .filter_map(|(t, _)| t.map(|t| t - submit))
        .collect();
    latencies.sort_unstable();
    let secs = place_wall.as_secs_f64().max(1e-9);
    println!("placement of {total} workloads submitted together:");
    println!(
        "  every replica running after     {:>9.2} s simulated (replica start ≈ {} ms included)",
        conv as f64 / 1000.0,
        args.start_ms
    );
    println!(
        "  per workload, submission to all its replicas running: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        pct(&latencies, 0.5),
        pct(&latencies, 0.9),
        pct(&latencies, 0.99),
        pct(&latencies, 1.0)
    );
    println!(
        "  wall clock                      {:>9.2} s  → {:.0} replicas/s, {:.0} workloads/s ({} scheduler inputs)",
        secs,
        replicas_total as f64 / secs,
        schedulable_count as f64 / secs,
        sim.handled - handled_before
    );
    let cpu_secs = place_cpu.max(0.01);
    println!(
        "  CPU time (one core)             {:>9.2} s  → {:.0} replicas/s, {:.0} workloads/s",
        place_cpu,
        replicas_total as f64 / cpu_secs,
        schedulable_count as f64 / cpu_secs
    );
    println!(
        "  messages                        {:>9}  → {:.2} per replica, {:.2} per workload; {:.6} per node per replica",
        placed_msgs,
        placed_msgs as f64 / replicas_total as f64,
        placed_msgs as f64 / schedulable_count as f64,
        placed_msgs as f64 / replicas_total as f64 / f64::from(n)
    );
    let kinds: Vec<String> = KINDS
        .iter()
        .enumerate()
        .map(|(k, name)| format!("{name} {}", sim.counts.by_kind[k] - before.by_kind[k]))
        .collect();
    println!(
        "  by kind: {}; lost {}; manifests fetched {}; refused {}",
        kinds.join(", "),
        sim.counts.lost - before.lost,
        sim.counts.fetched - before.fetched,
        sim.counts.refused - before.refused
    );
    let stats = sim.nodes.iter().map(|s| s.stats()).fold((0, 0, 0), |a, s| {
        (
            a.0 + s.tenders_opened,
            a.1 + s.replicas_awarded,
            a.2 + s.conflicts_resolved,
        )
    });
    println!(
        "  tenders {} for {} replicas awarded; conflicts resolved {}; overcommitted nodes {}",
        stats.0,
        stats.1,
        stats.2,
        sim.overcommitted()
    );
    for w in 0..sim.specs.len() {
        if !sim.schedulable[w] {
            let id = sim.specs[w].id.clone();
            let coord = sim.nodes[0].coordinator(&id).unwrap_or(0);
            let st = sim.nodes[coord as usize].status(&id);
            println!(
                "  unschedulable {}: {} of {} placed: {}",
                id,
                st.placed,
                st.replicas,
                st.unschedulable.unwrap_or_else(|| "(no reason)".into())
            );
        }
    }

    // Steady state: nothing moves for 40 s (one round of anti-entropy reports included).
    let steady_from = sim.counts;
    let tenders_before: u64 = sim.nodes.iter().map(|s| s.stats().tenders_opened).sum();
    sim.run_while(t_conv + 40_000, |_| false);
    let tenders_after: u64 = sim.nodes.iter().map(|s| s.stats().tenders_opened).sum();
    let steady_msgs = sim.counts.sent - steady_from.sent;
    println!(
        "steady 40 s: still exact: {}; {} new tenders; {} messages (anti-entropy reports: {:.3} per node per second)",
        sim.converged(),
        tenders_after - tenders_before,
        steady_msgs,
        steady_msgs as f64 / f64::from(n) / 40.0
    );

    // Phase 2: kill a fraction of the nodes.
    let t_kill = sim.now;
    let mut victims: Vec<u32> = (0..n).collect();
    for i in 0..victims.len() {
        let j = sim.rng.random_range(i..victims.len());
        victims.swap(i, j);
    }
    victims.truncate(((f64::from(n) * args.kill).round() as usize).min(n as usize - 1));
    victims.sort_unstable();
    let lost: usize = victims.iter().map(|&v| sim.on_node[v as usize].len()).sum();
    let coordinators_lost = sim
        .specs
        .iter()
        .filter(|s| {
            sim.nodes[0]
                .coordinator(&s.id)
                .is_some_and(|c| victims.binary_search(&c).is_ok())
        })
        .count();
    // Every node's store holds every manifest; the simulator gave each workload only to the
    // first three nodes of its ring. Give it now to the node that coordinates it once the
    // victims are gone, if that one is further down the ring (its store would have it).
    let viewer = (0..n)
        .find(|i| victims.binary_search(i).is_err())
        .unwrap_or(0) as usize;
    let mut late_feeds = 0;
    for w in 0..sim.specs.len() {
        let spec = sim.specs[w].clone();
        let order = sim.nodes[viewer].status_sources(&spec.id, 64);
        let Some(pos) = order.iter().position(|c| victims.binary_search(c).is_err()) else {
            continue;
        };
        if pos >= 3 {
            late_feeds += 1;
            let at = sim.now;
            sim.push(
                at,
                Ev::Desired {
                    node: order[pos],
                    spec,
                },
            );
        }
    }
    for &v in &victims {
        sim.kill(v);
    }
    let dead = Arc::new(victims.clone());
    let mut detect: Vec<Millis> = Vec::new();
    for i in 0..n {
        if sim.alive[i as usize] {
            let d = args.detect_ms + sim.rng.random_range(0..=args.detect_spread_ms);
            detect.push(d);
            sim.push(
                t_kill + d,
                Ev::Down {
                    node: i,
                    dead: dead.clone(),
                },
            );
        }
    }
    detect.sort_unstable();
    let before = sim.counts;
    let wall = Instant::now();
    let cpu = cpu_seconds();
    let restored = if std::env::var_os("BEEMESH_SIM_TRACE").is_some() {
        let mut r = None;
        for k in 1..=120 {
            r = sim.run_while(t_kill + k * 1_000, Sim::converged);
            if r.is_some() {
                break;
            }
            if k % 5 == 0 {
                println!(
                    "  t+{k}s: {} of {} exact",
                    sim.satisfied_count, sim.schedulable_count
                );
                sim.explain(3);
            }
        }
        r
    } else {
        sim.run_while(t_kill + 600_000, Sim::converged)
    };
    let kill_wall = wall.elapsed();
    println!(
        "failure of {} nodes ({:.0} %) at once: {lost} replicas lost, and the coordinators of {coordinators_lost} workloads (for {late_feeds} of these the first three ring nodes died too)",
        victims.len(),
        args.kill * 100.0
    );
    match restored {
        Some(t) => {
            let msgs = sim.counts.sent - before.sent;
            println!(
                "  every replica running again after {:>6.2} s simulated (detection {:.1}..{:.1} s + reschedule_after 10 s + placement + start)",
                (t - t_kill) as f64 / 1000.0,
                pct(&detect, 0.0) as f64 / 1000.0,
                pct(&detect, 1.0) as f64 / 1000.0
            );
            println!(
                "  wall clock {:.2} s, CPU {:.2} s (includes {} NodeDown inputs); messages {} → {:.2} per replica restored; manifests fetched {}; refused {}",
                kill_wall.as_secs_f64(),
                cpu_seconds() - cpu,
                victims.len() * (n as usize - victims.len()),
                msgs,
                msgs as f64 / lost.max(1) as f64,
                sim.counts.fetched - before.fetched,
                sim.counts.refused - before.refused
            );
        }
        None => println!(
            "  NOT restored within 10 minutes: {} of {} workloads exact",
            sim.satisfied_count, sim.schedulable_count
        ),
    }
    println!(
        "  overcommitted nodes {}; total wall clock {:.1} s (setup {:.2} s)",
        sim.overcommitted(),
        wall_start.elapsed().as_secs_f64(),
        setup_wall.as_secs_f64()
    );
    println!();
}

fn main() {
    let args = Args::parse();
    for &n in &args.nodes {
        if n < 8 {
            eprintln!("beemesh-sim: --nodes must be at least 8");
            std::process::exit(2);
        }
        run(&args, n);
    }
}
