//! [`Groups`]: every Raft group of one node, their lifecycle, their key-value API, and the
//! routing of requests to each group's leader.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::RaftConfig;
use super::error::Error;
use super::membership::{PlanError, QuorumLost, Step, majority, plan_move, quorum_lost};
use super::memory::RpcHandler;
use super::network::{GroupNetworkFactory, Liveness, NetShared, RaftTransport};
use super::store::{self, DB_FILE, MAX_SNAPSHOT_BYTES, StateReader, encode};
use super::types::{
    ApplyResult, GroupId, KvCommand, ListPage, MAX_MEMBERS, MAX_VOTERS, NodeId, Page, Raft,
    RaftPeer, Versioned, check_key, check_peer_id, node_id,
};
use super::wire::{
    ForwardReply, LeaderOp, MembershipView, OpResult, PeerProgress, Refusal, Request, RequestBody,
    Response, decode_limited, encode_limited,
};

/// Consecutive forwards without an answer before waiting a heartbeat.
const MAX_HOPS: usize = 4;
/// How long stopping a group waits for its storage to be released.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// A node's role in a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

/// A group as this node sees it, for `beemesh get workloads` and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    /// This node's peer id.
    pub node: String,
    pub role: Role,
    pub leader: Option<String>,
    pub term: u64,
    /// The voter sets: one, or two while a membership change is in its joint phase.
    pub configs: Vec<Vec<String>>,
    /// Every voter, sorted.
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub commit_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// The log is purged up to this index (covered by the snapshot).
    pub purged_index: Option<u64>,
    /// The group's revision as applied here.
    pub revision: u64,
    /// The state's accounted size in bytes.
    pub state_bytes: u64,
}

/// One open group.
struct Group {
    id: GroupId,
    raft: Raft,
    reader: StateReader,
    liveness: Arc<Liveness>,
    released: Weak<redb::Database>,
    dir: PathBuf,
    bootstrap: Mutex<Option<JoinHandle<()>>>,
    /// The leader that added this node as a learner: heard before this node knows the
    /// membership, even when the workload's placement no longer names it (a leader moving
    /// its own replica away leads until the move is committed).
    introducer: Mutex<Option<String>>,
    /// Reads waiting for a read index (see [`Groups::read_index`]).
    reads: Mutex<ReadQueue>,
    /// Writes waiting to be proposed (see [`Groups::propose`]).
    writes: Mutex<WriteQueue>,
}

/// A write's answer, once its batch is applied (or refused).
type WriteTx = tokio::sync::oneshot::Sender<Result<OpResult, Exec>>;

/// Writes waiting for this node, as the leader, to propose them, and how many tasks propose.
#[derive(Default)]
struct WriteQueue {
    proposers: usize,
    waiting: VecDeque<(KvCommand, WriteTx)>,
}

/// Batches a leader has in the Raft core at once: while they are appended, replicated and
/// applied, the next writes gather into the following batches. (With `bench_kv` at 16 and
/// 64 clients, 1 and 2 did about equally well, 4 a tenth worse and 8 a fifth worse: the core
/// appends one proposal per fsync, so more in flight only makes each batch smaller.)
const WRITE_PIPELINE: usize = 2;
/// The most writes in one batch (one log entry).
const MAX_BATCH_WRITES: usize = 512;
/// The most writes waiting for a leader to propose them.
const MAX_WAITING_WRITES: usize = 8192;

/// A read's answer: the read index, or why there is none.
type ReadIndexTx = tokio::sync::oneshot::Sender<Result<Option<u64>, Error>>;

/// Reads waiting for the next read index of a group, and whether a round is under way.
#[derive(Default)]
struct ReadQueue {
    round_running: bool,
    waiting: Vec<ReadIndexTx>,
}

impl Group {
    fn membership(&self) -> MembershipView {
        let m = self.raft.metrics().borrow().membership_config.clone();
        view(m.membership())
    }

    fn peer_of(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.peer_id.clone())
    }

    fn known_leader(&self) -> Option<String> {
        let leader = self.raft.metrics().borrow().current_leader;
        leader.and_then(|id| self.peer_of(id))
    }
}

fn view(m: &openraft::Membership<NodeId, RaftPeer>) -> MembershipView {
    let name = |id: &NodeId| {
        m.get_node(id)
            .map(|n| n.peer_id.clone())
            .unwrap_or_else(|| format!("node-{id}"))
    };
    let configs: Vec<Vec<String>> = m
        .get_joint_config()
        .iter()
        .map(|c| {
            let mut v: Vec<String> = c.iter().map(name).collect();
            v.sort();
            v
        })
        .collect();
    let mut voters: Vec<String> = m.voter_ids().map(|id| name(&id)).collect();
    voters.sort();
    let mut learners: Vec<String> = m.learner_ids().map(|id| name(&id)).collect();
    learners.sort();
    MembershipView {
        configs,
        voters,
        learners,
    }
}

/// Why an operation did not run on this node.
enum Exec {
    /// Not the leader; the leader this node knows of, if any.
    NotLeader(Option<String>),
    Fail(Error),
}

/// A forward that failed, and whether the peer may have received it.
struct ForwardError {
    error: Error,
    maybe_delivered: bool,
}

impl From<Error> for Exec {
    fn from(e: Error) -> Self {
        Exec::Fail(e)
    }
}

/// Who may take part in a group, in the receiving node's own view of its workload's
/// placement. A peer's Raft message or forwarded request is served only when the peer is a
/// member of the group as this node knows it, or a participant by this policy; only
/// participants may be added as learners or voters, and a voter may be removed on a
/// forwarded request only once it is no longer a participant.
pub trait Participants: Send + Sync + 'static {
    /// Whether `peer` hosts, or is about to host, a replica of `group`'s workload.
    fn may_participate(&self, group: &GroupId, peer: &str) -> bool;
}

/// The policy of a node that was given none: no peer outside a group's membership takes part.
struct Nobody;

impl Participants for Nobody {
    fn may_participate(&self, _: &GroupId, _: &str) -> bool {
        false
    }
}

struct Inner<T> {
    participants: std::sync::RwLock<Arc<dyn Participants>>,
    local: String,
    local_id: NodeId,
    config: RaftConfig,
    root: PathBuf,
    transport: Arc<T>,
    groups: Mutex<HashMap<GroupId, Arc<Group>>>,
    /// Serializes opening, creating and deleting groups.
    lifecycle: tokio::sync::Mutex<()>,
    forward_out: Arc<Semaphore>,
    forward_in: Arc<Semaphore>,
    /// Groups found on disk that could not be opened.
    failed: Mutex<Vec<(GroupId, Error)>>,
}

/// Every Raft group of one node.
///
/// Cheap to clone; all clones share the groups. See the [module docs](super) for the
/// lifecycle the node drives.
pub struct Groups<T: RaftTransport> {
    inner: Arc<Inner<T>>,
}

impl<T: RaftTransport> Clone for Groups<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

