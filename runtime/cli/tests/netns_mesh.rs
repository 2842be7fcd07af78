//! The mesh across hosts (issue #3): real `beemesh node` processes, one per network namespace,
//! on one bridge, configured only by the host.toml files this test writes. Runs as root; see
//! `common/netns.rs` for the rig and for what happens on machines that cannot run it.
//!
//! One test walks through the scenarios in order, because they share the namespaces and nodes:
//!
//! 1. membership: each of five nodes lists the other four (`GET /v1/peers`);
//! 2. replication: manifests applied on n1 are listed by n5 (and every node) with the same
//!    content id and generation;
//! 3. admission: a peer without a ticket, a node whose ticket has expired and a node whose ticket
//!    comes from a foreign admission key are refused by every node and never listed by any, and
//!    the manifests they submit never reach the mesh;
//! 4. restart: a node killed with SIGKILL and started again (partitioned, so that nothing can
//!    come from its peers) has its PeerId and its desired state, then rejoins;
//! 5. anti-entropy: a node started after the manifests were applied catches up by sync;
//! 6. gossip validation: a rollback, an unsigned manifest and one signed by an unknown key,
//!    published on `/beemesh/manifests/1` by an admitted peer, are dropped by every node, which
//!    logs why;
//! 7. robustness: non-UTF-8, garbage and oversized gossip crash no node.
//!
//! A monitor samples every node's peers and workloads from scenario 3 to the end: any sighting
//! of an outsider, of a manifest that must never be accepted, or of a generation going back
//! fails the test. Every wait polls with a deadline. The nodes announce every 2 s and time out
//! peers after 10 s (see `netns::ANNOUNCE_INTERVAL`); no step waits for either.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use beemesh_manifest::SignedManifest;
use beemesh_mesh::Keypair;
use common::api::{Api, ApiError, eventually};
use common::netns::{self, Cli, Credentials, Host, HostToml, Lab, MeshPeer, NodeProcess};
use sha2::Digest;
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The node's manifest topic (`beemesh_node::node::MANIFEST_TOPIC`).
const TOPIC: &str = "/beemesh/manifests/1";
/// Deadline for membership and replication to converge (a loaded 2-core machine, debug build).
const CONVERGE: Duration = Duration::from_secs(30);
/// Deadline for a node's API to answer after start.
const START: Duration = Duration::from_secs(20);
/// Gossipsub answers IWANT from its message cache for three heartbeats (2.1 s at 700 ms): a
/// node that joins later than this after a publication can only get it from anti-entropy.
const GOSSIP_REPLAY_WINDOW: Duration = Duration::from_secs(4);
/// Lifetime of the ticket that is to be expired when its holder meets the mesh.
const SHORT_TICKET: &str = "5s";
/// Admitted nodes started first; a sixth joins late (scenario 5).
const FIRST_NODES: usize = 5;

#[test]
fn mesh_in_network_namespaces() {
    if !netns::available("mesh_in_network_namespaces") {
        return;
    }
    let mut rig = Rig::new();
    rig.step("start five nodes", Rig::start);
    rig.step("1 membership", Rig::membership);
    rig.step("2 replication", Rig::replication);
    rig.step("3 admission", Rig::admission);
    rig.step("4 restart", Rig::restart);
    rig.step("5 anti-entropy", Rig::late_joiner);
    rig.step("6 gossip validation", Rig::gossip_validation);
    rig.step("7 malformed gossip", Rig::malformed_gossip);
    rig.step("final checks", Rig::final_checks);
}

/// A node of the mesh under test.
struct Member {
    node: NodeProcess,
    host: Host,
    /// Known before the first start: the rig creates the identity in the data directory.
    peer_id: String,
}

impl Member {
    fn name(&self) -> &str {
        self.node.name()
    }

    fn api(&self) -> &Api {
        self.node.api()
    }
}

/// A signed manifest file.
#[derive(Debug, Clone)]
struct Doc {
    name: String,
    generation: u64,
    /// `sha256:<hex>` of the manifest bytes.
    digest: String,
    /// The signed envelope (or, for the unsigned one, an envelope without signatures).
    text: String,
    path: PathBuf,
}

struct Docs {
    hello1: Doc,
    batch1: Doc,
    hello2: Doc,
    after: Doc,
    rollback: Doc,
    unsigned: Doc,
    stranger: Doc,
    intruder_expired: Doc,
    intruder_foreign: Doc,
    intruder_ticketless: Doc,
}

