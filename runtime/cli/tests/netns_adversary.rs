//! An admitted but malicious node against honest ones, on real hosts: four `beemesh node`
//! processes and an attacker, each in its own network namespace on one bridge (see
//! `common/netns.rs`; runs as root). The attacker is the test rig's in-process peer on the real
//! mesh crate, admitted with the fleet's ticket: it announces itself with a small capacity and
//! then speaks the scheduler protocol (`/beemesh/sched/2`) with forged messages. It is test
//! code only; nothing of it ships in the product.
//!
//! With a signed `replicas = 3` workload running, the attacker sends, in turn and then in
//! floods: reports naming a generation nobody signed (as a forged tombstone or a forged
//! `replicas = 60` would), reports in the old format that carried a spec, claims it awarded
//! itself (60 of them, and one under the epoch `u64::MAX - 1`), awards and revokes for a
//! workload it does not coordinate, tenders for workloads nobody signed, and, when a second
//! workload is tendered, bids claiming a huge free capacity. After every attack exactly 3
//! replicas of the signed spec run, on the same honest nodes, and the attack shows in the
//! nodes' `beemesh_scheduler_refused_total`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use beemesh_mesh::PeerId;
use beemesh_scheduler::{
    AwardProof, Bid, Message, Report, ReportedReplica, ReportedWorkload, Resources, Revoke,
    RevokeReason, SCHEDULER_PROTOCOL, Signature, SlotAward, Tender, WorkloadId, WorkloadRef,
    award_message,
};
use common::api::{Api, eventually};
use common::netns::{self, Cli, Credentials, Host, Lab, MeshPeer, NodeProcess};
use serde_json::Value;
use tempfile::TempDir;

const HONEST: usize = 4;
const START: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);
/// A census must hold this long to count (more than a reconcile pass, an announcement round
/// and the wait of a deferred message).
const STABLE: Duration = Duration::from_secs(12);
/// What the attacker announces: room for a few replicas, less than any honest host.
const EVIL_CPU: u64 = 100;
const EVIL_MEMORY: u64 = 64 << 20;
/// Messages of each kind in a flood.
const FLOOD: usize = 300;

#[test]
fn an_admitted_attacker_changes_nothing_the_operators_signed() {
    if !netns::available("an_admitted_attacker_changes_nothing_the_operators_signed") {
        return;
    }
    let mut rig = Rig::new();
    rig.step("start four nodes and the attacker", Rig::start);
    rig.step("a signed workload runs", Rig::run_web);
    rig.step("forged reports", Rig::forged_reports);
    rig.step("claims the attacker awarded itself", Rig::self_awards);
    rig.step(
        "awards, revokes and tenders from a non-coordinator",
        Rig::commands,
    );
    rig.step("bids claiming a huge capacity", Rig::inflated_bids);
    rig.step("floods", Rig::floods);
}

struct Member {
    node: NodeProcess,
    host: Host,
    peer_id: String,
}

// Fields drop in declaration order: processes and the attacker first, then the namespaces,
// the files last.
struct Rig {
    members: Vec<Member>,
    evil: Option<MeshPeer>,
    /// The attacker's identity key (it signs its own "awards").
    evil_key: beemesh_mesh::Keypair,
    evil_host: Host,
    /// Kept for its namespaces, removed when dropped.
    _lab: Lab,
    cli: Cli,
    creds: Credentials,
    root: PathBuf,
    /// The running workload: its name, marker, and what the API says of it.
    web: Option<Running>,
    started: Instant,
    dir: Option<TempDir>,
}

struct Running {
    name: String,
    marker: String,
    r: WorkloadRef,
    coordinator: usize,
    /// (member, replica index, epoch) of each holder when it was placed.
    holders: BTreeSet<usize>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        netns::keep_files_on_failure(&mut self.dir, self.started);
    }
}

fn manifest(name: &str, marker: &str) -> String {
    format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nnamespace = \"default\"\nname = \"{name}\"\n\
         generation = 1\n\n[placement]\nreplicas = 3\nspread = \"node\"\n\
         reschedule_after = \"5s\"\n\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"/bin/sleep\", \"{marker}\"]\n\
         resources = {{ cpu = \"10m\", memory = \"16Mi\" }}\n"
    )
}

