//! The node: wiring of the host config, the desired-state store, the mesh and the API, and
//! the loop that replicates desired state.
//!
//! Replication:
//! - A manifest accepted through the API is published on the gossip topic
//!   `/beemesh/manifests/1` and stored as a Kademlia record `/beemesh/manifest/<ns>/<name>`.
//! - A manifest arriving by gossip is verified by [`DesiredStore::submit`] before gossipsub may
//!   forward it: accepted ones are forwarded, invalid ones rejected, old ones ignored.
//! - Anti-entropy (`/beemesh/sync/1`): when a peer comes up, and periodically with a random
//!   peer, the node sends what it has (`namespace/name`, generation, content id) and receives
//!   the signed manifests it lacks, each verified like any other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use beemesh_manifest::host::Driver;
use beemesh_manifest::{ContentId, HostConfig, TrustPolicy};
use beemesh_mesh::{MeshConfig, MeshEvent, MeshHandle, PeerId, Validation};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::capacity::Capacity;
use crate::metrics::Metrics;
use crate::placement::{self, Placement};
use crate::store::{DesiredStore, Have, Outcome, SubmitError};
use beemesh_driver::ContainerDriver;
use beemesh_scheduler::{Input, SchedulerConfig};

pub const MANIFEST_TOPIC: &str = "/beemesh/manifests/1";
pub const SYNC_PROTOCOL: &str = "/beemesh/sync/1";
/// How often a node syncs with a random peer, besides every time a peer comes up.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Budget for one sync response, below the mesh's message limit.
const SYNC_RESPONSE_BUDGET: usize = 768 * 1024;

