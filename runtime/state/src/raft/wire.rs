//! The messages of the `/beemesh/raft/1` protocol: one request-response protocol for every
//! group of a node, each request naming its group.
//!
//! Encoding is CBOR (the mesh's encoding). Requests and responses are decoded only up to the
//! configured `max_rpc_bytes`; unknown fields are ignored so adjacent versions interoperate.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use super::error::Error;
use super::store::{decode, encode};
use super::types::{ApplyResult, GroupId, KvCommand, NodeId, RaftPeer, TypeConfig};

/// The libp2p protocol the node serves these messages on.
pub const PROTOCOL: &str = "/beemesh/raft/1";

/// A request to one group on the receiving node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub group: GroupId,
    pub body: RequestBody,
}

/// What is asked of the group.
#[derive(Debug, Serialize, Deserialize)]
pub enum RequestBody {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(SnapshotChunk),
    /// An operation only the leader can perform, forwarded to it; the sender waits at most
    /// `timeout_ms` for the answer.
    Forward {
        op: LeaderOp,
        timeout_ms: u64,
    },
}

/// One chunk of a snapshot (openraft's `InstallSnapshotRequest`, with its data encoded as a
/// byte string rather than an array of numbers).
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, RaftPeer>,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub done: bool,
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(r: InstallSnapshotRequest<TypeConfig>) -> Self {
        Self {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data,
            done: r.done,
        }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        Self {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        }
    }
}

/// An operation that only the group's leader performs. A node that is not the leader answers
/// [`ForwardReply::NotLeader`], naming the leader it knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderOp {
    /// Propose a key-value write.
    Write(KvCommand),
    /// Confirm leadership with a quorum and answer the log index a linearizable read must
    /// wait for.
    ReadIndex,
    /// Add a peer as a learner (it starts receiving the log).
    AddLearner { peer: String },
    /// How far a peer's log matches the leader's.
    Progress { peer: String },
    /// Make a caught-up learner a voter.
    AddVoter { peer: String },
    /// Remove a voter, if that leaves a live majority.
    RemoveVoter { peer: String },
    /// The current membership.
    Membership,
}

impl LeaderOp {
    /// What the operation does, for refusals and logs.
    pub fn name(&self) -> &'static str {
        match self {
            LeaderOp::Write(_) => "write",
            LeaderOp::ReadIndex => "confirm a read",
            LeaderOp::AddLearner { .. } => "add a learner",
            LeaderOp::Progress { .. } => "ask for a peer's progress",
            LeaderOp::AddVoter { .. } => "add a voter",
            LeaderOp::RemoveVoter { .. } => "remove a voter",
            LeaderOp::Membership => "read the membership",
        }
    }
}

/// The leader's answer to a [`LeaderOp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Applied(ApplyResult),
    ReadIndex(Option<u64>),
    Progress(PeerProgress),
    Membership(MembershipView),
    Done,
}

/// How far a peer has caught up, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    /// The last index of the leader's log the peer is known to hold.
    pub matched: Option<u64>,
    /// The leader's commit index: the peer is caught up when it matches at least this.
    pub committed: Option<u64>,
    pub is_voter: bool,
    pub is_learner: bool,
    /// Whether the peer answered the leader within the maximum election timeout.
    pub live: bool,
}

impl PeerProgress {
    pub fn caught_up(&self) -> bool {
        self.live && self.matched >= self.committed
    }
}

/// A group's membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipView {
    /// The voter sets: one, or two while a change is in its joint phase.
    pub configs: Vec<Vec<String>>,
    /// Every voter (the union of `configs`), sorted.
    pub voters: Vec<String>,
    /// Members that replicate but do not vote, sorted.
    pub learners: Vec<String>,
}

impl MembershipView {
    pub fn is_joint(&self) -> bool {
        self.configs.len() > 1
    }
}

/// The answer to a forwarded operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardReply {
    Done(OpResult),
    NotLeader { leader: Option<String> },
    Failed(Error),
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Forward(ForwardReply),
    /// The request was not handed to the group.
    Refused(Refusal),
}

/// Why a request was not handed to its group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("group {0} is not open on the receiving node")]
    UnknownGroup(GroupId),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the request is {len} bytes; at most {max} are accepted")]
    TooLarge { len: usize, max: usize },
    #[error("the sender {sender} is not node {claimed} that the request claims to come from")]
    SenderMismatch { sender: String, claimed: NodeId },
    #[error("the snapshot would exceed {max} bytes (chunk at offset {offset})")]
    SnapshotTooLarge { offset: u64, max: u64 },
    #[error("busy: {max} forwarded requests are already being served")]
    Busy { max: usize },
    #[error("{sender} is neither a member of group {group} nor one of its workload's hosts")]
    NotParticipant { sender: String, group: GroupId },
    #[error("{sender} may not {op} in group {group}: {reason}")]
    NotAllowed {
        sender: String,
        group: GroupId,
        op: String,
        reason: String,
    },
}

/// Encodes a message, refusing one larger than `max` bytes.
pub fn encode_limited<T: Serialize>(what: &str, v: &T, max: usize) -> Result<Vec<u8>, Error> {
    let bytes = encode(v).map_err(|reason| Error::Wire {
        reason: format!("{what}: {reason}"),
    })?;
    if bytes.len() > max {
        return Err(Error::Wire {
            reason: format!("{what} is {} bytes; at most {max} may be sent", bytes.len()),
        });
    }
    Ok(bytes)
}

/// Decodes a message, refusing one larger than `max` bytes before parsing it.
pub fn decode_limited<T: serde::de::DeserializeOwned>(
    what: &str,
    bytes: &[u8],
    max: usize,
) -> Result<T, Error> {
    if bytes.len() > max {
        return Err(Error::Wire {
            reason: format!(
                "{what} is {} bytes; at most {max} are accepted",
                bytes.len()
            ),
        });
    }
    decode(bytes).map_err(|reason| Error::Wire {
        reason: format!("{what}: {reason}"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_name_their_group() {
        let req = Request {
            group: GroupId::new("default", "db").unwrap(),
            body: RequestBody::Forward {
                op: LeaderOp::Write(KvCommand::Put {
                    key: "k".into(),
                    value: vec![1, 2, 3],
                    if_revision: Some(4),
                }),
                timeout_ms: 100,
            },
        };
        let bytes = encode_limited("request", &req, 1024).unwrap();
        let back: Request = decode_limited("request", &bytes, 1024).unwrap();
        assert_eq!(back.group, req.group);
        match back.body {
            RequestBody::Forward {
                op: LeaderOp::Write(KvCommand::Put { value, .. }),
                ..
            } => {
                assert_eq!(value, vec![1, 2, 3])
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn values_travel_as_byte_strings() {
        let value = vec![200u8; 10_000];
        let op = LeaderOp::Write(KvCommand::Put {
            key: "k".into(),
            value,
            if_revision: None,
        });
        let bytes = encode_limited("op", &op, usize::MAX).unwrap();
        assert!(bytes.len() < 10_100, "{} bytes", bytes.len());
    }

    #[test]
    fn oversized_and_garbage_input_is_refused() {
        let e = decode_limited::<Request>("request", &[0u8; 100], 10).unwrap_err();
        assert!(e.to_string().contains("100 bytes"), "{e}");
        assert!(decode_limited::<Request>("request", &[0xff, 0x00, 0x13], 100).is_err());
        let e = encode_limited("op", &LeaderOp::ReadIndex, 1).unwrap_err();
        assert!(e.to_string().contains("at most 1"), "{e}");
    }
}
