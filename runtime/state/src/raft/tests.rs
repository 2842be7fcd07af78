//! In-process multi-node tests of the groups over the in-memory transport: every message is
//! encoded, size-checked and decoded as it would be over libp2p.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use super::*;

const A: &str = "12D3KooWTestNodeA";
const B: &str = "12D3KooWTestNodeB";
const C: &str = "12D3KooWTestNodeC";
const D: &str = "12D3KooWTestNodeD";

/// Every wait in these tests is bounded.
async fn within<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

fn peers(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

/// The workload's hosts as every node of a test cluster sees them: `None` lets every peer
/// take part.
#[derive(Default)]
struct TestHosts(std::sync::Mutex<Option<std::collections::BTreeSet<String>>>);

impl TestHosts {
    fn set(&self, hosts: &[&str]) {
        *self.0.lock().unwrap() = Some(hosts.iter().map(|h| h.to_string()).collect());
    }
}

impl Participants for TestHosts {
    fn may_participate(&self, _: &GroupId, peer: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|h| h.contains(peer))
    }
}

struct Cluster {
    hosts: Arc<TestHosts>,
    net: MemoryNetwork,
    dir: TempDir,
    config: RaftConfig,
    nodes: BTreeMap<String, Groups<MemoryTransport>>,
}

impl Cluster {
    async fn new(names: &[&str], config: RaftConfig) -> Self {
        let mut c = Self {
            hosts: Arc::new(TestHosts::default()),
            net: MemoryNetwork::new(),
            dir: tempfile::tempdir().unwrap(),
            config,
            nodes: BTreeMap::new(),
        };
        for n in names {
            c.start(n).await;
        }
        c
    }

    fn data_dir(&self, peer: &str) -> PathBuf {
        self.dir.path().join(peer)
    }

    async fn start(&mut self, peer: &str) {
        let g = Groups::open(
            peer,
            &self.data_dir(peer),
            self.config.clone(),
            self.net.transport(peer),
        )
        .await
        .unwrap();
        g.set_participants(self.hosts.clone());
        self.net.register(peer, g.rpc_handler());
        self.nodes.insert(peer.to_string(), g);
    }

    /// The node stops answering at once and its groups shut down (its data stays).
    async fn kill(&mut self, peer: &str) {
        self.net.unregister(peer);
        if let Some(g) = self.nodes.remove(peer) {
            within("shutdown", Duration::from_secs(20), g.shutdown()).await;
        }
    }

    fn node(&self, peer: &str) -> &Groups<MemoryTransport> {
        &self.nodes[peer]
    }

    async fn create(&self, group: &GroupId, voters: &[&str]) {
        for v in voters {
            self.node(v).create(group, &peers(voters)).await.unwrap();
        }
    }

