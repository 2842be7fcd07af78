//! The node's side of the mesh: a cloneable [`MeshHandle`] that sends commands to the event
//! loop, and the [`MeshEvent`]s the loop emits.

use std::fmt;

use libp2p::gossipsub::MessageId;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::MeshError;
use crate::membership::PeerInfo;
use crate::wire::{self, ANNOUNCE_TOPIC, RpcResponse};

/// Largest announcement payload.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 64 * 1024;

/// What the mesh tells the node. Every [`MeshEvent::Gossip`] must be answered with
/// [`MeshHandle::validate`]; every [`MeshEvent::Request`] with its [`ReplyHandle`].
#[derive(Debug)]
pub enum MeshEvent {
    /// The node listens on a new address.
    Listening { addr: Multiaddr },
    /// An admitted peer announced itself for the first time, or again after being down.
    PeerUp { peer: PeerId, announcement: Vec<u8> },
    /// A peer that is up announced a different payload.
    PeerUpdated { peer: PeerId, announcement: Vec<u8> },
    /// A peer has not announced itself for `peer_timeout` (or its ticket expired).
    PeerDown { peer: PeerId },
    /// This node refused a peer (no valid ticket in time, a bad ticket, an expired one): it is
    /// disconnected and refused for a while.
    PeerRejected { peer: PeerId, reason: String },
    /// A peer refused this node's ticket.
    RefusedByPeer { peer: PeerId, reason: String },
    /// An admitted peer announced itself, but the membership view already tracks
    /// `max_members` peers and none is down: it is not tracked (not up, not a member).
    MembershipFull { peer: PeerId },
    /// A message on a topic the node subscribed to, from an admitted author, not yet forwarded:
    /// answer with [`MeshHandle::validate`]`(message_id, propagation_source, ..)`.
    Gossip {
        topic: String,
        /// The author (checked against the message's signature).
        source: PeerId,
        /// The neighbour that forwarded it.
        propagation_source: PeerId,
        message_id: MessageId,
        data: Vec<u8>,
    },
    /// A request on one of the node's protocols from an admitted peer.
    Request {
        peer: PeerId,
        protocol: String,
        data: Vec<u8>,
        reply: ReplyHandle,
    },
}

/// The node's verdict on a gossip message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Deliver and forward it.
    Accept,
    /// Invalid (bad signature, bad content): drop it and do not forward.
    Reject,
    /// Not invalid but unwanted (a duplicate, an old generation): drop it and do not forward.
    Ignore,
}

/// Answers one inbound request, at any time (within the request timeout). Dropping it
/// unanswered answers the requester with an error.
pub struct ReplyHandle {
    pub(crate) tx: oneshot::Sender<RpcResponse>,
}

impl ReplyHandle {
    /// Answers with `data`. An answer larger than the mesh's message limit is replaced by an
    /// error for the requester (and logged).
    pub fn respond(self, data: Vec<u8>) {
        let _ = self.tx.send(RpcResponse { data, error: None });
    }

    /// Answers with an error text, which the requester gets as [`MeshError::Remote`].
    pub fn refuse(self, reason: impl Into<String>) {
        let _ = self.tx.send(RpcResponse::error(reason));
    }
}

impl fmt::Debug for ReplyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyHandle")
    }
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, MeshError>>;

#[derive(Debug)]
pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    SetAnnouncement(Vec<u8>),
    Subscribe(String, Reply<()>),
    Unsubscribe(String, Reply<()>),
    Publish(String, Vec<u8>, Reply<()>),
    Validate(MessageId, PeerId, Validation),
    PutRecord(Vec<u8>, Vec<u8>, Reply<()>),
    GetRecord(Vec<u8>, Reply<Option<Vec<u8>>>),
    Request(PeerId, String, Vec<u8>, Reply<Vec<u8>>),
    Dial(Multiaddr, Reply<()>),
    Block(PeerId, bool),
}

/// A cloneable handle on the running mesh. Every method fails with [`MeshError::Stopped`] once
/// the event loop has stopped.
#[derive(Clone)]
pub struct MeshHandle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) local_peer_id: PeerId,
    pub(crate) max_message_size: usize,
}

impl fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshHandle")
            .field("local_peer_id", &self.local_peer_id)
            .finish()
    }
}

impl MeshHandle {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn send(&self, cmd: Command) -> Result<(), MeshError> {
        self.tx.send(cmd).await.map_err(|_| MeshError::Stopped)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, MeshError> {
        self.ask(make).await?
    }

