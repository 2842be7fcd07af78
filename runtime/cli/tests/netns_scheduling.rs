//! Decentralised scheduling across real hosts: five `beemesh node` processes, each in its own
//! network namespace on one bridge, running workloads with the process driver. Runs as root;
//! see `common/netns.rs` for the rig and for what happens on machines that cannot run it.
//!
//! The hosts: n1 and n2 carry `tier = "edge"`, n3 carries `fast = "yes"`, n4 nothing extra,
//! and n5 reserves more memory than the machine has, so it has no memory to offer. Every
//! replica is `/bin/sleep <marker>`, one marker per workload, so the truth about what runs
//! where is read from the processes in each namespace, and compared with what the API says.
//!
//! Scenarios, in order, on one mesh:
//! 1. `replicas = 3, spread = "node"` gives exactly 3 running replicas on 3 distinct nodes;
//! 2. `selector` places only on matching nodes, `prefer` on the preferred node, and a workload
//!    needing more memory than any node has is reported unschedulable and never started;
//! 3. SIGKILL of a host holding a replica (the node and its replicas die, as in a power loss)
//!    brings the workload back to 3 within `reschedule_after` plus the stated [`MARGIN`]; the
//!    host comes back and the count stays 3;
//! 4. SIGKILL of the coordinator of a manifest applied on another node, right after it sent
//!    its tender and before any bid (the nodes other than the one the manifest was applied on
//!    are frozen meanwhile), still converges to 3;
//! 5. a 2|3 partition: the majority side runs 3 on its own; after healing, exactly 3;
//! 6. a host restarted with its links down restarts its replicas on its own; once reconnected,
//!    exactly 3;
//! 7. `replicas = 5, spread = "node"` with four nodes that fit is reported unschedulable with
//!    4 placed; a sixth node joins and gets the fifth replica;
//! 8. `beemesh delete` (a signed tombstone) stops every replica on every node.
//!
//! Throughout, n5 (no free memory) never runs a replica: every census checks it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::api::{Api, eventually};
use common::netns::{self, Cli, Credentials, Host, Lab, NodeProcess, PEER_TIMEOUT};
use serde_json::Value;
use tempfile::TempDir;

/// n1..n5 start at once; n6 joins in scenario 7.
const NODES: usize = 5;
const HOSTS: usize = 6;
/// Deadline for a node's API to answer after start.
const START: Duration = Duration::from_secs(20);
/// Deadline for membership and first placements (debug build, loaded 2-core machine).
const CONVERGE: Duration = Duration::from_secs(60);
/// `reschedule_after` of the rig's workloads.
const RESCHEDULE_AFTER: Duration = Duration::from_secs(5);
/// The margin on top of `reschedule_after` for a vanished host's replicas to run elsewhere:
/// detecting the loss takes up to the peer timeout (10 s), then one tender, bid and award
/// round and the start of a process (well under a second on an idle machine); the rest is
/// headroom for a loaded CI machine.
const MARGIN: Duration = Duration::from_secs(PEER_TIMEOUT.as_secs() + 20);
/// A census must hold this long, unchanged, to count as converged (more than one reconcile
/// pass and one announcement round, so a late duplicate would show).
const STABLE: Duration = Duration::from_secs(4);

#[test]
fn scheduling_in_network_namespaces() {
    if !netns::available("scheduling_in_network_namespaces") {
        return;
    }
    let mut rig = Rig::new();
    rig.step("start five nodes", Rig::start);
    rig.step("1 spread", Rig::spread);
    rig.step("2 selector, prefer, memory", Rig::constraints);
    rig.step("3 SIGKILL of a holder", Rig::holder_lost);
    rig.step(
        "4 SIGKILL of the coordinator mid-tender",
        Rig::coordinator_lost,
    );
    rig.step("5 partition 2|3 and heal", Rig::partition);
    rig.step("6 offline restart", Rig::offline_restart);
    rig.step("7 a fitting node joins", Rig::join);
    rig.step("8 delete", Rig::delete);
}