// Fields drop in declaration order: the monitor and every process first, the namespaces
// after them, the files last.
struct Rig {
    monitor: Option<Monitor>,
    injector: Option<MeshPeer>,
    ticketless: Option<MeshPeer>,
    /// The injector's identity, made early so that the monitor knows it.
    injector_key: Option<Keypair>,
    members: Vec<Member>,
    expired: Member,
    foreign: Member,
    ticketless_host: Host,
    injector_host: Host,
    /// Held for its `Drop`: the namespaces live as long as the rig.
    _lab: Lab,
    cli: Cli,
    creds: Credentials,
    stranger_key: String,
    expired_ticket: PathBuf,
    expired_at: Option<OffsetDateTime>,
    docs: Docs,
    /// When a manifest was last published by an admitted node.
    last_publication: Instant,
    started: Instant,
    dir: Option<TempDir>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        netns::keep_files_on_failure(&mut self.dir, self.started);
    }
}

/// A workload manifest. Its selector matches no node of the rig, so that nothing is placed
/// or started: this test is about desired state; running replicas is the scheduling tests'.
fn manifest_text(name: &str, generation: u64, tag: &str) -> String {
    format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nnamespace = \"default\"\nname = \"{name}\"\n\
         generation = {generation}\n\n[placement]\nreplicas = 1\nselector = {{ rig = \"nowhere\" }}\n\n\
         [[container]]\nname = \"web\"\nimage = \"localhost/busybox:{tag}\"\n\
         command = [\"httpd\", \"-f\", \"-p\", \"8080\"]\n"
    )
}

