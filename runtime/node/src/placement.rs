//! Placement on a node: the task that owns the scheduler state machine, and the reconcile
//! loop that turns its decisions into replicas through the container driver.
//!
//! - The scheduler task is the only owner of [`Scheduler`]. Inputs (membership, desired
//!   state, protocol messages, replica reports) arrive on a bounded channel; it calls
//!   `handle(input, now)` with the node's monotonic clock and carries out the outputs: protocol
//!   messages go to peers over `/beemesh/sched/2`, `Start`/`Stop` change the set of replicas
//!   this node must run, `Persist` writes `<data_dir>/assignments.json` atomically, `Fetch`
//!   asks the node for a manifest a peer's message named (anti-entropy with that peer), and
//!   `Refused` is counted in `beemesh_scheduler_refused_total` and logged at a bounded rate.
//! - Peers' messages are offered to the channel and dropped when it is full (the protocol's
//!   timers recover from a lost message); local inputs wait for room.
//! - At start the persisted assignments are restored before the mesh is consulted, so a node
//!   that restarts without any connectivity restarts its replicas by itself.
//! - The reconcile loop runs the driver's `reconcile` over the wanted set every few seconds
//!   (and at once after a change), and reports each replica's transitions back to the
//!   scheduler (running, failed with the reason, stopped).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beemesh_driver::{ContainerDriver, ReplicaSpec as DriverSpec, ReplicaState as DriverState};
use beemesh_manifest::ContentId;
use beemesh_mesh::{MeshHandle, PeerId};
use beemesh_scheduler::{
    Authority, Input, LocalAssignments, Message, NodeInfo, Output, Replica, ReplicaId, Resources,
    Scheduler, SchedulerConfig, StatusQuery, StatusReply, WorkloadId, WorkloadSpec, WorkloadStatus,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::capacity::Capacity;
use crate::metrics::SchedulerMetrics;
use crate::node::Announcement;
use crate::store::Entry;

pub use beemesh_scheduler::{SCHEDULER_PROTOCOL, STATUS_PROTOCOL};

/// How often the reconcile loop runs when nothing changes (restarts of dead replicas).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(3);
const ASSIGNMENTS_FILE: &str = "assignments.json";
/// Inputs waiting for the scheduler task; peers' messages beyond this are dropped.
pub const QUEUE: usize = 4096;

type Id = String;

enum Command {
    Input(Input<Id>),
    Status {
        workloads: Vec<WorkloadId>,
        reply: oneshot::Sender<Vec<(WorkloadStatus<Id>, Option<Id>)>>,
    },
}

/// A cloneable handle to the scheduler task.
#[derive(Clone)]
pub struct Placement {
    tx: mpsc::Sender<Command>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl Placement {
    /// A local input (membership, desired state, the driver's reports): waits for room.
    pub async fn input(&self, input: Input<Id>) {
        let _ = self.tx.send(Command::Input(input)).await;
    }

    /// A peer's message: dropped (and counted) when the scheduler is behind; the protocol's
    /// timers recover from a lost message.
    pub fn offer(&self, input: Input<Id>) -> bool {
        match self.tx.try_send(Command::Input(input)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Each workload's status in this node's view, with its coordinator (whom to ask when the
    /// view is not authoritative).
    pub async fn status(
        &self,
        workloads: Vec<WorkloadId>,
    ) -> Vec<(WorkloadStatus<Id>, Option<Id>)> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Status { workloads, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

pub fn resources(c: &Capacity) -> Resources {
    Resources::new(c.allocatable_cpu, c.allocatable_memory)
}

pub fn node_info(a: &Announcement) -> NodeInfo {
    NodeInfo {
        name: a.name.clone(),
        labels: a.labels.clone(),
        allocatable: resources(&a.capacity),
    }
}

pub fn spec_of(e: &Entry) -> Option<WorkloadSpec> {
    WorkloadSpec::from_manifest(&e.manifest, e.content_id)
        .map_err(|err| tracing::warn!("cannot place {}: {err}", e.manifest.id()))
        .ok()
}

/// Finds a manifest by namespace, name and content id.
pub type Lookup =
    dyn Fn(&str, &str, &ContentId) -> Option<Arc<beemesh_manifest::Manifest>> + Send + Sync;

/// Whether the desired state holds a tombstone for a workload (namespace, name).
pub type Deleted = dyn Fn(&str, &str) -> bool + Send + Sync;

/// What the reconcile loop must run, shared with the scheduler task.
#[derive(Default)]
struct Wanted {
    replicas: BTreeMap<ReplicaId, Replica>,
    /// Replicas the scheduler (re)started since the reconcile loop last looked: their next
    /// state is reported even when it equals the last one (a restart that fails again for
    /// the same reason must still count as a failure).
    started: BTreeSet<ReplicaId>,
}

/// Everything the placement tasks need from the node.
pub struct Context {
    pub local: Id,
    pub node_name: String,
    pub data_dir: PathBuf,
    pub mesh: MeshHandle,
    pub driver: Arc<dyn ContainerDriver>,
    /// Finds a manifest by workload and content id in the desired-state store.
    pub lookup: Arc<Lookup>,
    /// Signs this node's awards and checks others' (the node's identity key).
    pub keys: Arc<dyn Authority<Id>>,
    /// Peers to fetch manifests from (anti-entropy); full means a fetch is already due.
    pub fetch: mpsc::Sender<PeerId>,
    pub metrics: SchedulerMetrics,
    /// Each replica's state endpoint (its channel to this node).
    pub endpoints: Arc<crate::replica_api::Endpoints>,
    /// The stores behind the endpoints.
    pub consistency: Arc<crate::consistency::Consistency>,
    /// Whether the desired state holds a tombstone for a workload (namespace, name).
    pub deleted: Arc<Deleted>,
}

/// Starts the scheduler task and the reconcile loop. `restore` replays the persisted
/// assignments before anything else.
pub fn spawn(
    ctx: Context,
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> (Placement, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let placement = Placement {
        tx,
        dropped: ctx.metrics.dropped.clone(),
    };
    let wanted = Arc::new(std::sync::Mutex::new(Wanted::default()));
    let changed = Arc::new(Notify::new());
    let ctx = Arc::new(ctx);
    let sched = Scheduler::new(ctx.local.clone(), config, ctx.keys.clone());
    let t1 = tokio::spawn(scheduler_task(
        sched,
        rx,
        ctx.clone(),
        wanted.clone(),
        changed.clone(),
        shutdown.clone(),
    ));
    let t2 = tokio::spawn(reconcile_loop(
        ctx,
        wanted,
        changed,
        placement.clone(),
        shutdown,
    ));
    (placement, vec![t1, t2])
}

fn load_assignments(path: &std::path::Path) -> Option<LocalAssignments<Id>> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(
                "{}: unreadable assignments, ignoring them: {e}",
                path.display()
            );
            None
        }
    }
}

async fn scheduler_task(
    mut sched: Scheduler<Id>,
    mut rx: mpsc::Receiver<Command>,
    ctx: Arc<Context>,
    wanted: Arc<std::sync::Mutex<Wanted>>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_millis() as u64;
    let path = ctx.data_dir.join(ASSIGNMENTS_FILE);
    if let Some(saved) = load_assignments(&path) {
        match sched.restore(saved, now()) {
            Ok(out) => {
                tracing::info!("restored persisted assignments");
                carry_out(&ctx, out, &wanted, &changed, &path);
            }
            Err(e) => tracing::error!("cannot restore assignments: {e}"),
        }
    }
    loop {
        let deadline = sched.next_deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep(Duration::from_millis(d.saturating_sub(now()))).await,
                None => std::future::pending().await,
            }
        };
        let outputs = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep => sched.handle(Input::Tick, now()),
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Command::Input(input)) => sched.handle(input, now()),
                Some(Command::Status { workloads, reply }) => {
                    let out = workloads
                        .iter()
                        .map(|w| (sched.status(w), sched.coordinator(w)))
                        .collect();
                    let _ = reply.send(out);
                    Vec::new()
                }
            },
        };
        carry_out(&ctx, outputs, &wanted, &changed, &path);
    }
}