/// A workload of the rig: its name and the marker its replicas run (`/bin/sleep MARKER`).
#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    marker: &'static str,
}

const WEB: Workload = Workload {
    name: "web",
    marker: "7770001",
};
const EDGE: Workload = Workload {
    name: "edge",
    marker: "7770002",
};
const PREF: Workload = Workload {
    name: "pref",
    marker: "7770003",
};
const BIG: Workload = Workload {
    name: "big",
    marker: "7770004",
};
const JOB: Workload = Workload {
    name: "job",
    marker: "7770005",
};
const WIDE: Workload = Workload {
    name: "wide",
    marker: "7770006",
};
const ALL: [Workload; 6] = [WEB, EDGE, PREF, BIG, JOB, WIDE];

fn manifest(w: Workload, replicas: u32, placement: &str, memory: &str) -> String {
    format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nnamespace = \"default\"\nname = \"{}\"\n\
         generation = 1\n\n[placement]\nreplicas = {replicas}\nspread = \"node\"\n\
         reschedule_after = \"{}s\"\n{placement}\n\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"/bin/sleep\", \"{}\"]\n\
         resources = {{ cpu = \"10m\", memory = \"{memory}\" }}\n",
        w.name,
        RESCHEDULE_AFTER.as_secs(),
        w.marker
    )
}

struct Member {
    node: NodeProcess,
    host: Host,
    peer_id: String,
    /// False while the rig has killed it.
    up: bool,
}

// Fields drop in declaration order: the node processes first, then the namespaces (which
// kills whatever still runs in them), the files last.
struct Rig {
    members: Vec<Member>,
    lab: Lab,
    cli: Cli,
    creds: Credentials,
    manifests: PathBuf,
    started: Instant,
    dir: Option<TempDir>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        netns::keep_files_on_failure(&mut self.dir, self.started);
    }
}

