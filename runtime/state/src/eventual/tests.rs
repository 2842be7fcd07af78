use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::{Arc, Mutex};

use redb::{BackendError, StorageBackend};

use super::store::Store;
use super::*;
use crate::crdt::testutil::Rng;

const T0: u64 = 1_700_000_000_000;

fn peers(ids: &[&str]) -> BTreeSet<PeerId> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

fn put(r: &mut Replica, req: u64, key: &str, value: &[u8], now: u64) -> Vec<Output> {
    r.handle(
        Input::Put {
            req,
            key: key.into(),
            value: value.to_vec(),
        },
        now,
    )
}

fn written(outs: &[Output]) -> Timestamp {
    outs.iter()
        .find_map(|o| match o {
            Output::Reply {
                result: Ok(Reply::Written { ts, .. }),
                ..
            } => Some(*ts),
            _ => None,
        })
        .expect("a written reply")
}

#[test]
fn a_local_write_persists_then_publishes_then_replies() {
    let mut r = Replica::new("n1".into(), ReplicaConfig::default()).expect("config");
    let outs = put(&mut r, 7, "k", b"v", T0);
    assert!(
        matches!(&outs[0], Output::Persist(b) if b.upserts.len() == 1 && b.meta.clock.physical == T0)
    );
    let Output::Publish(delta) = &outs[1] else {
        panic!("{outs:?}")
    };
    let recs = decode_delta(delta).expect("delta");
    assert_eq!(recs[0].key, "k");
    assert!(matches!(
        &outs[2],
        Output::Reply {
            req: 7,
            result: Ok(Reply::Written { existed: false, .. })
        }
    ));
    assert_eq!(outs.len(), 3);
    assert_eq!(
        r.get("k").expect("get"),
        Some((b"v".to_vec(), written(&outs)))
    );
    // A refused write changes nothing and persists nothing.
    let outs = put(&mut r, 8, "", b"v", T0);
    assert!(matches!(
        &outs[..],
        [Output::Reply {
            req: 8,
            result: Err(KvError::EmptyKey)
        }]
    ));
    let outs = r.handle(
        Input::Delete {
            req: 9,
            key: "k".into(),
        },
        T0,
    );
    assert!(matches!(
        &outs[2],
        Output::Reply {
            req: 9,
            result: Ok(Reply::Written { existed: true, .. })
        }
    ));
    assert_eq!(r.get("k").expect("get"), None);
    assert_eq!(r.stats().tombstones, 1);
}

#[test]
fn deltas_beyond_the_drift_bound_are_refused_and_counted() {
    let mut r = Replica::new("n1".into(), ReplicaConfig::default()).expect("config");
    r.handle(Input::Peers(peers(&["n2"])), T0);
    let ahead = |ms: u64, key: &str| {
        encode_delta(&[Record {
            key: key.into(),
            ts: Timestamp {
                physical: T0 + ms,
                logical: 0,
                node: 2,
            },
            value: Some(b"x".to_vec()),
        }])
    };
    let outs = r.handle(
        Input::Delta {
            from: "n2".into(),
            bytes: ahead(400, "near"),
        },
        T0,
    );
    assert!(matches!(&outs[0], Output::Persist(_)));
    let outs = r.handle(
        Input::Delta {
            from: "n2".into(),
            bytes: ahead(501, "far"),
        },
        T0,
    );
    assert!(
        matches!(
            &outs[..],
            [Output::Refused {
                reason: Refusal::Drift(HlcError::TooFarAhead { ahead_ms: 501, .. }),
                ..
            }]
        ),
        "{outs:?}"
    );
    assert_eq!(r.stats().refused_timestamps, 1);
    assert!(r.get("far").expect("get").is_none());
    // Local writes are above what was accepted, even with local time behind it.
    let ts = written(&put(&mut r, 1, "mine", b"1", T0));
    assert!(ts.physical == T0 + 400 && ts.logical == 1, "{ts}");
    // Not from a host of the workload, or garbage: refused.
    let outs = r.handle(
        Input::Delta {
            from: "n9".into(),
            bytes: ahead(0, "x"),
        },
        T0,
    );
    assert!(matches!(
        &outs[..],
        [Output::Refused {
            reason: Refusal::NotPeer,
            ..
        }]
    ));
    let outs = r.handle(
        Input::Delta {
            from: "n2".into(),
            bytes: vec![1, 0, 0, 0, 9],
        },
        T0,
    );
    assert!(matches!(
        &outs[..],
        [Output::Refused {
            reason: Refusal::Malformed(_),
            ..
        }]
    ));
    assert_eq!(r.stats().refused_messages, 2);
}

