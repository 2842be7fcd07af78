//! A deterministic router for several [`Scheduler`]s: virtual time, a fixed per-link latency,
//! partitions, node deaths and restarts, message filters, and a fake driver that reports a
//! replica running shortly after it is started. Each node's membership view is derived from
//! who can reach whom, so every view change is an explicit `NodeUp`/`NodeDown`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use beemesh_manifest::keys::PublicKey;
use beemesh_manifest::workload::Spread;

use crate::authority::testing::SeededKeys;
use crate::{
    Authority, AwardProof, Input, LocalAssignments, MemberTable, Message, Millis, NodeInfo, Output,
    Refusal, Replica, ReplicaId, ReplicaIndex, ReplicaState, ReportedReplica, Resources, Scheduler,
    SchedulerConfig, WorkloadId, WorkloadSpec, award_message,
};

pub type Filter = Box<dyn FnMut(Millis, u32, u32, &Message<u32>) -> bool>;
/// Rewrites a message a (malicious) node sends: `from, to, msg`.
pub type Tamper = Box<dyn FnMut(u32, u32, &mut Message<u32>)>;

/// Node `id`'s award keys (real Ed25519, derived from the id; public keys cached for the
/// whole test process).
pub fn keys(id: u32) -> Arc<dyn Authority<u32>> {
    static CACHE: OnceLock<Arc<Mutex<HashMap<u32, PublicKey>>>> = OnceLock::new();
    SeededKeys::of(&id, CACHE.get_or_init(SeededKeys::cache))
}

/// A scheduler for node `id` with its keys.
pub fn scheduler(id: u32, config: SchedulerConfig) -> Scheduler<u32> {
    Scheduler::new(id, config, keys(id))
}

/// A scheduler for node `id` whose view starts from `table`.
pub fn scheduler_with(
    id: u32,
    config: SchedulerConfig,
    table: Arc<MemberTable<u32>>,
) -> Scheduler<u32> {
    Scheduler::with_members(id, config, keys(id), table)
}

/// A claim of `host` on replica `index` of `spec`, awarded (and signed) by `issuer`.
pub fn claim(
    spec: &WorkloadSpec,
    index: ReplicaIndex,
    epoch: u64,
    host: u32,
    issuer: u32,
    state: ReplicaState,
) -> ReportedReplica<u32> {
    let m = award_message(
        &spec.id,
        spec.generation,
        &spec.content,
        index,
        epoch,
        &host,
        &issuer,
    );
    ReportedReplica {
        index,
        epoch,
        state,
        relinquish: false,
        award: AwardProof {
            issuer,
            sig: keys(issuer).sign(&m),
        },
    }
}

pub struct Node {
    pub sched: Scheduler<u32>,
    pub info: NodeInfo,
    pub alive: bool,
    /// What the fake driver runs.
    pub running: BTreeMap<ReplicaId, Replica>,
    pub persisted: Option<LocalAssignments<u32>>,
    /// Whom this node currently believes up.
    pub sees: BTreeSet<u32>,
    /// Starts fail on this node.
    pub broken: bool,
    /// Starts never finish on this node (it neither runs nor fails).
    pub stuck: bool,
    pub starts: u64,
}

enum Ev {
    Msg {
        from: u32,
        to: u32,
        msg: Message<u32>,
    },
    Started {
        node: u32,
        id: ReplicaId,
    },
    /// The answer to a node's fetch of a manifest (anti-entropy with a peer).
    Fetched {
        node: u32,
        spec: WorkloadSpec,
    },
}