fn storage_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Storage {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl<T: RaftTransport> Groups<T> {
    /// Opens the groups of node `local_peer` under `data_dir/raft/`, restarting every group
    /// found on disk (a node restarts its groups from its own state, without the mesh).
    pub async fn open(
        local_peer: &str,
        data_dir: &Path,
        config: RaftConfig,
        transport: T,
    ) -> Result<Self, Error> {
        config.validate()?;
        check_peer_id(local_peer)?;
        let root = data_dir.join("raft");
        let max = config.max_pending_forwards;
        let groups = Self {
            inner: Arc::new(Inner {
                participants: std::sync::RwLock::new(Arc::new(Nobody)),
                local: local_peer.to_string(),
                local_id: node_id(local_peer),
                config,
                root: root.clone(),
                transport: Arc::new(transport),
                groups: Mutex::new(HashMap::new()),
                lifecycle: tokio::sync::Mutex::new(()),
                forward_out: Arc::new(Semaphore::new(max)),
                forward_in: Arc::new(Semaphore::new(max)),
                failed: Mutex::new(Vec::new()),
            }),
        };
        let found = tokio::task::spawn_blocking(move || scan(&root))
            .await
            .map_err(|e| storage_error(data_dir, format!("scanning: {e}")))??;
        // One damaged group must not keep the others from serving.
        for id in found {
            match groups.start_group(&id).await {
                Ok(g) => {
                    // A first voter that stopped before its group formed bootstraps again.
                    if let Ok(Some(members)) = g.reader.bootstrap()
                        && let Err(e) = groups.bootstrap(&g, members).await
                    {
                        tracing::warn!(group = %id, error = %e, "bootstrapping");
                    }
                    groups.map_insert(g)
                }
                Err(e) => {
                    tracing::error!(group = %id, error = %e, "cannot open the raft group");
                    if let Ok(mut f) = groups.inner.failed.lock() {
                        f.push((id, e));
                    }
                }
            }
        }
        Ok(groups)
    }

    /// Groups found on disk by [`Self::open`] that could not be opened, and why: the node
    /// reports their workloads failed (it must not re-create them empty).
    pub fn open_failures(&self) -> Vec<(GroupId, Error)> {
        self.inner
            .failed
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// This node's peer id.
    pub fn local_peer(&self) -> &str {
        &self.inner.local
    }

    /// The settings in force.
    pub fn config(&self) -> &RaftConfig {
        &self.inner.config
    }

    /// The handler the in-memory transport delivers requests to (the node calls
    /// [`Self::handle_rpc`] directly).
    /// Sets who, besides a group's members, may take part in it (see [`Participants`]).
    /// Until it is set, nobody outside a group's membership does.
    pub fn set_participants(&self, policy: Arc<dyn Participants>) {
        let mut p = match self.inner.participants.write() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        *p = policy;
    }

    pub fn rpc_handler(&self) -> Arc<dyn RpcHandler> {
        self.inner.clone()
    }

    /// The groups open on this node, sorted.
    pub fn list_groups(&self) -> Vec<GroupId> {
        let mut v: Vec<GroupId> = self.map(|m| m.keys().cloned().collect());
        v.sort();
        v
    }

    fn map<R>(&self, f: impl FnOnce(&mut HashMap<GroupId, Arc<Group>>) -> R) -> R {
        let mut m = match self.inner.groups.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut m)
    }

    fn map_insert(&self, g: Arc<Group>) {
        self.map(|m| m.insert(g.id.clone(), g));
    }

    fn group(&self, id: &GroupId) -> Result<Arc<Group>, Error> {
        self.map(|m| m.get(id).cloned())
            .ok_or_else(|| Error::UnknownGroup { group: id.clone() })
    }

    fn check_capacity(&self) -> Result<(), Error> {
        let count = self.map(|m| m.len());
        if count >= self.inner.config.max_groups {
            return Err(Error::TooManyGroups {
                count,
                max: self.inner.config.max_groups,
            });
        }
        Ok(())
    }

    async fn start_group(&self, id: &GroupId) -> Result<Arc<Group>, Error> {
        let dir = self.inner.root.join(id.rel_path());
        let storage = store::open(&dir, &self.inner.local).await?;
        let liveness = Arc::new(Liveness::default());
        let cfg = &self.inner.config;
        let network = GroupNetworkFactory {
            shared: Arc::new(NetShared {
                group: id.clone(),
                local: self.inner.local_id,
                transport: self.inner.transport.clone(),
                max_rpc_bytes: cfg.max_rpc_bytes,
                backoff: cfg.heartbeat() * 2,
                liveness: liveness.clone(),
            }),
        };
        let raft = Raft::new(
            self.inner.local_id,
            cfg.openraft(id)?,
            network,
            storage.log,
            storage.sm,
        )
        .await
        .map_err(|e| Error::Stopped {
            group: id.clone(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(Group {
            id: id.clone(),
            raft,
            reader: storage.reader,
            liveness,
            released: storage.released,
            dir,
            bootstrap: Mutex::new(None),
            introducer: Mutex::new(None),
            reads: Mutex::new(ReadQueue::default()),
            writes: Mutex::new(WriteQueue::default()),
        }))
    }

    fn members(
        &self,
        group: &GroupId,
        peers: &[String],
    ) -> Result<BTreeMap<NodeId, RaftPeer>, Error> {
        let mut members = BTreeMap::new();
        for p in peers {
            let peer = RaftPeer::new(p)?;
            if let Some(other) = members.insert(peer.node_id(), peer.clone())
                && other != peer
            {
                return Err(Error::InvalidMembership {
                    group: group.clone(),
                    reason: format!("peers {other} and {peer} map to the same node id"),
                });
            }
        }
        Ok(members)
    }

    /// Creates the group on one of its first voters, when the workload is first placed.
    ///
    /// Every first voter calls this with the same `voters`. The voter with the lowest node id
    /// initialises the group at once; the others wait [`RaftConfig::bootstrap_grace`] for it
    /// and initialise themselves only if nobody has contacted them by then (all of them
    /// initialise with the same first entry, so this is safe, only slower).
    ///
    /// Idempotent: a group already open, or found on disk, is left as it is. The node must
    /// call this only for the first placement, never to replace a group that lost its data
    /// or its quorum (see [`quorum_lost`]).
    pub async fn create(&self, group: &GroupId, voters: &[String]) -> Result<(), Error> {
        group.check()?;
        if voters.is_empty() || voters.len() > MAX_VOTERS {
            return Err(Error::InvalidMembership {
                group: group.clone(),
                reason: format!(
                    "{} voters given; 1 to {MAX_VOTERS} are allowed",
                    voters.len()
                ),
            });
        }
        let members = self.members(group, voters)?;
        if !members.contains_key(&self.inner.local_id) {
            return Err(Error::InvalidMembership {
                group: group.clone(),
                reason: format!("this node ({}) is not among the voters", self.inner.local),
            });
        }
        let _l = self.inner.lifecycle.lock().await;
        if self.group(group).is_ok() {
            return Ok(());
        }
        self.check_capacity()?;
        let g = self.start_group(group).await?;
        let saved = g
            .reader
            .save_bootstrap(&members)
            .await
            .map_err(|e| storage_error(&g.dir, e));
        let started = match saved {
            Ok(()) => self.bootstrap(&g, members).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            if let Err(stop_error) = stop(g).await {
                tracing::warn!(group = %group, error = %stop_error, "stopping after a failed create");
            }
            return Err(e);
        }
        self.map_insert(g);
        Ok(())
    }

    /// Initialises a group that has never formed: at once on the first voter with the lowest
    /// node id, after the grace period on the others (unless a leader has reached them).
    async fn bootstrap(
        &self,
        g: &Arc<Group>,
        members: BTreeMap<NodeId, RaftPeer>,
    ) -> Result<(), Error> {
        let initialized = g.raft.is_initialized().await.map_err(|e| Error::Stopped {
            group: g.id.clone(),
            reason: e.to_string(),
        })?;
        if initialized || !members.contains_key(&self.inner.local_id) {
            return Ok(());
        }
        let bootstrapper = members.keys().next().copied() == Some(self.inner.local_id);
        let raft = g.raft.clone();
        let grace = if bootstrapper {
            Duration::ZERO
        } else {
            self.inner.config.bootstrap_grace()
        };
        let id = g.id.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Ok(false) = raft.is_initialized().await {
                match raft.initialize(members).await {
                    Ok(()) => tracing::info!(group = %id, "initialised the raft group"),
                    Err(e) => tracing::debug!(group = %id, error = %e, "not initialising"),
                }
            }
        });
        if let Ok(mut b) = g.bootstrap.lock() {
            *b = Some(task);
        }
        Ok(())
    }

    /// Opens the group on a node that is to host a moved replica, empty, and asks the
    /// group's leader (found through `contacts`, peers hosting the group) to add this node as
    /// a learner. The log (or a snapshot) then arrives from the leader; [`Self::promote`]
    /// makes the node a voter once it has caught up.
    pub async fn join_as_learner(&self, group: &GroupId, contacts: &[String]) -> Result<(), Error> {
        group.check()?;
        if contacts.len() > MAX_MEMBERS {
            return Err(Error::InvalidMembership {
                group: group.clone(),
                reason: format!("{} contacts given; at most {MAX_MEMBERS}", contacts.len()),
            });
        }
        for c in contacts {
            check_peer_id(c)?;
        }
        let g = {
            let _l = self.inner.lifecycle.lock().await;
            match self.group(group) {
                Ok(g) => g,
                Err(_) => {
                    self.check_capacity()?;
                    let g = self.start_group(group).await?;
                    self.map_insert(g.clone());
                    g
                }
            }
        };
        let me = self.inner.local.clone();
        let m = g.membership();
        if m.voters.contains(&me) || m.learners.contains(&me) {
            return Ok(());
        }
        let (_, leader) = self
            .leader_op_at(
                &g,
                LeaderOp::AddLearner { peer: me },
                contacts,
                self.deadline(),
            )
            .await?;
        let mut introducer = match g.introducer.lock() {
            Ok(i) => i,
            Err(poisoned) => poisoned.into_inner(),
        };
        *introducer = Some(leader);
        Ok(())
    }

    /// Adds `peer` as a learner (its node must have opened the group with
    /// [`Self::join_as_learner`] for the log to reach it).
    pub async fn add_learner(&self, group: &GroupId, peer: &str) -> Result<(), Error> {
        check_peer_id(peer)?;
        let g = self.group(group)?;
        self.leader_op(
            &g,
            LeaderOp::AddLearner {
                peer: peer.to_string(),
            },
            &[],
            self.deadline(),
        )
        .await
        .map(|_| ())
    }

    /// Makes learner `peer` a voter once it has caught up with the leader's commit index,
    /// waiting at most `catch_up` for that.
    pub async fn promote(
        &self,
        group: &GroupId,
        peer: &str,
        catch_up: Duration,
    ) -> Result<(), Error> {
        check_peer_id(peer)?;
        let g = self.group(group)?;
        let until = Instant::now() + catch_up;
        loop {
            let deadline = self
                .deadline()
                .min(until.max(Instant::now() + self.inner.config.heartbeat()));
            let progress = match self
                .leader_op(
                    &g,
                    LeaderOp::Progress {
                        peer: peer.to_string(),
                    },
                    &[],
                    deadline,
                )
                .await?
            {
                OpResult::Progress(p) => p,
                other => return Err(unexpected(&other)),
            };
            if progress.is_voter {
                return Ok(());
            }
            if !progress.is_learner {
                return Err(Error::MembershipRefused {
                    group: group.clone(),
                    reason: format!("{peer} is not a learner of the group"),
                });
            }
            if progress.caught_up() {
                match self
                    .leader_op(
                        &g,
                        LeaderOp::AddVoter {
                            peer: peer.to_string(),
                        },
                        &[],
                        self.deadline(),
                    )
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(Error::NotCaughtUp { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= until {
                return Err(Error::NotCaughtUp {
                    group: group.clone(),
                    peer: peer.to_string(),
                    matched: progress.matched,
                    needed: progress.committed.unwrap_or(0),
                });
            }
            tokio::time::sleep(self.inner.config.heartbeat()).await;
        }
    }

    /// Removes voter `peer`. The leader refuses when fewer than a majority of the current
    /// voters would remain, or when the remaining voters that answer it are not a majority
    /// of the new voter set (the group would stall).
    pub async fn remove_voter(&self, group: &GroupId, peer: &str) -> Result<(), Error> {
        check_peer_id(peer)?;
        let g = self.group(group)?;
        self.leader_op(
            &g,
            LeaderOp::RemoveVoter {
                peer: peer.to_string(),
            },
            &[],
            self.deadline(),
        )
        .await
        .map(|_| ())
    }

    /// Moves the group to the voter set `target` one replica at a time: add a learner, wait
    /// up to `catch_up` for it, promote it, remove one old voter; refuses up front (taking no
    /// step) a move with a step below a majority. Every new voter's node must have called
    /// [`Self::join_as_learner`] (or at least opened the group) for it to catch up.
    pub async fn change_voters(
        &self,
        group: &GroupId,
        target: &[String],
        catch_up: Duration,
    ) -> Result<(), Error> {
        for p in target {
            check_peer_id(p)?;
        }
        let g = self.group(group)?;
        let m = match self
            .leader_op(&g, LeaderOp::Membership, &[], self.deadline())
            .await?
        {
            OpResult::Membership(m) => m,
            other => return Err(unexpected(&other)),
        };
        if m.is_joint() {
            return Err(Error::MembershipRefused {
                group: group.clone(),
                reason: "a membership change is in progress".into(),
            });
        }
        let steps =
            plan_move(&m.voters, target).map_err(|e: PlanError| Error::MembershipRefused {
                group: group.clone(),
                reason: e.to_string(),
            })?;
        for step in steps {
            tracing::info!(group = %group, ?step, "membership step");
            match step {
                Step::AddLearner(p) => {
                    if !m.learners.contains(&p) {
                        self.add_learner(group, &p).await?;
                    }
                }
                Step::Promote(p) => self.promote(group, &p, catch_up).await?,
                Step::Remove(p) => self.remove_voter(group, &p).await?,
            }
        }
        Ok(())
    }

    /// Whether the group has lost its quorum for good, given which peers are gone for good.
    pub async fn quorum_check(
        &self,
        group: &GroupId,
        is_gone: impl Fn(&str) -> bool,
    ) -> Result<Option<QuorumLost>, Error> {
        let g = self.group(group)?;
        let (_, m) = core_state(&g).await?;
        Ok(quorum_lost(&m.configs, is_gone))
    }

    /// Stops the group and deletes its data on this node: when the workload is deleted, or
    /// (after [`Self::remove_voter`] has removed this node) when its replica has moved away.
    /// Idempotent.
    pub async fn delete_group(&self, group: &GroupId) -> Result<(), Error> {
        group.check()?;
        let _l = self.inner.lifecycle.lock().await;
        let g = self.map(|m| m.remove(group));
        let dir = match g {
            Some(g) => {
                let dir = g.dir.clone();
                stop(g).await?;
                dir
            }
            None => self.inner.root.join(group.rel_path()),
        };
        let root = self.inner.root.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(storage_error(&dir, format!("removing: {e}"))),
            }
            // The namespace directory goes when its last group does.
            if let Some(ns) = dir.parent()
                && ns != root
            {
                let _ = std::fs::remove_dir(ns);
            }
            Ok(())
        })
        .await
        .map_err(|e| storage_error(&self.inner.root, format!("removing: {e}")))?
    }

    /// Stops every group (their data stays for the next [`Self::open`]).
    pub async fn shutdown(&self) {
        let _l = self.inner.lifecycle.lock().await;
        let all: Vec<Arc<Group>> = self.map(|m| m.drain().map(|(_, g)| g).collect());
        for g in all {
            let id = g.id.clone();
            if let Err(e) = stop(g).await {
                tracing::warn!(group = %id, error = %e, "stopping the group");
            }
        }
    }

    /// The group as this node sees it.
    pub async fn status(&self, group: &GroupId) -> Result<GroupStatus, Error> {
        let g = self.group(group)?;
        // Asked of the Raft core, so a group that just started reports what it loaded.
        let (commit_index, membership) = core_state(&g).await?;
        let m = g.raft.metrics().borrow().clone();
        let (revision, state_bytes) = g
            .reader
            .revision_and_size()
            .map_err(|e| storage_error(&g.dir, e))?;
        Ok(GroupStatus {
            group: group.clone(),
            node: self.inner.local.clone(),
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            leader: m.current_leader.and_then(|id| g.peer_of(id)),
            term: m.current_term,
            configs: membership.configs,
            voters: membership.voters,
            learners: membership.learners,
            commit_index,
            last_applied: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            revision,
            state_bytes,
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.config.request_timeout()
    }

    /// Reads `key` linearizably: the leader confirms its leadership with a quorum and names
    /// its commit index (read index), this node waits until it has applied that far, then
    /// reads its own state.
    pub async fn get(&self, group: &GroupId, key: &str) -> Result<Option<Versioned>, Error> {
        check_key(key)?;
        let g = self.group(group)?;
        self.read_barrier(&g).await?;
        g.reader.get(key).map_err(|e| storage_error(&g.dir, e))
    }

    /// Lists keys starting with `prefix`, linearizably, a page at a time.
    pub async fn list(&self, group: &GroupId, prefix: &str, page: Page) -> Result<ListPage, Error> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        if let Some(after) = &page.after {
            check_key(after)?;
        }
        let g = self.group(group)?;
        self.read_barrier(&g).await?;
        let max = self.inner.config.max_list_items;
        let limit = if page.limit == 0 {
            max
        } else {
            page.limit.min(max)
        };
        let (items, next, revision) = g
            .reader
            .list(prefix, page.after.as_deref(), limit)
            .map_err(|e| storage_error(&g.dir, e))?;
        Ok(ListPage {
            items,
            next,
            revision,
        })
    }

    /// Sets `key`; with `if_revision`, only if the key is at that revision (0: absent).
    /// Returns the new revision.
    pub async fn put(
        &self,
        group: &GroupId,
        key: &str,
        value: Vec<u8>,
        if_revision: Option<u64>,
    ) -> Result<u64, Error> {
        self.write(
            group,
            KvCommand::Put {
                key: key.to_string(),
                value,
                if_revision,
            },
        )
        .await
    }

    /// Deletes `key`; with `if_revision`, only if the key is at that revision. Returns the
    /// new revision; [`Error::KeyNotFound`] when the key does not exist.
    pub async fn delete(
        &self,
        group: &GroupId,
        key: &str,
        if_revision: Option<u64>,
    ) -> Result<u64, Error> {
        self.write(
            group,
            KvCommand::Delete {
                key: key.to_string(),
                if_revision,
            },
        )
        .await
    }

    async fn write(&self, group: &GroupId, cmd: KvCommand) -> Result<u64, Error> {
        cmd.check()?;
        let g = self.group(group)?;
        let key = cmd.key().to_string();
        match self
            .leader_op(&g, LeaderOp::Write(cmd), &[], self.deadline())
            .await?
        {
            OpResult::Applied(ApplyResult::Written { revision }) => Ok(revision),
            OpResult::Applied(ApplyResult::NotFound { .. }) => Err(Error::KeyNotFound {
                group: group.clone(),
                key,
            }),
            OpResult::Applied(ApplyResult::PreconditionFailed {
                key,
                expected,
                current,
            }) => Err(Error::PreconditionFailed {
                group: group.clone(),
                key,
                expected,
                current,
            }),
            OpResult::Applied(ApplyResult::StateFull { key, size, limit }) => {
                Err(Error::StateFull {
                    group: group.clone(),
                    key,
                    size,
                    limit,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// A read index for a read that arrives now: the leader's commit index, taken after the
    /// leader confirmed with a quorum that it still leads (here or on the leader).
    ///
    /// Concurrent reads share one confirmation, as etcd's read loop does: a read that arrives
    /// while a round is under way waits for the next round, which starts after it arrived, so
    /// every read still gets an index taken after its arrival (linearizable), and a round costs
    /// one forward to the leader and one heartbeat per voter however many reads it serves.
    /// Without this, every read sent its own heartbeat to every voter: under 64 concurrent
    /// readers the heartbeats filled the connections' stream limits and reads failed with
    /// "cannot confirm a quorum" (docs/benchmarks.md).
    async fn read_index(&self, g: &Arc<Group>, deadline: Instant) -> Result<Option<u64>, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_round = {
            let mut q = g.reads.lock().unwrap_or_else(|p| p.into_inner());
            q.waiting.push(tx);
            !std::mem::replace(&mut q.round_running, true)
        };
        if start_round {
            // A task of its own: the rounds go on when the read that started them is dropped.
            let (groups, g) = (self.clone(), g.clone());
            tokio::spawn(async move { groups.read_rounds(&g).await });
        }
        let timeout = || Error::Timeout {
            group: g.id.clone(),
            what: "confirming leadership for a read".into(),
            ms: self.inner.config.request_timeout_ms,
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Stopped {
                group: g.id.clone(),
                reason: "the read was dropped".into(),
            }),
            Err(_) => Err(timeout()),
        }
    }

    /// Proposes a client's write on this node, the leader (a node that is not answers
    /// [`Exec::NotLeader`]), and waits until it is applied.
    ///
    /// openraft 0.9's core appends each proposal as its own log entry and waits for that
    /// append's fsync before it takes the next request, so a write per entry caps a group at
    /// one write per fsync (about 2,400 a second on the build machine, docs/benchmarks.md).
    /// Writes therefore wait in the group's queue, and up to [`WRITE_PIPELINE`] tasks take
    /// all that wait (up to [`MAX_BATCH_WRITES`] and half an RPC's bytes) as one
    /// [`KvCommand::Batch`]: one entry, one fsync, one replication, applied in order with a
    /// result and a revision for each write. A lone write is proposed at once, as itself.
    /// Every write is still linearized between its arrival and its answer.
    async fn propose(
        &self,
        g: &Arc<Group>,
        cmd: KvCommand,
        deadline: Instant,
    ) -> Result<OpResult, Exec> {
        let key = cmd.key().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = g.writes.lock().unwrap_or_else(|p| p.into_inner());
            if q.waiting.len() >= MAX_WAITING_WRITES {
                return Err(Exec::Fail(Error::WritesWaiting {
                    group: g.id.clone(),
                    waiting: q.waiting.len(),
                    max: MAX_WAITING_WRITES,
                }));
            }
            q.waiting.push_back((cmd, tx));
            let start = q.proposers < WRITE_PIPELINE;
            if start {
                q.proposers += 1;
            }
            start
        };
        if start {
            // A task of its own: the batches go on when the write that started them is dropped.
            let (groups, g) = (self.clone(), g.clone());
            tokio::spawn(async move { groups.write_rounds(&g).await });
        }
        let ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Exec::Fail(Error::Stopped {
                group: g.id.clone(),
                reason: format!("the write of key {key:?} was dropped"),
            })),
            Err(_) => Err(Exec::Fail(Error::Timeout {
                group: g.id.clone(),
                what: format!("the write of key {key:?}"),
                ms,
            })),
        }
    }

    /// Proposes the writes queued on `g`, a batch at a time, until none is left.
    async fn write_rounds(&self, g: &Arc<Group>) {
        let max_bytes = self.inner.config.max_rpc_bytes / 2;
        loop {
            let batch = {
                let mut q = g.writes.lock().unwrap_or_else(|p| p.into_inner());
                let mut batch: Vec<(KvCommand, WriteTx)> = Vec::new();
                let mut bytes = 0;
                while let Some((cmd, tx)) = q.waiting.pop_front() {
                    // Its caller gave up (its answer is "unknown"): not proposing it is one
                    // of the outcomes it allowed.
                    if tx.is_closed() {
                        continue;
                    }
                    let weight = cmd.weight();
                    if !batch.is_empty()
                        && (batch.len() >= MAX_BATCH_WRITES || bytes + weight > max_bytes)
                    {
                        q.waiting.push_front((cmd, tx));
                        break;
                    }
                    bytes += weight;
                    batch.push((cmd, tx));
                }
                if batch.is_empty() {
                    q.proposers -= 1;
                    return;
                }
                batch
            };
            let (mut commands, answers): (Vec<KvCommand>, Vec<WriteTx>) = batch.into_iter().unzip();
            let proposal = match commands.len() {
                1 => commands.remove(0),
                _ => KvCommand::Batch(commands),
            };
            let batched = matches!(proposal, KvCommand::Batch(_));
            let key = proposal.key().to_string();
            let limit = self.inner.config.request_timeout();
            let fail = |answers: Vec<WriteTx>, e: &dyn Fn() -> Exec| {
                for a in answers {
                    let _ = a.send(Err(e()));
                }
            };
            // Not the leader (any more): nothing was proposed, the callers may go elsewhere.
            if let Err(e) = self.require_leader(g) {
                fail(answers, &|| match &e {
                    Exec::NotLeader(l) => Exec::NotLeader(l.clone()),
                    Exec::Fail(f) => Exec::Fail(f.clone()),
                });
                continue;
            }
            match tokio::time::timeout(limit, g.raft.client_write(proposal)).await {
                Ok(Ok(resp)) => {
                    let results = match resp.data {
                        ApplyResult::Batch(results) if batched => results,
                        one => vec![one],
                    };
                    if results.len() != answers.len() {
                        let reason = format!(
                            "a batch of {} writes was applied with {} results",
                            answers.len(),
                            results.len()
                        );
                        fail(answers, &|| {
                            Exec::Fail(Error::OutcomeUnknown {
                                group: g.id.clone(),
                                reason: reason.clone(),
                            })
                        });
                        continue;
                    }
                    for (a, r) in answers.into_iter().zip(results) {
                        let _ = a.send(Ok(OpResult::Applied(r)));
                    }
                }
                // openraft also answers "forward to the leader" for an entry it had appended
                // when this leader stepped down and its log was reverted, and another leader
                // could still commit a copy of that entry: the outcome is unknown, and the
                // write must not be sent to the next leader as if it had never been proposed.
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    let to = f.leader_node.map(|n| n.peer_id);
                    fail(answers, &|| {
                        Exec::Fail(Error::OutcomeUnknown {
                            group: g.id.clone(),
                            reason: format!(
                                "this node stepped down as leader while the write of key \
                                 {key:?} was proposed{}",
                                to.as_ref()
                                    .map(|l| format!("; the leader is now {l}"))
                                    .unwrap_or_default()
                            ),
                        })
                    })
                }
                Ok(Err(e)) => fail(answers, &|| write_error(g, e.clone())),
                Err(_) => fail(answers, &|| {
                    Exec::Fail(Error::Timeout {
                        group: g.id.clone(),
                        what: if batched {
                            format!("a batch of writes (the first of key {key:?})")
                        } else {
                            format!("the write of key {key:?}")
                        },
                        ms: limit.as_millis() as u64,
                    })
                }),
            }
        }
    }

    /// Serves the reads queued on `g`, a round at a time, until none is left.
    async fn read_rounds(&self, g: &Arc<Group>) {
        loop {
            let batch = {
                let mut q = g.reads.lock().unwrap_or_else(|p| p.into_inner());
                q.waiting.retain(|w| !w.is_closed());
                if q.waiting.is_empty() {
                    q.round_running = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            let result = match self
                .leader_op(g, LeaderOp::ReadIndex, &[], self.deadline())
                .await
            {
                Ok(OpResult::ReadIndex(i)) => Ok(i),
                Ok(other) => Err(unexpected(&other)),
                Err(e) => Err(e),
            };
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
    }

    async fn read_barrier(&self, g: &Arc<Group>) -> Result<(), Error> {
        let deadline = self.deadline();
        let index = self.read_index(g, deadline).await?;
        let wait = deadline.saturating_duration_since(Instant::now());
        g.raft
            .wait(Some(wait))
            .applied_index_at_least(index, "read index")
            .await
            .map(|_| ())
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => Error::Timeout {
                    group: g.id.clone(),
                    what: format!("applying up to the read index {index:?}"),
                    ms: self.inner.config.request_timeout_ms,
                },
                openraft::metrics::WaitError::ShuttingDown => Error::Stopped {
                    group: g.id.clone(),
                    reason: "shutting down".into(),
                },
            })
    }

    /// Runs `op` on the group's leader: here if this node leads, else forwarded to the leader
    /// this node knows of (or to `contacts` while it knows none), following redirects, until
    /// `deadline`.
    async fn leader_op(
        &self,
        g: &Arc<Group>,
        op: LeaderOp,
        contacts: &[String],
        deadline: Instant,
    ) -> Result<OpResult, Error> {
        self.leader_op_at(g, op, contacts, deadline)
            .await
            .map(|(r, _)| r)
    }

    /// [`Self::leader_op`], also answering which node ran it.
    async fn leader_op_at(
        &self,
        g: &Arc<Group>,
        op: LeaderOp,
        contacts: &[String],
        deadline: Instant,
    ) -> Result<(OpResult, String), Error> {
        let mut next_contact = 0usize;
        let mut redirect: Option<String> = None;
        let mut hops = 0usize;
        let mut last = String::from("no leader known");
        loop {
            if Instant::now() >= deadline {
                return Err(Error::NoLeader {
                    group: g.id.clone(),
                    detail: format!(
                        "gave up after {} ms; {last}",
                        self.inner.config.request_timeout_ms
                    ),
                });
            }
            if hops >= MAX_HOPS {
                hops = 0;
                self.pause(deadline).await;
            }
            hops += 1;
            let target = redirect.take().or_else(|| g.known_leader()).or_else(|| {
                let c = contacts.get(next_contact % contacts.len().max(1)).cloned();
                next_contact += 1;
                c
            });
            let Some(target) = target else {
                self.pause(deadline).await;
                continue;
            };
            if target == self.inner.local {
                match self.exec_local(g, &op, deadline).await {
                    Ok(r) => return Ok((r, target)),
                    Err(Exec::Fail(e)) => return Err(e),
                    Err(Exec::NotLeader(l)) => {
                        last = "this node is not the leader and knows of none".into();
                        redirect = l.filter(|l| *l != self.inner.local);
                        if redirect.is_none() {
                            self.pause(deadline).await;
                        }
                    }
                }
                continue;
            }
            match self.forward(g, &target, &op, deadline).await {
                Ok(ForwardReply::Done(r)) => return Ok((r, target)),
                Ok(ForwardReply::Failed(e)) => return Err(e),
                Ok(ForwardReply::NotLeader { leader }) => {
                    last = format!("{target} is not the leader");
                    redirect = leader.filter(|l| *l != target);
                    if redirect.is_none() {
                        self.pause(deadline).await;
                    }
                }
                Err(ForwardError {
                    error,
                    maybe_delivered,
                }) => {
                    // A write the leader may have received is not sent again: it could be
                    // applied twice (and a conditional one would then report a conflict with
                    // itself). The caller learns that its outcome is unknown.
                    if maybe_delivered && matches!(op, LeaderOp::Write(_)) {
                        return Err(Error::OutcomeUnknown {
                            group: g.id.clone(),
                            reason: format!("the write was forwarded to {target}: {error}"),
                        });
                    }
                    if matches!(error, Error::Busy { .. }) {
                        return Err(error);
                    }
                    last = format!("{target}: {error}");
                    self.pause(deadline).await;
                }
            }
        }
    }

    async fn pause(&self, deadline: Instant) {
        let until = (Instant::now() + self.inner.config.heartbeat()).min(deadline);
        tokio::time::sleep_until(until).await;
    }

    /// Sends `op` to `peer` for it to run as the leader.
    async fn forward(
        &self,
        g: &Arc<Group>,
        peer: &str,
        op: &LeaderOp,
        deadline: Instant,
    ) -> Result<ForwardReply, ForwardError> {
        let undelivered = |error: Error| ForwardError {
            error,
            maybe_delivered: false,
        };
        let max = self.inner.config.max_pending_forwards;
        let _permit = self
            .inner
            .forward_out
            .clone()
            .try_acquire_owned()
            .map_err(|_| undelivered(Error::Busy { pending: max, max }))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let req = Request {
            group: g.id.clone(),
            body: RequestBody::Forward {
                op: op.clone(),
                timeout_ms: remaining.as_millis() as u64,
            },
        };
        let max_rpc = self.inner.config.max_rpc_bytes;
        let bytes = encode_limited("forwarded request", &req, max_rpc).map_err(undelivered)?;
        let transport_error = |reason: String, maybe_delivered: bool| ForwardError {
            error: Error::Transport {
                peer: peer.to_string(),
                reason,
            },
            maybe_delivered,
        };
        // A little longer than the leader's own deadline, so its answer can arrive.
        let wait = remaining + self.inner.config.heartbeat();
        let answer = tokio::time::timeout(wait, self.inner.transport.call(peer, bytes))
            .await
            .map_err(|_| {
                transport_error(format!("no answer within {} ms", wait.as_millis()), true)
            })?
            .map_err(|e| {
                let sent = !matches!(e, super::network::TransportError::Unreachable { .. });
                transport_error(e.to_string(), sent)
            })?;
        match decode_limited::<Response>("response", &answer, max_rpc) {
            Err(e) => Err(transport_error(e.to_string(), true)),
            Ok(Response::Forward(reply)) => Ok(reply),
            Ok(Response::Refused(Refusal::UnknownGroup(_))) => {
                Ok(ForwardReply::NotLeader { leader: None })
            }
            Ok(Response::Refused(r)) => Err(transport_error(format!("refused: {r}"), false)),
            Ok(other) => Err(transport_error(
                format!("unexpected answer {other:?}"),
                true,
            )),
        }
    }

    /// Runs `op` here if this node is the leader.
    async fn exec_local(
        &self,
        g: &Arc<Group>,
        op: &LeaderOp,
        deadline: Instant,
    ) -> Result<OpResult, Exec> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = |what: String| {
            Exec::Fail(Error::Timeout {
                group: g.id.clone(),
                what,
                ms: remaining.as_millis() as u64,
            })
        };
        let stopped = |reason: String| {
            Exec::Fail(Error::Stopped {
                group: g.id.clone(),
                reason,
            })
        };
        match op {
            LeaderOp::Write(cmd) => {
                cmd.check()?;
                self.propose(g, cmd.clone(), deadline).await
            }
            LeaderOp::ReadIndex => {
                match tokio::time::timeout(remaining, g.raft.get_read_log_id()).await {
                    Err(_) => Err(timeout("confirming leadership for a read".into())),
                    Ok(Ok((read, _))) => Ok(OpResult::ReadIndex(read.map(|l| l.index))),
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                        Err(Exec::NotLeader(f.leader_node.map(|n| n.peer_id)))
                    }
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                        Err(Exec::Fail(Error::Unavailable {
                            group: g.id.clone(),
                            reason: format!(
                                "only {} of its {} voters confirmed this leader within a heartbeat",
                                q.got.len(),
                                g.membership().voters.len()
                            ),
                        }))
                    }
                    Ok(Err(RaftError::Fatal(f))) => Err(stopped(f.to_string())),
                }
            }
            LeaderOp::Membership => {
                self.require_leader(g)?;
                Ok(OpResult::Membership(g.membership()))
            }
            LeaderOp::Progress { peer } => {
                check_peer_id(peer)?;
                self.require_leader(g)?;
                Ok(OpResult::Progress(self.progress(g, peer).await))
            }
            LeaderOp::AddLearner { peer } => {
                let target = RaftPeer::new(peer)?;
                self.require_leader(g)?;
                let m = g.raft.metrics().borrow().membership_config.clone();
                let m = m.membership();
                if let Some(existing) = m.get_node(&target.node_id()) {
                    if *existing == target {
                        return Ok(OpResult::Done);
                    }
                    return Err(Exec::Fail(Error::InvalidMembership {
                        group: g.id.clone(),
                        reason: format!("{target} maps to the node id of member {existing}"),
                    }));
                }
                if m.nodes().count() >= MAX_MEMBERS {
                    return Err(Exec::Fail(Error::MembershipRefused {
                        group: g.id.clone(),
                        reason: format!("the group already has {MAX_MEMBERS} members"),
                    }));
                }
                let add = g.raft.add_learner(target.node_id(), target.clone(), false);
                match tokio::time::timeout(remaining, add).await {
                    Err(_) => Err(timeout(format!("adding learner {target}"))),
                    Ok(Ok(_)) => Ok(OpResult::Done),
                    Ok(Err(e)) => Err(write_error(g, e)),
                }
            }
            LeaderOp::AddVoter { peer } => {
                let target = RaftPeer::new(peer)?;
                self.require_leader(g)?;
                let p = self.progress(g, peer).await;
                if p.is_voter {
                    return Ok(OpResult::Done);
                }
                let voters = g.membership().voters.len();
                if voters >= MAX_VOTERS {
                    return Err(Exec::Fail(Error::MembershipRefused {
                        group: g.id.clone(),
                        reason: format!(
                            "the group already has {voters} voters; at most {MAX_VOTERS}"
                        ),
                    }));
                }
                if !p.is_learner || !p.caught_up() {
                    return Err(Exec::Fail(Error::NotCaughtUp {
                        group: g.id.clone(),
                        peer: peer.clone(),
                        matched: p.matched,
                        needed: p.committed.unwrap_or(0),
                    }));
                }
                let ids = BTreeSet::from([target.node_id()]);
                let change = g
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(ids), false);
                match tokio::time::timeout(remaining, change).await {
                    Err(_) => Err(timeout(format!("promoting {target}"))),
                    Ok(Ok(_)) => Ok(OpResult::Done),
                    Ok(Err(e)) => Err(write_error(g, e)),
                }
            }
            LeaderOp::RemoveVoter { peer } => {
                let target = RaftPeer::new(peer)?;
                self.require_leader(g)?;
                let m = g.membership();
                let refuse = |reason: String| {
                    Exec::Fail(Error::MembershipRefused {
                        group: g.id.clone(),
                        reason,
                    })
                };
                if m.is_joint() {
                    return Err(refuse("a membership change is in progress".into()));
                }
                if !m.voters.contains(peer) {
                    return Ok(OpResult::Done);
                }
                let voters = m.voters.len();
                let left: Vec<&String> = m.voters.iter().filter(|v| *v != peer).collect();
                if left.len() < majority(voters) {
                    return Err(refuse(format!(
                        "removing {peer} would leave {} of {voters} voters, fewer than a majority ({})",
                        left.len(),
                        majority(voters)
                    )));
                }
                let window = self.inner.config.election_timeout_max();
                let live = left
                    .iter()
                    .filter(|v| {
                        **v == &self.inner.local || g.liveness.answered_within(node_id(v), window)
                    })
                    .count();
                if live < majority(left.len()) {
                    return Err(refuse(format!(
                        "only {live} of the {} remaining voters answer the leader; {} are needed to keep the group serving",
                        left.len(),
                        majority(left.len())
                    )));
                }
                let ids = BTreeSet::from([target.node_id()]);
                let change = g
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters(ids), false);
                match tokio::time::timeout(remaining, change).await {
                    Err(_) => Err(timeout(format!("removing voter {target}"))),
                    Ok(Ok(_)) => Ok(OpResult::Done),
                    Ok(Err(e)) => Err(write_error(g, e)),
                }
            }
        }
    }

    fn require_leader(&self, g: &Arc<Group>) -> Result<(), Exec> {
        let m = g.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            Ok(())
        } else {
            Err(Exec::NotLeader(
                m.current_leader.and_then(|id| g.peer_of(id)),
            ))
        }
    }

    async fn progress(&self, g: &Arc<Group>, peer: &str) -> PeerProgress {
        let id = node_id(peer);
        let m = g.raft.metrics().borrow().clone();
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned())
            .flatten()
            .map(|l| l.index);
        let committed = g
            .raft
            .with_raft_state(|s| s.committed.map(|l| l.index))
            .await
            .ok()
            .flatten();
        let membership = m.membership_config.membership();
        let is_voter = membership.voter_ids().any(|v| v == id);
        let is_learner = membership.learner_ids().any(|v| v == id);
        PeerProgress {
            matched,
            committed,
            is_voter,
            is_learner,
            live: g
                .liveness
                .answered_within(id, self.inner.config.election_timeout_max()),
        }
    }

    /// Serves one request from peer `from` (the node's request-response handler for
    /// [`super::wire::PROTOCOL`]); the answer is always an encoded [`Response`].
    pub async fn handle_rpc(&self, from: &str, request: &[u8]) -> Vec<u8> {
        let resp = self.serve(from, request).await;
        match encode(&resp) {
            Ok(b) => b,
            Err(e) => encode(&Response::Refused(Refusal::Malformed(format!(
                "encoding the answer: {e}"
            ))))
            .unwrap_or_default(),
        }
    }

    fn may_participate(&self, group: &GroupId, peer: &str) -> bool {
        let policy = match self.inner.participants.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        policy.may_participate(group, peer)
    }

    async fn serve(&self, from: &str, bytes: &[u8]) -> Response {
        let max = self.inner.config.max_rpc_bytes;
        if bytes.len() > max {
            return Response::Refused(Refusal::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let req: Request = match decode_limited("request", bytes, max) {
            Ok(r) => r,
            Err(e) => return Response::Refused(Refusal::Malformed(e.to_string())),
        };
        if let Err(e) = req.group.check() {
            return Response::Refused(Refusal::Malformed(e.to_string()));
        }
        let Ok(g) = self.group(&req.group) else {
            return Response::Refused(Refusal::UnknownGroup(req.group));
        };
        // Only the group's members and its workload's hosts (in this node's own view) are
        // heard: an admitted node that is neither cannot vote, lead, write or read here.
        // Members of the effective configuration, and of the committed one: a leader that
        // removes itself leads until the configuration without it is committed, and the
        // followers must hear that commit from it.
        let Ok((voter, member)) = g
            .raft
            .with_raft_state({
                let from = from.to_string();
                move |s| {
                    let (mut voter, mut member) = (false, false);
                    for m in [
                        s.membership_state.effective().membership(),
                        s.membership_state.committed().membership(),
                    ] {
                        let v = view(m);
                        voter |= v.voters.contains(&from);
                        member |= v.voters.contains(&from) || v.learners.contains(&from);
                    }
                    (voter, member)
                }
            })
            .await
        else {
            return Response::Refused(Refusal::UnknownGroup(g.id.clone()));
        };
        let participates = |peer: &str| self.may_participate(&g.id, peer);
        let introduced = !member && {
            let i = match g.introducer.lock() {
                Ok(i) => i,
                Err(poisoned) => poisoned.into_inner(),
            };
            i.as_deref() == Some(from)
        };
        if !member && !introduced && !participates(from) {
            return Response::Refused(Refusal::NotParticipant {
                sender: from.to_string(),
                group: g.id.clone(),
            });
        }
        let sender = node_id(from);
        let mismatch = |vote: &Vote<NodeId>| {
            let claimed = vote.leader_id().voted_for();
            (claimed != Some(sender)).then(|| {
                Response::Refused(Refusal::SenderMismatch {
                    sender: from.to_string(),
                    claimed: claimed.unwrap_or_default(),
                })
            })
        };
        match req.body {
            RequestBody::AppendEntries(rpc) => {
                if let Some(refusal) = mismatch(&rpc.vote) {
                    return refusal;
                }
                Response::AppendEntries(g.raft.append_entries(rpc).await)
            }
            RequestBody::Vote(rpc) => {
                if let Some(refusal) = mismatch(&rpc.vote) {
                    return refusal;
                }
                Response::Vote(g.raft.vote(rpc).await)
            }
            RequestBody::InstallSnapshot(chunk) => {
                if let Some(refusal) = mismatch(&chunk.vote) {
                    return refusal;
                }
                if chunk.offset.saturating_add(chunk.data.len() as u64) > MAX_SNAPSHOT_BYTES {
                    return Response::Refused(Refusal::SnapshotTooLarge {
                        offset: chunk.offset,
                        max: MAX_SNAPSHOT_BYTES,
                    });
                }
                Response::InstallSnapshot(g.raft.install_snapshot(chunk.into()).await)
            }
            RequestBody::Forward { op, timeout_ms } => {
                let not_allowed = |reason: &str| {
                    Response::Refused(Refusal::NotAllowed {
                        sender: from.to_string(),
                        group: g.id.clone(),
                        op: op.name().to_string(),
                        reason: reason.to_string(),
                    })
                };
                match &op {
                    LeaderOp::AddLearner { peer } if peer != from && !voter => {
                        return not_allowed("only a voter adds a learner other than itself");
                    }
                    LeaderOp::AddLearner { peer } | LeaderOp::AddVoter { peer }
                        if !participates(peer) =>
                    {
                        return not_allowed(&format!(
                            "{peer} hosts no replica of the workload in this node's view"
                        ));
                    }
                    LeaderOp::AddVoter { .. } | LeaderOp::RemoveVoter { .. } if !voter => {
                        return not_allowed("only a voter changes the voters");
                    }
                    LeaderOp::RemoveVoter { peer } if peer != from && participates(peer) => {
                        return not_allowed(&format!(
                            "{peer} still hosts a replica of the workload in this node's view"
                        ));
                    }
                    _ => {}
                }
                let max = self.inner.config.max_pending_forwards;
                let Ok(_permit) = self.inner.forward_in.clone().try_acquire_owned() else {
                    return Response::Refused(Refusal::Busy { max });
                };
                let ms = timeout_ms.min(self.inner.config.request_timeout_ms);
                let deadline = Instant::now() + Duration::from_millis(ms);
                Response::Forward(match self.exec_local(&g, &op, deadline).await {
                    Ok(r) => ForwardReply::Done(r),
                    Err(Exec::NotLeader(leader)) => ForwardReply::NotLeader { leader },
                    Err(Exec::Fail(e)) => ForwardReply::Failed(e),
                })
            }
        }
    }
}

fn write_error(g: &Arc<Group>, e: RaftError<NodeId, ClientWriteError<NodeId, RaftPeer>>) -> Exec {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            Exec::NotLeader(f.leader_node.map(|n| n.peer_id))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Exec::Fail(Error::MembershipRefused {
                group: g.id.clone(),
                reason: c.to_string(),
            })
        }
        RaftError::Fatal(f) => Exec::Fail(Error::Stopped {
            group: g.id.clone(),
            reason: f.to_string(),
        }),
    }
}