/// `beemesh_scheduler_refused_total{message,reason}` as a node's `/metrics` shows it.
fn refusals(api: &Api) -> BTreeMap<(String, String), u64> {
    let text = api
        .request("GET", "/metrics", None)
        .map(|r| r.text())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("beemesh_scheduler_refused_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        out.insert((label("message"), label("reason")), n);
    }
    out
}

impl Rig {
    fn new() -> Self {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("bmadv")
            .tempdir()
            .expect("a temporary directory");
        let root = dir.path().to_owned();
        let cli = Cli::new(env!("CARGO_BIN_EXE_beemesh"));
        let creds = Credentials::create(&cli, &root.join("keys"))
            .expect("operator key, admission key, fleet ticket");
        let mut lab = Lab::new().expect("the lab's hub namespace and bridge");
        let hosts: Vec<Host> = (1..=HONEST)
            .map(|i| {
                lab.add_host(&format!("n{i}"))
                    .unwrap_or_else(|e| panic!("host n{i}: {e}"))
            })
            .collect();
        let evil_host = lab.add_host("evil").expect("the attacker's host");
        let configs =
            netns::plan_nodes(&hosts, &root, &creds).expect("host configs and identities");
        let members = configs
            .into_iter()
            .zip(hosts)
            .map(|((cfg, peer_id), host)| Member {
                node: NodeProcess::new(&cli, &host, &root.join(&host.name), &cfg)
                    .unwrap_or_else(|e| panic!("node {}: {e}", host.name)),
                host,
                peer_id,
            })
            .collect();
        eprintln!("adversary rig: files in {}", root.display());
        Rig {
            members,
            evil: None,
            evil_key: beemesh_mesh::Keypair::generate_ed25519(),
            evil_host,
            _lab: lab,
            cli,
            creds,
            root,
            web: None,
            started,
            dir: Some(dir),
        }
    }

    fn step(&mut self, name: &str, f: fn(&mut Rig)) {
        let t = Instant::now();
        f(self);
        eprintln!(
            "[{:>6.1?}] {name}: ok ({:.1?})",
            self.started.elapsed(),
            t.elapsed()
        );
    }

    fn evil(&self) -> &MeshPeer {
        self.evil.as_ref().expect("the attacker runs")
    }

    fn evil_id(&self) -> String {
        self.evil_key.public().to_peer_id().to_base58()
    }

    /// Sends a scheduler message as the attacker; the node answers every well-formed one
    /// with an empty reply, whatever it makes of it.
    fn send(&self, to: usize, msg: &Message<String>) {
        let body = serde_json::to_vec(msg).expect("encode");
        self.send_raw(to, SCHEDULER_PROTOCOL, body);
    }

    fn send_raw(&self, to: usize, protocol: &str, body: Vec<u8>) {
        let peer: PeerId = self.members[to].peer_id.parse().expect("PeerId");
        let evil = self.evil();
        // Refused requests are fine: the node says so; what counts is what it does.
        let _ = evil.block_on(evil.mesh().request(peer, protocol, body));
    }