fn content_id(manifest: &str) -> String {
    let sum = sha2::Sha256::digest(manifest.as_bytes());
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Writes a manifest, signs it with `key` through the CLI (no key: an envelope without
/// signatures).
fn doc(
    cli: &Cli,
    dir: &std::path::Path,
    key: Option<&std::path::Path>,
    name: &str,
    generation: u64,
    tag: &str,
) -> Doc {
    let text = manifest_text(name, generation, tag);
    let plain = dir.join(format!("{name}-{generation}-{tag}.toml"));
    let path = dir.join(format!("{name}-{generation}-{tag}.signed.toml"));
    std::fs::write(&plain, &text).expect("write a manifest");
    match key {
        Some(key) => cli.sign(&plain, key, &path).expect("beemesh sign"),
        None => std::fs::write(&path, SignedManifest::new(text.clone()).to_toml())
            .expect("write an unsigned envelope"),
    }
    Doc {
        name: name.to_owned(),
        generation,
        digest: content_id(&text),
        text: read(&path),
        path,
    }
}

/// The `/p2p/` mesh addresses of `members`.
fn addrs(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .map(|m| {
            let peer = m.peer_id.parse().expect("a pre-generated PeerId parses");
            m.host.mesh_addr(Some(&peer))
        })
        .collect()
}

impl Rig {
    fn new() -> Self {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("bmnet")
            .tempdir()
            .expect("a temporary directory");
        let root = dir.path().to_owned();
        let cli = Cli::new(env!("CARGO_BIN_EXE_beemesh"));
        let keys = root.join("keys");
        let creds =
            Credentials::create(&cli, &keys).expect("operator key, admission key, fleet ticket");
        let foreign_key = keys.join("foreign-admission.key");
        let foreign_admission = cli.key_gen(&foreign_key).expect("a foreign admission key");
        let foreign_ticket = keys.join("foreign.ticket");
        cli.ticket_issue(&foreign_key, &foreign_ticket, None, None)
            .expect("a fleet ticket of the foreign admission key");
        let stranger_path = keys.join("stranger.key");
        let stranger_key = cli
            .key_gen(&stranger_path)
            .expect("a signing key nobody trusts");

        let mdir = root.join("manifests");
        std::fs::create_dir_all(&mdir).expect("manifest directory");
        let op = Some(creds.operator_key.as_path());
        let docs = Docs {
            hello1: doc(&cli, &mdir, op, "hello", 1, "1"),
            batch1: doc(&cli, &mdir, op, "batch", 1, "1"),
            hello2: doc(&cli, &mdir, op, "hello", 2, "2"),
            after: doc(&cli, &mdir, op, "after", 1, "1"),
            rollback: doc(&cli, &mdir, op, "hello", 1, "rollback"),
            unsigned: doc(&cli, &mdir, None, "unsigned-web", 1, "1"),
            stranger: doc(&cli, &mdir, Some(&stranger_path), "stranger-web", 1, "1"),
            intruder_expired: doc(&cli, &mdir, op, "intruder-expired", 1, "1"),
            intruder_foreign: doc(&cli, &mdir, op, "intruder-foreign", 1, "1"),
            intruder_ticketless: doc(&cli, &mdir, op, "intruder-ticketless", 1, "1"),
        };

        let mut lab = Lab::new().expect("the lab's hub namespace and bridge");
        let mut add = |name: &str| {
            lab.add_host(name)
                .unwrap_or_else(|e| panic!("host {name}: {e}"))
        };
        let hosts: Vec<Host> = (1..=FIRST_NODES + 1)
            .map(|i| add(&format!("n{i}")))
            .collect();
        let expired_host = add("expired");
        let foreign_host = add("foreign");
        let ticketless_host = add("ticketless");
        let injector_host = add("injector");

        // Identities first: every bootstrap address names the peer it expects.
        let identities: Vec<(HostToml, String)> = hosts
            .iter()
            .map(|h| {
                let cfg = HostToml::new(h, &root.join(&h.name), &creds);
                let id = netns::node_identity(&cfg.data_dir).expect("a node identity");
                (cfg, id.to_base58())
            })
            .collect();
        let bootstrap: Vec<String> = identities[..FIRST_NODES]
            .iter()
            .zip(&hosts)
            .map(|((_, id), h)| h.mesh_addr(Some(&id.parse().expect("PeerId"))))
            .collect();
        let member = |host: &Host, mut cfg: HostToml, peer_id: String| {
            cfg.bootstrap = bootstrap.clone();
            let node = NodeProcess::new(&cli, host, &root.join(&host.name), &cfg)
                .unwrap_or_else(|e| panic!("node {}: {e}", host.name));
            Member {
                node,
                host: host.clone(),
                peer_id,
            }
        };
        let members: Vec<Member> = identities
            .into_iter()
            .zip(&hosts)
            .map(|((cfg, id), h)| member(h, cfg, id))
            .collect();

        // The outsiders run the same binary with a valid-looking configuration.
        let expired_ticket = root.join("expired").join("short.ticket");
        let mut cfg = HostToml::new(&expired_host, &root.join("expired"), &creds);
        cfg.ticket = expired_ticket.clone();
        let id = netns::node_identity(&cfg.data_dir)
            .expect("identity")
            .to_base58();
        let expired = member(&expired_host, cfg, id);
        let mut cfg = HostToml::new(&foreign_host, &root.join("foreign"), &creds);
        cfg.admission = foreign_admission;
        cfg.ticket = foreign_ticket;
        let id = netns::node_identity(&cfg.data_dir)
            .expect("identity")
            .to_base58();
        let foreign = member(&foreign_host, cfg, id);

        eprintln!(
            "netns rig: {} namespaces, files in {}, set up in {:.1?}",
            lab.hosts().len() + 1,
            root.display(),
            started.elapsed()
        );
        Rig {
            monitor: None,
            injector: None,
            ticketless: None,
            injector_key: None,
            members,
            expired,
            foreign,
            ticketless_host,
            injector_host,
            _lab: lab,
            cli,
            creds,
            stranger_key,
            expired_ticket,
            expired_at: None,
            docs,
            last_publication: Instant::now(),
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

    fn first(&self) -> &[Member] {
        &self.members[..FIRST_NODES]
    }

    fn start_member(m: &mut Member) {
        m.node.start().unwrap_or_else(|e| panic!("{e}"));
        let status = m.node.wait_ready(START).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            status["peer_id"].as_str(),
            Some(m.peer_id.as_str()),
            "node {} must run with the identity in its data_dir",
            m.name()
        );
    }

    fn start(&mut self) {
        for m in &mut self.members[..FIRST_NODES] {
            Self::start_member(m);
        }
        // The node with the short ticket starts cut off from everyone, so that its ticket has
        // expired before it can meet anybody.
        self.expired
            .host
            .disconnect()
            .expect("partition the expired node");
        let issued = self
            .cli
            .ticket_issue(
                &self.creds.admission_key,
                &self.expired_ticket,
                None,
                Some(SHORT_TICKET),
            )
            .expect("a short-lived ticket");
        let expires = issued["expires"].as_str().expect("the ticket expires");
        self.expired_at =
            Some(OffsetDateTime::parse(expires, &Rfc3339).expect("an RFC 3339 expiry"));
        Self::start_member(&mut self.expired);
    }

    /// Scenario 1.
    fn membership(&mut self) {
        let first: Vec<&Member> = self.first().iter().collect();
        expect_membership(
            &first,
            "each of the first five nodes to list exactly the other four",
        );
    }

    /// Scenario 2.
    fn replication(&mut self) {
        let (n1, n5) = (&self.members[0], &self.members[FIRST_NODES - 1]);
        for d in [&self.docs.hello1, &self.docs.batch1] {
            let answer = self
                .cli
                .apply(n1.api(), &d.path)
                .expect("beemesh apply on n1");
            assert_eq!(
                answer["status"], "accepted",
                "n1's answer to {}: {answer}",
                d.name
            );
            assert_eq!(
                answer["content_id"].as_str(),
                Some(d.digest.as_str()),
                "n1 must report the SHA-256 of the manifest bytes as the content id of {}",
                d.name
            );
        }
        self.last_publication = Instant::now();
        let docs = [&self.docs.hello1, &self.docs.batch1];
        expect_desired(&[n5], &docs, "n5 to list what was applied on n1");
        let first: Vec<&Member> = self.first().iter().collect();
        expect_desired(&first, &docs, "every node to list what was applied on n1");
    }

    /// Scenario 3.
    fn admission(&mut self) {
        let ticketless_key = Keypair::generate_ed25519();
        let ticketless_id = ticketless_key.public().to_peer_id().to_base58();
        let injector_key = Keypair::generate_ed25519();
        let injector_id = injector_key.public().to_peer_id().to_base58();

        // Everything that must never be seen is known now: watch from here to the end.
        let monitor = Monitor::start(Watch {
            admitted: self
                .members
                .iter()
                .map(|m| (m.name().to_owned(), m.api().clone()))
                .collect(),
            outsiders: [&self.expired, &self.foreign]
                .iter()
                .map(|m| (m.name().to_owned(), m.api().clone()))
                .collect(),
            admitted_ids: self
                .members
                .iter()
                .map(|m| (m.peer_id.clone(), m.name().to_owned()))
                .chain([(injector_id.clone(), "injector".to_owned())])
                .collect(),
            outsider_ids: [
                (self.expired.peer_id.clone(), "expired".to_owned()),
                (self.foreign.peer_id.clone(), "foreign".to_owned()),
                (ticketless_id.clone(), "ticketless".to_owned()),
            ]
            .into(),
            forbidden: [
                &self.docs.intruder_expired,
                &self.docs.intruder_foreign,
                &self.docs.intruder_ticketless,
                &self.docs.rollback,
                &self.docs.unsigned,
                &self.docs.stranger,
            ]
            .iter()
            .map(|d| {
                (
                    d.digest.clone(),
                    format!("{} generation {}", d.name, d.generation),
                )
            })
            .collect(),
            forbidden_names: [
                "intruder-expired",
                "intruder-foreign",
                "intruder-ticketless",
                "unsigned-web",
                "stranger-web",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            forbidden_prefix: "probe-".into(),
        });
        self.monitor = Some(monitor);
        self.injector_key = Some(injector_key);

        // The expired node meets the mesh only once its ticket has expired.
        let expires = self.expired_at.expect("the expired node was started");
        eventually("the short ticket to expire", CONVERGE, || {
            let now = OffsetDateTime::now_utc();
            if now > expires + time::Duration::milliseconds(500) {
                Ok(())
            } else {
                Err(format!("it is {now}, the ticket expires at {expires}"))
            }
        });
        self.expired
            .host
            .reconnect()
            .expect("reconnect the expired node");
        Self::start_member(&mut self.foreign);
        let cfg = netns::mesh_config(
            &self.ticketless_host,
            ticketless_key,
            &self.creds.admission,
            Vec::new(),
            None,
            &addrs(self.first()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ticketless = MeshPeer::start("ticketless", &self.ticketless_host, cfg)
            .unwrap_or_else(|e| panic!("{e}"));

        // Every admitted node refuses each of them, for the right reason.
        let first: Vec<&Member> = self.first().iter().collect();
        for (who, id, reason) in [
            (
                "the peer without a ticket",
                &ticketless_id,
                "presented no admission ticket",
            ),
            (
                "the node with the expired ticket",
                &self.expired.peer_id,
                "ticket expired at",
            ),
            (
                "the node with a foreign ticket",
                &self.foreign.peer_id,
                "not by the admission key",
            ),
        ] {
            expect_logged(
                &first,
                &format!("the refusal of {who}"),
                &["refused peer", id.as_str(), reason],
            );
        }
        eventually(
            "the peer without a ticket to be refused by every node",
            CONVERGE,
            || {
                let events = ticketless.events();
                let missing: Vec<&str> = self
                    .first()
                    .iter()
                    .filter(|m| {
                        !events
                            .iter()
                            .any(|e| e.starts_with(&format!("RefusedByPeer {}", m.peer_id)))
                    })
                    .map(Member::name)
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "not yet refused by {missing:?}; its events: {events:?}"
                    ))
                }
            },
        );

        // Each submits a manifest the operator signed: its own node accepts it, nobody else
        // ever sees it (the monitor watches until the end of the test).
        for (m, d) in [
            (&self.expired, &self.docs.intruder_expired),
            (&self.foreign, &self.docs.intruder_foreign),
        ] {
            let (status, answer) = m
                .api()
                .apply(&d.text)
                .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
            assert_eq!(
                status,
                202,
                "{} must accept a correctly signed manifest locally: {answer}",
                m.name()
            );
            let peers = m
                .api()
                .peers()
                .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
            assert!(
                peers.is_empty(),
                "{} must see no peer, but lists {peers:?}",
                m.name()
            );
        }
        let published = ticketless.block_on(ticketless.mesh().publish(
            TOPIC,
            self.docs.intruder_ticketless.text.clone().into_bytes(),
        ));
        assert!(
            published.is_err(),
            "the peer without a ticket must have no peer to publish to, but its publish succeeded"
        );
        assert!(
            ticketless
                .block_on(ticketless.mesh().peers())
                .is_ok_and(|p| p.is_empty()),
            "the peer without a ticket must see no member"
        );
        self.ticketless = Some(ticketless);
    }

    /// Scenario 4.
    fn restart(&mut self) {
        let m = &mut self.members[2];
        let name = m.name().to_owned();
        let before = m.api().peer_id().unwrap_or_else(|e| panic!("{name}: {e}"));
        let desired = m
            .api()
            .workloads()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            !desired.is_empty(),
            "{name} must hold the applied manifests before the restart"
        );
        m.node.kill().expect("SIGKILL");
        assert!(
            matches!(m.api().status(), Err(ApiError::Unreachable(_))),
            "{name}'s API must be gone after SIGKILL"
        );
        // Partitioned while it starts: whatever it lists comes from its own disk.
        m.host.disconnect().expect("partition");
        Self::start_member(m);
        let after = m.api().peer_id().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            after, before,
            "{name} must keep its PeerId across a SIGKILL restart"
        );
        let restored = m
            .api()
            .workloads()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            restored, desired,
            "{name} must restore its desired state from disk (partitioned, it has no peer to sync with)"
        );
        let peers = m.api().peers().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            peers.is_empty(),
            "{name} is partitioned, yet lists peers {peers:?}"
        );
        m.host.reconnect().expect("heal the partition");
        let first: Vec<&Member> = self.first().iter().collect();
        expect_membership(
            &first,
            &format!("{name} to rejoin: every node lists exactly the other four"),
        );
    }

    /// Scenario 5.
    fn late_joiner(&mut self) {
        let since = self.last_publication;
        eventually(
            "gossipsub's replay window to pass since the last publication",
            CONVERGE,
            || {
                if since.elapsed() >= GOSSIP_REPLAY_WINDOW {
                    Ok(())
                } else {
                    Err(format!(
                        "{:.1?} since the last publication",
                        since.elapsed()
                    ))
                }
            },
        );
        let late = &mut self.members[FIRST_NODES];
        Self::start_member(late);
        let docs = [&self.docs.hello1, &self.docs.batch1];
        let late = &self.members[FIRST_NODES];
        expect_desired(&[late], &docs, "the late node to catch up");
        for d in docs {
            let lines = late.node.log_lines_with(&[
                "accepted manifest",
                "source=\"sync\"",
                &format!("workload=default/{}", d.name),
            ]);
            assert!(
                !lines.is_empty(),
                "{} must have received {} by anti-entropy sync; its log:\n{}",
                late.name(),
                d.name,
                late.node.log_tail(40)
            );
        }
        let all: Vec<&Member> = self.members.iter().collect();
        expect_membership(&all, "all six nodes to list each other");
        // The late node is a full member: what it is given reaches everyone.
        let answer = self
            .cli
            .apply(late.api(), &self.docs.hello2.path)
            .expect("apply on the late node");
        assert_eq!(answer["status"], "accepted", "{answer}");
        self.last_publication = Instant::now();
        expect_desired(
            &all,
            &[&self.docs.hello2, &self.docs.batch1],
            "generation 2, applied on the late node, everywhere",
        );
    }

    /// Scenario 6.
    fn gossip_validation(&mut self) {
        let ticket = std::fs::read(&self.creds.fleet_ticket).expect("the fleet ticket");
        let ticket_key = beemesh_manifest::SecretKey::load(
            &beemesh_manifest::ticket::default_key_path(&self.creds.fleet_ticket),
        )
        .expect("the fleet ticket's key");
        let key = self
            .injector_key
            .take()
            .expect("the injector's key was made with the monitor");
        let mut cfg = netns::mesh_config(
            &self.injector_host,
            key,
            &self.creds.admission,
            ticket,
            Some(ticket_key),
            &addrs(&self.members),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // Lets it send more than the nodes take (scenario 7).
        cfg.max_message_size = 4 * beemesh_mesh::DEFAULT_MAX_MESSAGE_SIZE;
        let injector =
            MeshPeer::start("injector", &self.injector_host, cfg).unwrap_or_else(|e| panic!("{e}"));
        let injector_id = injector.peer_id().to_base58();
        let all: Vec<&Member> = self.members.iter().collect();
        eventually("every node to admit the injecting peer", CONVERGE, || {
            let missing = missing_peer(&all, &injector_id);
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not listed by {missing:?}"))
            }
        });
        probe(
            &injector,
            &all,
            "gossip from the admitted injector to reach every node directly",
            false,
        );

        for d in [
            &self.docs.rollback,
            &self.docs.unsigned,
            &self.docs.stranger,
        ] {
            injector
                .block_on(injector.mesh().publish(TOPIC, d.text.clone().into_bytes()))
                .unwrap_or_else(|e| panic!("the injector cannot publish {}: {e}", d.name));
        }
        for (what, needles) in [
            (
                "the rollback to generation 1",
                vec![self.docs.rollback.digest.as_str(), "refusing a rollback"],
            ),
            (
                "the unsigned manifest",
                vec![
                    self.docs.unsigned.digest.as_str(),
                    "0 valid signature(s) from trusted signers, 1 needed",
                ],
            ),
            (
                "the manifest signed by an unknown key",
                vec![
                    self.docs.stranger.digest.as_str(),
                    self.stranger_key.as_str(),
                    "not among the trusted signers",
                ],
            ),
        ] {
            let mut all_needles = vec!["dropped gossip manifest", injector_id.as_str()];
            all_needles.extend(needles);
            expect_logged(&all, &format!("why it dropped {what}"), &all_needles);
        }
        for m in &all {
            let list = m
                .api()
                .workloads()
                .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
            for d in [&self.docs.unsigned, &self.docs.stranger] {
                assert!(
                    !list.iter().any(|w| w.name == d.name),
                    "{} lists the injected {}: {list:?}",
                    m.name(),
                    d.name
                );
            }
            let hello = list.iter().find(|w| w.name == "hello");
            assert!(
                hello.is_some_and(|w| w.generation == 2 && w.digest == self.docs.hello2.digest),
                "{} must still hold hello generation 2 ({}), not {hello:?}",
                m.name(),
                self.docs.hello2.digest
            );
        }
        self.injector = Some(injector);
    }

    /// Scenario 7.
    fn malformed_gossip(&mut self) {
        let injector = self
            .injector
            .as_ref()
            .expect("scenario 6 started the injector");
        let injector_id = injector.peer_id().to_base58();
        let all: Vec<&Member> = self.members.iter().collect();
        let publish = |what: &str, data: Vec<u8>| {
            injector
                .block_on(injector.mesh().publish(TOPIC, data))
                .unwrap_or_else(|e| panic!("the injector cannot publish {what}: {e}"));
        };
        publish(
            "bytes that are not UTF-8",
            vec![0xff, 0xfe, 0x00, b'b', b'e', b'e', 0xc3, 0x28, 0x80],
        );
        publish(
            "garbage",
            b"manifest = \"\"\"never closed\n[[signature]\nkey = = \x07\n".to_vec(),
        );
        let over_node_limit = beemesh_manifest::input::MAX_SIGNED_BYTES as usize + 4096;
        publish(
            "a message over the node's manifest limit",
            vec![b'#'; over_node_limit],
        );
        for (what, reason) in [
            (
                "the non-UTF-8 message",
                "dropped gossip manifest: not UTF-8",
            ),
            (
                "the garbage message",
                "dropped gossip manifest: not a signed manifest",
            ),
            (
                "the oversized message",
                "dropped gossip manifest: signed manifest is larger than",
            ),
        ] {
            expect_logged(
                &all,
                &format!("why it dropped {what}"),
                &[reason, &injector_id],
            );
        }
        // Over the mesh's own frame limit: gossipsub's codec refuses the frame before the node
        // sees it. Either the injector's stream survives (a probe published after the frame
        // arrives) or the node closed it (it stops hearing the injector): either way the frame
        // has been dealt with when the nodes are checked below.
        publish(
            "a message over the mesh's frame limit",
            vec![b'#'; 2 * beemesh_mesh::DEFAULT_MAX_MESSAGE_SIZE],
        );
        let outcome = probe(
            injector,
            &all,
            "every node to have dealt with the oversized frame",
            true,
        );
        eprintln!("after the oversized frame: {outcome:?}");
        for m in &all {
            let status = m
                .api()
                .status()
                .unwrap_or_else(|e| panic!("{} must still answer its API: {e}", m.name()));
            assert_eq!(
                status["peer_id"].as_str(),
                Some(m.peer_id.as_str()),
                "{}",
                m.name()
            );
        }
    }

    fn final_checks(&mut self) {
        let all: Vec<&Member> = self.members.iter().collect();
        // The mesh still works end to end after everything thrown at it.
        let n4 = &self.members[3];
        let answer = self
            .cli
            .apply(n4.api(), &self.docs.after.path)
            .expect("apply on n4");
        assert_eq!(answer["status"], "accepted", "{answer}");
        expect_desired(
            &all,
            &[&self.docs.after, &self.docs.hello2, &self.docs.batch1],
            "a last manifest everywhere",
        );
        for m in &mut self.members {
            assert!(
                m.node.is_running(),
                "node {} is not running any more; its log:\n{}",
                m.name(),
                m.node.log_tail(40)
            );
        }
        for m in [&mut self.expired, &mut self.foreign] {
            assert!(
                m.node.is_running(),
                "outsider {} is not running any more",
                m.name()
            );
        }
        // What the outsiders submitted stayed with them.
        for (m, d) in [
            (&self.expired, &self.docs.intruder_expired),
            (&self.foreign, &self.docs.intruder_foreign),
        ] {
            let own = m
                .api()
                .workload("default", &d.name)
                .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
            assert!(
                own.is_some_and(|w| w.digest == d.digest),
                "{} lost its own {}",
                m.name(),
                d.name
            );
        }
        let report = self
            .monitor
            .take()
            .expect("the monitor runs from scenario 3")
            .finish();
        eprintln!(
            "monitor: {} rounds, {} answers, {} violations",
            report.rounds,
            report.answers,
            report.violations.len()
        );
        assert!(
            report.rounds >= 10,
            "the monitor sampled only {} rounds",
            report.rounds
        );
        assert!(
            report.violations.is_empty(),
            "the monitor saw what must never be seen:\n{}",
            report.violations.join("\n")
        );
    }
}