    fn check_size(&self, what: &'static str, size: usize) -> Result<(), MeshError> {
        if size > self.max_message_size {
            return Err(MeshError::TooLarge {
                what,
                size,
                limit: self.max_message_size,
            });
        }
        Ok(())
    }

    /// Resolves once the event loop has stopped (shutdown signalled, or every handle dropped).
    pub async fn stopped(&self) {
        self.tx.closed().await
    }

    /// The addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Admitted peers that announced themselves and are not down, sorted by peer id.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, MeshError> {
        self.ask(Command::Peers).await
    }

    /// Peers with an open connection to this node, admitted or still in the handshake.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, MeshError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Sets the payload of this node's announcements (name, labels, capacity...) and announces
    /// it right away.
    pub async fn set_announcement(&self, payload: Vec<u8>) -> Result<(), MeshError> {
        if payload.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(MeshError::TooLarge {
                what: "an announcement",
                size: payload.len(),
                limit: MAX_ANNOUNCEMENT_BYTES,
            });
        }
        self.send(Command::SetAnnouncement(payload)).await
    }

    /// Subscribes to a versioned topic (`/beemesh/<name>/<version>`).
    pub async fn subscribe(&self, topic: &str) -> Result<(), MeshError> {
        check_topic(topic)?;
        self.call(|r| Command::Subscribe(topic.to_owned(), r)).await
    }

    pub async fn unsubscribe(&self, topic: &str) -> Result<(), MeshError> {
        check_topic(topic)?;
        self.call(|r| Command::Unsubscribe(topic.to_owned(), r))
            .await
    }

    /// Publishes `data` on a topic. [`MeshError::NoPeers`] means no admitted peer subscribes
    /// to it (yet); the message is then dropped.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), MeshError> {
        check_topic(topic)?;
        self.check_size("a gossip message", data.len())?;
        self.call(|r| Command::Publish(topic.to_owned(), data, r))
            .await
    }

    /// The verdict on a [`MeshEvent::Gossip`]: only accepted messages are forwarded.
    pub async fn validate(
        &self,
        message_id: MessageId,
        propagation_source: PeerId,
        validation: Validation,
    ) -> Result<(), MeshError> {
        self.send(Command::Validate(
            message_id,
            propagation_source,
            validation,
        ))
        .await
    }

    /// Stores a record locally and at the peers closest to its key. Returns when the
    /// replication attempt is over; replication failures are logged, not returned.
    pub async fn put_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), MeshError> {
        self.check_size("a record value", value.len())?;
        if key.is_empty() || key.len() > 1024 {
            return Err(MeshError::Record {
                key: crate::error::show_key(&key),
                reason: format!("a key must be 1 to 1024 bytes, not {}", key.len()),
            });
        }
        self.call(|r| Command::PutRecord(key, value, r)).await
    }

    /// Looks a record up: locally, then in the DHT. `None` when nobody has it.
    pub async fn get_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, MeshError> {
        self.call(|r| Command::GetRecord(key, r)).await
    }

    /// Sends a request on a node protocol (a versioned name such as `/beemesh/sync/1`) to an
    /// admitted peer and waits for its answer.
    pub async fn request(
        &self,
        peer: PeerId,
        protocol: impl Into<String>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, MeshError> {
        let protocol = protocol.into();
        wire::check_versioned_name(&protocol)?;
        self.check_size("a request", data.len())?;
        self.call(|r| Command::Request(peer, protocol, data, r))
            .await
    }

    /// Dials an address (with `/p2p/<peer-id>` to insist on who answers). Returns once the
    /// dial has started; the peer appears in [`MeshHandle::peers`] once admitted.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        self.call(|r| Command::Dial(addr, r)).await
    }

    /// Refuses connections from and to `peer` until [`MeshHandle::unblock_peer`] (or a
    /// restart), and closes the ones open.
    pub async fn block_peer(&self, peer: PeerId) -> Result<(), MeshError> {
        self.send(Command::Block(peer, true)).await
    }

    pub async fn unblock_peer(&self, peer: PeerId) -> Result<(), MeshError> {
        self.send(Command::Block(peer, false)).await
    }
}

fn check_topic(topic: &str) -> Result<(), MeshError> {
    wire::check_versioned_name(topic)?;
    if topic == ANNOUNCE_TOPIC {
        return Err(MeshError::Reserved {
            name: topic.to_owned(),
        });
    }
    Ok(())
}