    fn start(&mut self) {
        for m in &mut self.members {
            m.node.start().unwrap_or_else(|e| panic!("{e}"));
        }
        for m in &mut self.members {
            m.node.wait_ready(START).unwrap_or_else(|e| panic!("{e}"));
        }
        // The attacker: admitted with the fleet ticket, announcing a small capacity.
        let ticket = std::fs::read(&self.creds.fleet_ticket).expect("the fleet ticket");
        let ticket_key = beemesh_manifest::SecretKey::load(
            &beemesh_manifest::ticket::default_key_path(&self.creds.fleet_ticket),
        )
        .expect("the fleet ticket's key");
        let bootstrap: Vec<String> = self
            .members
            .iter()
            .map(|m| m.host.mesh_addr(Some(&m.peer_id.parse().expect("PeerId"))))
            .collect();
        let mut cfg = netns::mesh_config(
            &self.evil_host,
            self.evil_key.clone(),
            &self.creds.admission,
            ticket,
            Some(ticket_key),
            &bootstrap,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let capacity = beemesh_node::capacity::Capacity::from_totals(
            beemesh_manifest::Cpu(EVIL_CPU),
            beemesh_manifest::Memory(EVIL_MEMORY),
            &beemesh_manifest::host::Reserve {
                cpu: beemesh_manifest::Cpu(0),
                memory: beemesh_manifest::Memory(0),
            },
        );
        cfg.announcement = serde_json::to_vec(&beemesh_node::node::Announcement {
            name: "evil".into(),
            labels: BTreeMap::new(),
            capacity,
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .expect("announcement");
        self.evil =
            Some(MeshPeer::start("evil", &self.evil_host, cfg).unwrap_or_else(|e| panic!("{e}")));
        let evil = self.evil_id();
        eventually(
            "every node to list every other and the attacker",
            CONVERGE,
            || {
                for m in &self.members {
                    let peers: BTreeSet<String> = m
                        .node
                        .api()
                        .peers()
                        .map_err(|e| format!("{}: {e}", m.node.name()))?
                        .into_iter()
                        .map(|p| p.peer_id)
                        .collect();
                    let mut want: BTreeSet<String> = self
                        .members
                        .iter()
                        .filter(|o| o.peer_id != m.peer_id)
                        .map(|o| o.peer_id.clone())
                        .collect();
                    want.insert(evil.clone());
                    if peers != want {
                        return Err(format!("{} lists {} peers", m.node.name(), peers.len()));
                    }
                }
                Ok(())
            },
        );
    }

    /// Every peer id of the mesh, the attacker's included.
    fn mesh_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.members.iter().map(|m| m.peer_id.clone()).collect();
        ids.push(self.evil_id());
        ids
    }

    /// Applies and waits for a workload of 3 replicas whose coordinator is honest.
    fn place(&self, prefix: &str, marker: &str) -> Running {
        let ids = self.mesh_ids();
        let evil = self.evil_id();
        let name = (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| {
                beemesh_scheduler::coordinator_among(&WorkloadId::new("default", n), &ids)
                    .is_some_and(|c| c != evil)
            })
            .expect("a name");
        let coordinator_id =
            beemesh_scheduler::coordinator_among(&WorkloadId::new("default", &name), &ids)
                .expect("a coordinator");
        let coordinator = self
            .members
            .iter()
            .position(|m| m.peer_id == coordinator_id)
            .expect("an honest coordinator");
        let plain = self.root.join(format!("{name}.toml"));
        let signed = self.root.join(format!("{name}.signed.toml"));
        std::fs::write(&plain, manifest(&name, marker)).expect("write manifest");
        self.cli
            .sign(&plain, &self.creds.operator_key, &signed)
            .expect("beemesh sign");
        let answer = self
            .cli
            .apply(self.members[0].node.api(), &signed)
            .expect("beemesh apply");
        assert_eq!(answer["status"], "accepted", "{answer}");
        let holders = self.expect_three(&name, marker, None);
        let view: Value = self.members[0]
            .node
            .api()
            .get(&format!("/v1/workloads/default/{name}"))
            .expect("the workload");
        let r: WorkloadRef = serde_json::from_value(serde_json::json!({
            "id": { "namespace": "default", "name": name },
            "generation": view["generation"],
            "content": view["digest"],
        }))
        .unwrap_or_else(|e| panic!("a workload reference from {view}: {e}"));
        Running {
            name,
            marker: marker.to_owned(),
            r,
            coordinator,
            holders,
        }
    }

    /// Waits until exactly 3 replica processes run, one on each of 3 honest nodes (the same
    /// ones as `same`, if given), the API agrees, and this holds for [`STABLE`].
    fn expect_three(
        &self,
        name: &str,
        marker: &str,
        same: Option<&BTreeSet<usize>>,
    ) -> BTreeSet<usize> {
        let evil_procs = || self.evil_host.processes_running(&["/bin/sleep", marker]);
        let mut since: Option<(BTreeSet<usize>, Instant)> = None;
        eventually(
            format!("exactly 3 replicas of {name} on honest nodes"),
            CONVERGE,
            || {
                let per: Vec<usize> = self
                    .members
                    .iter()
                    .map(|m| m.host.processes_running(&["/bin/sleep", marker]).len())
                    .collect();
                let on: BTreeSet<usize> = (0..HONEST).filter(|i| per[*i] > 0).collect();
                let check = || -> Result<(), String> {
                    if !evil_procs().is_empty() {
                        return Err("a replica runs on the attacker's host".into());
                    }
                    if per.iter().sum::<usize>() != 3 || per.iter().any(|n| *n > 1) {
                        return Err(format!("replica processes per node: {per:?}"));
                    }
                    if let Some(same) = same
                        && &on != same
                    {
                        return Err(format!("replicas moved: {on:?}, were on {same:?}"));
                    }
                    let view: Value = self.members[0]
                        .node
                        .api()
                        .get(&format!("/v1/workloads/default/{name}"))
                        .map_err(|e| e.to_string())?;
                    let running: BTreeSet<String> = view["placements"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["state"] == "running")
                        .filter_map(|p| p["node"].as_str().map(str::to_owned))
                        .collect();
                    let names: BTreeSet<String> = on
                        .iter()
                        .map(|i| self.members[*i].node.name().to_owned())
                        .collect();
                    if running != names || view["replicas"] != 3 {
                        return Err(format!("the API says {view}"));
                    }
                    Ok(())
                };
                match check() {
                    Err(e) => {
                        since = None;
                        Err(e)
                    }
                    Ok(()) => match &since {
                        Some((s, t)) if *s == on && t.elapsed() >= STABLE => Ok(on.clone()),
                        Some((s, _)) if *s == on => Err("holding".into()),
                        _ => {
                            since = Some((on.clone(), Instant::now()));
                            Err("holding".into())
                        }
                    },
                }
            },
        )
    }

    fn web(&self) -> &Running {
        self.web.as_ref().expect("web runs")
    }

    /// After an attack: nothing moved, and `node` counted at least one more refusal of each
    /// of `reasons` than `before`.
    fn unchanged_and_refused(
        &self,
        before: &[BTreeMap<(String, String), u64>],
        expect: &[(usize, &str, &str)],
    ) {
        let w = self.web();
        self.expect_three(&w.name, &w.marker, Some(&w.holders));
        for &(node, message, reason) in expect {
            let key = (message.to_owned(), reason.to_owned());
            let was = before[node].get(&key).copied().unwrap_or(0);
            eventually(
                format!(
                    "{} to count a refused {message} ({reason})",
                    self.members[node].node.name()
                ),
                CONVERGE,
                || {
                    let now = refusals(self.members[node].node.api())
                        .get(&key)
                        .copied()
                        .unwrap_or(0);
                    if now > was {
                        Ok(())
                    } else {
                        Err(format!("{now} (was {was})"))
                    }
                },
            );
        }
    }

    fn snapshot(&self) -> Vec<BTreeMap<(String, String), u64>> {
        self.members
            .iter()
            .map(|m| refusals(m.node.api()))
            .collect()
    }

    fn run_web(&mut self) {
        let web = self.place("web", "7780001");
        eprintln!(
            "  {}: replicas on {:?}, coordinator {}",
            web.name,
            web.holders
                .iter()
                .map(|i| self.members[*i].node.name())
                .collect::<Vec<_>>(),
            self.members[web.coordinator].node.name()
        );
        self.web = Some(web);
    }

    /// A claim of the attacker on replica `index`, awarded by itself (validly signed).
    fn own_claim(&self, r: &WorkloadRef, index: u32, epoch: u64) -> ReportedReplica<String> {
        let me = self.evil_id();
        let m = award_message(&r.id, r.generation, &r.content, index, epoch, &me, &me);
        let sig = self
            .evil_key
            .sign(&m)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s.as_slice()).ok())
            .map(Signature)
            .expect("an Ed25519 signature");
        ReportedReplica {
            index,
            epoch,
            state: beemesh_scheduler::ReplicaState::Running,
            relinquish: false,
            award: AwardProof { issuer: me, sig },
        }
    }

