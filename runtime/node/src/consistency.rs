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
use beemesh_state::raft::{self, GroupId, Groups, RaftTransport, Role, TransportError};
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

/// Raft over the mesh: each request on `/beemesh/raft/1` to the target peer.
#[derive(Clone)]
pub struct MeshRaft {
    pub mesh: MeshHandle,
}

impl RaftTransport for MeshRaft {
    fn call(
        &self,
        target: &str,
        request: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, TransportError>> + Send {
        let mesh = self.mesh.clone();
        let target = target.to_owned();
        async move {
            let peer: PeerId = target.parse().map_err(|_| TransportError::Unreachable {
                peer: target.clone(),
                reason: "not a peer id".into(),
            })?;
            mesh.request(peer, raft::PROTOCOL, request)
                .await
                .map_err(|e| match e {
                    // Certainly not sent.
                    beemesh_mesh::MeshError::NotAdmitted { .. }
                    | beemesh_mesh::MeshError::BadName { .. }
                    | beemesh_mesh::MeshError::TooLarge { .. }
                    | beemesh_mesh::MeshError::Stopped => TransportError::Unreachable {
                        peer: target.clone(),
                        reason: e.to_string(),
                    },
                    other => TransportError::Failed {
                        peer: target.clone(),
                        reason: other.to_string(),
                    },
                })
        }
    }
}

/// How long a new voter may take to catch up before a membership step gives up.
const CATCH_UP: Duration = Duration::from_secs(60);

/// A strong workload on this node.
#[derive(Default)]
struct Strong {}

/// A strong workload's store, as one of its replicas sees it: the workload's Raft group.
pub struct StrongKv {
    groups: Groups<MeshRaft>,
    group: GroupId,
}

fn raft_error(e: raft::Error) -> KvError {
    use raft::Error as E;
    match e {
        E::PreconditionFailed {
            key,
            expected,
            current,
            ..
        } => KvError::Precondition {
            key,
            expected,
            actual: Some(current),
        },
        E::InvalidKey { key, reason } => KvError::InvalidKey { key, reason },
        E::ValueTooLarge { len, max, .. } => KvError::TooLarge {
            what: "the value",
            size: len,
            limit: max,
        },
        e @ E::StateFull { .. } => KvError::Full {
            reason: e.to_string(),
        },
        e @ (E::NoLeader { .. }
        | E::Unavailable { .. }
        | E::Timeout { .. }
        | E::OutcomeUnknown { .. }
        | E::Busy { .. }
        | E::WritesWaiting { .. }
        | E::UnknownGroup { .. }
        | E::Stopped { .. }
        | E::Transport { .. }) => KvError::Unavailable {
            reason: e.to_string(),
        },
        other => KvError::Internal(other.to_string()),
    }
}

#[async_trait]
impl Kv for StrongKv {
    fn mode(&self) -> &'static str {
        "strong"
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, KvError> {
        let v = self
            .groups
            .get(&self.group, key)
            .await
            .map_err(raft_error)?;
        Ok(v.map(|v| Item {
            key: key.to_owned(),
            value: v.value,
            revision: v.revision,
        }))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        if_revision: Option<u64>,
    ) -> Result<Written, KvError> {
        let revision = self
            .groups
            .put(&self.group, key, value, if_revision)
            .await
            .map_err(raft_error)?;
        Ok(Written { revision })
    }

    async fn delete(&self, key: &str, if_revision: Option<u64>) -> Result<Written, KvError> {
        match self.groups.delete(&self.group, key, if_revision).await {
            Ok(revision) => Ok(Written { revision }),
            // Deleting what is absent is fine (unless a revision was expected).
            Err(raft::Error::KeyNotFound { .. }) if matches!(if_revision, None | Some(0)) => {
                Ok(Written { revision: 0 })
            }
            // Absent, while a revision was expected: the precondition does not hold.
            Err(raft::Error::KeyNotFound { .. }) => Err(KvError::Precondition {
                key: key.to_owned(),
                expected: if_revision.unwrap_or(0),
                actual: None,
            }),
            Err(e) => Err(raft_error(e)),
        }
    }

