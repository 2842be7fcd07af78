//! The node's side of per-workload consistency (DESIGN.md section 5, docs/consistency.md):
//! the stores behind the state endpoints of the replicas this node runs.
//!
//! - `eventual` workloads: one task per workload owns its [`eventual::Replica`] (the CRDT
//!   map's state machine) and its [`Store`] (`<data_dir>/state/<ns>/<name>/`), and carries out
//!   what the replica asks in order: a batch to persist is committed (fsynced) before anything
//!   after it, so a write is durable before its HTTP answer and before its delta leaves;
//!   deltas go out on the workload's gossip topic, reconciliation messages to one peer on the
//!   workload's request protocol. The peers are the other hosts of the workload's replicas, as
//!   the workload's coordinator reports them; deltas and reconciliation messages from anyone
//!   else are refused.
//! - `strong` workloads: not served yet (their replicas' requests answer 503 saying so).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use beemesh_manifest::Manifest;
use beemesh_manifest::workload::ConsistencyMode;
use beemesh_mesh::{MeshHandle, PeerId};
use beemesh_state::eventual::store::{Store, workload_dir};
use beemesh_state::eventual::{self, Input, Output, ReplicaConfig, Reply};
use beemesh_state::kv::{Item, Kv, KvError, Page, Written};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::{SchedulerMetrics, StateMetrics};
use crate::replica_api::Backends;

/// Commands queued for one workload's task.
const QUEUE: usize = 1024;
/// How long a local request waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Unix milliseconds: the hybrid logical clocks' physical time.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

type Key = (String, String);

enum Cmd {
    Local {
        input: Input,
        reply: oneshot::Sender<Result<Reply, KvError>>,
    },
    Delta {
        from: String,
        bytes: Vec<u8>,
        verdict: oneshot::Sender<bool>,
    },
    Reconcile {
        from: String,
        bytes: Vec<u8>,
    },
    Peers(BTreeSet<String>),
}

/// One `eventual` workload's store on this node: a handle to its task.
pub struct EventualStore {
    tx: mpsc::Sender<Cmd>,
    stop: CancellationToken,
    next_req: std::sync::atomic::AtomicU64,
}

impl EventualStore {
    async fn ask(&self, make: impl FnOnce(u64) -> Input) -> Result<Reply, KvError> {
        let req = self
            .next_req
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Local {
                input: make(req),
                reply,
            })
            .await
            .map_err(|_| KvError::Unavailable {
                reason: "the workload's store stopped".into(),
            })?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(KvError::Unavailable {
                reason: "the workload's store stopped".into(),
            }),
            Err(_) => Err(KvError::Unavailable {
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            }),
        }
    }
}

/// An eventual write's revision: its timestamp's physical milliseconds and logical counter,
/// so that later writes of a key have greater revisions.
fn revision(ts: &beemesh_state::hlc::Timestamp) -> u64 {
    ts.physical
        .saturating_mul(1 << 16)
        .saturating_add(u64::from(ts.logical.min(u32::from(u16::MAX))))
}