    fn report(r: WorkloadRef, replicas: Vec<ReportedReplica<String>>) -> Message<String> {
        Message::Report(Report {
            seq: 1,
            workloads: vec![ReportedWorkload {
                workload: r,
                replicas,
            }],
        })
    }

    fn forged_reports(&mut self) {
        let before = self.snapshot();
        let w = self.web();
        let coord = w.coordinator;
        // A generation nobody signed, with 60 replicas: what a forged tombstone or a forged
        // `replicas = 60` would have to name. The coordinator fetches it from the attacker,
        // which has nothing signed to give, and drops the report when its wait ends.
        let forged = WorkloadRef {
            id: w.r.id.clone(),
            generation: w.r.generation + 1,
            content: beemesh_scheduler::Digest([0xee; 32]),
        };
        let claims: Vec<_> = (0..60).map(|i| self.own_claim(&forged, i, 1)).collect();
        self.send(coord, &Self::report(forged, claims));
        // The old protocol's report, which carried a spec (here a tombstone): not a message
        // of this protocol any more.
        let old = serde_json::json!({ "report": { "seq": 1, "workloads": [{
            "spec": { "id": { "namespace": "default", "name": w.name }, "generation": 99,
                      "deleted": true, "replicas": 60 },
            "replicas": [] }] } });
        self.send_raw(
            coord,
            SCHEDULER_PROTOCOL,
            serde_json::to_vec(&old).expect("json"),
        );
        self.unchanged_and_refused(
            &before,
            &[
                (coord, "report", "unverified"),
                (coord, "undecodable", "malformed"),
            ],
        );
    }