    async fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, KvError> {
        let page = self
            .groups
            .list(
                &self.group,
                prefix,
                raft::Page {
                    after: after.map(str::to_owned),
                    limit,
                },
            )
            .await
            .map_err(raft_error)?;
        Ok(Page {
            items: page
                .items
                .into_iter()
                .map(|i| Item {
                    key: i.key,
                    value: i.value,
                    revision: i.revision,
                })
                .collect(),
            next: page.next,
        })
    }
}

/// The hosts of each strong workload this node takes part in, as this node's own view of the
/// coordinator's placements (and the first voters it was told) names them: only they, and
/// the group's members, are heard on the workload's group.
#[derive(Default)]
struct StrongHosts(Mutex<BTreeMap<Key, BTreeSet<String>>>);

impl StrongHosts {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, BTreeSet<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl raft::Participants for StrongHosts {
    fn may_participate(&self, group: &GroupId, peer: &str) -> bool {
        self.lock()
            .get(&(group.namespace.clone(), group.name.clone()))
            .is_some_and(|h| h.contains(peer))
    }
}

/// Where a node asks a host of a strong workload for its group's state (for operators).
pub const GROUP_STATUS: &str = "/beemesh/group-status/1";

/// The largest group-status request served (a namespace and a name).
const MAX_GROUP_STATUS_REQUEST: usize = 1024;

/// A strong workload's group as one of its hosts sees it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupView {
    /// The host that answered (peer id).
    pub node: String,
    pub leader: Option<String>,
    pub term: u64,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub commit_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Set when a majority of the voters are gone from the mesh (as this host sees it):
    /// "quorum lost: 2 of 3 voters gone".
    pub quorum_lost: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct GroupStatusRequest {
    namespace: String,
    name: String,
}

/// The request asking a host for a group's state.
pub fn group_status_request(namespace: &str, name: &str) -> Vec<u8> {
    serde_json::to_vec(&GroupStatusRequest {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
    .unwrap_or_default()
}

/// One step of moving a group's voters to `target`, as its leader `local` sees the group:
/// every target host, once it joined as a learner, becomes a voter (when caught up); only
/// when all are voters are the voters outside the target removed, this node last (a leader
/// leaving steps down once its removal is committed).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A host that has not joined by itself after [`JOIN_TICKS`] ticks is added by the
    /// leader (a host that was removed while it was cut off still believes it is a voter and
    /// does not ask).
    AddLearner(String),
    Promote(String),
    Remove(String),
    /// A host is not in the group yet: wait for it to ask.
    Wait(String),
}

/// Ticks (2 s each) a leader waits for a new host to join before adding it itself.
const JOIN_TICKS: u32 = 3;

fn next_step(
    local: &str,
    voters: &[String],
    learners: &[String],
    target: &BTreeSet<String>,
) -> Option<Step> {
    if let Some(h) = target
        .iter()
        .find(|h| !voters.contains(h) && learners.contains(h))
    {
        return Some(Step::Promote(h.clone()));
    }
    if let Some(h) = target.iter().find(|h| !voters.contains(h)) {
        // A new host joins by itself (it asks the leader, and so learns who the leader is
        // before the log reaches it); nothing is removed meanwhile.
        return Some(Step::Wait(h.clone()));
    }
    if let Some(v) = voters.iter().find(|v| !target.contains(*v) && *v != local) {
        return Some(Step::Remove(v.clone()));
    }
    (voters.iter().any(|v| v == local) && !target.contains(local))
        .then(|| Step::Remove(local.to_owned()))
}

/// The Raft settings of host.toml's `[consistency]` section (validated with the host config;
/// the rest keep their defaults).
pub fn raft_config(c: &beemesh_manifest::host::ConsistencySection) -> raft::RaftConfig {
    raft::RaftConfig {
        heartbeat_ms: c.heartbeat.as_millis(),
        election_timeout_min_ms: c.election_timeout_min.as_millis(),
        election_timeout_max_ms: c.election_timeout_max.as_millis(),
        request_timeout_ms: c.request_timeout.as_millis(),
        install_snapshot_timeout_ms: (2 * c.heartbeat.as_millis()).max(10_000),
        ..raft::RaftConfig::default()
    }
}

/// The eventual stores under `data_dir/state/<namespace>/<name>` (a bounded scan: at most
/// [`MAX_STORES_SCANNED`] directories).
fn stores_on_disk(data_dir: &std::path::Path) -> Vec<Key> {
    let names = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .take(MAX_STORES_SCANNED)
                    .collect()
            })
            .unwrap_or_default()
    };
    let root = data_dir.join("state");
    let mut out = Vec::new();
    for ns in names(&root) {
        for name in names(&root.join(&ns)) {
            if out.len() >= MAX_STORES_SCANNED {
                return out;
            }
            out.push((ns.clone(), name));
        }
    }
    out
}