#[async_trait]
impl Kv for EventualStore {
    fn mode(&self) -> &'static str {
        "eventual"
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, KvError> {
        let key_owned = key.to_owned();
        match self
            .ask(|req| Input::Get {
                req,
                key: key_owned,
            })
            .await?
        {
            Reply::Value(v) => Ok(v.map(|(value, ts)| Item {
                key: key.to_owned(),
                value,
                revision: revision(&ts),
            })),
            other => Err(KvError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        if_revision: Option<u64>,
    ) -> Result<Written, KvError> {
        if if_revision.is_some() {
            return Err(KvError::Unsupported { mode: "eventual" });
        }
        let key = key.to_owned();
        match self.ask(|req| Input::Put { req, key, value }).await? {
            Reply::Written { ts, .. } => Ok(Written {
                revision: revision(&ts),
            }),
            other => Err(KvError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn delete(&self, key: &str, if_revision: Option<u64>) -> Result<Written, KvError> {
        if if_revision.is_some() {
            return Err(KvError::Unsupported { mode: "eventual" });
        }
        let key = key.to_owned();
        match self.ask(|req| Input::Delete { req, key }).await? {
            Reply::Written { ts, .. } => Ok(Written {
                revision: revision(&ts),
            }),
            other => Err(KvError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, KvError> {
        let (prefix, after) = (prefix.to_owned(), after.map(str::to_owned));
        match self
            .ask(|req| Input::List {
                req,
                prefix,
                after,
                limit,
            })
            .await?
        {
            Reply::Page(p) => Ok(Page {
                items: p
                    .items
                    .into_iter()
                    .map(|i| Item {
                        key: i.key,
                        value: i.value,
                        revision: revision(&i.ts),
                    })
                    .collect(),
                next: p.next,
            }),
            other => Err(KvError::Internal(format!("unexpected answer {other:?}"))),
        }
    }
}

/// The stores of the workloads whose replicas run on this node.
pub struct Consistency {
    local: String,
    data_dir: PathBuf,
    mesh: MeshHandle,
    metrics: SchedulerMetrics,
    state_metrics: StateMetrics,
    eventual: Mutex<BTreeMap<Key, Arc<EventualStore>>>,
    shutdown: CancellationToken,
}

impl Consistency {
    pub fn new(
        local: String,
        data_dir: PathBuf,
        mesh: MeshHandle,
        metrics: SchedulerMetrics,
        state_metrics: StateMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            local,
            data_dir,
            mesh,
            metrics,
            state_metrics,
            eventual: Mutex::new(BTreeMap::new()),
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Arc<EventualStore>>> {
        self.eventual.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the store of `manifest`'s workload on this node (once), because one of its
    /// replicas runs here.
    pub async fn ensure(&self, manifest: &Manifest) -> Result<(), String> {
        if manifest.consistency.mode != ConsistencyMode::Eventual {
            return Ok(());
        }
        let key = (manifest.namespace.clone(), manifest.name.clone());
        if self.lock().contains_key(&key) {
            return Ok(());
        }
        let dir = workload_dir(&self.data_dir, &key.0, &key.1);
        let store = tokio::task::spawn_blocking(move || {
            Store::open(&dir).and_then(|s| {
                let restored = s.load()?;
                Ok((s, restored))
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the store of {}/{}: {e}", key.0, key.1))?;
        let (store, restored) = store;
        let replica =
            eventual::Replica::restore(self.local.clone(), ReplicaConfig::default(), restored)
                .map_err(|e| format!("the store of {}/{}: {e}", key.0, key.1))?;
        let topic = eventual::delta_topic(&key.0, &key.1);
        self.mesh
            .subscribe(&topic)
            .await
            .map_err(|e| format!("subscribing to {topic}: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = self.shutdown.child_token();
        let handle = Arc::new(EventualStore {
            tx,
            stop: stop.clone(),
            next_req: std::sync::atomic::AtomicU64::new(1),
        });
        tokio::spawn(run_eventual(
            replica,
            Arc::new(store),
            rx,
            Wiring {
                mesh: self.mesh.clone(),
                metrics: self.metrics.clone(),
                state_metrics: self.state_metrics.clone(),
            },
            key.clone(),
            stop,
        ));
        self.lock().insert(key, handle);
        Ok(())
    }

    /// Stops the stores of workloads not in `wanted` (their data stays on disk: a replica
    /// coming back finds it, and deleting the workload removes it). Returns those stopped.
    pub async fn retain(&self, wanted: &BTreeSet<Key>) -> Vec<Key> {
        let gone: Vec<(Key, Arc<EventualStore>)> = {
            let mut map = self.lock();
            let keys: Vec<Key> = map
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| map.remove(&k).map(|s| (k, s)))
                .collect()
        };
        let mut stopped = Vec::with_capacity(gone.len());
        for ((ns, name), s) in gone {
            s.stop.cancel();
            let topic = eventual::delta_topic(&ns, &name);
            if let Err(e) = self.mesh.unsubscribe(&topic).await {
                tracing::debug!("unsubscribing from {topic}: {e}");
            }
            stopped.push((ns, name));
        }
        stopped
    }

    /// Removes the data of a deleted workload (after its replicas stopped).
    pub async fn remove_data(&self, namespace: &str, name: &str) {
        let dir = workload_dir(&self.data_dir, namespace, name);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing the state of {namespace}/{name}: {e}");
        }
    }

    /// The other hosts of a workload's replicas (from its coordinator's placements).
    pub async fn set_peers(&self, namespace: &str, name: &str, peers: BTreeSet<String>) {
        let store = self
            .lock()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned();
        if let Some(s) = store {
            let _ = s.tx.send(Cmd::Peers(peers)).await;
        }
    }

    /// Workloads whose stores run here.
    pub fn running(&self) -> Vec<Key> {
        self.lock().keys().cloned().collect()
    }

    /// A delta from the workload's topic; true when it was accepted (forward it).
    pub async fn delta(&self, topic: &str, from: &PeerId, bytes: Vec<u8>) -> bool {
        let Some((ns, name)) = eventual::delta_workload(topic) else {
            return false;
        };
        let Some(s) = self.lock().get(&(ns.to_owned(), name.to_owned())).cloned() else {
            return false;
        };
        let (verdict, rx) = oneshot::channel();
        let cmd = Cmd::Delta {
            from: from.to_base58(),
            bytes,
            verdict,
        };
        if s.tx.try_send(cmd).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// A reconciliation message on a workload's protocol; `Err` when no store of it runs here.
    pub fn reconcile(&self, protocol: &str, from: &PeerId, bytes: Vec<u8>) -> Result<(), String> {
        let (ns, name) = eventual::reconcile_workload(protocol)
            .ok_or_else(|| format!("{protocol:?} names no workload"))?;
        let s = self
            .lock()
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| format!("no store of {ns}/{name} runs on this node"))?;
        s.tx.try_send(Cmd::Reconcile {
            from: from.to_base58(),
            bytes,
        })
        .map_err(|_| format!("the store of {ns}/{name} is busy"))
    }
}

impl Backends for Consistency {
    fn kv(&self, namespace: &str, name: &str) -> Result<Arc<dyn Kv>, KvError> {
        match self.lock().get(&(namespace.to_owned(), name.to_owned())) {
            Some(s) => Ok(s.clone()),
            None => Err(KvError::Unavailable {
                reason: format!(
                    "no store of {namespace}/{name} runs on this node (strong consistency is not served yet)"
                ),
            }),
        }
    }
}

/// What a store's task reaches outside itself.
struct Wiring {
    mesh: MeshHandle,
    metrics: SchedulerMetrics,
    state_metrics: StateMetrics,
}

/// The task of one eventual workload: the replica's state machine and its store.
async fn run_eventual(
    mut replica: eventual::Replica,
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Cmd>,
    wiring: Wiring,
    (ns, name): Key,
    stop: CancellationToken,
) {
    let Wiring {
        mesh,
        metrics,
        state_metrics,
    } = wiring;
    let label = format!("{ns}/{name}");
    let mut last_stats = beemesh_state::eventual::Stats::default();
    let topic = eventual::delta_topic(&ns, &name);
    let protocol = eventual::reconcile_protocol(&ns, &name);
    let mut waiting: BTreeMap<u64, oneshot::Sender<Result<Reply, KvError>>> = BTreeMap::new();
    loop {
        let wait = Duration::from_millis(replica.next_deadline().saturating_sub(now_ms()));
        let mut verdict: Option<(String, oneshot::Sender<bool>)> = None;
        let outputs = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => replica.handle(Input::Tick, now_ms()),
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Local { input, reply }) => {
                    if let Some(req) = request_of(&input) {
                        waiting.insert(req, reply);
                    }
                    replica.handle(input, now_ms())
                }
                Some(Cmd::Delta { from, bytes, verdict: v }) => {
                    verdict = Some((from.clone(), v));
                    replica.handle(Input::Delta { from, bytes }, now_ms())
                }
                Some(Cmd::Reconcile { from, bytes }) => {
                    replica.handle(Input::Reconcile { from, bytes }, now_ms())
                }
                Some(Cmd::Peers(peers)) => replica.handle(Input::Peers(peers), now_ms()),
            },
        };
        let mut refused_sender = false;
        for out in outputs {
            match out {
                Output::Persist(batch) => {
                    let s = store.clone();
                    let committed = tokio::task::spawn_blocking(move || s.commit(&[batch])).await;
                    match committed {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            // Nothing after an unpersisted batch may happen: fail what waits.
                            tracing::error!("the store of {ns}/{name}: {e}");
                            for (_, w) in std::mem::take(&mut waiting) {
                                let _ = w.send(Err(KvError::Internal(format!("storage: {e}"))));
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::error!("the store of {ns}/{name}: {e}");
                            break;
                        }
                    }
                }
                Output::Publish(bytes) => {
                    if let Err(e) = mesh.publish(&topic, bytes).await {
                        tracing::debug!("publishing on {topic}: {e}");
                    }
                }
                Output::Send { to, bytes } => match to.parse::<PeerId>() {
                    Ok(peer) => {
                        let (mesh, protocol) = (mesh.clone(), protocol.clone());
                        tokio::spawn(async move {
                            if let Err(e) = mesh.request(peer, &protocol, bytes).await {
                                tracing::debug!(%peer, "reconciliation message not delivered: {e}");
                            }
                        });
                    }
                    Err(_) => tracing::warn!("reconciliation with {to:?}: not a peer id"),
                },
                Output::Reply { req, result } => {
                    if let Some(w) = waiting.remove(&req) {
                        let _ = w.send(result.map_err(KvError::from));
                    }
                }
                Output::Refused { from, reason } => {
                    if verdict.as_ref().is_some_and(|(f, _)| *f == from) {
                        refused_sender = true;
                    }
                    metrics.refused(&from, "state", refusal_label(&reason));
                }
            }
        }
        if let Some((_, v)) = verdict {
            let _ = v.send(!refused_sender);
        }
        let stats = replica.stats();
        state_metrics.observe(&label, &stats, &last_stats);
        last_stats = stats;
    }
}

fn request_of(input: &Input) -> Option<u64> {
    match input {
        Input::Put { req, .. }
        | Input::Delete { req, .. }
        | Input::Get { req, .. }
        | Input::List { req, .. } => Some(*req),
        _ => None,
    }
}

fn refusal_label(r: &eventual::Refusal) -> &'static str {
    match r {
        eventual::Refusal::NotPeer => "not_peer",
        eventual::Refusal::RateLimited => "rate_limited",
        eventual::Refusal::Malformed(_) => "malformed",
        eventual::Refusal::Drift(_) => "clock_drift",
        eventual::Refusal::Limit(_) => "limit",
    }
}