/// Polls until each node lists exactly the other `members` (by PeerId, with their names).
fn expect_membership(members: &[&Member], what: &str) {
    eventually(what, CONVERGE, || {
        let mut problems = Vec::new();
        for m in members {
            let listed = match m.api().peers() {
                Ok(p) => p,
                Err(e) => {
                    problems.push(format!("{}: {e}", m.name()));
                    continue;
                }
            };
            let listed: BTreeMap<&str, &str> = listed
                .iter()
                .map(|p| (p.peer_id.as_str(), p.name.as_str()))
                .collect();
            let expected: BTreeMap<&str, &str> = members
                .iter()
                .filter(|o| o.peer_id != m.peer_id)
                .map(|o| (o.peer_id.as_str(), o.name()))
                .collect();
            if listed != expected {
                let missing: Vec<&str> = expected
                    .iter()
                    .filter(|(id, _)| !listed.contains_key(*id))
                    .map(|(_, n)| *n)
                    .collect();
                let extra: Vec<String> = listed
                    .iter()
                    .filter(|(id, name)| expected.get(*id) != Some(*name))
                    .map(|(id, name)| format!("{name:?} {id}"))
                    .collect();
                problems.push(format!(
                    "{} misses {missing:?} and lists unexpected {extra:?}",
                    m.name()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    });
}

/// Members that do not list `peer_id` (or do not answer).
fn missing_peer<'a>(members: &[&'a Member], peer_id: &str) -> Vec<&'a str> {
    members
        .iter()
        .filter(|m| {
            !m.api()
                .peers()
                .is_ok_and(|p| p.iter().any(|p| p.peer_id == peer_id))
        })
        .map(|m| m.name())
        .collect()
}

/// Polls until each node lists every doc with its generation and content id.
fn expect_desired(members: &[&Member], docs: &[&Doc], what: &str) {
    eventually(what, CONVERGE, || {
        let mut problems = Vec::new();
        for m in members {
            for d in docs {
                match m.api().workload("default", &d.name) {
                    Ok(Some(w)) if w.generation == d.generation && w.digest == d.digest => {}
                    Ok(Some(w)) => problems.push(format!(
                        "{} has {} generation {} ({}), expected generation {} ({})",
                        m.name(),
                        d.name,
                        w.generation,
                        w.digest,
                        d.generation,
                        d.digest
                    )),
                    Ok(None) => problems.push(format!("{} lacks {}", m.name(), d.name)),
                    Err(e) => problems.push(format!("{}: {e}", m.name())),
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    });
}

/// Polls until the log of each node has a line containing all of `needles`.
fn expect_logged(members: &[&Member], what: &str, needles: &[&str]) {
    eventually(format!("every node to log {what}"), CONVERGE, || {
        let missing: Vec<&str> = members
            .iter()
            .filter(|m| m.node.log_lines_with(needles).is_empty())
            .map(|m| m.name())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "no line with all of {needles:?} in the logs of {missing:?}"
            ))
        }
    });
}

/// How a node dealt with the injector's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// It logged the drop of a probe: gossip from the injector reaches it directly.
    Probe,
    /// It no longer lists the injector: it stopped hearing it (its gossip stream was closed).
    Gone,
}