/// Most store directories one scan looks at.
const MAX_STORES_SCANNED: usize = 4096;

/// The stores of the workloads whose replicas run on this node.
pub struct Consistency {
    hosts: Arc<StrongHosts>,
    local: String,
    data_dir: PathBuf,
    mesh: MeshHandle,
    metrics: SchedulerMetrics,
    state_metrics: StateMetrics,
    eventual: Mutex<BTreeMap<Key, Arc<EventualStore>>>,
    groups: Groups<MeshRaft>,
    strong: Mutex<BTreeMap<Key, Strong>>,
    /// First voters named by the coordinator, until the group is formed here.
    bootstraps: Mutex<BTreeMap<Key, Vec<String>>>,
    /// Strong workloads this node no longer hosts: their group is removed here once the
    /// leader has taken this node out of its voters.
    leaving: Mutex<BTreeSet<Key>>,
    /// Ticks each group's leader has waited for a new host to join.
    waits: Mutex<BTreeMap<Key, u32>>,
    /// Groups whose voters this node (their leader) is moving: one step at a time.
    moving: Arc<Mutex<BTreeSet<Key>>>,
    /// The leader each group had when last observed (for the leader-change counter).
    leaders: Mutex<BTreeMap<Key, Option<String>>>,
    shutdown: CancellationToken,
}

impl Consistency {
    /// Opens this node's Raft groups (those it hosted before a restart come back).
    pub async fn open(
        config: raft::RaftConfig,
        local: String,
        data_dir: PathBuf,
        mesh: MeshHandle,
        metrics: SchedulerMetrics,
        state_metrics: StateMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let groups = Groups::open(&local, &data_dir, config, MeshRaft { mesh: mesh.clone() })
            .await
            .map_err(|e| format!("the Raft groups under {}: {e}", data_dir.display()))?;
        let hosts = Arc::new(StrongHosts::default());
        groups.set_participants(hosts.clone());
        for (g, e) in groups.open_failures() {
            tracing::error!(
                "the Raft group of {}/{} did not open: {e}",
                g.namespace,
                g.name
            );
        }
        Ok(Self {
            hosts,
            local,
            data_dir,
            mesh,
            metrics,
            state_metrics,
            eventual: Mutex::new(BTreeMap::new()),
            groups,
            strong: Mutex::new(BTreeMap::new()),
            bootstraps: Mutex::new(BTreeMap::new()),
            leaving: Mutex::new(BTreeSet::new()),
            leaders: Mutex::new(BTreeMap::new()),
            moving: Arc::new(Mutex::new(BTreeSet::new())),
            waits: Mutex::new(BTreeMap::new()),
            shutdown,
        })
    }

    /// The Raft groups of this node (for `/beemesh/raft/1` and status).
    pub fn groups(&self) -> &Groups<MeshRaft> {
        &self.groups
    }

    /// The workload's group as this node sees it, if this node has it. `live`: the peers the
    /// mesh currently sees (besides this node).
    pub async fn group_view(
        &self,
        namespace: &str,
        name: &str,
        live: &BTreeSet<String>,
    ) -> Option<GroupView> {
        let g = GroupId::new(namespace, name).ok()?;
        if !self.has_group(&g) {
            return None;
        }
        let s = self.groups.status(&g).await.ok()?;
        if s.voters.is_empty() {
            // Joining: it knows nothing of the group yet; a member answers instead.
            return None;
        }
        // (A leader cut off from its followers goes on believing it leads: the mesh's view
        // of who is gone decides.)
        let quorum_lost = self
            .groups
            .quorum_check(&g, |p| p != self.local && !live.contains(p))
            .await
            .ok()
            .flatten()
            .map(|q| q.to_string());
        Some(GroupView {
            node: self.local.clone(),
            leader: s.leader,
            term: s.term,
            voters: s.voters,
            learners: s.learners,
            commit_index: s.commit_index,
            last_applied: s.last_applied,
            quorum_lost,
        })
    }