    fn self_awards(&mut self) {
        let before = self.snapshot();
        let w = self.web();
        let coord = w.coordinator;
        let r = w.r.clone();
        // 60 replicas of the real generation, and replica 0 under the largest epoch.
        let claims: Vec<_> = (0..60).map(|i| self.own_claim(&r, i, 2)).collect();
        self.send(coord, &Self::report(r.clone(), claims));
        self.send(
            coord,
            &Self::report(r.clone(), vec![self.own_claim(&r, 0, u64::MAX - 1)]),
        );
        self.unchanged_and_refused(
            &before,
            &[
                (coord, "report", "self_award"),
                (coord, "report", "epoch_out_of_bounds"),
            ],
        );
    }

    fn commands(&mut self) {
        let before = self.snapshot();
        let w = self.web();
        let r = w.r.clone();
        let holders: Vec<usize> = w.holders.iter().copied().collect();
        let idle = (0..HONEST)
            .find(|i| !w.holders.contains(i))
            .expect("a node without a replica");
        // Revokes of every replica on every holder, under every epoch an honest coordinator
        // would have used here.
        for &h in &holders {
            for index in 0..3 {
                for epoch in 1..=10 {
                    self.send(
                        h,
                        &Message::Revoke(Revoke {
                            workload: r.id.clone(),
                            index,
                            generation: r.generation,
                            epoch,
                            reason: RevokeReason::NotWanted,
                        }),
                    );
                }
            }
        }
        // An award of replica 0 to the node that holds none, and a tender.
        self.send(
            idle,
            &Message::Award(beemesh_scheduler::Award {
                round: 1,
                workload: r.clone(),
                slots: vec![SlotAward {
                    index: 0,
                    epoch: 1_000,
                    sig: Signature::default(),
                }],
                bootstrap: Vec::new(),
            }),
        );
        self.send(
            idle,
            &Message::Tender(Tender {
                round: 1,
                workload: r.clone(),
                wanted: 3,
                hold_ms: 60_000,
            }),
        );
        let mut expect: Vec<(usize, &str, &str)> = holders
            .iter()
            .map(|&h| (h, "revoke", "not_coordinator"))
            .collect();
        expect.push((idle, "award", "not_coordinator"));
        expect.push((idle, "tender", "not_coordinator"));
        self.unchanged_and_refused(&before, &expect);
        let idle_host = &self.members[idle].host;
        assert!(
            idle_host
                .processes_running(&["/bin/sleep", &w.marker])
                .is_empty(),
            "the forged award started nothing"
        );
    }