/// Publishes probes (unsigned envelopes, which every node drops and logs with their content id)
/// every second until every node has logged one, or, with `or_gone`, no longer lists the
/// injector. Gossip that a node rejects is not forwarded, so a logged probe proves that the
/// injector sends to that node directly, and that what it published before has been handled.
fn probe(
    injector: &MeshPeer,
    members: &[&Member],
    what: &str,
    or_gone: bool,
) -> Vec<(String, Heard)> {
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let injector_id = injector.peer_id().to_base58();
    let mut probes: Vec<String> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut errors = Vec::new();
    eventually(what, CONVERGE, || {
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let k = PROBES.fetch_add(1, Ordering::Relaxed);
            let text = manifest_text(&format!("probe-{k}"), 1, "probe");
            probes.push(content_id(&text));
            let envelope = SignedManifest::new(text).to_toml().into_bytes();
            if let Err(e) = injector.block_on(injector.mesh().publish(TOPIC, envelope)) {
                errors.push(e.to_string());
            }
            last = Some(Instant::now());
        }
        let mut heard = Vec::new();
        let mut missing = Vec::new();
        for m in members {
            let log = m.node.log();
            let logged = log.lines().any(|l| {
                l.contains("dropped gossip manifest")
                    && probes.iter().any(|p| l.contains(p.as_str()))
            });
            let gone = || {
                m.api()
                    .peers()
                    .is_ok_and(|ps| !ps.iter().any(|p| p.peer_id == injector_id))
            };
            if logged {
                heard.push((m.name().to_owned(), Heard::Probe));
            } else if or_gone && gone() {
                heard.push((m.name().to_owned(), Heard::Gone));
            } else {
                missing.push(m.name());
            }
        }
        if missing.is_empty() {
            Ok(heard)
        } else {
            Err(format!(
                "{} probes published (publish errors: {errors:?}); no probe logged yet by {missing:?}",
                probes.len()
            ))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The monitor

/// What the monitor watches for.
struct Watch {
    admitted: Vec<(String, Api)>,
    outsiders: Vec<(String, Api)>,
    /// PeerId → name of everything that may be a member.
    admitted_ids: BTreeMap<String, String>,
    /// PeerId → name of the peers that must never be listed by an admitted node.
    outsider_ids: BTreeMap<String, String>,
    /// Content id → description of manifests no admitted node may ever list.
    forbidden: BTreeMap<String, String>,
    forbidden_names: BTreeSet<String>,
    forbidden_prefix: String,
}

#[derive(Debug, Default)]
struct Report {
    rounds: usize,
    answers: usize,
    violations: Vec<String>,
}

/// Samples every node's peers and workloads in a thread until finished.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Report>>,
}

const MONITOR_INTERVAL: Duration = Duration::from_millis(250);

impl Monitor {
    fn start(watch: Watch) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || watch.run(&flag))
            .expect("start the monitor thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("the monitor thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Watch {
    fn run(self, stop: &AtomicBool) -> Report {
        let started = Instant::now();
        let mut report = Report::default();
        let mut seen = BTreeSet::new();
        // (node, workload) → highest generation seen.
        let mut highest: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut violation = |key: String, text: String, report: &mut Report| {
            if seen.insert(key) {
                report.violations.push(format!(
                    "[{:.1?} after scenario 3 began] {text}",
                    started.elapsed()
                ));
            }
        };
        while !stop.load(Ordering::Relaxed) {
            report.rounds += 1;
            for (node, api) in &self.admitted {
                if let Ok(peers) = api.peers() {
                    report.answers += 1;
                    for p in peers {
                        if let Some(who) = self.outsider_ids.get(&p.peer_id) {
                            violation(
                                format!("{node} peer {who}"),
                                format!("{node} lists outsider {who} ({}) as a peer", p.peer_id),
                                &mut report,
                            );
                        }
                    }
                }
                if let Ok(list) = api.workloads() {
                    report.answers += 1;
                    for w in list {
                        let bad = self.forbidden.get(&w.digest).cloned().or_else(|| {
                            (self.forbidden_names.contains(&w.name)
                                || w.name.starts_with(&self.forbidden_prefix))
                            .then(|| format!("{} generation {}", w.name, w.generation))
                        });
                        if let Some(what) = bad {
                            violation(
                                format!("{node} workload {}", w.digest),
                                format!("{node} lists {what} ({})", w.digest),
                                &mut report,
                            );
                        }
                        let top = highest
                            .entry((node.clone(), w.name.clone()))
                            .or_insert(w.generation);
                        if w.generation < *top {
                            violation(
                                format!("{node} rollback {} {}", w.name, w.generation),
                                format!(
                                    "{node} went back from generation {top} to {} of {}",
                                    w.generation, w.name
                                ),
                                &mut report,
                            );
                        }
                        *top = (*top).max(w.generation);
                    }
                }
            }
            for (node, api) in &self.outsiders {
                if let Ok(peers) = api.peers() {
                    report.answers += 1;
                    for p in peers {
                        if let Some(who) = self.admitted_ids.get(&p.peer_id) {
                            violation(
                                format!("{node} sees {who}"),
                                format!("outsider {node} lists admitted {who} as a peer"),
                                &mut report,
                            );
                        }
                    }
                }
            }
            std::thread::sleep(MONITOR_INTERVAL);
        }
        report
    }
}
