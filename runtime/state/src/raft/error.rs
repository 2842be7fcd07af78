//! Errors of the strong mode. Serializable, so a leader's refusal travels back to the node a
//! request was forwarded from as the same variant.

use serde::{Deserialize, Serialize};

use super::types::GroupId;

/// Everything the Raft groups can refuse or fail with; each message names the offending value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    #[error("invalid group {group:?}: {reason}")]
    InvalidGroup { group: String, reason: String },
    #[error("invalid peer id {peer:?}: {reason}")]
    InvalidPeer { peer: String, reason: String },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("the value of key {key:?} is {len} bytes; at most {max} are allowed")]
    ValueTooLarge { key: String, len: usize, max: usize },
    #[error("invalid raft setting {field} = {value}: {reason}")]
    Config {
        field: String,
        value: String,
        reason: String,
    },
    #[error("invalid membership for group {group}: {reason}")]
    InvalidMembership { group: GroupId, reason: String },
    #[error("group {group} is not open on this node")]
    UnknownGroup { group: GroupId },
    #[error("this node already holds {count} raft groups; at most {max} are allowed")]
    TooManyGroups { count: usize, max: usize },
    #[error("key {key:?} not found in group {group}")]
    KeyNotFound { group: GroupId, key: String },
    #[error(
        "precondition failed in group {group}: key {key:?} is at revision {current}, not {expected}"
    )]
    PreconditionFailed {
        group: GroupId,
        key: String,
        expected: u64,
        current: u64,
    },
    #[error(
        "group {group} is full: writing {key:?} would take its state past {limit} bytes (now {size})"
    )]
    StateFull {
        group: GroupId,
        key: String,
        size: u64,
        limit: u64,
    },
    #[error("group {group} has no leader this node can reach: {detail}")]
    NoLeader { group: GroupId, detail: String },
    #[error("group {group} cannot confirm a quorum: {reason}")]
    Unavailable { group: GroupId, reason: String },
    #[error("{what} in group {group} timed out after {ms} ms (a write's outcome is unknown)")]
    Timeout {
        group: GroupId,
        what: String,
        ms: u64,
    },
    #[error("the outcome of a write in group {group} is unknown: {reason}")]
    OutcomeUnknown { group: GroupId, reason: String },
    #[error("busy: {pending} forwarded requests are pending on this node, at most {max}")]
    Busy { pending: usize, max: usize },
    #[error(
        "group {group} is busy: {waiting} writes are waiting for its leader to propose them, at most {max}; retry shortly"
    )]
    WritesWaiting {
        group: GroupId,
        waiting: usize,
        max: usize,
    },
    #[error("membership change in group {group} refused: {reason}")]
    MembershipRefused { group: GroupId, reason: String },
    #[error(
        "peer {peer} has not caught up in group {group}: it matches the leader's log up to {matched:?}, {needed} is needed"
    )]
    NotCaughtUp {
        group: GroupId,
        peer: String,
        matched: Option<u64>,
        needed: u64,
    },
    #[error("transport to {peer}: {reason}")]
    Transport { peer: String, reason: String },
    #[error("malformed raft message: {reason}")]
    Wire { reason: String },
    #[error("storage {path}: {reason}")]
    Storage { path: String, reason: String },
    #[error("group {group} has stopped: {reason}")]
    Stopped { group: GroupId, reason: String },
}

impl Error {
    /// Whether retrying the same request later may succeed (no leader, no quorum, busy,
    /// transport trouble). A timed-out write is not retryable blindly: it may have happened.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NoLeader { .. }
                | Error::Unavailable { .. }
                | Error::Busy { .. }
                | Error::WritesWaiting { .. }
                | Error::Transport { .. }
                | Error::NotCaughtUp { .. }
        )
    }
}
