//! The mesh's error type.

use libp2p::{Multiaddr, PeerId};

use crate::identity::IdentityError;

/// Everything that can go wrong when starting the mesh or asking it to do something.
///
/// Every variant names the offending value, so a message is useful on its own in a log line or
/// an API answer.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Identity(#[from] IdentityError),

    #[error("invalid mesh configuration: {0}")]
    Config(String),

    #[error("{value:?} is not a multiaddr ({reason})")]
    BadAddress { value: String, reason: String },

    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),

    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },

    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },

    #[error(
        "{name:?} is not a versioned BeeMesh name: expected /beemesh/<name>/<version>, e.g. /beemesh/sync/1"
    )]
    BadName { name: String },

    #[error("{name} is reserved for the mesh itself")]
    Reserved { name: String },

    #[error("{what} is {size} bytes; the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },

    #[error("cannot subscribe to {topic}: {reason}")]
    Subscribe { topic: String, reason: String },

    #[error("no admitted peer is subscribed to {topic} yet")]
    NoPeers { topic: String },

    #[error("cannot publish to {topic}: {reason}")]
    Publish { topic: String, reason: String },

    #[error("peer {peer} is not an admitted member of the mesh")]
    NotAdmitted { peer: PeerId },

    #[error("request {protocol} to {peer} failed: {reason}")]
    Request {
        peer: PeerId,
        protocol: String,
        reason: String,
    },

    #[error("peer {peer} answered {protocol} with an error: {reason}")]
    Remote {
        peer: PeerId,
        protocol: String,
        reason: String,
    },

    #[error("record {key}: {reason}")]
    Record { key: String, reason: String },

    #[error("the mesh event loop has stopped")]
    Stopped,
}

/// Shows a record key for humans: the text if it is UTF-8, otherwise hex.
pub(crate) fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.len() <= 256 => s.to_owned(),
        _ => key.iter().take(64).map(|b| format!("{b:02x}")).collect(),
    }
}