fn carry_out(
    ctx: &Arc<Context>,
    outputs: Vec<Output<Id>>,
    wanted: &Arc<std::sync::Mutex<Wanted>>,
    changed: &Arc<Notify>,
    path: &std::path::Path,
) {
    let mut touched = false;
    for out in outputs {
        match out {
            Output::Send { to, msg } => send(ctx, to, msg),
            Output::Start { replica } => {
                let mut w = wanted.lock().unwrap_or_else(|p| p.into_inner());
                w.started.insert(replica.id.clone());
                w.replicas.insert(replica.id.clone(), replica);
                touched = true;
            }
            Output::Stop { replica } => {
                let mut w = wanted.lock().unwrap_or_else(|p| p.into_inner());
                w.replicas.remove(&replica);
                touched = true;
            }
            Output::Persist(assignments) => match serde_json::to_vec_pretty(&assignments) {
                Ok(bytes) => {
                    if let Err(e) = beemesh_manifest::input::write_atomically(path, &bytes) {
                        tracing::error!("cannot persist assignments to {}: {e}", path.display());
                    }
                }
                Err(e) => tracing::error!("cannot encode assignments: {e}"),
            },
            Output::Fetch { from, workload } => match from.parse::<PeerId>() {
                Ok(peer) => {
                    tracing::debug!(
                        %peer,
                        workload = %workload.id,
                        generation = workload.generation,
                        "fetching a manifest a peer's message named"
                    );
                    // Full: fetches are due already, and this one's message will wait or be
                    // re-sent.
                    if ctx.fetch.try_send(peer).is_ok() {
                        ctx.metrics.fetches.inc();
                    }
                }
                Err(_) => tracing::warn!("cannot fetch from {from:?}: not a peer id"),
            },
            Output::Refused {
                from,
                message,
                reason,
            } => ctx.metrics.refused(&from, message, reason.as_str()),
            Output::Bootstrap { workload, voters } => {
                ctx.consistency
                    .bootstrap(&workload.namespace, &workload.name, voters);
            }
        }
    }
    if touched {
        changed.notify_one();
    }
}