    /// The leader that every running voter named in `among` agrees on.
    async fn leader(&self, group: &GroupId, among: &[&str], limit: Duration) -> String {
        within("electing a leader", limit, async {
            loop {
                let mut seen = Vec::new();
                for p in among {
                    if let Ok(s) = self.node(p).status(group).await {
                        seen.push((s.role, s.leader, s.term));
                    }
                }
                let leader = seen.iter().find(|s| s.0 == Role::Leader).cloned();
                if let Some((_, Some(l), term)) = leader
                    && seen
                        .iter()
                        .all(|s| s.1.as_deref() == Some(l.as_str()) && s.2 == term)
                {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

fn group(name: &str) -> GroupId {
    GroupId::new("default", name).unwrap()
}

/// Concurrent reads share read-index rounds: each still sees every write acknowledged before
/// it began, and a burst of reads costs a few leadership confirmations, not one per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_share_leadership_confirmations_and_stay_linearizable() {
    let c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    // A little latency, so that reads pile up behind a round.
    c.net
        .set_delay(Duration::from_millis(2), Duration::from_millis(2), 3);
    let acked = Arc::new(AtomicU64::new(0));
    c.node(&leader)
        .put(&g, "k", 0u64.to_be_bytes().to_vec(), None)
        .await
        .unwrap();

    // A writer acknowledges increasing values while readers on every node read.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (l, g, acked, stop) = (
            c.node(&leader).clone(),
            g.clone(),
            acked.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                l.put(&g, "k", n.to_be_bytes().to_vec(), None)
                    .await
                    .unwrap();
                acked.store(n, Ordering::SeqCst);
            }
        })
    };
    let mut readers = Vec::new();
    for i in 0..48 {
        let node = c.node([A, B, C][i % 3]).clone();
        let (g, acked) = (g.clone(), acked.clone());
        readers.push(tokio::spawn(async move {
            for _ in 0..10 {
                let before = acked.load(Ordering::SeqCst);
                let v = node.get(&g, "k").await.unwrap().unwrap();
                let read = u64::from_be_bytes(v.value.as_slice().try_into().unwrap());
                assert!(
                    read >= before,
                    "read {read} after {before} was acknowledged"
                );
            }
        }));
    }
    for r in readers {
        within("the readers", Duration::from_secs(60), r)
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    within("the writer", Duration::from_secs(10), writer)
        .await
        .unwrap();

    // 240 reads at once on the leader, no writes: one heartbeat per voter per read would be
    // 480 messages at least.
    let before = c.net.delivered();
    let mut burst = Vec::new();
    for _ in 0..240 {
        let (node, g) = (c.node(&leader).clone(), g.clone());
        burst.push(tokio::spawn(async move { node.get(&g, "k").await }));
    }
    for b in burst {
        within("a burst read", Duration::from_secs(30), b)
            .await
            .unwrap()
            .unwrap();
    }
    let sent = c.net.delivered() - before;
    assert!(sent < 240, "{sent} messages for 240 reads");
}

/// Writes that wait together are proposed together: fewer log entries than writes, yet each
/// write has its own revision and result (a conditional write that loses the race is refused
/// alone), and a batch offered by a peer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_proposed_in_batches_each_with_its_own_result() {
    use super::wire::{ForwardReply, LeaderOp, Request, RequestBody, Response, decode_limited};
    let c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    // A little latency, so that writes pile up behind the batches in flight.
    c.net
        .set_delay(Duration::from_millis(2), Duration::from_millis(2), 3);
    let before = c.node(&leader).status(&g).await.unwrap();
    let mut writes = Vec::new();
    for i in 0..300usize {
        let node = c.node([A, B, C][i % 3]).clone();
        let g = g.clone();
        writes.push(tokio::spawn(async move {
            let r = node
                .put(&g, &format!("k{i:03}"), format!("v{i}").into_bytes(), None)
                .await;
            (format!("k{i:03}"), r)
        }));
    }
    // Twenty writers race to create the same key: exactly one wins.
    let mut racers = Vec::new();
    for i in 0..20usize {
        let node = c.node([A, B, C][i % 3]).clone();
        let g = g.clone();
        racers.push(tokio::spawn(async move {
            node.put(&g, "once", format!("w{i}").into_bytes(), Some(0))
                .await
        }));
    }
    let mut revisions = BTreeSet::new();
    for w in writes {
        let (key, r) = within("a write", Duration::from_secs(30), w).await.unwrap();
        let revision = r.unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(
            revisions.insert(revision),
            "revision {revision} given twice"
        );
        let got = c.node(&leader).get(&g, &key).await.unwrap().unwrap();
        assert_eq!(got.revision, revision, "{key}");
    }
    let (mut won, mut refused) = (0, 0);
    for r in racers {
        match within("a racer", Duration::from_secs(30), r).await.unwrap() {
            Ok(revision) => {
                won += 1;
                assert!(
                    revisions.insert(revision),
                    "revision {revision} given twice"
                );
            }
            Err(Error::PreconditionFailed { current, .. }) => {
                refused += 1;
                assert!(current > 0);
            }
            Err(e) => panic!("racer: {e}"),
        }
    }
    assert_eq!((won, refused), (1, 19));
    // Revisions are the group's counter: 321 writes took 321 consecutive revisions.
    let first = *revisions.first().unwrap();
    assert_eq!(*revisions.last().unwrap(), first + 300);
    assert_eq!(revisions.len(), 301);
    let after = c.node(&leader).status(&g).await.unwrap();
    let entries = after.commit_index.unwrap() - before.commit_index.unwrap();
    assert!(
        entries < 320,
        "{entries} log entries for 320 writes: they were not batched"
    );

    // A peer cannot propose a batch of its own.
    let forged = Request {
        group: g.clone(),
        body: RequestBody::Forward {
            op: LeaderOp::Write(KvCommand::Batch(vec![KvCommand::Put {
                key: "k000".into(),
                value: b"forged".to_vec(),
                if_revision: None,
            }])),
            timeout_ms: 1000,
        },
    };
    let from = [A, B, C].into_iter().find(|p| *p != leader).unwrap();
    let answer = c
        .node(&leader)
        .handle_rpc(from, &super::store::encode(&forged).unwrap())
        .await;
    let answer = decode_limited::<Response>("response", &answer, c.config.max_rpc_bytes).unwrap();
    assert!(
        matches!(
            answer,
            Response::Forward(ForwardReply::Failed(Error::InvalidKey { .. }))
        ),
        "{answer:?}"
    );
    let got = c.node(&leader).get(&g, "k000").await.unwrap().unwrap();
    assert_eq!(got.value, b"v0");
}

/// A write the leader appended and replicated but whose acknowledgements it never got, when
/// the leader is then cut off and another takes over (with the write in its log): the write is
/// applied once, and its caller hears that it was applied or that its outcome is unknown.
/// (openraft answers such a write "forward to the leader"; sending it to the new leader as if
/// it had never been proposed applied it twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_leader_stepped_down_mid_proposal_is_applied_once() {
    let c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let others: Vec<&str> = [A, B, C].into_iter().filter(|p| *p != leader).collect();
    c.node(&leader)
        .put(&g, "k", b"v0".to_vec(), None)
        .await
        .unwrap();
    let before = c.node(&leader).status(&g).await.unwrap();
    // The followers' answers to the leader are lost: they append the write, the leader
    // never learns that they did.
    for o in &others {
        c.net.cut(o, &leader);
    }
    let node = c.node(&leader).clone();
    let g2 = g.clone();
    let write = tokio::spawn(async move { node.put(&g2, "k", b"v1".to_vec(), None).await });
    let appended = before.last_log_index.unwrap() + 1;
    within(
        "the followers append the write",
        Duration::from_secs(10),
        async {
            loop {
                let mut all = true;
                for o in &others {
                    let s = c.node(o).status(&g).await.unwrap();
                    all &= s.last_log_index.is_some_and(|i| i >= appended);
                }
                if all {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    // The leader is cut off: one of the followers, which hold the write, takes over and
    // commits it; then the old leader hears of the new term and steps down.
    for o in &others {
        c.net.cut(&leader, o);
    }
    let new = c.leader(&g, &others, Duration::from_secs(10)).await;
    c.net.heal();
    let answer = within("the write's answer", Duration::from_secs(10), write)
        .await
        .unwrap();
    // Every node ends at the same revision: the write's, once.
    let want = before.revision + 1;
    within(
        "every node applies the same",
        Duration::from_secs(10),
        async {
            loop {
                let mut revs = Vec::new();
                for p in [A, B, C] {
                    revs.push(c.node(p).status(&g).await.unwrap().revision);
                }
                if revs.iter().all(|r| *r == revs[0]) && revs[0] >= want {
                    assert_eq!(
                        revs[0],
                        want,
                        "the write was applied {} times",
                        revs[0] - before.revision
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    assert_eq!(
        c.node(&new).get(&g, "k").await.unwrap().unwrap().value,
        b"v1"
    );
    match answer {
        Ok(revision) => assert_eq!(revision, want),
        Err(Error::OutcomeUnknown { .. }) => {}
        Err(e) => panic!("the write's caller heard {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_serve_linearizable_reads_and_conditional_writes() {
    let c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let followers: Vec<&str> = [A, B, C].into_iter().filter(|p| *p != leader).collect();
    let l = c.node(&leader);

    let r1 = l.put(&g, "config/a", b"1".to_vec(), None).await.unwrap();
    // Reads on any member see an acknowledged write: the read index goes through the leader.
    for p in &followers {
        let v = c.node(p).get(&g, "config/a").await.unwrap().unwrap();
        assert_eq!((v.value.as_slice(), v.revision), (&b"1"[..], r1));
    }
    // A write on a follower is forwarded to the leader.
    let r2 = c
        .node(followers[0])
        .put(&g, "config/b", b"2".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(r2, r1 + 1);
    let v = c
        .node(followers[1])
        .get(&g, "config/b")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.revision, r2);

    // Conditional writes: a stale revision is refused (HTTP 412), the right one succeeds.
    let e = c
        .node(followers[1])
        .put(&g, "config/a", b"x".to_vec(), Some(r1 + 100))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed { key, expected, current, .. }
            if key == "config/a" && *expected == r1 + 100 && *current == r1),
        "{e}"
    );
    let r3 = c
        .node(followers[1])
        .put(&g, "config/a", b"3".to_vec(), Some(r1))
        .await
        .unwrap();
    assert!(r3 > r2);
    // Create-only.
    assert!(matches!(
        l.put(&g, "config/a", b"y".to_vec(), Some(0)).await,
        Err(Error::PreconditionFailed { current, .. }) if current == r3
    ));
    let r4 = l.put(&g, "lock", b"me".to_vec(), Some(0)).await.unwrap();
    // Deletes.
    assert!(matches!(
        c.node(followers[0]).delete(&g, "lock", Some(r4 - 1)).await,
        Err(Error::PreconditionFailed { .. })
    ));
    let r5 = c
        .node(followers[0])
        .delete(&g, "lock", Some(r4))
        .await
        .unwrap();
    assert_eq!(r5, r4 + 1);
    assert!(matches!(
        l.delete(&g, "lock", None).await,
        Err(Error::KeyNotFound { key, .. }) if key == "lock"
    ));
    assert_eq!(c.node(followers[1]).get(&g, "lock").await.unwrap(), None);

    // Listing, a page at a time.
    for i in 0..5 {
        l.put(&g, &format!("list/{i}"), vec![i], None)
            .await
            .unwrap();
    }
    let mut keys = Vec::new();
    let mut page = Page {
        after: None,
        limit: 2,
    };
    loop {
        let p = c
            .node(followers[0])
            .list(&g, "list/", page.clone())
            .await
            .unwrap();
        keys.extend(p.items.iter().map(|i| i.key.clone()));
        match p.next {
            Some(n) => page.after = Some(n),
            None => break,
        }
    }
    assert_eq!(keys, ["list/0", "list/1", "list/2", "list/3", "list/4"]);

    // Status for `beemesh get workloads`.
    let s = l.status(&g).await.unwrap();
    assert_eq!(s.role, Role::Leader);
    assert_eq!(s.voters, {
        let mut v = peers(&[A, B, C]);
        v.sort();
        v
    });
    assert!(s.learners.is_empty());
    assert_eq!(s.leader.as_deref(), Some(leader.as_str()));
    assert!(s.commit_index >= s.last_applied.map(|_| 0));
    assert_eq!(s.revision, r5 + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_is_elected_and_no_acknowledged_write_is_lost() {
    let config = RaftConfig::for_tests();
    let mut c = Cluster::new(&[A, B, C], config.clone()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let old = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let rest: Vec<&str> = [A, B, C].into_iter().filter(|p| *p != old).collect();
    let mut acknowledged = Vec::new();
    for i in 0..20u8 {
        let node = if i % 2 == 0 { old.as_str() } else { rest[0] };
        let rev = c
            .node(node)
            .put(&g, &format!("k{i}"), vec![i], None)
            .await
            .unwrap();
        acknowledged.push((format!("k{i}"), vec![i], rev));
    }

    let killed = Instant::now();
    c.kill(&old).await;
    let new = c.leader(&g, &rest, Duration::from_secs(10)).await;
    let took = killed.elapsed();
    assert_ne!(new, old);
    // Followers notice after one election timeout. The margin covers a second round (a
    // candidate that times out before the other follower's leader lease, one maximum election
    // timeout, has expired is refused once), a split vote and a loaded 2-core machine.
    let margin = Duration::from_millis(1400);
    assert!(
        took <= config.election_timeout_max() + margin,
        "a new leader after {took:?}"
    );
    eprintln!("new leader {new} after {took:?}");

    for (k, v, rev) in &acknowledged {
        let got = c.node(rest[1]).get(&g, k).await.unwrap().unwrap();
        assert_eq!((&got.value, got.revision), (v, *rev), "{k}");
    }
    let after = c
        .node(rest[0])
        .put(&g, "after", b"x".to_vec(), None)
        .await
        .unwrap();
    assert!(after > acknowledged.last().unwrap().2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_partition_the_majority_serves_and_the_minority_refuses() {
    let config = RaftConfig {
        request_timeout_ms: 1500,
        ..RaftConfig::for_tests()
    };
    let c = Cluster::new(&[A, B, C], config).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let old = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let rest: Vec<&str> = [A, B, C].into_iter().filter(|p| *p != old).collect();
    c.node(&old)
        .put(&g, "before", b"1".to_vec(), None)
        .await
        .unwrap();

    // Cut the leader off: 2 | 1.
    c.net.partition(&[&rest, &[old.as_str()]]);
    let new = c.leader(&g, &rest, Duration::from_secs(10)).await;
    assert_ne!(new, old);
    for (i, p) in rest.iter().enumerate() {
        c.node(p)
            .put(&g, &format!("majority{i}"), b"m".to_vec(), None)
            .await
            .unwrap();
        assert!(c.node(p).get(&g, "before").await.unwrap().is_some());
    }

    // The minority: its reads cannot confirm a quorum, its writes never commit.
    let minority = c.node(&old);
    let started = Instant::now();
    let e = within(
        "a minority read",
        Duration::from_secs(5),
        minority.get(&g, "before"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unavailable { .. } | Error::NoLeader { .. } | Error::Timeout { .. }
        ),
        "{e}"
    );
    eprintln!("minority read refused after {:?}: {e}", started.elapsed());
    let started = Instant::now();
    let e = within(
        "a minority write",
        Duration::from_secs(5),
        minority.put(&g, "minority", b"lost".to_vec(), None),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Timeout { .. } | Error::NoLeader { .. } | Error::Unavailable { .. }
        ),
        "{e}"
    );
    eprintln!("minority write refused after {:?}: {e}", started.elapsed());

    // Healed, the old leader follows the new one and has every committed write; the write
    // it could not commit is gone.
    c.net.heal();
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    assert_ne!(leader, old);
    let v = c.node(&old).get(&g, "majority1").await.unwrap();
    assert!(v.is_some());
    assert_eq!(c.node(&old).get(&g, "minority").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moves_from_c_to_d_while_the_group_serves() {
    // Snapshot often, keep no log behind it: D catches up from a snapshot.
    let config = RaftConfig {
        snapshot_every_entries: 20,
        logs_kept_after_snapshot: 0,
        ..RaftConfig::for_tests()
    };
    let mut c = Cluster::new(&[A, B, C, D], config).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    for i in 0..60u32 {
        c.node(A)
            .put(&g, &format!("seed/{i}"), i.to_be_bytes().to_vec(), None)
            .await
            .unwrap();
    }

    // The leader has purged the start of its log: D can only catch up by a snapshot.
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let l = within("a purge", Duration::from_secs(10), async {
        loop {
            let s = c.node(&leader).status(&g).await.unwrap();
            if s.purged_index.is_some() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(l.snapshot_index >= l.purged_index, "{l:?}");

    // A writer keeps writing through A during the whole move.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let writer = {
        let (a, g, stop, ok) = (c.node(A).clone(), g.clone(), stop.clone(), ok.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match a.put(&g, &format!("during/{i}"), vec![1], None).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        })
    };

    within(
        "D joining as a learner",
        Duration::from_secs(10),
        c.node(D).join_as_learner(&g, &peers(&[A, B, C])),
    )
    .await
    .unwrap();
    let s = c.node(A).status(&g).await.unwrap();
    assert_eq!(s.learners, vec![D.to_string()]);
    // C's replica moved to D (in every node's view): only then may C be removed.
    c.hosts.set(&[A, B, D]);
    within(
        "moving from {A,B,C} to {A,B,D}",
        Duration::from_secs(30),
        c.node(B)
            .change_voters(&g, &peers(&[A, B, D]), Duration::from_secs(10)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = within("the writer", Duration::from_secs(10), writer)
        .await
        .unwrap();
    assert!(
        failures.is_empty(),
        "writes failed during the move: {failures:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 0);

    let mut want = peers(&[A, B, D]);
    want.sort();
    for p in [A, B, D] {
        let s = c.node(p).status(&g).await.unwrap();
        assert_eq!(s.voters, want, "as {p} sees it");
        assert!(s.learners.is_empty());
    }
    // D got the state (by snapshot: the log it needed had been purged).
    let d = c.node(D).status(&g).await.unwrap();
    assert!(d.snapshot_index >= l.purged_index, "{d:?}");
    for i in [0u32, 33, 59] {
        let v = c
            .node(D)
            .get(&g, &format!("seed/{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.value, i.to_be_bytes().to_vec());
    }
    // C, removed, deletes its copy; the group goes on without it.
    let c_dir = c.data_dir(C).join("raft/default/db");
    assert!(c_dir.exists());
    c.node(C).delete_group(&g).await.unwrap();
    assert!(!c_dir.exists());
    c.kill(C).await;
    c.node(D)
        .put(&g, "after-move", b"1".to_vec(), None)
        .await
        .unwrap();
    c.leader(&g, &[A, B, D], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_steps_that_would_lose_the_majority_are_refused() {
    let mut c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let two = group("two");
    c.create(&two, &[A, B]).await;
    c.leader(&two, &[A, B], Duration::from_secs(10)).await;
    // B's replica is going away: it may be removed, if the group survives that.
    c.hosts.set(&[A, C]);
    let e = c.node(A).remove_voter(&two, B).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("would leave 1 of 2 voters, fewer than a majority (2)"),
        "{e}"
    );
    let e = c
        .node(B)
        .change_voters(&two, &peers(&[A]), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::MembershipRefused { .. }), "{e}");

    // Three voters with C gone: removing B would leave {A, C} with only A answering.
    let three = group("three");
    c.create(&three, &[A, B, C]).await;
    c.leader(&three, &[A, B, C], Duration::from_secs(10)).await;
    c.node(A)
        .put(&three, "k", b"v".to_vec(), None)
        .await
        .unwrap();
    c.kill(C).await;
    tokio::time::sleep(RaftConfig::for_tests().election_timeout_max() * 2).await;
    let e = c.node(A).remove_voter(&three, B).await.unwrap_err();
    assert!(
        e.to_string().contains("remaining voters answer the leader"),
        "{e}"
    );
    // Removing the gone voter itself is fine and leaves {A, B} serving.
    c.hosts.set(&[A, B]);
    c.node(B).remove_voter(&three, C).await.unwrap();
    c.node(B)
        .put(&three, "k2", b"v".to_vec(), None)
        .await
        .unwrap();
    let s = c.node(A).status(&three).await.unwrap();
    assert_eq!(s.voters.len(), 2);

    // Quorum loss as the node reports it.
    let lost = c.node(A).quorum_check(&two, |p| p == B).await.unwrap();
    assert_eq!(lost.unwrap().to_string(), "quorum lost: 1 of 2 voters gone");
    assert!(
        c.node(A)
            .quorum_check(&three, |p| p == C)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_restart_from_disk_and_continue() {
    let mut c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let mut last = 0;
    for i in 0..10u8 {
        last = c
            .node(B)
            .put(&g, &format!("k{i}"), vec![i], None)
            .await
            .unwrap();
    }
    // Every node has applied the last write before the restart (a follower learns of a commit
    // with the leader's next message: killed before it, it would restart one write behind,
    // which is correct but not what this test checks).
    within(
        "every node applies the writes",
        Duration::from_secs(10),
        async {
            for p in [A, B, C] {
                while c.node(p).status(&g).await.unwrap().revision < last {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        },
    )
    .await;
    let before = c.node(A).status(&g).await.unwrap();
    for p in [A, B, C] {
        c.kill(p).await;
    }
    for p in [A, B, C] {
        c.start(p).await;
        assert_eq!(c.node(p).list_groups(), vec![g.clone()]);
        let s = c.node(p).status(&g).await.unwrap();
        assert_eq!(s.voters, before.voters, "{s:?}");
        assert!(s.commit_index >= before.commit_index, "{s:?}");
        assert_eq!(s.revision, last, "the state machine is there: {s:?}");
        let log = within("the log", Duration::from_secs(5), async {
            loop {
                let s = c.node(p).status(&g).await.unwrap();
                if s.last_log_index.is_some() {
                    return s.last_log_index;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(log >= before.commit_index, "the log is there");
    }
    c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let v = c.node(C).get(&g, "k9").await.unwrap().unwrap();
    assert_eq!((v.value, v.revision), (vec![9], last));
    let next = c
        .node(A)
        .put(&g, "after", b"x".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(next, last + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_groups_share_a_node_and_deleting_one_removes_its_directory() {
    let config = RaftConfig {
        max_groups: 12,
        ..RaftConfig::for_tests()
    };
    let c = Cluster::new(&[A, B, C], config).await;
    let names: Vec<GroupId> = (0..12).map(|i| group(&format!("w{i}"))).collect();
    for g in &names {
        c.create(g, &[A, B, C]).await;
    }
    for g in &names {
        c.leader(g, &[A, B, C], Duration::from_secs(20)).await;
        c.node(A)
            .put(g, "name", g.name.as_bytes().to_vec(), None)
            .await
            .unwrap();
    }
    for g in &names {
        let v = c.node(C).get(g, "name").await.unwrap().unwrap();
        assert_eq!(v.value, g.name.as_bytes());
    }
    // Bounded: a thirteenth group is refused.
    let e = c
        .node(A)
        .create(&group("w12"), &peers(&[A, B, C]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::TooManyGroups { count: 12, max: 12 }),
        "{e}"
    );

    // The workload w0 is deleted everywhere.
    let gone = &names[0];
    for p in [A, B, C] {
        let dir = c.data_dir(p).join("raft/default/w0");
        assert!(dir.join("raft.redb").exists());
        c.node(p).delete_group(gone).await.unwrap();
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(matches!(
            c.node(p).status(gone).await,
            Err(Error::UnknownGroup { .. })
        ));
        // Idempotent.
        c.node(p).delete_group(gone).await.unwrap();
    }
    // The others are untouched.
    assert_eq!(
        c.node(B)
            .get(&names[1], "name")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"w1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_checked_before_they_reach_a_group() {
    use super::wire::{Refusal, Request, RequestBody, Response, decode_limited};
    let c = Cluster::new(&[A, B], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B]).await;
    c.leader(&g, &[A, B], Duration::from_secs(10)).await;
    let max = c.config.max_rpc_bytes;
    let ask = |from: &'static str, req: Request| {
        let node = c.node(A).clone();
        async move {
            let bytes = super::store::encode(&req).unwrap();
            let answer = node.handle_rpc(from, &bytes).await;
            decode_limited::<Response>("response", &answer, max).unwrap()
        }
    };
    // B claims to be a candidate with A's node id.
    let forged = Request {
        group: g.clone(),
        body: RequestBody::Vote(openraft::raft::VoteRequest {
            vote: openraft::Vote::new(99, node_id(A)),
            last_log_id: None,
        }),
    };
    assert!(matches!(
        ask(B, forged).await,
        Response::Refused(Refusal::SenderMismatch { .. })
    ));
    // An unknown group.
    let unknown = Request {
        group: group("nope"),
        body: RequestBody::Forward {
            op: super::wire::LeaderOp::ReadIndex,
            timeout_ms: 100,
        },
    };
    assert!(matches!(
        ask(B, unknown).await,
        Response::Refused(Refusal::UnknownGroup(_))
    ));
    // Garbage and oversized input.
    let answer = c.node(A).handle_rpc(B, &[0xff, 0x00]).await;
    assert!(matches!(
        decode_limited::<Response>("response", &answer, max).unwrap(),
        Response::Refused(Refusal::Malformed(_))
    ));
    let answer = c.node(A).handle_rpc(B, &vec![0u8; max + 1]).await;
    assert!(matches!(
        decode_limited::<Response>("response", &answer, max).unwrap(),
        Response::Refused(Refusal::TooLarge { .. })
    ));
    // The term did not move: the forged vote never reached the group.
    assert!(c.node(A).status(&g).await.unwrap().term < 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_and_hosts_take_part_and_only_hosts_are_added() {
    use super::types::KvCommand;
    use super::wire::{LeaderOp, Refusal, Request, RequestBody, Response, decode_limited};
    let c = Cluster::new(&[A, B, C, D], RaftConfig::for_tests()).await;
    c.hosts.set(&[A, B, C]);
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let member = [A, B, C].into_iter().find(|p| *p != leader).unwrap();
    let max = c.config.max_rpc_bytes;
    let ask = |from: &'static str, body: RequestBody| {
        let node = c.node(&leader).clone();
        let req = Request {
            group: g.clone(),
            body,
        };
        async move {
            let bytes = super::store::encode(&req).unwrap();
            let answer = node.handle_rpc(from, &bytes).await;
            decode_limited::<Response>("response", &answer, max).unwrap()
        }
    };
    let forward = |op| RequestBody::Forward {
        op,
        timeout_ms: 2_000,
    };
    let term = c.node(&leader).status(&g).await.unwrap().term;
    // D is admitted to the mesh but hosts no replica: it cannot vote, write, read or join.
    let vote = RequestBody::Vote(openraft::raft::VoteRequest {
        vote: openraft::Vote::new(term + 10, node_id(D)),
        last_log_id: None,
    });
    let write = LeaderOp::Write(KvCommand::Put {
        key: "k".into(),
        value: b"forged".to_vec(),
        if_revision: None,
    });
    for body in [
        vote,
        forward(write.clone()),
        forward(LeaderOp::ReadIndex),
        forward(LeaderOp::AddLearner { peer: D.into() }),
    ] {
        assert!(
            matches!(
                ask(D, body).await,
                Response::Refused(Refusal::NotParticipant { .. })
            ),
            "D was heard"
        );
    }
    assert_eq!(c.node(&leader).status(&g).await.unwrap().term, term);
    assert_eq!(c.node(&leader).get(&g, "k").await.unwrap(), None);
    assert!(
        c.node(D)
            .join_as_learner(&g, &peers(&[A, B, C]))
            .await
            .is_err()
    );
    // A member may write, but not add a peer that hosts nothing, nor remove a host.
    assert!(matches!(
        ask(member, forward(write)).await,
        Response::Forward(wire::ForwardReply::Done(_))
    ));
    for op in [
        LeaderOp::AddLearner { peer: D.into() },
        LeaderOp::AddVoter { peer: D.into() },
        LeaderOp::RemoveVoter {
            peer: [A, B, C]
                .into_iter()
                .find(|p| *p != leader && *p != member)
                .unwrap()
                .into(),
        },
    ] {
        assert!(
            matches!(
                ask(member, forward(op)).await,
                Response::Refused(Refusal::NotAllowed { .. })
            ),
            "a member moved the voters"
        );
    }
    assert_eq!(
        c.node(&leader).status(&g).await.unwrap().voters.len(),
        3,
        "the voters changed"
    );
    // Once D hosts a replica (in the nodes' view), it joins and the voters move to it.
    c.hosts.set(&[A, B, C, D]);
    within(
        "D joins",
        Duration::from_secs(20),
        c.node(D).join_as_learner(&g, &peers(&[A, B, C])),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_and_slow_links() {
    // 200 KiB values: a batch of them must be cut to fit below the RPC limit.
    let c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    c.net
        .set_delay(Duration::from_millis(2), Duration::from_millis(8), 7);
    let g = group("blobs");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let mut tasks = Vec::new();
    for i in 0..12u8 {
        let (node, g) = (c.node(&leader).clone(), g.clone());
        tasks.push(tokio::spawn(async move {
            node.put(&g, &format!("blob{i}"), vec![i; 200 * 1024], None)
                .await
        }));
    }
    for t in tasks {
        within("a large write", Duration::from_secs(20), t)
            .await
            .unwrap()
            .unwrap();
    }
    let follower = [A, B, C].into_iter().find(|p| *p != leader).unwrap();
    let v = c.node(follower).get(&g, "blob11").await.unwrap().unwrap();
    assert_eq!(v.value.len(), 200 * 1024);
    let e = c
        .node(follower)
        .put(&g, "too-big", vec![0; types::MAX_VALUE_BYTES + 1], None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ValueTooLarge { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_whose_answer_is_lost_is_not_sent_twice() {
    let c = Cluster::new(&[A, B, C], RaftConfig::for_tests()).await;
    let g = group("db");
    c.create(&g, &[A, B, C]).await;
    let leader = c.leader(&g, &[A, B, C], Duration::from_secs(10)).await;
    let follower = [A, B, C].into_iter().find(|p| *p != leader).unwrap();
    let before = c
        .node(&leader)
        .put(&g, "other", b"0".to_vec(), None)
        .await
        .unwrap();

    // The leader's answers to the follower are lost: the forwarded create-only write happens
    // on the leader, and the follower must report its outcome unknown, not retry it into a
    // precondition failure against itself.
    c.net.cut(&leader, follower);
    let e = c
        .node(follower)
        .put(&g, "once", b"1".to_vec(), Some(0))
        .await
        .unwrap_err();
    c.net.heal();
    assert!(matches!(e, Error::OutcomeUnknown { .. }), "{e}");
    let v = c.node(&leader).get(&g, "once").await.unwrap().unwrap();
    assert_eq!(v.revision, before + 1, "applied exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_voters_that_restart_before_the_group_formed_still_form_it() {
    let config = RaftConfig {
        bootstrap_grace_ms: 500,
        ..RaftConfig::for_tests()
    };
    let mut c = Cluster::new(&[A, B, C], config).await;
    let g = group("db");
    let voters = [A, B, C];
    // The bootstrapper (lowest node id) never comes up; the other two restart at once.
    let first = *voters.iter().min_by_key(|p| node_id(p)).unwrap();
    let others: Vec<&str> = voters.into_iter().filter(|p| *p != first).collect();
    c.kill(first).await;
    for p in &others {
        c.node(p).create(&g, &peers(&voters)).await.unwrap();
    }
    for p in &others {
        c.kill(p).await;
    }
    for p in &others {
        c.start(p).await;
    }
    c.leader(&g, &others, Duration::from_secs(10)).await;
    c.node(others[0])
        .put(&g, "k", b"v".to_vec(), None)
        .await
        .unwrap();
}

/// The node spawns these: they must be `Send` (checked at compile time).
#[allow(dead_code)]
fn the_api_futures_are_send(g: Groups<MemoryTransport>, id: GroupId) {
    fn send<T: Send>(_: T) {}
    let v: Vec<String> = Vec::new();
    send(Groups::open(
        A,
        std::path::Path::new("/"),
        RaftConfig::default(),
        MemoryNetwork::new().transport(A),
    ));
    send(g.create(&id, &v));
    send(g.join_as_learner(&id, &v));
    send(g.add_learner(&id, A));
    send(g.promote(&id, A, Duration::ZERO));
    send(g.remove_voter(&id, A));
    send(g.change_voters(&id, &v, Duration::ZERO));
    send(g.quorum_check(&id, |_| false));
    send(g.delete_group(&id));
    send(g.shutdown());
    send(g.status(&id));
    send(g.get(&id, "k"));
    send(g.list(&id, "", Page::default()));
    send(g.put(&id, "k", Vec::new(), None));
    send(g.delete(&id, "k", None));
    send(g.handle_rpc(A, &[]));
}
