//! The openraft type configuration and the data a group replicates: node identities, group
//! names, the key-value commands and what applying them answers.

use std::fmt;
use std::io::Cursor;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::Error;

/// An openraft node id: derived from the peer id by [`node_id`], never chosen.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of every BeeMesh group.
    pub TypeConfig:
        D = KvCommand,
        R = ApplyResult,
        NodeId = NodeId,
        Node = RaftPeer,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of a group.
pub type Entry = openraft::Entry<TypeConfig>;
/// A group's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// The longest peer id accepted (a base58 libp2p peer id is 46 to 53 characters).
pub const MAX_PEER_ID_LEN: usize = 128;
/// The most voters a group may have: consensus among more hosts than this costs more than the
/// replicas gain.
pub const MAX_VOTERS: usize = 9;
/// The most members (voters and learners) a group may have.
pub const MAX_MEMBERS: usize = 16;
/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value, in bytes (one entry always fits in one RPC below the mesh's 1 MiB limit).
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// What one key costs in the state machine's size accounting on top of its key and value.
pub const ENTRY_OVERHEAD_BYTES: u64 = 64;
/// The most a group's state may hold (keys, values and [`ENTRY_OVERHEAD_BYTES`] per key).
///
/// A protocol constant, not a setting: every replica applies the same entries with the same
/// limit, so a put that would cross it is refused identically everywhere.
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// A mesh node as a member of a group: its libp2p peer id (base58).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RaftPeer {
    pub peer_id: String,
}

impl RaftPeer {
    /// A member for `peer_id`, checked by [`check_peer_id`].
    pub fn new(peer_id: &str) -> Result<Self, Error> {
        check_peer_id(peer_id)?;
        Ok(Self {
            peer_id: peer_id.to_string(),
        })
    }

    /// The member's openraft node id.
    pub fn node_id(&self) -> NodeId {
        node_id(&self.peer_id)
    }
}

impl fmt::Display for RaftPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.peer_id)
    }
}

const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Checks that `peer_id` looks like a base58 peer id: 1 to [`MAX_PEER_ID_LEN`] characters of
/// the base58 alphabet.
pub fn check_peer_id(peer_id: &str) -> Result<(), Error> {
    let reason = if peer_id.is_empty() {
        Some("is empty".to_string())
    } else if peer_id.len() > MAX_PEER_ID_LEN {
        Some(format!(
            "is {} characters long; at most {MAX_PEER_ID_LEN} are allowed",
            peer_id.len()
        ))
    } else {
        peer_id
            .bytes()
            .find(|b| !BASE58.contains(b))
            .map(|b| format!("contains {:?}, which is not a base58 character", b as char))
    };
    match reason {
        Some(reason) => Err(Error::InvalidPeer {
            peer: truncate(peer_id, MAX_PEER_ID_LEN),
            reason,
        }),
        None => Ok(()),
    }
}