impl From<beemesh_mesh::MeshError> for NodeError {
    fn from(e: beemesh_mesh::MeshError) -> Self {
        NodeError::Mesh(Box::new(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot read {what} {}: {cause}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: String,
    },
    #[error("cannot prepare {}: {cause}", path.display())]
    Dir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("desired-state store: {0}")]
    Store(#[from] SubmitError),
    #[error("mesh: {0}")]
    Mesh(Box<beemesh_mesh::MeshError>),
    #[error("node identity: {0}")]
    Identity(#[from] beemesh_mesh::IdentityError),
    #[error("API: {0}")]
    Api(String),
}

/// What a node says about itself to the mesh (the announcement payload, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    #[serde(default)]
    pub version: String,
}

/// A peer as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub peer_id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<String>,
    pub capacity: Option<Capacity>,
    pub version: String,
    pub connected: bool,
    pub last_seen_ms: u128,
}

#[derive(Debug, Serialize, Deserialize)]
struct SyncRequest {
    have: Vec<Have>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SyncResponse {
    manifests: Vec<String>,
    /// More is available than fit in this response: ask again.
    #[serde(default)]
    more: bool,
}

/// State shared by the node's loops and its API handlers.
pub struct Shared {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub domain: String,
    pub peer_id: PeerId,
    pub started: Instant,
    pub capacity: Capacity,
    pub sandbox: serde_json::Value,
    pub mesh: MeshHandle,
    pub metrics: Metrics,
    pub clock: fn() -> OffsetDateTime,
    pub placement: Placement,
    pub driver: Arc<dyn ContainerDriver>,
    /// Log streams served from this node's replicas (`/beemesh/logs/1`).
    pub logs: crate::logs::Logs,
    /// The stores behind the replicas' state endpoints.
    pub consistency: Arc<crate::consistency::Consistency>,
    /// Operators' signed requests to workloads' stores (`POST /v1/kv`, `/beemesh/kv-op/1`).
    pub operator_kv: crate::operator_kv::OperatorKv,
    store: Arc<Mutex<DesiredStore>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.name)
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, DesiredStore> {
        // A panic while holding the lock cannot leave the store half-written (files are
        // replaced atomically), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies and stores a signed manifest from `source` (`api`, `gossip`, `sync`),
    /// counting the outcome. Publishing is the caller's business. The verification and the
    /// durable writes (fsync) run on the blocking pool, so that they never stall the async
    /// workers that serve the API, the mesh and the scheduler.
    pub async fn submit(
        &self,
        source: &str,
        text: &str,
    ) -> Result<(Outcome, crate::store::Entry), SubmitError> {
        let store = self.store.clone();
        let (src, owned, now) = (source.to_owned(), text.to_owned(), (self.clock)());
        let result = match tokio::task::spawn_blocking(move || {
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .submit(&src, &owned, now)
        })
        .await
        {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(SubmitError::Interrupted(e.to_string())),
        };
        match &result {
            Ok((Outcome::Accepted, e)) => {
                if let Some(spec) = placement::spec_of(e) {
                    self.placement.input(Input::Workload(spec)).await;
                }
                self.metrics.accepted(source);
                self.metrics.workloads.set(self.store().len() as i64);
                tracing::info!(
                    source,
                    workload = %e.manifest.id(),
                    generation = e.manifest.generation,
                    content_id = %e.content_id,
                    deleted = e.manifest.deleted,
                    "accepted manifest"
                );
            }
            Ok((Outcome::Unchanged, _)) => {}
            Err(e) => self.metrics.rejected(source, reject_reason(e)),
        }
        result
    }

    /// Accepts a manifest from the API and spreads it: gossip plus a Kademlia record.
    pub async fn apply(&self, text: &str) -> Result<(Outcome, crate::store::Entry), SubmitError> {
        let (outcome, entry) = self.submit("api", text).await?;
        if outcome == Outcome::Accepted {
            let bytes = entry.signed_text.clone().into_bytes();
            if let Err(e) = self.mesh.publish(MANIFEST_TOPIC, bytes.clone()).await {
                // With no peers yet, anti-entropy delivers it when they come.
                tracing::debug!("publishing {}: {e}", entry.manifest.id());
            }
            // Kademlia replication can take a query timeout; the API does not wait for it.
            let key = record_key(&entry.manifest.namespace, &entry.manifest.name);
            let mesh = self.mesh.clone();
            let id = entry.manifest.id();
            tokio::spawn(async move {
                if let Err(e) = mesh.put_record(key, bytes).await {
                    tracing::debug!("storing the record of {id}: {e}");
                }
            });
        }
        Ok((outcome, entry))
    }

    pub async fn peers(&self) -> Vec<PeerView> {
        let peers = self.mesh.peers().await.unwrap_or_default();
        self.metrics.peers.set(peers.len() as i64);
        peers
            .into_iter()
            .map(|p| {
                let ann: Option<Announcement> = serde_json::from_slice(&p.announcement).ok();
                PeerView {
                    peer_id: p.peer_id.to_base58(),
                    name: ann.as_ref().map(|a| a.name.clone()).unwrap_or_default(),
                    labels: ann.as_ref().map(|a| a.labels.clone()).unwrap_or_default(),
                    addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                    capacity: ann.as_ref().map(|a| a.capacity),
                    version: ann.map(|a| a.version).unwrap_or_default(),
                    connected: p.connected,
                    last_seen_ms: p.last_seen.elapsed().as_millis(),
                }
            })
            .collect()
    }
}

pub fn record_key(namespace: &str, name: &str) -> Vec<u8> {
    format!("/beemesh/manifest/{namespace}/{name}").into_bytes()
}

fn reject_reason(e: &SubmitError) -> &'static str {
    match e {
        SubmitError::TooLarge(_) => "too_large",
        SubmitError::Envelope(_) => "envelope",
        SubmitError::Untrusted(_) => "untrusted",
        SubmitError::Rollback(_) => "rollback",
        SubmitError::Io { .. } | SubmitError::Store(_) | SubmitError::Interrupted(_) => "storage",
    }
}

/// Everything `beemesh node` needs, resolved from the host config.
#[derive(Clone)]
pub struct NodeOptions {
    pub config: HostConfig,
    /// Where the host config was read from (a relative ticket path is resolved against it).
    pub config_path: Option<PathBuf>,
    /// Injectable wall clock (expiry of manifests and tickets).
    pub clock: fn() -> OffsetDateTime,
    /// The sandbox status to report (the CLI confines the process before starting the node).
    pub sandbox: serde_json::Value,
    /// Placement timers and limits.
    pub scheduler: SchedulerConfig,
    /// A container driver made beforehand; `None` makes the one the host config names. The
    /// daemon makes the process driver before it confines itself, because the workloads'
    /// namespace that hides the node's files cannot be made by a Landlock-confined process
    /// ([`process_config`]).
    pub driver: Option<Arc<dyn ContainerDriver>>,
    /// The sidecar's root file system (Podman), assembled beforehand; `None` assembles it at
    /// start. The daemon assembles it before it confines itself (it runs `ldd` and reads the
    /// libraries).
    pub sidecar_rootfs: Option<PathBuf>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("config", &self.config)
            .field("config_path", &self.config_path)
            .field("sandbox", &self.sandbox)
            .field("scheduler", &self.scheduler)
            .field("driver", &self.driver.as_ref().map(|d| d.name()))
            .finish_non_exhaustive()
    }
}

impl NodeOptions {
    pub fn new(config: HostConfig, config_path: Option<PathBuf>) -> Self {
        Self {
            config,
            config_path,
            clock: OffsetDateTime::now_utc,
            sandbox: serde_json::json!({ "enforced": false, "reason": "not confined" }),
            scheduler: SchedulerConfig::default(),
            driver: None,
            sidecar_rootfs: None,
        }
    }
}