fn send(ctx: &Arc<Context>, to: Id, msg: Message<Id>) {
    let Ok(peer) = to.parse::<PeerId>() else {
        tracing::warn!("scheduler addressed a message to {to:?}, which is not a peer id");
        return;
    };
    match &msg {
        Message::Tender(t) => tracing::debug!(
            %peer,
            workload = %t.workload.id,
            round = t.round,
            wanted = t.wanted,
            "sending tender"
        ),
        other => tracing::debug!(%peer, kind = other.kind(), "sending scheduler message"),
    }
    let Ok(bytes) = serde_json::to_vec(&msg) else {
        return;
    };
    let mesh = ctx.mesh.clone();
    tokio::spawn(async move {
        if let Err(e) = mesh.request(peer, SCHEDULER_PROTOCOL, bytes).await {
            // Timers in the state machine recover from lost messages.
            tracing::debug!(%peer, "scheduler message not delivered: {e}");
        }
    });
}

/// Decodes a scheduler message from a peer.
pub fn decode_message(data: &[u8]) -> Result<Message<Id>, String> {
    serde_json::from_slice(data).map_err(|e| format!("malformed scheduler message: {e}"))
}

/// Answers a peer's placement query from this node's view.
pub async fn answer_status(placement: &Placement, data: &[u8]) -> Result<Vec<u8>, String> {
    let q: StatusQuery =
        serde_json::from_slice(data).map_err(|e| format!("malformed status query: {e}"))?;
    let statuses = placement
        .status(q.workloads)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    serde_json::to_vec(&StatusReply { statuses }).map_err(|e| e.to_string())
}