#[test]
fn config_is_validated() {
    let mut c = ReplicaConfig::default();
    c.limits.tombstone_horizon_ms = 1000;
    assert!(matches!(
        Replica::new("n".into(), c),
        Err(ConfigError::HorizonTooShort { .. })
    ));
    let mut c = ReplicaConfig::default();
    c.limits.max_value_len = 2 << 20;
    let e = Replica::new("n".into(), c).expect_err("too large");
    assert!(e.to_string().contains("2097152"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Persistence.

fn apply_outputs(store: &Store, outs: &[Output]) {
    let batches: Vec<PersistBatch> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Persist(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    store.commit(&batches).expect("commit");
}

#[test]
fn write_drop_reopen_gives_the_same_map_and_a_monotonic_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wdir = store::workload_dir(dir.path(), "ns", "app");
    let cfg = ReplicaConfig::default();
    let (map, last) = {
        let store = Store::open(&wdir).expect("open");
        let mut r = Replica::restore("n1".into(), cfg.clone(), store.load().expect("load"))
            .expect("restore");
        r.handle(Input::Peers(peers(&["n2"])), T0);
        let mut last = Timestamp::ZERO;
        for i in 0..50u64 {
            let outs = put(
                &mut r,
                i,
                &format!("k/{i}"),
                &[i as u8; 100],
                T0 + 10_000 + i,
            );
            apply_outputs(&store, &outs);
            last = written(&outs);
        }
        let outs = r.handle(
            Input::Delete {
                req: 99,
                key: "k/3".into(),
            },
            T0 + 20_000,
        );
        apply_outputs(&store, &outs);
        // A remote timestamp accepted (ahead of local time, within the drift bound).
        let remote = Timestamp {
            physical: T0 + 20_400,
            logical: 5,
            node: 2,
        };
        let outs = r.handle(
            Input::Delta {
                from: "n2".into(),
                bytes: encode_delta(&[Record {
                    key: "remote".into(),
                    ts: remote,
                    value: Some(vec![1]),
                }]),
            },
            T0 + 20_000,
        );
        apply_outputs(&store, &outs);
        (r.map().clone(), last)
    };
    assert!(last.physical < T0 + 20_400);
    // Reopen with the wall clock far behind (a host whose clock was reset).
    let store = Store::open(&wdir).expect("reopen");
    let restored = store.load().expect("load");
    let mut r = Replica::restore("n1".into(), cfg, restored).expect("restore");
    assert_eq!(r.map(), &map);
    assert_eq!(r.map().tombstones(), 1);
    assert_eq!(
        r.clock(),
        last.max(Timestamp {
            physical: T0 + 20_400,
            logical: 5,
            node: 2
        })
    );
    let ts = written(&put(&mut r, 1, "after", b"x", T0));
    assert!(
        ts > Timestamp {
            physical: T0 + 20_400,
            logical: 5,
            node: 2
        },
        "{ts}"
    );
}

/// A disk that keeps what was synced apart from what was only written, and can "lose power"
/// at a chosen operation.
#[derive(Debug, Clone, Default)]
struct CrashDisk(Arc<Mutex<Disk>>);

#[derive(Debug, Default)]
struct Disk {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    ops: usize,
    crash_at: Option<usize>,
    crashed: bool,
}

impl CrashDisk {
    fn from_image(image: Vec<u8>) -> Self {
        CrashDisk(Arc::new(Mutex::new(Disk {
            durable: image.clone(),
            volatile: image,
            ..Disk::default()
        })))
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn op(&self) -> Result<(), BackendError> {
        let mut d = self.lock();
        d.ops += 1;
        if d.crashed || d.crash_at.is_some_and(|c| d.ops >= c) {
            d.crashed = true;
            return Err(BackendError::Io(std::io::Error::other(
                "simulated power loss",
            )));
        }
        Ok(())
    }
    /// What is on the platter after the crash: the synced image plus the first `torn` of the
    /// writes that followed the last sync.
    fn image_after_crash(&self, torn: usize) -> Vec<u8> {
        let d = self.lock();
        let mut img = d.durable.clone();
        for (off, data) in d.pending.iter().take(torn) {
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        img
    }
}

impl StorageBackend for CrashDisk {
    fn len(&self) -> Result<u64, BackendError> {
        Ok(self.lock().volatile.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        let d = self.lock();
        let end = offset as usize + out.len();
        if end > d.volatile.len() {
            return Err(BackendError::Io(std::io::Error::other("read past the end")));
        }
        out.copy_from_slice(&d.volatile[offset as usize..end]);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), BackendError> {
        self.op()?;
        let mut d = self.lock();
        d.volatile.resize(len as usize, 0);
        // Growing the file is metadata: model it as durable at once (as ext4 does after the
        // sync that follows); shrinking only happens on compaction, which the store never does.
        if d.durable.len() < len as usize {
            d.durable.resize(len as usize, 0);
        }
        Ok(())
    }
    fn sync_data(&self) -> Result<(), BackendError> {
        self.op()?;
        let mut d = self.lock();
        d.durable = d.volatile.clone();
        d.pending.clear();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.op()?;
        let mut d = self.lock();
        let end = offset as usize + data.len();
        if end > d.volatile.len() {
            d.volatile.resize(end, 0);
        }
        d.volatile[offset as usize..end].copy_from_slice(data);
        d.pending.push((offset, data.to_vec()));
        Ok(())
    }
}

fn batch(
    cfg: &ReplicaConfig,
    r: &mut Replica,
    key: &str,
    value: &[u8],
    now: u64,
) -> Vec<PersistBatch> {
    let _ = cfg;
    put(r, 0, key, value, now)
        .into_iter()
        .filter_map(|o| match o {
            Output::Persist(b) => Some(b),
            _ => None,
        })
        .collect()
}

#[test]
fn a_crash_in_the_middle_of_a_commit_leaves_the_previous_or_the_new_state() {
    let cfg = ReplicaConfig::default();
    let mut r = Replica::new("n1".into(), cfg.clone()).expect("config");
    // State A: two keys committed.
    let disk = CrashDisk::default();
    let store = Store::open_with_backend(disk.clone(), "crash").expect("open");
    store
        .commit(&batch(&cfg, &mut r, "a", &[1; 3000], T0))
        .expect("commit");
    store
        .commit(&batch(&cfg, &mut r, "b", &[2; 3000], T0 + 1))
        .expect("commit");
    let state_a = store.load().expect("load");
    drop(store);
    let image_a = disk.image_after_crash(0);
    // The commit to be interrupted: B = A + "c" + a new "a".
    let mut batch_b = batch(&cfg, &mut r, "c", &[3; 5000], T0 + 2);
    batch_b.extend(batch(&cfg, &mut r, "a", &[4; 100], T0 + 3));
    let ops_of_commit = {
        let d = CrashDisk::from_image(image_a.clone());
        let s = Store::open_with_backend(d.clone(), "count").expect("open");
        let before = d.lock().ops;
        s.commit(&batch_b).expect("commit");
        let n = d.lock().ops - before;
        drop(s);
        n
    };
    assert!(ops_of_commit >= 2, "{ops_of_commit}");
    let state_b = {
        let d = CrashDisk::from_image(image_a.clone());
        let s = Store::open_with_backend(d, "b").expect("open");
        s.commit(&batch_b).expect("commit");
        s.load().expect("load")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for crash in 1..=ops_of_commit {
        let d = CrashDisk::from_image(image_a.clone());
        let s = Store::open_with_backend(d.clone(), "crash").expect("open");
        {
            let mut g = d.lock();
            g.crash_at = Some(g.ops + crash);
        }
        let res = s.commit(&batch_b);
        drop(s);
        let pending = d.lock().pending.len();
        for torn in [0, pending / 2, pending] {
            let img = d.image_after_crash(torn);
            let path = dir.path().join(format!("c{crash}-{torn}"));
            std::fs::create_dir_all(&path).expect("mkdir");
            std::fs::write(path.join(store::DB_FILE), &img).expect("write image");
            let reopened = Store::open(&path).expect("a crashed store reopens");
            let got = reopened.load().expect("and reads");
            if got == state_a {
                *outcomes.entry("previous").or_default() += 1;
            } else if got == state_b {
                *outcomes.entry("new").or_default() += 1;
            } else {
                panic!("crash at op {crash}, torn {torn}: neither state ({res:?})");
            }
        }
    }
    eprintln!("{ops_of_commit} crash points: {outcomes:?}");
    assert!(outcomes.contains_key("previous"));
}

#[test]
fn a_truncated_store_file_is_an_error_or_a_readable_store_never_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ReplicaConfig::default();
    let mut r = Replica::new("n1".into(), cfg.clone()).expect("config");
    {
        let s = Store::open(dir.path()).expect("open");
        for i in 0..20 {
            s.commit(&batch(
                &cfg,
                &mut r,
                &format!("k{i}"),
                &[i as u8; 2000],
                T0 + i,
            ))
            .expect("commit");
        }
    }
    let full = std::fs::read(dir.path().join(store::DB_FILE)).expect("read");
    let mut results = BTreeMap::<String, usize>::new();
    for cut in [
        full.len() - 1,
        full.len() - 4096,
        full.len() / 2,
        4096,
        100,
        0,
    ] {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(store::DB_FILE), &full[..cut]).expect("write");
        let outcome = match Store::open(d.path()).and_then(|s| s.load()) {
            Ok(restored) => format!("readable ({} entries)", restored.entries.len()),
            Err(e) => format!(
                "error: {}",
                e.to_string().split(':').nth(1).unwrap_or("").trim()
            ),
        };
        *results.entry(outcome).or_default() += 1;
    }
    eprintln!("truncated stores: {results:?}");
}

// ---------------------------------------------------------------------------------------------
// Simulation: replicas exchanging messages through a lossy, partitionable network.

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    seq: u64,
    to: usize,
    from: usize,
    gossip: bool,
    bytes: Vec<u8>,
}

struct Sim {
    ids: Vec<PeerId>,
    nodes: Vec<Replica>,
    offsets: Vec<i64>,
    side: Vec<u8>,
    partitioned: bool,
    loss_percent: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<InFlight>>,
    sent: u64,
    lost: u64,
}

impl Sim {
    fn new(seed: u64, n: usize, cfg: ReplicaConfig) -> Sim {
        let ids: Vec<PeerId> = (0..n).map(|i| format!("n{i}")).collect();
        let mut rng = Rng::new(seed);
        let offsets = (0..n).map(|_| rng.below(201) as i64 - 100).collect();
        let mut sim = Sim {
            nodes: ids
                .iter()
                .map(|id| Replica::new(id.clone(), cfg.clone()).expect("config"))
                .collect(),
            ids,
            offsets,
            side: vec![0; n],
            partitioned: false,
            loss_percent: 0,
            rng,
            now: T0,
            seq: 0,
            queue: BinaryHeap::new(),
            sent: 0,
            lost: 0,
        };
        for i in 0..n {
            let others: BTreeSet<PeerId> = sim
                .ids
                .iter()
                .filter(|p| **p != sim.ids[i])
                .cloned()
                .collect();
            sim.input(i, Input::Peers(others));
        }
        sim
    }

    fn local_now(&self, i: usize) -> u64 {
        (self.now as i64 + self.offsets[i]) as u64
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        !self.partitioned || self.side[a] == self.side[b]
    }

    fn deliver_later(&mut self, from: usize, to: usize, gossip: bool, bytes: Vec<u8>) {
        self.sent += 1;
        if !self.reachable(from, to) || self.rng.chance(self.loss_percent) {
            self.lost += 1;
            return;
        }
        self.seq += 1;
        let at = self.now + 5 + self.rng.below(60);
        self.queue.push(Reverse(InFlight {
            at,
            seq: self.seq,
            to,
            from,
            gossip,
            bytes,
        }));
    }

    fn input(&mut self, i: usize, input: Input) -> Vec<Output> {
        let now = self.local_now(i);
        let outs = self.nodes[i].handle(input, now);
        for o in &outs {
            match o {
                Output::Publish(bytes) => {
                    for j in 0..self.nodes.len() {
                        if j != i {
                            self.deliver_later(i, j, true, bytes.clone());
                        }
                    }
                }
                Output::Send { to, bytes } => {
                    let j = self.ids.iter().position(|p| p == to).expect("known peer");
                    self.deliver_later(i, j, false, bytes.clone());
                }
                Output::Refused { from, reason } => {
                    assert!(
                        !matches!(reason, Refusal::Malformed(_) | Refusal::Limit(_)),
                        "{} refused {from}: {reason:?}",
                        self.ids[i]
                    );
                }
                Output::Persist(_) | Output::Reply { .. } => {}
            }
        }
        outs
    }

    /// Advance simulated time by `ms`, delivering messages and ticking every 100 ms.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            let step_end = (self.now + 100).min(end);
            while let Some(Reverse(m)) = self.queue.peek() {
                if m.at > step_end {
                    break;
                }
                let Some(Reverse(m)) = self.queue.pop() else {
                    break;
                };
                self.now = self.now.max(m.at);
                if !self.reachable(m.from, m.to) {
                    self.lost += 1;
                    continue;
                }
                let from = self.ids[m.from].clone();
                let input = if m.gossip {
                    Input::Delta {
                        from,
                        bytes: m.bytes,
                    }
                } else {
                    Input::Reconcile {
                        from,
                        bytes: m.bytes,
                    }
                };
                self.input(m.to, input);
            }
            self.now = step_end;
            for i in 0..self.nodes.len() {
                self.input(i, Input::Tick);
            }
        }
    }

    fn random_write(&mut self, i: usize, keys: u64) {
        let key = format!("key/{:03}", self.rng.below(keys));
        let req = self.rng.next_u64();
        if self.rng.chance(25) {
            self.input(i, Input::Delete { req, key });
        } else {
            let value = self.rng.bytes(40);
            self.input(i, Input::Put { req, key, value });
        }
    }

    fn live(&self, i: usize) -> Vec<(String, Vec<u8>)> {
        self.nodes[i]
            .map()
            .iter()
            .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
            .collect()
    }

    fn converged(&self) -> bool {
        self.nodes.windows(2).all(|w| w[0].map() == w[1].map())
    }
}

fn sim_config() -> ReplicaConfig {
    ReplicaConfig {
        anti_entropy_interval_ms: 2_000,
        session_timeout_ms: 1_000,
        gc_interval_ms: 5_000,
        ..ReplicaConfig::default()
    }
}

/// Five replicas, 10 % message loss, a 2|3 partition with writes on both sides, heal: all
/// converge to one map. Returns the final map and the network's counters.
type Outcome = (Vec<(String, Vec<u8>)>, LwwMap, u64, Vec<Stats>);

fn partition_scenario(seed: u64) -> Outcome {
    let mut sim = Sim::new(seed, 5, sim_config());
    sim.loss_percent = 10;
    for _ in 0..100 {
        let i = sim.rng.below(5) as usize;
        sim.random_write(i, 60);
        sim.run(50);
    }
    sim.run(10_000);
    sim.side = vec![0, 0, 1, 1, 1];
    sim.partitioned = true;
    for _ in 0..300 {
        let i = sim.rng.below(5) as usize;
        sim.random_write(i, 80);
        sim.run(100);
    }
    assert!(
        !sim.converged(),
        "the two sides should differ during the partition"
    );
    sim.partitioned = false;
    let mut waited = 0;
    while !sim.converged() {
        sim.run(1_000);
        waited += 1;
        assert!(
            waited < 300,
            "no convergence 300 s after the heal (seed {seed})"
        );
    }
    eprintln!(
        "seed {seed}: converged {waited} s after the heal; {} messages, {} lost; {} live keys",
        sim.sent,
        sim.lost,
        sim.nodes[0].map().live_keys()
    );
    let stats: Vec<Stats> = sim.nodes.iter().map(Replica::stats).collect();
    for s in &stats {
        assert!(s.reconciliations > 0);
    }
    (sim.live(0), sim.nodes[0].map().clone(), sim.sent, stats)
}

#[test]
fn five_replicas_converge_after_a_partition_with_loss_deterministically() {
    let (live_a, map_a, sent_a, stats_a) = partition_scenario(11);
    let (live_b, map_b, sent_b, stats_b) = partition_scenario(11);
    assert_eq!(live_a, live_b);
    assert_eq!(map_a, map_b);
    assert_eq!(sent_a, sent_b);
    assert_eq!(stats_a, stats_b);
    let (_, map_c, _, _) = partition_scenario(12);
    assert_ne!(map_a, map_c, "another seed, another history");
}

/// A partition longer than the tombstone horizon: keys deleted on one side, and collected
/// there, must not come back from the other side when it heals; recent writes of both sides
/// survive.
#[test]
fn a_partition_longer_than_the_horizon_does_not_resurrect_deleted_keys() {
    let horizon = 60_000;
    let mut cfg = sim_config();
    cfg.limits.tombstone_horizon_ms = horizon;
    let mut sim = Sim::new(5, 5, cfg);
    for k in 0..20 {
        sim.input(
            k % 5,
            Input::Put {
                req: 0,
                key: format!("k{k:02}"),
                value: vec![k as u8],
            },
        );
    }
    sim.run(20_000);
    assert!(sim.converged());
    sim.side = vec![0, 0, 1, 1, 1];
    sim.partitioned = true;
    sim.run(1_000);
    for k in 0..5 {
        sim.input(
            2 + k % 3,
            Input::Delete {
                req: 0,
                key: format!("k{k:02}"),
            },
        );
    }
    sim.run(5 * horizon);
    // Side 1 collected the tombstones; side 0 still holds the old values.
    assert_eq!(sim.nodes[2].map().len(), 15);
    assert_eq!(sim.nodes[0].map().live_keys(), 20);
    let collected: u64 = sim.nodes[2..].iter().map(|n| n.stats().collected).sum();
    assert!(collected >= 15, "{collected}");
    // Recent writes on both sides.
    sim.input(
        0,
        Input::Put {
            req: 0,
            key: "recent-a".into(),
            value: vec![1],
        },
    );
    sim.input(
        3,
        Input::Put {
            req: 0,
            key: "recent-b".into(),
            value: vec![2],
        },
    );
    sim.run(5_000);
    sim.partitioned = false;
    let mut waited = 0;
    while !sim.converged() {
        sim.run(1_000);
        waited += 1;
        assert!(waited < 3 * horizon / 1000, "no convergence");
    }
    for i in 0..5 {
        let live: BTreeSet<String> = sim.live(i).into_iter().map(|(k, _)| k).collect();
        for k in 0..5 {
            assert!(
                !live.contains(&format!("k{k:02}")),
                "node {i} resurrected k{k:02}"
            );
        }
        for k in 5..20 {
            assert!(live.contains(&format!("k{k:02}")), "node {i} lost k{k:02}");
        }
        assert!(
            live.contains("recent-a") && live.contains("recent-b"),
            "node {i}: {live:?}"
        );
    }
    let full: u64 = sim.nodes.iter().map(|n| n.stats().full_exchanges).sum();
    let buried: u64 = sim.nodes.iter().map(|n| n.stats().buried).sum();
    eprintln!("healed in {waited} s: {full} full exchanges, {buried} buried");
    assert!(buried >= 5);
}

/// A new host appearing is reconciled with at once, not at the next period.
#[test]
fn a_new_peer_is_reconciled_at_once() {
    let mut a = Replica::new("a".into(), sim_config()).expect("config");
    put(&mut a, 1, "k", b"v", T0);
    let outs = a.handle(Input::Peers(peers(&["b"])), T0 + 1);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Send { to, .. } if to == "b")),
        "{outs:?}"
    );
    assert!(a.in_session());
}