/// A started node: its shared state and the tasks to wait for.
pub struct RunningNode {
    pub shared: Arc<Shared>,
    pub api_socket: PathBuf,
    pub api_tcp: Option<std::net::SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Waits until every loop has stopped (after `shutdown` fired).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        self.shared.mesh.stopped().await;
        let _ = std::fs::remove_file(&self.api_socket);
    }
}

fn node_name(config: &HostConfig) -> String {
    if let Some(n) = &config.node.name {
        return n.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.is_empty() {
        "node".to_owned()
    } else {
        name
    }
}

/// This node's admission ticket: `trust.ticket` (relative to the host config's directory),
/// else `ticket` beside the host config (on a flashed image, the config partition's).
pub fn ticket_path(config: &HostConfig, config_path: Option<&Path>) -> PathBuf {
    match &config.trust.ticket {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => config_path
            .and_then(Path::parent)
            .map_or_else(|| p.clone(), |d| d.join(p)),
        None => config_path
            .and_then(Path::parent)
            .unwrap_or(Path::new("/etc/beemesh"))
            .join("ticket"),
    }
}

/// The ticket secret key of a fleet ticket: `trust.ticket_key` (relative to the host config's
/// directory), else the ticket's path with `.key` appended (where `beemesh ticket issue`
/// writes it: `ticket.key` beside the ticket on a config partition).
pub fn ticket_key_path(config: &HostConfig, config_path: Option<&Path>) -> PathBuf {
    match &config.trust.ticket_key {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => config_path
            .and_then(Path::parent)
            .map_or_else(|| p.clone(), |d| d.join(p)),
        None => beemesh_manifest::ticket::default_key_path(&ticket_path(config, config_path)),
    }
}

/// Creates a directory (and its parents) and sets its mode.
pub fn prepare_dir(path: &Path, mode: u32) -> Result<(), NodeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |cause| NodeError::Dir {
        path: path.to_owned(),
        cause,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(err)?;
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.permissions().mode() & 0o777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// Starts a node: opens the store, joins the mesh, serves the API. Everything is bound before
/// this returns; the loops run until `shutdown` fires.
pub async fn start(
    opts: NodeOptions,
    shutdown: CancellationToken,
) -> Result<RunningNode, NodeError> {
    let cfg = &opts.config;
    let admission = cfg.trust.admission.ok_or_else(|| {
        NodeError::Config(
            "trust.admission is not set: a node joins a mesh only with a ticket signed by the admission key".into(),
        )
    })?;
    let ticket_file = ticket_path(&opts.config, opts.config_path.as_deref());
    let ticket = beemesh_manifest::input::read_file(
        &ticket_file,
        beemesh_manifest::ticket::MAX_TICKET_BYTES,
        "an admission ticket",
    )
    .map_err(|e| NodeError::Read {
        what: "admission ticket",
        path: ticket_file.clone(),
        cause: format!("{e} (issue one with `beemesh ticket issue`, or set trust.ticket)"),
    })?;
    // Refuse to start with a ticket that cannot admit us: better here than a silent mesh.
    let parsed =
        beemesh_manifest::ticket::Ticket::parse(&ticket_file.display().to_string(), &ticket)
            .map_err(|e| NodeError::Config(e.to_string()))?;
    // A fleet ticket admits whoever proves it holds the ticket key: load that key. A peer
    // ticket needs none (noise authenticates the PeerId it names).
    let ticket_key = match parsed.holder {
        None => {
            if let Some(k) = &cfg.trust.ticket_key {
                tracing::warn!(
                    "trust.ticket_key is {} but {} is a peer ticket, which needs no key: not read",
                    k.display(),
                    ticket_file.display()
                );
            }
            None
        }
        Some(holder) => {
            let key_file = ticket_key_path(&opts.config, opts.config_path.as_deref());
            let key = beemesh_manifest::SecretKey::load(&key_file).map_err(|e| NodeError::Read {
                what: "ticket key",
                path: key_file.clone(),
                cause: format!(
                    "{e} (the fleet ticket {} is bound to the ticket key {holder}, whose secret \
                     half `beemesh ticket issue` wrote beside it; set trust.ticket_key if it lives \
                     elsewhere)",
                    ticket_file.display()
                ),
            })?;
            Some(key)
        }
    };

    let data_dir = cfg.node.data_dir.clone();
    prepare_dir(&data_dir, 0o700)?;
    let keypair = beemesh_mesh::load_or_create_identity(&data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let award_keys = Arc::new(crate::authority::PeerKeys::new(keypair.clone()));
    parsed
        .check_own(
            &admission,
            ticket_key.as_ref(),
            &peer_id.to_base58(),
            (opts.clock)(),
        )
        .map_err(|e| NodeError::Config(format!("{}: {e}", ticket_file.display())))?;

    let policy =
        TrustPolicy::from_host(&cfg.trust).map_err(|e| NodeError::Config(format!("trust: {e}")))?;
    let operator_kv = crate::operator_kv::OperatorKv::new(policy.clone());
    let (store, skipped) = DesiredStore::open(&data_dir, policy, (opts.clock)())?;
    for s in &skipped {
        tracing::warn!("not loading stored manifest: {s}");
    }

    let name = node_name(cfg);
    let capacity = Capacity::detect(&cfg.resources.reserve);
    let announcement = Announcement {
        name: name.clone(),
        labels: cfg.node.labels.clone(),
        capacity,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut mesh_cfg = MeshConfig::from_host(
        keypair,
        &cfg.mesh,
        admission,
        ticket.into_bytes(),
        ticket_key,
    )?;
    mesh_cfg.announcement =
        serde_json::to_vec(&announcement).map_err(|e| NodeError::Config(e.to_string()))?;
    mesh_cfg.clock = opts.clock;
    let (mesh, events) = beemesh_mesh::spawn(mesh_cfg, shutdown.clone()).await?;
    mesh.subscribe(MANIFEST_TOPIC).await?;

    let driver = match &opts.driver {
        Some(d) => d.clone(),
        None => make_driver(cfg, opts.config_path.as_deref()).await?,
    };
    let store = Arc::new(Mutex::new(store));
    let lookup_store = store.clone();
    let lookup: Arc<placement::Lookup> =
        Arc::new(move |ns: &str, name: &str, content: &ContentId| {
            let store = lookup_store.lock().unwrap_or_else(|p| p.into_inner());
            store
                .get(ns, name)
                .filter(|e| e.content_id == *content)
                .map(|e| Arc::new(e.manifest.clone()))
        });
    let mut tasks = Vec::new();
    let metrics = Metrics::new();
    let (fetch_tx, fetch_rx) = mpsc::channel(FETCH_QUEUE);
    let channel = match cfg.runtime.driver {
        Driver::Podman => {
            let (rootfs, program) = sidecar_root(opts.sidecar_rootfs.clone(), &data_dir)?;
            crate::replica_api::Channel::Sidecar { rootfs, program }
        }
        Driver::Process => crate::replica_api::Channel::Loopback,
    };
    let consistency = Arc::new(
        crate::consistency::Consistency::open(
            crate::consistency::raft_config(&cfg.consistency),
            peer_id.to_base58(),
            data_dir.clone(),
            mesh.clone(),
            metrics.scheduler.clone(),
            metrics.state.clone(),
            shutdown.clone(),
        )
        .await
        .map_err(NodeError::Config)?,
    );
    let endpoints = Arc::new(crate::replica_api::Endpoints::new(
        &data_dir,
        channel,
        consistency.clone(),
        shutdown.clone(),
    ));
    let (placement, placement_tasks) = placement::spawn(
        placement::Context {
            local: peer_id.to_base58(),
            node_name: name.clone(),
            data_dir: data_dir.clone(),
            mesh: mesh.clone(),
            driver: driver.clone(),
            lookup,
            keys: award_keys,
            fetch: fetch_tx,
            metrics: metrics.scheduler.clone(),
            endpoints,
            consistency: consistency.clone(),
            deleted: {
                let store = store.clone();
                Arc::new(move |ns: &str, name: &str| {
                    store
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(ns, name)
                        .is_some_and(|e| e.manifest.deleted)
                })
            },
        },
        opts.scheduler.clone(),
        shutdown.clone(),
    );
    tasks.extend(placement_tasks);
    placement
        .input(Input::NodeUp {
            node: peer_id.to_base58(),
            info: placement::node_info(&announcement),
        })
        .await;
    let specs: Vec<_> = {
        let store = store.lock().unwrap_or_else(|p| p.into_inner());
        store.entries().filter_map(placement::spec_of).collect()
    };
    for spec in specs {
        placement.input(Input::Workload(spec)).await;
    }

    metrics
        .workloads
        .set(store.lock().map(|s| s.len()).unwrap_or(0) as i64);
    let shared = Arc::new(Shared {
        name,
        labels: cfg.node.labels.clone(),
        domain: cfg.trust.domain.clone(),
        peer_id,
        started: Instant::now(),
        capacity,
        sandbox: opts.sandbox.clone(),
        mesh,
        metrics,
        clock: opts.clock,
        placement,
        driver,
        logs: crate::logs::Logs::new(shutdown.clone()),
        consistency,
        operator_kv,
        store,
    });

    let (api_socket, api_tcp, api_tasks) =
        crate::api::serve(shared.clone(), &cfg.api, shutdown.clone()).await?;
    tasks.extend(api_tasks);
    tasks.push(tokio::spawn(event_loop(
        shared.clone(),
        events,
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(state_peers_loop(
        shared.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(fetch_loop(
        shared.clone(),
        fetch_rx,
        shutdown.clone(),
    )));
    tracing::info!(
        peer_id = %shared.peer_id,
        name = %shared.name,
        api = %api_socket.display(),
        workloads = shared.store().len(),
        "node started"
    );
    Ok(RunningNode {
        shared,
        api_socket,
        api_tcp,
        tasks,
    })
}

/// Handles mesh events until shutdown.
async fn event_loop(
    shared: Arc<Shared>,
    mut events: mpsc::Receiver<MeshEvent>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                if let Ok(peers) = shared.mesh.connected_peers().await
                    && let Some(peer) = pick(&peers)
                {
                    tokio::spawn(sync_with(shared.clone(), peer));
                }
            }
            event = events.recv() => {
                let Some(event) = event else { break };
                handle_event(&shared, event).await;
            }
        }
    }
    tracing::debug!("node event loop stopped");
}

fn pick(peers: &[PeerId]) -> Option<PeerId> {
    use rand::Rng;
    if peers.is_empty() {
        return None;
    }
    peers.get(rand::rng().random_range(0..peers.len())).copied()
}

async fn handle_event(shared: &Arc<Shared>, event: MeshEvent) {
    match event {
        MeshEvent::Gossip {
            topic,
            source,
            propagation_source,
            message_id,
            data,
        } if topic == MANIFEST_TOPIC => {
            let verdict = match std::str::from_utf8(&data) {
                Err(_) => {
                    tracing::warn!(%source, %propagation_source, "dropped gossip manifest: not UTF-8");
                    shared.metrics.rejected("gossip", "envelope");
                    Validation::Reject
                }
                Ok(text) => match shared.submit("gossip", text).await {
                    Ok(_) => Validation::Accept,
                    Err(e) => {
                        tracing::warn!(%source, %propagation_source, "dropped gossip manifest: {e}");
                        match e {
                            SubmitError::Rollback(_) => Validation::Ignore,
                            SubmitError::Io { .. }
                            | SubmitError::Store(_)
                            | SubmitError::Interrupted(_) => Validation::Ignore,
                            _ => Validation::Reject,
                        }
                    }
                },
            };
            if let Err(e) = shared
                .mesh
                .validate(message_id, propagation_source, verdict)
                .await
            {
                tracing::debug!("reporting a gossip verdict: {e}");
            }
        }
        MeshEvent::Gossip {
            topic,
            source,
            propagation_source,
            message_id,
            data,
        } if beemesh_state::eventual::delta_workload(&topic).is_some() => {
            // A write to an eventual workload's map, from one of its hosts: forwarded only if
            // its store here accepted it (the author hosts the workload, the records are
            // within limits and clocks).
            let shared = shared.clone();
            tokio::spawn(async move {
                let accepted = shared.consistency.delta(&topic, &source, data).await;
                let verdict = if accepted {
                    Validation::Accept
                } else {
                    Validation::Ignore
                };
                let _ = shared
                    .mesh
                    .validate(message_id, propagation_source, verdict)
                    .await;
            });
        }
        MeshEvent::Gossip {
            topic,
            message_id,
            propagation_source,
            ..
        } => {
            tracing::debug!(%topic, "ignoring gossip on a topic this node does not use");
            let _ = shared
                .mesh
                .validate(message_id, propagation_source, Validation::Ignore)
                .await;
        }
        MeshEvent::Request {
            peer,
            protocol,
            data,
            reply,
        } => {
            if protocol == placement::SCHEDULER_PROTOCOL {
                match placement::decode_message(&data) {
                    Ok(msg) => {
                        shared.placement.offer(Input::Message {
                            from: peer.to_base58(),
                            msg,
                        });
                        reply.respond(Vec::new());
                    }
                    Err(e) => {
                        shared.metrics.scheduler.refused(
                            &peer.to_base58(),
                            "undecodable",
                            "malformed",
                        );
                        tracing::debug!(%peer, "{e}");
                        reply.refuse(e);
                    }
                }
            } else if protocol == placement::STATUS_PROTOCOL {
                let placement = shared.placement.clone();
                tokio::spawn(async move {
                    match placement::answer_status(&placement, &data).await {
                        Ok(bytes) => reply.respond(bytes),
                        Err(e) => reply.refuse(e),
                    }
                });
            } else if protocol == crate::logs::LOGS_PROTOCOL {
                let shared = shared.clone();
                tokio::spawn(async move {
                    match crate::logs::answer(&shared, &data).await {
                        Ok(bytes) => reply.respond(bytes),
                        Err(e) => reply.refuse(e),
                    }
                });
            } else if protocol == beemesh_state::raft::PROTOCOL {
                let groups = shared.consistency.groups().clone();
                tokio::spawn(async move {
                    let answer = groups.handle_rpc(&peer.to_base58(), &data).await;
                    reply.respond(answer);
                });
            } else if protocol == crate::consistency::GROUP_STATUS {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let live = live_peers(&shared).await;
                    match shared.consistency.serve_group_status(&data, &live).await {
                        Ok(bytes) => reply.respond(bytes),
                        Err(e) => reply.refuse(e),
                    }
                });
            } else if protocol == crate::operator_kv::PROTOCOL {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let answer = crate::operator_kv::from_peer(&shared, &peer, &data).await;
                    reply.respond(answer);
                });
            } else if protocol.starts_with("/beemesh/kv-sync/") {
                match shared.consistency.reconcile(&protocol, &peer, data) {
                    Ok(()) => reply.respond(Vec::new()),
                    Err(e) => reply.refuse(e),
                }
            } else if protocol == SYNC_PROTOCOL {
                match answer_sync(shared, &data) {
                    Ok(bytes) => reply.respond(bytes),
                    Err(e) => {
                        tracing::warn!(%peer, "bad sync request: {e}");
                        reply.refuse(e);
                    }
                }
            } else {
                reply.refuse(format!("unknown protocol {protocol}"));
            }
        }
        MeshEvent::PeerUp { peer, announcement } => {
            tracing::info!(%peer, "peer up");
            if let Ok(a) = serde_json::from_slice::<Announcement>(&announcement) {
                shared
                    .placement
                    .input(Input::NodeUp {
                        node: peer.to_base58(),
                        info: placement::node_info(&a),
                    })
                    .await;
            }
            tokio::spawn(sync_with(shared.clone(), peer));
        }
        MeshEvent::PeerUpdated { peer, announcement } => {
            if let Ok(a) = serde_json::from_slice::<Announcement>(&announcement) {
                shared
                    .placement
                    .input(Input::NodeUpdated {
                        node: peer.to_base58(),
                        info: placement::node_info(&a),
                    })
                    .await;
            }
        }
        MeshEvent::PeerDown { peer } => {
            tracing::info!(%peer, "peer down");
            shared
                .placement
                .input(Input::NodeDown {
                    node: peer.to_base58(),
                })
                .await;
        }
        MeshEvent::PeerRejected { peer, reason } => {
            shared.metrics.peers_rejected.inc();
            tracing::warn!(%peer, "refused peer: {reason}");
        }
        MeshEvent::MembershipFull { peer } => {
            shared.metrics.members_refused.inc();
            tracing::debug!(%peer, "membership view full: peer not tracked");
        }
        MeshEvent::RefusedByPeer { peer, reason } => {
            tracing::warn!(%peer, "peer refused this node: {reason}")
        }
        MeshEvent::Listening { .. } => {}
    }
}

fn answer_sync(shared: &Shared, data: &[u8]) -> Result<Vec<u8>, String> {
    let req: SyncRequest =
        serde_json::from_slice(data).map_err(|e| format!("malformed sync request: {e}"))?;
    let store = shared.store();
    let mut resp = SyncResponse::default();
    let mut size = 0;
    for e in store.newer_than(&req.have) {
        if size + e.signed_text.len() > SYNC_RESPONSE_BUDGET && !resp.manifests.is_empty() {
            resp.more = true;
            break;
        }
        size += e.signed_text.len();
        resp.manifests.push(e.signed_text.clone());
    }
    serde_json::to_vec(&resp).map_err(|e| e.to_string())
}

/// How often the hosts of each eventual workload running here are looked up.
const STATE_PEERS_EVERY: Duration = Duration::from_secs(2);

/// Tells each eventual store which other nodes host its workload's replicas, as the
/// workload's coordinator reports its placements (its stores accept writes and reconcile
/// with those nodes only).
async fn state_peers_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let local = shared.peer_id.to_base58();
    let mut tick = tokio::time::interval(STATE_PEERS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        shared.consistency.observe_groups().await;
        let eventual = shared.consistency.running();
        let strong = shared.consistency.strong_running();
        if eventual.is_empty() && strong.is_empty() {
            continue;
        }
        let ids = eventual
            .iter()
            .chain(&strong)
            .map(|(ns, name)| beemesh_scheduler::WorkloadId::new(ns, name))
            .collect();
        let statuses = placement::statuses(&shared.placement, &shared.mesh, &local, ids).await;
        for (w, (status, _)) in statuses {
            if !status.authoritative {
                continue;
            }
            let key = (w.namespace.to_string(), w.name.to_string());
            if strong.contains(&key) {
                // The hosts of the current generation's replicas; complete when every
                // replica is placed once (the voters follow only a complete picture).
                let current: Vec<&str> = status
                    .placements
                    .iter()
                    .filter(|p| {
                        p.generation == status.generation
                            && p.state != beemesh_scheduler::ReplicaState::Failed
                    })
                    .map(|p| p.node.as_str())
                    .collect();
                let hosts: std::collections::BTreeSet<String> =
                    current.iter().map(|s| (*s).to_owned()).collect();
                let complete =
                    current.len() == status.replicas as usize && hosts.len() == current.len();
                // Every node a replica of any generation is placed on takes part.
                let placed_on = status.placements.iter().map(|p| p.node.clone()).collect();
                shared
                    .consistency
                    .strong_placements(&w.namespace, &w.name, hosts, placed_on, complete)
                    .await;
            } else {
                let peers = status
                    .placements
                    .iter()
                    .map(|p| p.node.clone())
                    .filter(|n| *n != local)
                    .collect();
                shared
                    .consistency
                    .set_peers(&w.namespace, &w.name, peers)
                    .await;
            }
        }
    }
}