/// Each workload's placements and its coordinator in this node's view: this node's view where
/// it is authoritative, else the coordinator's (asked over the mesh, one query per coordinator), falling back to the local
/// view when the coordinator does not answer in time.
pub async fn statuses(
    placement: &Placement,
    mesh: &MeshHandle,
    local: &str,
    workloads: Vec<WorkloadId>,
) -> BTreeMap<WorkloadId, (WorkloadStatus<Id>, Option<Id>)> {
    let mut out = BTreeMap::new();
    let mut ask: BTreeMap<Id, Vec<WorkloadId>> = BTreeMap::new();
    for (status, coordinator) in placement.status(workloads).await {
        match &coordinator {
            Some(c) if !status.authoritative && c != local => {
                ask.entry(c.clone())
                    .or_default()
                    .push(status.workload.clone());
            }
            _ => {}
        }
        out.insert(status.workload.clone(), (status, coordinator));
    }
    for (coordinator, list) in ask {
        let Ok(peer) = coordinator.parse::<PeerId>() else {
            continue;
        };
        let Ok(req) = serde_json::to_vec(&StatusQuery { workloads: list }) else {
            continue;
        };
        let answer = tokio::time::timeout(
            Duration::from_secs(3),
            mesh.request(peer, STATUS_PROTOCOL, req),
        )
        .await;
        if let Ok(Ok(bytes)) = answer
            && let Ok(reply) = serde_json::from_slice::<StatusReply<Id>>(&bytes)
        {
            for s in reply.statuses {
                if s.authoritative {
                    out.insert(s.workload.clone(), (s, Some(coordinator.clone())));
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Reported {
    Running,
    Failed(String),
}

async fn reconcile_loop(
    ctx: Arc<Context>,
    wanted: Arc<std::sync::Mutex<Wanted>>,
    changed: Arc<Notify>,
    placement: Placement,
    shutdown: CancellationToken,
) {
    let mut reported: BTreeMap<ReplicaId, Reported> = BTreeMap::new();
    let mut running_ids: BTreeSet<ReplicaId> = BTreeSet::new();
    loop {
        let current: Vec<Replica> = {
            let mut w = wanted.lock().unwrap_or_else(|p| p.into_inner());
            for id in std::mem::take(&mut w.started) {
                reported.remove(&id);
            }
            w.replicas.values().cloned().collect()
        };
        let mut specs = Vec::new();
        let mut by_driver_id = BTreeMap::new();
        for r in &current {
            let content = ContentId::from(r.content);
            match (ctx.lookup)(&r.id.workload.namespace, &r.id.workload.name, &content) {
                Some(manifest) => {
                    let driver_id = beemesh_driver::ReplicaId::new(
                        &*r.id.workload.namespace,
                        &*r.id.workload.name,
                        r.id.index,
                    );
                    if let Err(reason) = ctx.consistency.ensure(&manifest).await {
                        report(&placement, &mut reported, &r.id, Reported::Failed(reason)).await;
                        continue;
                    }
                    let (env, sidecar) = match ctx.endpoints.ensure(&driver_id).await {
                        Ok(channel) => channel,
                        Err(e) => {
                            let reason = format!("its state endpoint: {e}");
                            report(&placement, &mut reported, &r.id, Reported::Failed(reason))
                                .await;
                            continue;
                        }
                    };
                    let spec = DriverSpec {
                        id: driver_id,
                        content_id: content.to_string(),
                        node: ctx.node_name.clone(),
                        manifest,
                        env,
                        sidecar,
                    };
                    by_driver_id.insert(spec.id.clone(), r.id.clone());
                    specs.push(spec);
                }
                None => {
                    let reason = format!(
                        "manifest {content} of {} is not in this node's desired state",
                        r.id.workload
                    );
                    report(&placement, &mut reported, &r.id, Reported::Failed(reason)).await;
                }
            }
        }
        match beemesh_driver::reconcile(&*ctx.driver, &specs, &ctx.node_name, false).await {
            Ok(outcome) => {
                for (driver_id, result) in outcome.ensured {
                    let Some(id) = by_driver_id.get(&driver_id) else {
                        continue;
                    };
                    let ready = ctx
                        .consistency
                        .ready(&id.workload.namespace, &id.workload.name)
                        .await;
                    let state = match result {
                        // A strong replica runs once its node is a voter of the group.
                        Ok(status) if status.state == DriverState::Running && !ready => None,
                        Ok(status) => match status.state {
                            DriverState::Running => Some(Reported::Running),
                            DriverState::Failed { reason } => Some(Reported::Failed(reason)),
                            DriverState::Pending | DriverState::Starting => None,
                        },
                        Err(e) => Some(Reported::Failed(e.to_string())),
                    };
                    if let Some(state) = state {
                        report(&placement, &mut reported, id, state).await;
                    }
                }
                for (driver_id, result) in outcome.removed {
                    if let Err(e) = result {
                        tracing::warn!("stopping {driver_id:?}: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!(
                "reconcile with the {} driver failed: {e}",
                ctx.driver.name()
            ),
        }
        // Replicas no longer wanted have been stopped by this pass: so are their endpoints
        // and the stores of workloads with no replica left here.
        let now_wanted: BTreeSet<ReplicaId> = current.iter().map(|r| r.id.clone()).collect();
        let stopped = ctx
            .consistency
            .retain(
                &current
                    .iter()
                    .map(|r| {
                        (
                            r.id.workload.namespace.to_string(),
                            r.id.workload.name.to_string(),
                        )
                    })
                    .collect(),
            )
            .await;
        // A deleted workload's state goes with it.
        for (ns, name) in stopped {
            if (ctx.deleted)(&ns, &name) {
                ctx.consistency.remove_data(&ns, &name).await;
            }
        }
        ctx.endpoints.retain(
            &current
                .iter()
                .map(|r| {
                    beemesh_driver::ReplicaId::new(
                        &*r.id.workload.namespace,
                        &*r.id.workload.name,
                        r.id.index,
                    )
                    .object_name()
                })
                .collect(),
        );
        for gone in running_ids.difference(&now_wanted) {
            placement
                .input(Input::ReplicaStopped {
                    replica: gone.clone(),
                })
                .await;
            reported.remove(gone);
        }
        running_ids = now_wanted;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
    }
}

async fn report(
    placement: &Placement,
    reported: &mut BTreeMap<ReplicaId, Reported>,
    id: &ReplicaId,
    state: Reported,
) {
    if reported.get(id) == Some(&state) {
        return;
    }
    let input = match &state {
        Reported::Running => Input::ReplicaStarted {
            replica: id.clone(),
        },
        Reported::Failed(reason) => {
            tracing::warn!("replica {id} failed: {reason}");
            Input::ReplicaFailed {
                replica: id.clone(),
                reason: reason.clone(),
            }
        }
    };
    placement.input(input).await;
    reported.insert(id.clone(), state);
}
