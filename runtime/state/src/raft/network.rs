//! The network seam: [`RaftTransport`], which the node implements over libp2p
//! request-response (protocol [`PROTOCOL`](super::wire::PROTOCOL)), and openraft's
//! `RaftNetworkFactory`/`RaftNetwork` for one group on top of it.
//!
//! Every group of a node shares the one transport: a request carries the group's id in its
//! envelope ([`Request`]), and the receiving node hands it to
//! [`Groups::handle_rpc`](super::Groups::handle_rpc).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RPCTypes};

use super::store::encode;
use super::types::{GroupId, NodeId, RaftPeer, TypeConfig};
use super::wire::{Refusal, Request, RequestBody, Response, decode_limited};

/// Why the transport could not deliver a request or bring back its answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection to the peer (down, partitioned, not admitted): openraft backs off.
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable { peer: String, reason: String },
    /// The exchange failed after it started (stream reset, timeout, oversized answer).
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: String, reason: String },
}

/// Sends one encoded [`Request`] to a peer and returns its encoded [`Response`].
///
/// The node implements this over libp2p request-response on [`super::wire::PROTOCOL`], with
/// the request and response as opaque bytes (at most the configured `max_rpc_bytes`); the peer
/// answers with what its [`Groups::handle_rpc`](super::Groups::handle_rpc) returned. The
/// caller puts its own deadline around each call and drops the future when it passes, so an
/// implementation needs no timeout of its own beyond freeing resources.
pub trait RaftTransport: Send + Sync + 'static {
    fn call(
        &self,
        target: &str,
        request: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send;
}

/// When each peer of a group last answered this node: a voter that has not answered within
/// the maximum election timeout is not counted as live by membership checks.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    last_ok: Mutex<HashMap<NodeId, Instant>>,
}

impl Liveness {
    fn record(&self, node: NodeId) {
        if let Ok(mut m) = self.last_ok.lock() {
            m.insert(node, Instant::now());
        }
    }

    pub(crate) fn answered_within(&self, node: NodeId, window: Duration) -> bool {
        self.last_ok
            .lock()
            .ok()
            .and_then(|m| m.get(&node).map(|t| t.elapsed() <= window))
            .unwrap_or(false)
    }
}

/// What a group's network needs: shared by every client openraft makes for the group.
pub(crate) struct NetShared<T> {
    pub group: GroupId,
    pub local: NodeId,
    pub transport: Arc<T>,
    pub max_rpc_bytes: usize,
    pub backoff: Duration,
    pub liveness: Arc<Liveness>,
}

/// openraft's network factory for one group.
pub(crate) struct GroupNetworkFactory<T> {
    pub shared: Arc<NetShared<T>>,
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for GroupNetworkFactory<T> {
    type Network = GroupNetwork<T>;

    async fn new_client(&mut self, target: NodeId, node: &RaftPeer) -> GroupNetwork<T> {
        GroupNetwork {
            shared: self.shared.clone(),
            target,
            peer: node.peer_id.clone(),
        }
    }
}

/// openraft's connection to one peer of one group.
pub(crate) struct GroupNetwork<T> {
    shared: Arc<NetShared<T>>,
    target: NodeId,
    peer: String,
}

/// Envelope, vote and log ids around the entries of an AppendEntries.
const APPEND_OVERHEAD: usize = 4096;

enum CallError {
    Timeout(Duration),
    Unreachable(String),
    Network(String),
}

impl<T: RaftTransport> GroupNetwork<T> {
    async fn call(&self, body: RequestBody, ttl: Duration) -> Result<Response, CallError> {
        let req = Request {
            group: self.shared.group.clone(),
            body,
        };
        let bytes = encode(&req).map_err(CallError::Network)?;
        if bytes.len() > self.shared.max_rpc_bytes {
            return Err(CallError::Network(format!(
                "the request is {} bytes; at most {} may be sent",
                bytes.len(),
                self.shared.max_rpc_bytes
            )));
        }
        let answer = tokio::time::timeout(ttl, self.shared.transport.call(&self.peer, bytes))
            .await
            .map_err(|_| CallError::Timeout(ttl))?
            .map_err(|e| match e {
                TransportError::Unreachable { .. } => CallError::Unreachable(e.to_string()),
                TransportError::Failed { .. } => CallError::Network(e.to_string()),
            })?;
        let resp: Response = decode_limited("response", &answer, self.shared.max_rpc_bytes)
            .map_err(|e| CallError::Network(e.to_string()))?;
        match resp {
            Response::Refused(Refusal::UnknownGroup(_)) => {
                // The peer has not opened the group (yet): back off like for a peer that is down.
                Err(CallError::Unreachable(format!(
                    "peer {} has not opened group {}",
                    self.peer, self.shared.group
                )))
            }
            Response::Refused(r) => Err(CallError::Network(format!(
                "peer {} refused: {r}",
                self.peer
            ))),
            other => {
                self.shared.liveness.record(self.target);
                Ok(other)
            }
        }
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: CallError,
    ) -> RPCError<NodeId, RaftPeer, E> {
        match e {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.shared.local,
                target: self.target,
                timeout,
            }),
            CallError::Unreachable(m) => {
                RPCError::Unreachable(Unreachable::from(AnyError::error(m)))
            }
            CallError::Network(m) => RPCError::Network(NetworkError::from(AnyError::error(m))),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        want: &str,
        got: &Response,
    ) -> RPCError<NodeId, RaftPeer, E> {
        RPCError::Network(NetworkError::from(AnyError::error(format!(
            "peer {} answered a {want} request with {got:?}",
            self.peer
        ))))
    }

    /// How many of `entries` fit in one message.
    fn entries_that_fit(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> u64 {
        let budget = self.shared.max_rpc_bytes.saturating_sub(APPEND_OVERHEAD);
        let mut used = 0usize;
        let mut n = 0u64;
        for e in &rpc.entries {
            used += encode(e).map(|b| b.len()).unwrap_or(usize::MAX / 2);
            if used > budget {
                break;
            }
            n += 1;
        }
        n
    }
}

impl<T: RaftTransport> RaftNetwork<TypeConfig> for GroupNetwork<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftPeer, RaftError<NodeId>>> {
        let len = encode(&rpc).map(|b| b.len()).unwrap_or(usize::MAX);
        if len + APPEND_OVERHEAD > self.shared.max_rpc_bytes && rpc.entries.len() > 1 {
            let fit = self.entries_that_fit(&rpc).max(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit),
            ));
        }
        match self
            .call(RequestBody::AppendEntries(rpc), option.hard_ttl())
            .await
        {
            Ok(Response::AppendEntries(Ok(r))) => Ok(r),
            Ok(Response::AppendEntries(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(self.unexpected("AppendEntries", &other)),
            Err(e) => Err(self.rpc_error(RPCTypes::AppendEntries, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RaftPeer, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(RequestBody::InstallSnapshot(rpc.into()), option.hard_ttl())
            .await
        {
            Ok(Response::InstallSnapshot(Ok(r))) => Ok(r),
            Ok(Response::InstallSnapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(self.unexpected("InstallSnapshot", &other)),
            Err(e) => Err(self.rpc_error(RPCTypes::InstallSnapshot, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RaftPeer, RaftError<NodeId>>> {
        match self.call(RequestBody::Vote(rpc), option.hard_ttl()).await {
            Ok(Response::Vote(Ok(r))) => Ok(r),
            Ok(Response::Vote(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(self.unexpected("Vote", &other)),
            Err(e) => Err(self.rpc_error(RPCTypes::Vote, e)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.shared.backoff))
    }
}