    /// Brings the Raft metrics of the groups on this node up to date.
    pub async fn observe_groups(&self) {
        let keys: Vec<Key> = self.strong_running();
        for (ns, name) in keys {
            let Ok(g) = GroupId::new(&ns, &name) else {
                continue;
            };
            let Ok(s) = self.groups.status(&g).await else {
                continue;
            };
            let workload = format!("{ns}/{name}");
            let l = crate::metrics::WorkloadLabels {
                workload: workload.clone(),
            };
            let m = &self.state_metrics;
            let set = |f: &prometheus_client::metrics::family::Family<
                crate::metrics::WorkloadLabels,
                prometheus_client::metrics::gauge::Gauge,
            >,
                       v: u64| {
                f.get_or_create(&l)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set(&m.raft_commit_index, s.commit_index.unwrap_or(0));
            set(&m.raft_term, s.term);
            set(&m.raft_is_leader, u64::from(s.role == Role::Leader));
            set(&m.raft_voters, s.voters.len() as u64);
            set(
                &m.raft_apply_lag,
                s.commit_index
                    .unwrap_or(0)
                    .saturating_sub(s.last_applied.unwrap_or(0)),
            );
            let changed = {
                let mut last = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
                let before = last.insert((ns, name), s.leader.clone());
                matches!(before, Some(b) if b != s.leader) && s.leader.is_some()
            };
            if changed {
                m.raft_leader_changes.get_or_create(&l).inc();
            }
        }
    }

    /// Answers a peer's [`GROUP_STATUS`] request.
    pub async fn serve_group_status(
        &self,
        data: &[u8],
        live: &BTreeSet<String>,
    ) -> Result<Vec<u8>, String> {
        if data.len() > MAX_GROUP_STATUS_REQUEST {
            return Err(format!(
                "the request is {} bytes; at most {MAX_GROUP_STATUS_REQUEST}",
                data.len()
            ));
        }
        let req: GroupStatusRequest =
            serde_json::from_slice(data).map_err(|e| format!("malformed request: {e}"))?;
        let view = self
            .group_view(&req.namespace, &req.name, live)
            .await
            .ok_or_else(|| format!("no group of {}/{} on this node", req.namespace, req.name))?;
        serde_json::to_vec(&view).map_err(|e| e.to_string())
    }

    /// The coordinator named this node among the first voters of a strong workload's group.
    pub fn bootstrap(&self, namespace: &str, name: &str, voters: Vec<String>) {
        self.hosts
            .lock()
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .extend(voters.iter().cloned());
        self.bootstraps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((namespace.to_owned(), name.to_owned()), voters);
    }

    fn strong_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Strong>> {
        self.strong.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_group(&self, g: &GroupId) -> bool {
        self.groups.list_groups().contains(g)
    }

    /// Whether a replica of `namespace/name` on this node may count as running: always for
    /// eventual workloads; for strong ones once this node is a voter of the group (a learner
    /// is promoted only after it caught up).
    pub async fn ready(&self, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        if !self.strong_lock().contains_key(&key) {
            return true;
        }
        let Ok(g) = GroupId::new(namespace, name) else {
            return false;
        };
        // A voter that hears a leader: a node removed while it was down still lists itself
        // among the voters it remembers, but no leader speaks to it.
        self.groups
            .status(&g)
            .await
            .is_ok_and(|s| s.voters.contains(&self.local) && s.leader.is_some())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Arc<EventualStore>>> {
        self.eventual.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the store of `manifest`'s workload on this node (once), because one of its
    /// replicas runs here.
    pub async fn ensure(&self, manifest: &Manifest) -> Result<(), String> {
        if manifest.consistency.mode == ConsistencyMode::Strong {
            return self.ensure_strong(manifest).await;
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

    async fn ensure_strong(&self, manifest: &Manifest) -> Result<(), String> {
        let key = (manifest.namespace.clone(), manifest.name.clone());
        if self.strong_lock().contains_key(&key) {
            return Ok(());
        }
        let g = GroupId::new(&key.0, &key.1).map_err(|e| e.to_string())?;
        let first = self
            .bootstraps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(voters) = first
            && !self.has_group(&g)
        {
            self.groups
                .create(&g, &voters)
                .await
                .map_err(|e| format!("forming the Raft group of {}/{}: {e}", key.0, key.1))?;
            tracing::info!(workload = %format!("{}/{}", key.0, key.1), ?voters, "formed the Raft group");
        }
        // Otherwise the group exists here already (a restart), or this node joins it as a
        // learner once it knows the other hosts ([`Self::strong_placements`]).
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.strong_lock().insert(key, Strong::default());
        Ok(())
    }

    /// Stops the stores of workloads not in `wanted` (their data stays on disk: a replica
    /// coming back finds it, and deleting the workload removes it). Returns those stopped.
    pub async fn retain(&self, wanted: &BTreeSet<Key>) -> Vec<Key> {
        let left: Vec<Key> = {
            let mut strong = self.strong_lock();
            let keys: Vec<Key> = strong
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            for k in &keys {
                strong.remove(k);
            }
            keys
        };
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(left.iter().cloned());
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
        // Groups and stores on disk from before a restart, of workloads none of whose
        // replicas runs here now: a group is left like any other (removed once this node is
        // no longer a voter, or when the workload is deleted); a store only when deleted
        // (the caller removes the data of deleted workloads among those returned).
        let hosted: BTreeSet<Key> = self.strong_lock().keys().cloned().collect();
        let mut orphans: Vec<Key> = self
            .groups
            .list_groups()
            .into_iter()
            .map(|g| (g.namespace, g.name))
            .filter(|k| !wanted.contains(k) && !hosted.contains(k) && !left.contains(k))
            .collect();
        {
            let mut leaving = self.leaving.lock().unwrap_or_else(|p| p.into_inner());
            leaving.extend(orphans.iter().cloned());
        }
        let running: BTreeSet<Key> = self.lock().keys().cloned().collect();
        orphans.extend(
            stores_on_disk(&self.data_dir)
                .into_iter()
                .filter(|k| !wanted.contains(k) && !running.contains(k)),
        );
        let mut stopped = Vec::with_capacity(gone.len() + orphans.len());
        stopped.extend(orphans);
        for ((ns, name), s) in gone {
            s.stop.cancel();
            let topic = eventual::delta_topic(&ns, &name);
            if let Err(e) = self.mesh.unsubscribe(&topic).await {
                tracing::debug!("unsubscribing from {topic}: {e}");
            }
            stopped.push((ns, name));
        }
        stopped.extend(left);
        stopped
    }

    /// Removes the data of a deleted workload (after its replicas stopped).
    pub async fn remove_data(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.hosts.lock().remove(&key);
        self.leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.state_metrics
            .forget_group(&format!("{namespace}/{name}"));
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Ok(g) = GroupId::new(namespace, name)
            && self.has_group(&g)
            && let Err(e) = self.groups.delete_group(&g).await
        {
            tracing::warn!("removing the Raft group of {namespace}/{name}: {e}");
        }
        let dir = workload_dir(&self.data_dir, namespace, name);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing the state of {namespace}/{name}: {e}");
        }
    }

    /// Strong workloads hosted here, and those this node is leaving.
    pub fn strong_running(&self) -> Vec<Key> {
        let mut v: Vec<Key> = self.strong_lock().keys().cloned().collect();
        v.extend(
            self.leaving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        v
    }

    /// A strong workload's placements as its coordinator reports them (`complete`: every
    /// replica placed, on distinct hosts): joins the group if this node is a new host, takes
    /// one step of moving the group's voters to the hosts if this node leads it (every tick
    /// recomputes the next step from the placements of that moment, so a move never follows
    /// a stale picture), and removes the group here once this node left it.
    pub async fn strong_placements(
        &self,
        namespace: &str,
        name: &str,
        hosts: BTreeSet<String>,
        placed_on: BTreeSet<String>,
        complete: bool,
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        self.hosts
            .lock()
            .insert(key.clone(), placed_on.union(&hosts).cloned().collect());
        let Ok(g) = GroupId::new(namespace, name) else {
            return;
        };
        let leaving = self
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        let hosted = self.strong_lock().contains_key(&key);
        if !leaving && !hosted {
            return;
        }
        // Not in the group as far as this node knows: (again) ask to join, which also tells
        // this node who leads (a first attempt may have opened the group and then failed).
        let knows_itself =
            match self.has_group(&g) {
                false => false,
                true => self.groups.status(&g).await.is_ok_and(|s| {
                    s.voters.contains(&self.local) || s.learners.contains(&self.local)
                }),
            };
        if !knows_itself {
            if !leaving {
                self.join(&g, namespace, name, &hosts).await;
                return;
            }
            if !self.has_group(&g) {
                return;
            }
        }
        let Ok(status) = self.groups.status(&g).await else {
            return;
        };
        let member = status.voters.contains(&self.local) || status.learners.contains(&self.local);
        if leaving && !member && !hosts.contains(&self.local) {
            // Gone from the group: nothing of it is needed here any more.
            self.remove_data(namespace, name).await;
            return;
        }
        if status.role != Role::Leader || !complete {
            return;
        }
        let Some(mut step) = next_step(&self.local, &status.voters, &status.learners, &hosts)
        else {
            return;
        };
        if let Step::Wait(host) = &step {
            let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
            let n = waits.entry(key.clone()).or_insert(0);
            *n += 1;
            if *n < JOIN_TICKS {
                return;
            }
            *n = 0;
            step = Step::AddLearner(host.clone());
        } else {
            self.waits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        if !self
            .moving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return; // the previous step is still under way
        }
        let groups = self.groups.clone();
        let moving = self.moving.clone();
        let workload = format!("{namespace}/{name}");
        tokio::spawn(async move {
            tracing::info!(%workload, voters = ?status.voters, ?step, "moving the Raft group's voters");
            let done = match &step {
                Step::AddLearner(p) => groups.add_learner(&g, p).await,
                Step::Promote(p) => groups.promote(&g, p, CATCH_UP).await,
                Step::Remove(p) => groups.remove_voter(&g, p).await,
                Step::Wait(_) => Ok(()),
            };
            if let Err(e) = done {
                tracing::warn!(%workload, ?step, "moving the Raft group's voters: {e}");
            }
            moving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// Asks the group's leader, through the other hosts, to add this node as a learner.
    async fn join(&self, g: &GroupId, namespace: &str, name: &str, hosts: &BTreeSet<String>) {
        let contacts: Vec<String> = hosts
            .iter()
            .filter(|h| **h != self.local)
            .cloned()
            .collect();
        if contacts.is_empty() {
            return;
        }
        match self.groups.join_as_learner(g, &contacts).await {
            Ok(()) => {
                tracing::info!(workload = %format!("{namespace}/{name}"), "joined the Raft group as a learner")
            }
            Err(e) => tracing::info!(
                workload = %format!("{namespace}/{name}"),
                "joining the Raft group (tried again in a moment): {e}"
            ),
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
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(s) = self.lock().get(&key) {
            return Ok(s.clone());
        }
        if self.strong_lock().contains_key(&key) {
            let group =
                GroupId::new(namespace, name).map_err(|e| KvError::Internal(e.to_string()))?;
            return Ok(Arc::new(StrongKv {
                groups: self.groups.clone(),
                group,
            }));
        }
        Err(KvError::Unavailable {
            reason: format!("no store of {namespace}/{name} runs on this node"),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }
    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn voters_move_add_first_then_remove_the_leader_last() {
        let step = |voters: &[&str], learners: &[&str], target: &[&str]| {
            next_step("a", &list(voters), &list(learners), &set(target))
        };
        // C's replica moved to D: D joins by itself, is promoted, then C goes.
        assert_eq!(
            step(&["a", "b", "c"], &[], &["a", "b", "d"]),
            Some(Step::Wait("d".into()))
        );
        assert_eq!(
            step(&["a", "b", "c"], &["d"], &["a", "b", "d"]),
            Some(Step::Promote("d".into()))
        );
        assert_eq!(
            step(&["a", "b", "c", "d"], &[], &["a", "b", "d"]),
            Some(Step::Remove("c".into()))
        );
        assert_eq!(step(&["a", "b", "d"], &[], &["a", "b", "d"]), None);
        // The leader's own replica moved: others first, itself last.
        assert_eq!(
            step(&["a", "b", "c", "x"], &[], &["b", "c", "x"]),
            Some(Step::Remove("a".into()))
        );
        assert_eq!(
            step(&["a", "b", "c", "x", "y"], &[], &["b", "c", "x"]),
            Some(Step::Remove("y".into()))
        );
        // Nothing is removed while a host is not yet a voter.
        assert_eq!(
            step(&["a", "b", "c"], &["d"], &["b", "c", "d"]),
            Some(Step::Promote("d".into()))
        );
    }
}