pub struct Cluster {
    pub now: Millis,
    pub nodes: BTreeMap<u32, Node>,
    queue: BTreeMap<(Millis, u64), Ev>,
    seq: u64,
    /// One-way latency; `latency_of` overrides it per link.
    pub latency: Millis,
    pub latency_of: Option<Box<dyn Fn(u32, u32) -> Millis>>,
    pub start_delay: Millis,
    /// Returns true to drop a message (`now, from, to, msg`).
    pub filter: Option<Filter>,
    /// Rewrites every message as it is sent (a malicious node's lies).
    pub tamper: Option<Tamper>,
    groups: Option<Vec<BTreeSet<u32>>>,
    isolated: BTreeSet<u32>,
    /// Links cut in both directions.
    cut: BTreeSet<(u32, u32)>,
    pub config: SchedulerConfig,
    pub specs: BTreeMap<WorkloadId, WorkloadSpec>,
    /// Every message sent between distinct nodes (delivered or not): (time, from, to, msg).
    pub log: Vec<(Millis, u32, u32, Message<u32>)>,
    pub keep_log: bool,
    pub sent: u64,
    /// Every refusal a node reported: (time, node, sender, message kind, reason).
    pub refusals: Vec<(Millis, u32, u32, &'static str, Refusal)>,
    /// Every fetch a node asked for: (time, node, from whom, workload).
    pub fetches: Vec<(Millis, u32, u32, WorkloadId)>,
    /// Every Raft bootstrap a node was told to make: (time, node, workload, first voters).
    pub bootstraps: Vec<(Millis, u32, WorkloadId, Vec<u32>)>,
    /// Every replica start a node was told to make: (time, node, replica).
    pub started: Vec<(Millis, u32, ReplicaId)>,
    /// Bootstraps that came after a replica of their workload had started on the node.
    pub late_bootstraps: Vec<(u32, WorkloadId)>,
}

pub fn info(cpu: u64, memory: u64, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: String::new(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        allocatable: Resources { cpu, memory },
    }
}

pub fn spec(name: &str, replicas: u32, spread: Spread) -> WorkloadSpec {
    WorkloadSpec {
        id: WorkloadId::new("default", name),
        generation: 1,
        content: crate::Digest([1; 32]),
        deleted: false,
        replicas,
        spread,
        selector: BTreeMap::new(),
        prefer: BTreeMap::new(),
        resources: Resources {
            cpu: 100,
            memory: 100,
        },
        reschedule_after: 3_000,
        max_unavailable: 1,
        strong: false,
    }
}

pub fn test_config() -> SchedulerConfig {
    SchedulerConfig {
        settle: 1_000,
        takeover_grace: 500,
        bid_timeout: 200,
        award_timeout: 300,
        hold: 2_000,
        report_interval: 5_000,
        ..SchedulerConfig::default()
    }
}

impl Cluster {
    /// `n` nodes that all see each other from time 0.
    pub fn new(n: u32, info_of: impl Fn(u32) -> NodeInfo, config: SchedulerConfig) -> Self {
        let mut c = Self::empty(config);
        for id in 0..n {
            let info = info_of(id);
            c.nodes
                .insert(id, Node::new(scheduler(id, c.config.clone()), info));
        }
        for id in 0..n {
            let info = c.nodes[&id].info.clone();
            c.input(id, Input::NodeUp { node: id, info });
        }
        c.sync_views();
        c
    }

    /// `n` nodes starting from one shared membership table (cheap for large meshes).
    pub fn with_table(n: u32, info_of: impl Fn(u32) -> NodeInfo, config: SchedulerConfig) -> Self {
        let mut c = Self::empty(config);
        let table = Arc::new(MemberTable::new((0..n).map(|i| (i, info_of(i)))));
        for id in 0..n {
            let mut node = Node::new(
                scheduler_with(id, c.config.clone(), table.clone()),
                info_of(id),
            );
            node.sees = (0..n).filter(|&j| j != id).collect();
            c.nodes.insert(id, node);
        }
        for id in 0..n {
            c.input(id, Input::Tick);
        }
        c
    }

    fn empty(config: SchedulerConfig) -> Self {
        Self {
            now: 0,
            nodes: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            latency: 5,
            latency_of: None,
            start_delay: 10,
            filter: None,
            tamper: None,
            groups: None,
            isolated: BTreeSet::new(),
            cut: BTreeSet::new(),
            config,
            specs: BTreeMap::new(),
            log: Vec::new(),
            keep_log: true,
            sent: 0,
            refusals: Vec::new(),
            fetches: Vec::new(),
            bootstraps: Vec::new(),
            late_bootstraps: Vec::new(),
            started: Vec::new(),
        }
    }

    pub fn alive(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.alive)
            .map(|(id, _)| *id)
            .collect()
    }

    fn connected(&self, a: u32, b: u32) -> bool {
        if a == b {
            return true;
        }
        let (Some(na), Some(nb)) = (self.nodes.get(&a), self.nodes.get(&b)) else {
            return false;
        };
        if !na.alive || !nb.alive || self.isolated.contains(&a) || self.isolated.contains(&b) {
            return false;
        }
        if self.cut.contains(&(a.min(b), a.max(b))) {
            return false;
        }
        match &self.groups {
            None => true,
            Some(gs) => gs.iter().any(|g| g.contains(&a) && g.contains(&b)),
        }
    }