/// Manifest fetches waiting (peers named by the scheduler's `Fetch`); more are dropped.
const FETCH_QUEUE: usize = 64;
/// At most one fetch from the same peer in this long; fetches run one at a time.
const FETCH_EVERY: Duration = Duration::from_secs(2);
/// Peers remembered for [`FETCH_EVERY`].
const FETCH_PEERS: usize = 1024;

/// Syncs with the peers the scheduler names (a peer's message named a manifest generation
/// this node has not verified), one at a time and at most once per peer every
/// [`FETCH_EVERY`]: a peer naming unknown manifests costs the node one sync every 2 s.
async fn fetch_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<PeerId>,
    shutdown: CancellationToken,
) {
    let mut last: BTreeMap<PeerId, Instant> = BTreeMap::new();
    loop {
        let peer = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = rx.recv() => match p { Some(p) => p, None => break },
        };
        let now = Instant::now();
        if last
            .get(&peer)
            .is_some_and(|t| now.duration_since(*t) < FETCH_EVERY)
        {
            continue;
        }
        if last.len() >= FETCH_PEERS {
            last.retain(|_, t| now.duration_since(*t) < FETCH_EVERY);
        }
        last.insert(peer, now);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sync_with(shared.clone(), peer) => {}
        }
    }
}

/// Pulls what `peer` has and this node lacks (until nothing more comes).
pub async fn sync_with(shared: Arc<Shared>, peer: PeerId) {
    for _ in 0..64 {
        let have = shared.store().have();
        let req = match serde_json::to_vec(&SyncRequest { have }) {
            Ok(r) => r,
            Err(_) => return,
        };
        let resp = match shared.mesh.request(peer, SYNC_PROTOCOL, req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, "sync failed: {e}");
                return;
            }
        };
        let resp: SyncResponse = match serde_json::from_slice(&resp) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, "malformed sync response: {e}");
                return;
            }
        };
        let mut progressed = false;
        for text in &resp.manifests {
            match shared.submit("sync", text).await {
                Ok((Outcome::Accepted, _)) => progressed = true,
                Ok((Outcome::Unchanged, _)) => {}
                Err(e) => tracing::warn!(%peer, "dropped synced manifest: {e}"),
            }
        }
        if !resp.more || !progressed {
            break;
        }
    }
    shared.metrics.syncs.inc();
}