/// The openraft node id of a peer: the first 8 bytes (big-endian) of
/// SHA-256("beemesh/raft/node-id/1\0" || peer id).
///
/// Deterministic, so every node derives the same id for a peer without coordination. Two peers
/// of one group colliding is a 2^-64 event; groups refuse such a membership rather than confuse
/// the two.
pub fn node_id(peer_id: &str) -> NodeId {
    let mut h = Sha256::new();
    h.update(b"beemesh/raft/node-id/1\0");
    h.update(peer_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A Raft group: the strong-consistency state of one workload, named like it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId {
    pub namespace: String,
    pub name: String,
}

impl GroupId {
    /// A group id for a workload; both parts must be DNS-1123 labels (they name directories).
    pub fn new(namespace: &str, name: &str) -> Result<Self, Error> {
        let id = Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        id.check()?;
        Ok(id)
    }

    /// Checks both parts (a group id may come from a remote peer).
    pub fn check(&self) -> Result<(), Error> {
        for (what, part) in [("namespace", &self.namespace), ("name", &self.name)] {
            if let Err(reason) = beemesh_manifest::names::check_dns_label(part) {
                return Err(Error::InvalidGroup {
                    group: format!(
                        "{}/{}",
                        truncate(&self.namespace, 63),
                        truncate(&self.name, 63)
                    ),
                    reason: format!("{what} {reason}"),
                });
            }
        }
        Ok(())
    }

    /// The group's directory below the raft root (`<namespace>/<name>`).
    pub fn rel_path(&self) -> PathBuf {
        PathBuf::from(&self.namespace).join(&self.name)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A write to a group's key-value state, as proposed to and replicated by Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`. With `if_revision`, only if the key's revision is that value
    /// (0: only if the key does not exist).
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        if_revision: Option<u64>,
    },
    /// Removes `key`. With `if_revision`, only if the key's revision is that value.
    Delete {
        key: String,
        if_revision: Option<u64>,
    },
    /// Writes proposed together in one log entry, applied in order, each with its own result
    /// (one [`ApplyResult`] each, in [`ApplyResult::Batch`]). Built only by the leader from
    /// the writes waiting for it (see `Groups::propose`); refused from anyone else.
    Batch(Vec<KvCommand>),
}

impl KvCommand {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key, .. } => key,
            KvCommand::Batch(commands) => commands.first().map_or("", KvCommand::key),
        }
    }

    /// The revision the write is conditional on, if any (none for a batch).
    pub fn if_revision(&self) -> Option<u64> {
        match self {
            KvCommand::Put { if_revision, .. } | KvCommand::Delete { if_revision, .. } => {
                *if_revision
            }
            KvCommand::Batch(_) => None,
        }
    }

    /// Bytes of key and value: what the command weighs in a log entry.
    pub fn weight(&self) -> usize {
        match self {
            KvCommand::Put { key, value, .. } => key.len() + value.len(),
            KvCommand::Delete { key, .. } => key.len(),
            KvCommand::Batch(commands) => commands.iter().map(KvCommand::weight).sum(),
        }
    }

    /// Checks key and value sizes before a client's command is proposed; a batch is never a
    /// client's command.
    pub fn check(&self) -> Result<(), Error> {
        if let KvCommand::Batch(_) = self {
            return Err(Error::InvalidKey {
                key: String::new(),
                reason: "a batch of writes is built by the group's leader; \
                         send the writes one by one"
                    .into(),
            });
        }
        check_key(self.key())?;
        if let KvCommand::Put { key, value, .. } = self
            && value.len() > MAX_VALUE_BYTES
        {
            return Err(Error::ValueTooLarge {
                key: truncate(key, 64),
                len: value.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        Ok(())
    }
}

/// Checks a key: 1 to [`MAX_KEY_BYTES`] bytes of UTF-8 without control characters.
pub fn check_key(key: &str) -> Result<(), Error> {
    let reason = if key.is_empty() {
        Some("is empty".to_string())
    } else if key.len() > MAX_KEY_BYTES {
        Some(format!(
            "is {} bytes long; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        ))
    } else {
        key.chars()
            .find(|c| c.is_control())
            .map(|c| format!("contains the control character {c:?}"))
    };
    match reason {
        Some(reason) => Err(Error::InvalidKey {
            key: truncate(key, 64),
            reason,
        }),
        None => Ok(()),
    }
}

/// What applying one log entry answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyResult {
    /// A blank or membership entry: nothing for a client.
    Nothing,
    /// The write happened; the group's revision is now `revision` (also the key's revision).
    Written { revision: u64 },
    /// A delete of a key that does not exist; the group's revision is unchanged.
    NotFound { revision: u64 },
    /// `if_revision` did not match the key's revision (`current`, 0 when absent).
    PreconditionFailed {
        key: String,
        expected: u64,
        current: u64,
    },
    /// The put would take the state beyond [`MAX_STATE_BYTES`].
    StateFull { key: String, size: u64, limit: u64 },
    /// The results of a [`KvCommand::Batch`], in its order.
    Batch(Vec<ApplyResult>),
}

/// A value as read, with the revision at which its key was last written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub revision: u64,
}

/// One key of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub revision: u64,
}

/// Which part of a listing to return.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Start after this key (the previous page's `next`).
    pub after: Option<String>,
    /// At most this many items (0: the configured maximum).
    pub limit: usize,
}

/// A page of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPage {
    pub items: Vec<Item>,
    /// Pass as [`Page::after`] to get the next page; `None` at the end.
    pub next: Option<String>,
    /// The group's revision at the time of the read.
    pub revision: u64,
}

/// Cuts `s` to at most `max` bytes (on a character boundary) for an error message.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_deterministic_and_distinct() {
        let a = node_id("12D3KooWTestNodeA");
        assert_eq!(a, node_id("12D3KooWTestNodeA"));
        assert_ne!(a, node_id("12D3KooWTestNodeB"));
    }

    #[test]
    fn peer_ids_are_checked() {
        assert!(check_peer_id("12D3KooWTestNodeA").is_ok());
        let e = check_peer_id("peer-0").unwrap_err().to_string();
        assert!(e.contains("peer-0") && e.contains("'-'"), "{e}");
        assert!(check_peer_id("").is_err());
        assert!(check_peer_id(&"a".repeat(MAX_PEER_ID_LEN + 1)).is_err());
    }

    #[test]
    fn group_ids_are_path_safe() {
        assert!(GroupId::new("default", "db").is_ok());
        for (ns, name) in [("..", "x"), ("a", "b/c"), ("A", "b"), ("", "b")] {
            let e = GroupId::new(ns, name).unwrap_err().to_string();
            assert!(e.contains("invalid group"), "{e}");
        }
    }

    #[test]
    fn keys_and_values_are_bounded() {
        assert!(check_key("a/b").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a\nb").is_err());
        let e = check_key(&"k".repeat(MAX_KEY_BYTES + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1025 bytes"), "{e}");
        let put = KvCommand::Put {
            key: "k".into(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            if_revision: None,
        };
        assert!(matches!(put.check(), Err(Error::ValueTooLarge { .. })));
    }
}