/// Reconciliation messages beyond the per-peer rate are refused.
#[test]
fn a_chatty_peer_is_rate_limited() {
    let mut cfg = sim_config();
    cfg.max_messages_per_peer_per_s = 3;
    let mut a = Replica::new("a".into(), cfg).expect("config");
    a.handle(Input::Peers(peers(&["b"])), T0);
    let done = Message::Done { session: 1 }.encode();
    let mut refused = 0;
    for _ in 0..10 {
        let outs = a.handle(
            Input::Reconcile {
                from: "b".into(),
                bytes: done.clone(),
            },
            T0 + 5,
        );
        refused += outs
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Refused {
                        reason: Refusal::RateLimited,
                        ..
                    }
                )
            })
            .count();
    }
    assert_eq!(refused, 7);
}

/// The whole protocol between two replicas of 100,000 keys that differ in a handful of writes:
/// round trips and bytes (frames, records and envelopes) follow the differences.
#[test]
fn replica_reconciliation_traffic_follows_the_differences() {
    let mut cfg = sim_config();
    cfg.limits.max_keys = 200_000;
    cfg.limits.max_total_bytes = 1 << 30;
    let mut rng = Rng::new(3);
    let mut base = LwwMap::new(cfg.limits.clone());
    for i in 0..100_000u64 {
        let rec = Record {
            key: format!("key/{i:07}"),
            ts: Timestamp {
                physical: T0 - 1_000_000 + rng.below(1_000_000),
                logical: 0,
                node: rng.below(5),
            },
            value: Some(rng.bytes(24)),
        };
        base.merge(rec, T0).expect("merge");
    }
    let restored = |peer: &str| Restored {
        entries: base.iter().map(|(k, e)| (k.clone(), e.clone())).collect(),
        meta: Meta {
            clock: Timestamp::ZERO,
            watermark: 0,
            synced: [(peer.to_owned(), T0)].into(),
        },
    };
    let mut a = Replica::restore("a".into(), cfg.clone(), restored("b")).expect("a");
    let mut b = Replica::restore("b".into(), cfg, restored("a")).expect("b");
    b.handle(Input::Peers(peers(&["a"])), T0);
    b.handle(Input::Peers(peers(&["a"])), T0); // its own first session is not what we measure
    let mut record_bytes = 0;
    for i in 0..5u64 {
        let v = rng.bytes(24);
        record_bytes += v.len() + 40;
        put(
            &mut a,
            i,
            &format!("key/{:07}", rng.below(100_000)),
            &v,
            T0 + 10 + i,
        );
        put(&mut b, i, &format!("new/{i}"), &v, T0 + 10 + i);
    }
    // Drain b's own session towards a (answered by nobody), then let a start one.
    let mut to_b: Vec<Vec<u8>> = a
        .handle(Input::Peers(peers(&["b"])), T0 + 100)
        .into_iter()
        .filter_map(|o| match o {
            Output::Send { to, bytes } if to == "b" => Some(bytes),
            _ => None,
        })
        .collect();
    let (mut round_trips, mut bytes) = (0, 0);
    while !to_b.is_empty() {
        let mut to_a = Vec::new();
        for m in to_b.drain(..) {
            bytes += m.len();
            for o in b.handle(
                Input::Reconcile {
                    from: "a".into(),
                    bytes: m,
                },
                T0 + 200,
            ) {
                if let Output::Send { to, bytes } = o
                    && to == "a"
                {
                    to_a.push(bytes);
                }
            }
        }
        if to_a.is_empty() {
            break; // the initiator's Done
        }
        round_trips += 1;
        for m in to_a {
            bytes += m.len();
            for o in a.handle(
                Input::Reconcile {
                    from: "b".into(),
                    bytes: m,
                },
                T0 + 200,
            ) {
                if let Output::Send { to, bytes } = o
                    && to == "b"
                {
                    to_b.push(bytes);
                }
            }
        }
        assert!(round_trips < 20);
    }
    eprintln!(
        "100,000 keys, 10 writes apart: {round_trips} round trips, {bytes} bytes ({record_bytes} of records)"
    );
    assert_eq!(a.map(), b.map());
    assert_eq!(a.stats().full_exchanges, 0);
    assert!(round_trips <= 6, "{round_trips}");
    assert!(bytes <= 2048 + 3 * 1024 * 10 + record_bytes, "{bytes}");
}