    /// Makes every live node's view match reachability.
    pub fn sync_views(&mut self) {
        let ids: Vec<u32> = self.nodes.keys().copied().collect();
        for &a in &ids {
            if !self.nodes[&a].alive {
                continue;
            }
            for &b in &ids {
                if a == b {
                    continue;
                }
                let want = self.connected(a, b);
                let has = self.nodes[&a].sees.contains(&b);
                if want && !has {
                    let info = self.nodes[&b].info.clone();
                    self.nodes.get_mut(&a).unwrap().sees.insert(b);
                    self.input(a, Input::NodeUp { node: b, info });
                } else if !want && has {
                    self.nodes.get_mut(&a).unwrap().sees.remove(&b);
                    self.input(a, Input::NodeDown { node: b });
                }
            }
        }
    }

    pub fn input(&mut self, node: u32, input: Input<u32>) {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if !n.alive {
            return;
        }
        let outs = n.sched.handle(input, now);
        self.apply(node, outs);
    }

    pub fn apply(&mut self, node: u32, outs: Vec<Output<u32>>) {
        for o in outs {
            match o {
                Output::Send { to, mut msg } => {
                    if let Some(t) = self.tamper.as_mut() {
                        t(node, to, &mut msg);
                    }
                    self.sent += 1;
                    if self.keep_log {
                        self.log.push((self.now, node, to, msg.clone()));
                    }
                    let lat = self
                        .latency_of
                        .as_ref()
                        .map_or(self.latency, |f| f(node, to));
                    self.push(
                        self.now + lat,
                        Ev::Msg {
                            from: node,
                            to,
                            msg,
                        },
                    );
                }
                Output::Start { replica } => {
                    self.started.push((self.now, node, replica.id.clone()));
                    let n = self.nodes.get_mut(&node).unwrap();
                    n.starts += 1;
                    let id = replica.id.clone();
                    n.running.insert(id.clone(), replica);
                    if !n.stuck {
                        let at = self.now + self.start_delay;
                        self.push(at, Ev::Started { node, id });
                    }
                }
                Output::Stop { replica } => {
                    let n = self.nodes.get_mut(&node).unwrap();
                    n.running.remove(&replica);
                }
                Output::Persist(la) => {
                    self.nodes.get_mut(&node).unwrap().persisted = Some(la);
                }
                Output::Fetch { from, workload } => {
                    self.fetches
                        .push((self.now, node, from, workload.id.clone()));
                    // The peer answers with the newest signed manifest it has (the cluster's).
                    if self.connected(node, from)
                        && let Some(spec) = self.specs.get(&workload.id)
                    {
                        let at = self.now + 2 * self.latency;
                        let spec = spec.clone();
                        self.push(at, Ev::Fetched { node, spec });
                    }
                }
                Output::Refused {
                    from,
                    message,
                    reason,
                } => {
                    self.refusals.push((self.now, node, from, message, reason));
                }
                Output::Bootstrap { workload, voters } => {
                    // The group must exist before a replica of it starts on this node.
                    let n = &self.nodes[&node];
                    if n.running.keys().any(|id| id.workload == workload) {
                        self.late_bootstraps.push((node, workload.clone()));
                    }
                    self.bootstraps.push((self.now, node, workload, voters));
                }
            }
        }
    }