fn unexpected(r: &OpResult) -> Error {
    Error::Wire {
        reason: format!("unexpected answer {r:?}"),
    }
}

/// The commit index and membership, as the Raft core holds them.
async fn core_state(g: &Arc<Group>) -> Result<(Option<u64>, MembershipView), Error> {
    g.raft
        .with_raft_state(|s| {
            (
                s.committed.map(|l| l.index),
                view(s.membership_state.effective().membership()),
            )
        })
        .await
        .map_err(|e| Error::Stopped {
            group: g.id.clone(),
            reason: e.to_string(),
        })
}

/// Shuts a group down and waits until its database is closed.
async fn stop(g: Arc<Group>) -> Result<(), Error> {
    if let Ok(mut b) = g.bootstrap.lock()
        && let Some(task) = b.take()
    {
        task.abort();
    }
    let id = g.id.clone();
    let dir = g.dir.clone();
    if let Err(e) = g.raft.shutdown().await {
        tracing::warn!(group = %id, error = %e, "raft shutdown");
    }
    let released = g.released.clone();
    drop(g);
    let until = Instant::now() + RELEASE_WAIT;
    while released.upgrade().is_some() {
        if Instant::now() >= until {
            return Err(storage_error(
                &dir,
                format!(
                    "still in use {} s after the group stopped",
                    RELEASE_WAIT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The groups found under `root` (`<namespace>/<name>/raft.redb`).
fn scan(root: &Path) -> Result<Vec<GroupId>, Error> {
    std::fs::create_dir_all(root).map_err(|e| storage_error(root, format!("creating: {e}")))?;
    let mut found = Vec::new();
    let read = |dir: &Path| {
        std::fs::read_dir(dir).map_err(|e| storage_error(dir, format!("listing: {e}")))
    };
    for ns in read(root)? {
        let ns = ns.map_err(|e| storage_error(root, format!("listing: {e}")))?;
        if !ns.path().is_dir() {
            continue;
        }
        for name in read(&ns.path())? {
            let name = name.map_err(|e| storage_error(&ns.path(), format!("listing: {e}")))?;
            if !name.path().join(DB_FILE).is_file() {
                continue;
            }
            let (n, m) = (ns.file_name(), name.file_name());
            match GroupId::new(&n.to_string_lossy(), &m.to_string_lossy()) {
                Ok(id) => found.push(id),
                Err(e) => tracing::warn!(path = %name.path().display(), error = %e, "skipping"),
            }
        }
    }
    found.sort();
    Ok(found)
}

impl<T: RaftTransport> RpcHandler for Inner<T> {
    fn handle(
        self: Arc<Self>,
        from: String,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        Box::pin(async move { Groups { inner: self }.handle_rpc(&from, &request).await })
    }
}