/// The process driver's settings for this node: its root under data_dir, the Landlock mode,
/// and what its workloads must not see: the API socket's directory, data_dir (the driver's
/// own root beneath it stays reachable), the host config, the ticket and the token file,
/// and the daemon user's runtime directory (`$XDG_RUNTIME_DIR`: its Podman API socket and
/// its systemd user manager's bus, either of which would run commands outside the sandbox).
pub fn process_config(
    cfg: &HostConfig,
    config_path: Option<&Path>,
) -> beemesh_driver::ProcessConfig {
    let mut pc = beemesh_driver::ProcessConfig::new(cfg.node.data_dir.join("process"));
    pc.landlock = cfg.sandbox.landlock;
    pc.hide.extend(
        cfg.api
            .socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf),
    );
    pc.hide.push(cfg.node.data_dir.clone());
    pc.hide.extend(config_path.map(Path::to_path_buf));
    pc.hide.push(ticket_path(cfg, config_path));
    pc.hide.extend(cfg.api.token_file.iter().cloned());
    pc.hide.extend(
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute()),
    );
    pc.hide.extend(
        cfg.runtime
            .podman_socket
            .as_deref()
            .and_then(Path::parent)
            .filter(|p| p.is_absolute())
            .map(Path::to_path_buf),
    );
    // `--config host.toml` and a ticket beside it are relative to the working directory.
    for p in &mut pc.hide {
        if let Ok(abs) = std::path::absolute(&*p) {
            *p = abs;
        }
    }
    pc
}