    fn inflated_bids(&mut self) {
        // A second workload is tendered; the attacker bids on every tender it gets with a huge
        // free capacity and the best score. It announced little, so it wins nothing.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let evil = self.evil();
        let (bait, (bids, awards)) = std::thread::scope(|s| {
            let bidder = s.spawn(|| bid_on_everything(evil, &stop));
            let bait = self.place("bait", "7780002");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (bait, bidder.join().expect("the bidder"))
        });
        eprintln!(
            "  {}: replicas on {:?}; the attacker bid {bids} times and was awarded {awards} replicas",
            bait.name,
            bait.holders
                .iter()
                .map(|i| self.members[*i].node.name())
                .collect::<Vec<_>>()
        );
        assert!(bids >= 1, "the attacker was asked to bid");
        assert_eq!(awards, 0, "no award for inflated bids");
    }

    fn floods(&mut self) {
        let before = self.snapshot();
        let w = self.web();
        let r = w.r.clone();
        let coord = w.coordinator;
        let target = (0..HONEST).find(|i| *i != coord).expect("another node");
        let started = Instant::now();
        for i in 0..FLOOD {
            // Tenders for workloads nobody signed.
            let mut phantom = r.clone();
            phantom.id = WorkloadId::new("flood", format!("t{i}"));
            self.send(
                target,
                &Message::Tender(Tender {
                    round: i as u64,
                    workload: phantom.clone(),
                    wanted: 1,
                    hold_ms: 60_000,
                }),
            );
            // Reports of forged generations and of self-awarded claims.
            let mut forged = r.clone();
            forged.generation += 1 + i as u64;
            self.send(coord, &Self::report(forged, vec![self.own_claim(&r, 0, 1)]));
            self.send(
                coord,
                &Self::report(r.clone(), vec![self.own_claim(&r, 1, 3)]),
            );
            // Revokes.
            self.send(
                target,
                &Message::Revoke(Revoke {
                    workload: r.id.clone(),
                    index: (i % 3) as u32,
                    generation: r.generation,
                    epoch: i as u64,
                    reason: RevokeReason::Conflict,
                }),
            );
        }
        eprintln!(
            "  sent {} forged messages in {:.1?}",
            4 * FLOOD,
            started.elapsed()
        );
        // Every node still answers, and nothing moved.
        for m in &self.members {
            m.node
                .api()
                .status()
                .unwrap_or_else(|e| panic!("{}: {e}", m.node.name()));
        }
        self.unchanged_and_refused(
            &before,
            &[
                (coord, "report", "self_award"),
                (coord, "report", "defer_full"),
                (target, "revoke", "not_coordinator"),
            ],
        );
    }
}

/// The attacker's answer to tenders: a bid with a huge free capacity and the best score for
/// every one, until `stop`. Returns (bids sent, awards received).
fn bid_on_everything(evil: &MeshPeer, stop: &std::sync::atomic::AtomicBool) -> (usize, usize) {
    let (mut bids, mut awards) = (0usize, 0usize);
    let huge = Resources {
        cpu: 1 << 40,
        memory: 1 << 40,
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (from, _, body) in evil.take_requests() {
            match serde_json::from_slice::<Message<String>>(&body) {
                Ok(Message::Tender(t)) => {
                    let bid = Message::<String>::Bid(Bid {
                        round: t.round,
                        workload: t.workload.id.clone(),
                        generation: t.workload.generation,
                        slots: t.wanted,
                        free: huge,
                        allocatable: huge,
                        preferred: 0,
                        score: 2000,
                    });
                    let body = serde_json::to_vec(&bid).expect("encode");
                    let _ = evil.block_on(evil.mesh().request(from, SCHEDULER_PROTOCOL, body));
                    bids += 1;
                }
                Ok(Message::Award(_)) => awards += 1,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (bids, awards)
}