/// Polls a node's log every few milliseconds (faster than [`eventually`]) until a line holds
/// every needle; returns that line.
fn poll_log(node: &NodeProcess, needles: &[&str], timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = node.log_lines_with(needles).into_iter().next() {
            return Ok(line);
        }
        if Instant::now() >= deadline {
            return Err(format!("no line with {needles:?} within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where a workload's replicas run: node name → number of replica processes there.
type Census = BTreeMap<String, usize>;

impl Rig {
    fn new() -> Self {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("bmsch")
            .tempdir()
            .expect("a temporary directory");
        let root = dir.path().to_owned();
        let cli = Cli::new(env!("CARGO_BIN_EXE_beemesh"));
        let creds = Credentials::create(&cli, &root.join("keys"))
            .expect("operator key, admission key, fleet ticket");
        let manifests = root.join("manifests");
        std::fs::create_dir_all(&manifests).expect("manifest directory");

        let mut lab = Lab::new().expect("the lab's hub namespace and bridge");
        let hosts: Vec<Host> = (1..=HOSTS)
            .map(|i| {
                lab.add_host(&format!("n{i}"))
                    .unwrap_or_else(|e| panic!("host n{i}: {e}"))
            })
            .collect();
        let mut configs =
            netns::plan_nodes(&hosts, &root, &creds).expect("host configs and identities");
        for (i, (cfg, _)) in configs.iter_mut().enumerate() {
            match i {
                0 | 1 => {
                    cfg.labels.insert("tier".into(), "edge".into());
                }
                2 => {
                    cfg.labels.insert("fast".into(), "yes".into());
                }
                4 => cfg.reserve = Some(("0".into(), "1Ti".into())),
                _ => {}
            }
        }
        let members = configs
            .into_iter()
            .zip(hosts)
            .map(|((cfg, peer_id), host)| Member {
                node: NodeProcess::new(&cli, &host, &root.join(&host.name), &cfg)
                    .unwrap_or_else(|e| panic!("node {}: {e}", host.name)),
                host,
                peer_id,
                up: false,
            })
            .collect::<Vec<Member>>();
        let mut members = members;
        for m in &mut members {
            // Scenario 4 watches for the coordinator's tender.
            m.node.set_log_filter("info,beemesh_node::placement=debug");
        }
        eprintln!("scheduling rig: files in {}", root.display());
        Rig {
            members,
            lab,
            cli,
            creds,
            manifests,
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

    fn index(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.node.name() == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// An API of a running member other than those in `except`.
    fn api_of_live(&self, except: &[&str]) -> &Api {
        self.members
            .iter()
            .find(|m| m.up && !except.contains(&m.node.name()))
            .map(|m| m.node.api())
            .expect("a running member")
    }

    fn start_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.node.start().unwrap_or_else(|e| panic!("{e}"));
        let status = m.node.wait_ready(START).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status["peer_id"].as_str(), Some(m.peer_id.as_str()));
        m.up = true;
    }

    /// The host loses power: its node and every replica it runs are SIGKILLed.
    fn power_off(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.node.kill().unwrap_or_else(|e| panic!("{e}"));
        m.host.kill_everything();
        m.up = false;
        let host = m.host.clone();
        eventually(
            format!("every process of {} to die", host.name),
            START,
            || {
                let left = host.pids();
                if left.is_empty() {
                    Ok(())
                } else {
                    host.kill_everything();
                    Err(format!("still there: {left:?}"))
                }
            },
        );
    }

    fn expect_membership(&self) {
        let live: Vec<&Member> = self.members.iter().filter(|m| m.up).collect();
        eventually("every running node to list every other", CONVERGE, || {
            for m in &live {
                let peers: BTreeSet<String> = m
                    .node
                    .api()
                    .peers()
                    .map_err(|e| format!("{}: {e}", m.node.name()))?
                    .into_iter()
                    .map(|p| p.peer_id)
                    .collect();
                let want: BTreeSet<String> = live
                    .iter()
                    .filter(|o| o.peer_id != m.peer_id)
                    .map(|o| o.peer_id.clone())
                    .collect();
                if peers != want {
                    return Err(format!("{} lists {} peers", m.node.name(), peers.len()));
                }
            }
            Ok(())
        });
    }

    fn sign(&self, w: Workload, replicas: u32, placement: &str, memory: &str) -> PathBuf {
        let plain = self.manifests.join(format!("{}.toml", w.name));
        let signed = self.manifests.join(format!("{}.signed.toml", w.name));
        std::fs::write(&plain, manifest(w, replicas, placement, memory)).expect("write manifest");
        self.cli
            .sign(&plain, &self.creds.operator_key, &signed)
            .expect("beemesh sign");
        signed
    }

    fn apply(&self, on: usize, w: Workload, replicas: u32, placement: &str, memory: &str) {
        let signed = self.sign(w, replicas, placement, memory);
        let answer = self
            .cli
            .apply(self.members[on].node.api(), &signed)
            .expect("beemesh apply");
        assert_eq!(answer["status"], "accepted", "apply {}: {answer}", w.name);
    }

    /// Where `w`'s replica processes run now. Panics at once if n5, which has no memory to
    /// offer, runs a replica of anything.
    fn census(&self, w: Workload) -> Census {
        let n5 = &self.members[self.index("n5")];
        for other in ALL {
            let on_n5 = n5.host.processes_running(&["/bin/sleep", other.marker]);
            assert!(
                on_n5.is_empty(),
                "n5 has no free memory but runs {} (pids {on_n5:?})",
                other.name
            );
        }
        self.members
            .iter()
            .filter_map(|m| {
                let n = m.host.processes_running(&["/bin/sleep", w.marker]).len();
                (n > 0).then(|| (m.node.name().to_owned(), n))
            })
            .collect()
    }

    /// The workload as a node's API shows it.
    fn view(api: &Api, w: Workload) -> Result<Value, String> {
        api.get::<Value>(&format!("/v1/workloads/default/{}", w.name))
            .map_err(|e| e.to_string())
    }

    /// The nodes the API reports as running `w`'s replicas.
    fn reported_running(view: &Value) -> BTreeSet<String> {
        view["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] == "running")
            .filter_map(|p| p["node"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until exactly `n` replicas of `w` run, one per node, on nodes accepted by
    /// `allowed`, the API of a running node agrees, and all of that holds for [`STABLE`].
    /// Returns the nodes and when the condition first held.
    fn expect_exactly(
        &self,
        w: Workload,
        n: usize,
        allowed: &dyn Fn(&str) -> bool,
        timeout: Duration,
    ) -> (BTreeSet<String>, Instant) {
        let mut since: Option<(Census, Instant)> = None;
        eventually(
            format!("exactly {n} replicas of {} on distinct nodes", w.name),
            timeout,
            || {
                let census = self.census(w);
                let check = || -> Result<(), String> {
                    let total: usize = census.values().sum();
                    if total != n || census.values().any(|c| *c != 1) {
                        return Err(format!("replica processes per node: {census:?}"));
                    }
                    if let Some(bad) = census.keys().find(|k| !allowed(k)) {
                        return Err(format!("a replica runs on {bad}: {census:?}"));
                    }
                    let view = Self::view(self.api_of_live(&[]), w)?;
                    let reported = Self::reported_running(&view);
                    let actual: BTreeSet<String> = census.keys().cloned().collect();
                    if reported != actual {
                        return Err(format!(
                            "processes run on {actual:?}, the API reports {reported:?}: {}",
                            view["placements"]
                        ));
                    }
                    Ok(())
                };
                match check() {
                    Err(e) => {
                        since = None;
                        Err(e)
                    }
                    Ok(()) => {
                        let (first, at) = match since.take() {
                            Some((c, at)) if c == census => (c, at),
                            _ => (census.clone(), Instant::now()),
                        };
                        let held = at.elapsed();
                        since = Some((first, at));
                        if held >= STABLE {
                            Ok((census.keys().cloned().collect(), at))
                        } else {
                            Err(format!("{census:?} for {held:.1?} so far"))
                        }
                    }
                }
            },
        )
    }

    fn any_node(_: &str) -> bool {
        true
    }

    fn start(&mut self) {
        for i in 0..NODES {
            self.start_member(i);
        }
        self.expect_membership();
    }

    /// Scenario 1.
    fn spread(&mut self) {
        let applied = Instant::now();
        // As an operator would: `apply --wait` returns once every replica runs.
        let signed = self.sign(WEB, 3, "", "64Mi");
        let out = self
            .cli
            .run(&[
                std::ffi::OsStr::new("apply"),
                signed.as_os_str(),
                std::ffi::OsStr::new("--wait"),
                std::ffi::OsStr::new("--timeout"),
                std::ffi::OsStr::new("60s"),
                std::ffi::OsStr::new("-o"),
                std::ffi::OsStr::new("json"),
                std::ffi::OsStr::new("--api"),
                self.members[0].node.api().socket().as_os_str(),
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "  web: `beemesh apply --wait` returned after {:.1?}",
            applied.elapsed()
        );
        assert_eq!(
            self.census(WEB).values().sum::<usize>(),
            3,
            "apply --wait returned ({}) before 3 replicas ran",
            out.trim()
        );
        let (nodes, at) = self.expect_exactly(WEB, 3, &Self::any_node, CONVERGE);
        eprintln!(
            "  web: 3 replicas running on {nodes:?} {:.1?} after apply",
            at - applied
        );
        // Every node's API shows the same placements (the coordinator's view).
        for m in self.members.iter().filter(|m| m.up) {
            let view = Self::view(m.node.api(), WEB).expect("the workload view");
            assert_eq!(
                Self::reported_running(&view),
                nodes,
                "{} reports other placements: {view}",
                m.node.name()
            );
            assert_eq!(view["running"], 3, "{}: {view}", m.node.name());
        }
    }

    /// Scenario 2.
    fn constraints(&mut self) {
        self.apply(1, EDGE, 2, "selector = { tier = \"edge\" }", "32Mi");
        self.apply(2, PREF, 1, "prefer = { fast = \"yes\" }", "32Mi");
        self.apply(3, BIG, 1, "", "100Ti");
        self.apply(4, WIDE, 5, "", "32Mi");
        let (edge, _) = self.expect_exactly(EDGE, 2, &|n: &str| n == "n1" || n == "n2", CONVERGE);
        assert_eq!(edge, BTreeSet::from(["n1".to_owned(), "n2".to_owned()]));
        let (pref, _) = self.expect_exactly(PREF, 1, &|n: &str| n == "n3", CONVERGE);
        assert_eq!(pref, BTreeSet::from(["n3".to_owned()]));
        let api = self.members[0].node.api();
        let view = eventually("big to be reported unschedulable", CONVERGE, || {
            let v = Self::view(api, BIG)?;
            match v["unschedulable"].as_str() {
                Some(reason) if reason.contains("100Ti") => Ok(v),
                _ => Err(format!("not (yet) unschedulable: {v}")),
            }
        });
        eprintln!("  big: unschedulable: {}", view["unschedulable"]);
        assert_eq!(view["placed"], 0, "{view}");
        assert!(self.census(BIG).is_empty(), "big must never start");
        let view = eventually("wide to be reported short of nodes", CONVERGE, || {
            let v = Self::view(api, WIDE)?;
            let reason = v["unschedulable"].as_str().unwrap_or_default();
            if reason.contains("spread") && v["placed"] == 4 {
                Ok(v)
            } else {
                Err(format!("not (yet) 4 placed and unschedulable: {v}"))
            }
        });
        eprintln!("  wide: 4 placed, unschedulable: {}", view["unschedulable"]);
    }

    /// Scenario 3.
    fn holder_lost(&mut self) {
        let holders: BTreeSet<String> = self.census(WEB).into_keys().collect();
        // Not n1 or n2: they also hold `edge`, which has nowhere else to go.
        let victim = holders
            .iter()
            .find(|h| *h != "n1" && *h != "n2")
            .or_else(|| holders.iter().next())
            .expect("a holder of web")
            .clone();
        let vi = self.index(&victim);
        let killed = Instant::now();
        self.power_off(vi);
        let (nodes, at) = self.expect_exactly(
            WEB,
            3,
            &|n: &str| n != victim,
            RESCHEDULE_AFTER + MARGIN + STABLE,
        );
        let took = at - killed;
        eprintln!(
            "  web: {victim} lost; 3 replicas again on {nodes:?} after {took:.1?} \
             (reschedule_after {RESCHEDULE_AFTER:?}, peer_timeout {PEER_TIMEOUT:?})"
        );
        assert!(
            took <= RESCHEDULE_AFTER + MARGIN,
            "restored after {took:?}, more than reschedule_after + margin"
        );
        // The host comes back with its old assignment: still exactly 3.
        self.start_member(vi);
        self.expect_membership();
        self.expect_exactly(WEB, 3, &Self::any_node, CONVERGE);
    }

    /// Scenario 4. To catch the coordinator in the middle of its tender, every other node is
    /// frozen (SIGSTOP) while the manifest is applied: the coordinator accepts it, publishes
    /// it and sends its tender, which nobody can answer; it is SIGKILLed as soon as its log
    /// shows the tender, then the others thaw, with the manifest and the tender in their
    /// sockets' buffers and a dead coordinator.
    fn coordinator_lost(&mut self) {
        use nix::sys::signal::Signal;
        let ids: Vec<String> = self.members.iter().map(|m| m.peer_id.clone()).collect();
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.up)
            .map(|m| m.peer_id.clone())
            .collect();
        let wid = beemesh_scheduler::WorkloadId::new("default", JOB.name);
        let coordinator = beemesh_scheduler::coordinator_among(&wid, &live)
            .expect("a coordinator among the running nodes");
        let ci = ids
            .iter()
            .position(|id| *id == coordinator)
            .expect("the coordinator is a member");
        let cname = self.members[ci].node.name().to_owned();
        // The manifest is applied on another node, which keeps running: a node killed before
        // its gossip left it takes a manifest it accepted with it (docs/scheduling.md,
        // Limits), which is not what this scenario is about.
        let ai = (0..self.members.len())
            .find(|&i| i != ci && self.members[i].up)
            .expect("another running node");
        let frozen: Vec<usize> = (0..self.members.len())
            .filter(|&i| i != ci && i != ai && self.members[i].up)
            .collect();
        for &i in &frozen {
            self.members[i]
                .node
                .signal(Signal::SIGSTOP)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let thaw = |rig: &Rig| {
            for &i in &frozen {
                rig.members[i]
                    .node
                    .signal(Signal::SIGCONT)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        };
        let needles = ["sending tender", "workload=default/job"];
        self.apply(ai, JOB, 3, "", "32Mi");
        let tendered = poll_log(&self.members[ci].node, &needles, CONVERGE);
        if let Err(e) = &tendered {
            thaw(self);
            panic!("{cname} never sent job's tender: {e}");
        }
        self.power_off(ci);
        thaw(self);
        eprintln!(
            "  job: coordinator {cname} killed right after its tender, before any bid (applied on {}): {}",
            self.members[ai].node.name(),
            tendered.unwrap_or_default()
        );
        let gone = cname.clone();
        let (nodes, _) = self.expect_exactly(
            JOB,
            3,
            &|n: &str| n != gone,
            RESCHEDULE_AFTER + MARGIN + CONVERGE,
        );
        eprintln!("  job: 3 replicas on {nodes:?} without {cname}");
        self.start_member(ci);
        self.expect_membership();
        self.expect_exactly(JOB, 3, &Self::any_node, CONVERGE);
        self.expect_exactly(WEB, 3, &Self::any_node, CONVERGE);
    }

    /// Scenario 5.
    fn partition(&mut self) {
        let minority = [self.index("n1"), self.index("n5")];
        let majority = [self.index("n2"), self.index("n3"), self.index("n4")];
        {
            let a: Vec<&Host> = minority.iter().map(|&i| &self.members[i].host).collect();
            let b: Vec<&Host> = majority.iter().map(|&i| &self.members[i].host).collect();
            self.lab.partition(&[&a, &b]).expect("partition 2|3");
        }
        let cut = Instant::now();
        // The majority side places what it lost on its own nodes.
        let side: BTreeSet<String> = ["n2", "n3", "n4"].iter().map(|s| s.to_string()).collect();
        eventually(
            "the majority side to run 3 web replicas",
            RESCHEDULE_AFTER + MARGIN + CONVERGE,
            || {
                let c = self.census(WEB);
                let on_side: usize = c
                    .iter()
                    .filter(|(n, _)| side.contains(*n))
                    .map(|(_, k)| *k)
                    .sum();
                if on_side == 3 && c.iter().all(|(_, k)| *k == 1) {
                    Ok(())
                } else {
                    Err(format!("{c:?}"))
                }
            },
        );
        eprintln!(
            "  partition: majority runs 3 web after {:.1?}; census {:?}",
            cut.elapsed(),
            self.census(WEB)
        );
        self.lab.heal().expect("heal the partition");
        let healed = Instant::now();
        self.expect_membership();
        let (nodes, at) = self.expect_exactly(WEB, 3, &Self::any_node, CONVERGE);
        eprintln!(
            "  healed: exactly 3 web on {nodes:?} {:.1?} after healing",
            at - healed
        );
        self.expect_exactly(JOB, 3, &Self::any_node, CONVERGE);
        self.expect_exactly(EDGE, 2, &|n: &str| n == "n1" || n == "n2", CONVERGE);
    }

    /// Scenario 6.
    fn offline_restart(&mut self) {
        let holders: BTreeSet<String> = self.census(WEB).into_keys().collect();
        let victim = holders
            .iter()
            .find(|h| *h != "n1" && *h != "n2")
            .or_else(|| holders.iter().next())
            .expect("a holder of web")
            .clone();
        let vi = self.index(&victim);
        self.power_off(vi);
        self.members[vi].host.disconnect().expect("unplug");
        let restarted = Instant::now();
        self.start_member(vi);
        let host = self.members[vi].host.clone();
        eventually(
            format!("{victim} to restart its web replica with no network"),
            CONVERGE,
            || {
                let n = host.processes_running(&["/bin/sleep", WEB.marker]).len();
                if n == 1 {
                    Ok(())
                } else {
                    Err(format!("{n} web processes on {victim}"))
                }
            },
        );
        eprintln!(
            "  {victim}: web replica running {:.1?} after a restart with links down",
            restarted.elapsed()
        );
        self.members[vi].host.reconnect().expect("plug back");
        self.expect_membership();
        self.expect_exactly(WEB, 3, &Self::any_node, CONVERGE);
        self.expect_exactly(JOB, 3, &Self::any_node, CONVERGE);
    }

    /// Scenario 7.
    fn join(&mut self) {
        // Four nodes fit `wide`; each holds one replica (wherever the failures above left it).
        self.expect_exactly(WIDE, 4, &|n: &str| n != "n5" && n != "n6", CONVERGE);
        let n6 = self.index("n6");
        let joined = Instant::now();
        self.start_member(n6);
        self.expect_membership();
        let (nodes, at) = self.expect_exactly(WIDE, 5, &|n: &str| n != "n5", CONVERGE);
        assert!(
            nodes.contains("n6"),
            "the fifth replica must go to n6: {nodes:?}"
        );
        eprintln!(
            "  wide: 5 replicas on {nodes:?} {:.1?} after n6 started",
            at - joined
        );
        let view = Self::view(self.members[0].node.api(), WIDE).expect("wide");
        assert!(view["unschedulable"].is_null(), "{view}");
    }

    /// Scenario 8.
    fn delete(&mut self) {
        for w in [WEB, JOB] {
            self.cli
                .run(&[
                    std::ffi::OsStr::new("delete"),
                    std::ffi::OsStr::new(&format!("default/{}", w.name)),
                    std::ffi::OsStr::new("--key"),
                    self.creds.operator_key.as_os_str(),
                    std::ffi::OsStr::new("--api"),
                    self.members[1].node.api().socket().as_os_str(),
                ])
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let deleted = Instant::now();
        for w in [WEB, JOB] {
            eventually(
                format!("every replica of {} to stop", w.name),
                CONVERGE,
                || {
                    let c = self.census(w);
                    if !c.is_empty() {
                        return Err(format!("still running: {c:?}"));
                    }
                    for m in self.members.iter().filter(|m| m.up) {
                        let v = Self::view(m.node.api(), w)?;
                        if v["deleted"] != true || v["placed"] != 0 {
                            return Err(format!("{}: {v}", m.node.name()));
                        }
                    }
                    Ok(())
                },
            );
        }
        eprintln!(
            "  web, job: no replica left {:.1?} after delete",
            deleted.elapsed()
        );
        // The others are untouched.
        self.expect_exactly(WIDE, 5, &|n: &str| n != "n5", CONVERGE);
    }
}