    fn push(&mut self, at: Millis, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    /// Gives every live node the desired state.
    pub fn submit(&mut self, spec: WorkloadSpec) {
        let all = self.alive();
        self.submit_to(spec, &all);
    }

    /// Gives the desired state to `nodes` only (the others fetch it when a message names it).
    pub fn submit_to(&mut self, spec: WorkloadSpec, nodes: &[u32]) {
        self.specs.insert(spec.id.clone(), spec.clone());
        for &id in nodes {
            self.input(id, Input::Workload(spec.clone()));
        }
    }

    /// A node announces new capacity or labels: every live node (itself included) learns it.
    pub fn announce(&mut self, id: u32, info: NodeInfo) {
        self.nodes.get_mut(&id).unwrap().info = info.clone();
        for n in self.alive() {
            if n == id || self.nodes[&n].sees.contains(&id) {
                self.input(
                    n,
                    Input::NodeUpdated {
                        node: id,
                        info: info.clone(),
                    },
                );
            }
        }
    }

    /// Delivers `msg` to `to` as if `from` sent it now (an attacker's forgery).
    pub fn inject(&mut self, from: u32, to: u32, msg: Message<u32>) {
        self.input(to, Input::Message { from, msg });
    }

    /// Refusals of `reason` that node `at` reported about `from`.
    pub fn refused(&self, at: u32, from: u32, reason: Refusal) -> usize {
        self.refusals
            .iter()
            .filter(|r| r.1 == at && r.2 == from && r.4 == reason)
            .count()
    }

    pub fn run_for(&mut self, ms: Millis) {
        let end = self.now + ms;
        self.run_until(end);
    }

    pub fn run_until(&mut self, end: Millis) {
        loop {
            let next_ev = self.queue.first_key_value().map(|(k, _)| k.0);
            let next_timer = self
                .nodes
                .iter()
                .filter(|(_, n)| n.alive)
                .filter_map(|(id, n)| n.sched.next_deadline().map(|t| (t, *id)))
                .min();
            let t_ev = next_ev.unwrap_or(Millis::MAX);
            let t_tm = next_timer.map_or(Millis::MAX, |t| t.0);
            let t = t_ev.min(t_tm);
            if t > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(t);
            if t_ev <= t_tm {
                let Some((_, ev)) = self.queue.pop_first() else {
                    continue;
                };
                self.deliver(ev);
            } else if let Some((_, id)) = next_timer {
                self.input(id, Input::Tick);
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        match ev {
            Ev::Msg { from, to, msg } => {
                if !self.connected(from, to) {
                    return;
                }
                if let Some(f) = self.filter.as_mut()
                    && f(self.now, from, to, &msg)
                {
                    return;
                }
                self.input(to, Input::Message { from, msg });
            }
            Ev::Started { node, id } => {
                let Some(n) = self.nodes.get(&node) else {
                    return;
                };
                if !n.alive || !n.running.contains_key(&id) {
                    return;
                }
                if n.broken {
                    self.nodes.get_mut(&node).unwrap().running.remove(&id);
                    self.input(
                        node,
                        Input::ReplicaFailed {
                            replica: id,
                            reason: "broken".into(),
                        },
                    );
                } else {
                    self.input(node, Input::ReplicaStarted { replica: id });
                }
            }
            Ev::Fetched { node, spec } => self.input(node, Input::Workload(spec)),
        }
    }

    /// Kills a node: its replicas die with it; the others notice.
    pub fn kill(&mut self, id: u32) {
        let n = self.nodes.get_mut(&id).unwrap();
        n.alive = false;
        n.running.clear();
        n.sees.clear();
        self.sync_views();
    }

    /// Kills a node, but only `by` notice at once; the others keep believing it is up (their
    /// messages to it are lost) until [`Cluster::sync_views`]: failure detection with skew.
    pub fn kill_noticed_by(&mut self, id: u32, by: &[u32]) {
        let n = self.nodes.get_mut(&id).unwrap();
        n.alive = false;
        n.running.clear();
        n.sees.clear();
        for &b in by {
            if self.nodes.get_mut(&b).unwrap().sees.remove(&id) {
                self.input(b, Input::NodeDown { node: id });
            }
        }
    }

    /// Restarts a dead node from what it persisted. Without network it sees nobody.
    pub fn revive(&mut self, id: u32, network: bool) {
        let cfg = self.config.clone();
        let now = self.now;
        let persisted = self.nodes[&id].persisted.clone();
        let info = self.nodes[&id].info.clone();
        {
            let n = self.nodes.get_mut(&id).unwrap();
            n.sched = scheduler(id, cfg);
            n.alive = true;
            n.running.clear();
            n.sees.clear();
        }
        self.input(id, Input::NodeUp { node: id, info });
        let specs: Vec<WorkloadSpec> = self.specs.values().cloned().collect();
        for s in specs {
            self.input(id, Input::Workload(s));
        }
        if let Some(p) = persisted {
            let outs = self
                .nodes
                .get_mut(&id)
                .unwrap()
                .sched
                .restore(p, now)
                .unwrap();
            self.apply(id, outs);
        }
        if network {
            self.isolated.remove(&id);
        } else {
            self.isolated.insert(id);
        }
        self.sync_views();
    }

    /// A new node joins (it learns the desired state, then everyone sees it).
    pub fn add_node(&mut self, id: u32, info: NodeInfo) {
        let sched = scheduler(id, self.config.clone());
        self.nodes.insert(id, Node::new(sched, info.clone()));
        self.input(id, Input::NodeUp { node: id, info });
        let specs: Vec<WorkloadSpec> = self.specs.values().cloned().collect();
        for s in specs {
            self.input(id, Input::Workload(s));
        }
        self.sync_views();
    }

    pub fn reconnect(&mut self, id: u32) {
        self.isolated.remove(&id);
        self.sync_views();
    }

    pub fn partition(&mut self, groups: &[&[u32]]) {
        self.groups = Some(groups.iter().map(|g| g.iter().copied().collect()).collect());
        self.sync_views();
    }

    pub fn heal(&mut self) {
        self.groups = None;
        self.cut.clear();
        self.sync_views();
    }

    /// Cuts the link between two nodes only: each believes the other down.
    pub fn cut_link(&mut self, a: u32, b: u32) {
        self.cut.insert((a.min(b), a.max(b)));
        self.sync_views();
    }

    /// Replicas of `w` the fake drivers of live nodes run: (node, index, generation).
    pub fn running(&self, w: &WorkloadId) -> Vec<(u32, ReplicaIndex, u64)> {
        let mut v = Vec::new();
        for (id, n) in &self.nodes {
            if !n.alive {
                continue;
            }
            for r in n.running.keys() {
                if &r.workload == w {
                    v.push((*id, r.index, r.generation));
                }
            }
        }
        v
    }

    /// Exactly `replicas` replicas of the current generation, one per index, honouring the
    /// selector and the spread; nothing else of the workload runs.
    pub fn check_exact(&self, w: &WorkloadId) -> Result<(), String> {
        let spec = &self.specs[w];
        let run = self.running(w);
        let want = spec.wanted() as usize;
        if run.len() != want {
            return Err(format!("{w}: {} running, want {want}: {run:?}", run.len()));
        }
        let idx: BTreeSet<ReplicaIndex> = run.iter().map(|r| r.1).collect();
        if idx != (0..spec.wanted()).collect() {
            return Err(format!("{w}: indexes {idx:?}"));
        }
        if run.iter().any(|r| r.2 != spec.generation) {
            return Err(format!("{w}: old generation running: {run:?}"));
        }
        if spec.spread == Spread::Node {
            let nodes: BTreeSet<u32> = run.iter().map(|r| r.0).collect();
            if nodes.len() != run.len() {
                return Err(format!("{w}: two replicas on one node: {run:?}"));
            }
        }
        for r in &run {
            if !spec.selects(&self.nodes[&r.0].info.labels) {
                return Err(format!("{w}: replica on node {} outside the selector", r.0));
            }
        }
        Ok(())
    }

    pub fn assert_exact(&self, w: &WorkloadId) {
        if let Err(e) = self.check_exact(w) {
            panic!("at {} ms: {e}", self.now);
        }
    }

    /// No live node runs more than its allocatable.
    pub fn check_capacity(&self) -> Result<(), String> {
        for (id, n) in &self.nodes {
            if !n.alive {
                continue;
            }
            let used = n
                .running
                .values()
                .fold(Resources::ZERO, |a, r| a.saturating_add(&r.resources));
            if !used.fits_in(&n.info.allocatable) {
                return Err(format!("node {id} runs {used} > {}", n.info.allocatable));
            }
        }
        Ok(())
    }

    /// The coordinator of `w` in the view of the first live node.
    pub fn coordinator(&self, w: &WorkloadId) -> u32 {
        let first = self.alive()[0];
        self.nodes[&first].sched.coordinator(w).unwrap()
    }

    pub fn sched(&self, id: u32) -> &Scheduler<u32> {
        &self.nodes[&id].sched
    }

    /// Messages of one kind in the log.
    pub fn count(&self, kind: &str) -> usize {
        self.log.iter().filter(|m| m.3.kind() == kind).count()
    }
}

impl Node {
    fn new(sched: Scheduler<u32>, info: NodeInfo) -> Self {
        Self {
            sched,
            info,
            alive: true,
            running: BTreeMap::new(),
            persisted: None,
            sees: BTreeSet::new(),
            broken: false,
            stuck: false,
            starts: 0,
        }
    }
}