/// The process driver for this node ([`process_config`]). It makes the workloads'
/// namespace, so a daemon that confines itself must call this first.
pub fn process_driver(
    cfg: &HostConfig,
    config_path: Option<&Path>,
) -> Result<beemesh_driver::ProcessDriver, NodeError> {
    beemesh_driver::ProcessDriver::new(process_config(cfg, config_path))
        .map_err(|e| NodeError::Config(format!("runtime.driver = \"process\": {e}")))
}

/// The program the sidecar runs (this binary, `beemesh`) and the root file system holding it:
/// `given` (assembled before the daemon confined itself), else assembled now under
/// `<data_dir>/sidecar`.
pub fn sidecar_root(
    given: Option<PathBuf>,
    data_dir: &Path,
) -> Result<(PathBuf, String), NodeError> {
    let exe = std::env::current_exe().map_err(|e| NodeError::Read {
        what: "this program",
        path: PathBuf::from("/proc/self/exe"),
        cause: e.to_string(),
    })?;
    let program = exe.file_name().map_or_else(
        || "beemesh".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let rootfs = match given {
        Some(r) => r,
        None => beemesh_driver::sidecar::assemble(&exe, &data_dir.join("sidecar"))
            .map_err(|e| NodeError::Config(format!("the replicas' sidecar: {e}")))?,
    };
    Ok((rootfs, program))
}

/// The container driver the host config asks for.
async fn make_driver(
    cfg: &HostConfig,
    config_path: Option<&Path>,
) -> Result<Arc<dyn ContainerDriver>, NodeError> {
    match cfg.runtime.driver {
        Driver::Podman => {
            let pc = beemesh_driver::PodmanConfig::from_host(&cfg.runtime);
            let socket = pc.socket.clone();
            let d = beemesh_driver::PodmanDriver::connect(pc).await.map_err(|e| {
                NodeError::Config(format!(
                    "runtime.driver = \"podman\", but the Podman API at {} does not answer ({e}); \
                     start it (`systemctl --user enable --now podman.socket`) or set runtime.driver = \"process\"",
                    socket.display()
                ))
            })?;
            Ok(Arc::new(d))
        }
        Driver::Process => Ok(Arc::new(process_driver(cfg, config_path)?)),
    }
}

/// The peers the mesh sees now, by peer id.
pub(crate) async fn live_peers(shared: &Shared) -> std::collections::BTreeSet<String> {
    shared
        .mesh
        .peers()
        .await
        .map(|ps| ps.into_iter().map(|p| p.peer_id.to_base58()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_driver_hides_the_nodes_socket_dir_data_config_ticket_and_token() {
        let cfg = HostConfig::from_toml(
            "host.toml",
            "[node]\ndata_dir = \"/var/lib/beemesh\"\n\
             [trust]\ndomain = \"example.org\"\nsigners = [\"ed25519:Wl7TJmUNtlOsCpkmT0DMSB2e41W/NmcBK7c1uRjE+BU=\"]\n\
             [api]\nsocket = \"/run/beemesh/api.sock\"\nlisten = \"127.0.0.1:7420\"\ntoken_file = \"/run/beemesh-config/token\"\n",
        )
        .expect("valid host config");
        // A relative --config (and the ticket beside it) is made absolute.
        let pc = process_config(&cfg, Some(Path::new("conf/host.toml")));
        let cwd = std::env::current_dir().expect("cwd");
        for want in [
            PathBuf::from("/run/beemesh"),
            PathBuf::from("/var/lib/beemesh"),
            cwd.join("conf/host.toml"),
            cwd.join("conf/ticket"),
            PathBuf::from("/run/beemesh-config/token"),
        ] {
            assert!(
                pc.hide.contains(&want),
                "{} not in {:?}",
                want.display(),
                pc.hide
            );
        }
        assert!(pc.hide.iter().all(|p| p.is_absolute()), "{:?}", pc.hide);
        assert_eq!(pc.root, PathBuf::from("/var/lib/beemesh/process"));
    }
}
