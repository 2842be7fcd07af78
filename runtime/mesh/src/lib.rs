//! BeeMesh's peer-to-peer mesh: one task owns the libp2p [`Swarm`](libp2p::Swarm); a cloneable
//! [`MeshHandle`] sends it commands, and [`MeshEvent`]s come out of a channel.
//!
//! - Transports: TCP (noise, yamux) and QUIC; identify, ping, connection limits.
//! - Admission (`/beemesh/admission/1`): a peer is admitted only with a ticket signed by the
//!   mesh's admission key, and (for a fleet ticket) a proof of holding the ticket's key made for
//!   this very connection, so a recorded or relayed exchange admits nobody. Until then the mesh protocols (gossipsub, Kademlia, the node's
//!   request-response protocols) are closed on its connections ([`gate`]); without a valid
//!   ticket in time it is disconnected and refused for a while.
//! - Membership: every node announces itself on `/beemesh/announce/1`; the mesh keeps a view
//!   of the admitted peers that announced ([`MeshHandle::peers`], `PeerUp`/`PeerDown`).
//! - Gossip for the node's own topics, validated by the node before anything is forwarded;
//!   Kademlia records; request-response for the node's protocols.
//!
//! `docs/mesh.md` describes the protocols, timing and threat model.
//!
//! ```no_run
//! # async fn run(config: beemesh_mesh::MeshConfig) -> Result<(), beemesh_mesh::MeshError> {
//! use beemesh_mesh::{MeshEvent, Validation};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let (mesh, mut events) = beemesh_mesh::spawn(config, shutdown.clone()).await?;
//! mesh.subscribe("/beemesh/manifests/1").await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         MeshEvent::Gossip { message_id, propagation_source, data, .. } => {
//!             let ok = !data.is_empty(); // verify the signed manifest here
//!             let verdict = if ok { Validation::Accept } else { Validation::Reject };
//!             mesh.validate(message_id, propagation_source, verdict).await?;
//!         }
//!         MeshEvent::Request { data, reply, .. } => reply.respond(data),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

// `MeshError` names the peer it is about, and a `PeerId` is 80 bytes. Errors travel once per
// command through a oneshot channel, never in a hot loop, so boxing them buys nothing.
#![allow(clippy::result_large_err)]

mod admission;
mod behaviour;
mod error;
mod event_loop;
pub mod gate;
mod handle;
mod identity;
mod membership;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use beemesh_manifest::host::MeshSection;
use beemesh_manifest::{PublicKey, SecretKey};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use admission::{AdmissionError, check_ticket, parse_ticket};
pub use error::MeshError;
pub use handle::{MAX_ANNOUNCEMENT_BYTES, MeshEvent, MeshHandle, ReplyHandle, Validation};
pub use identity::{IdentityError, NODE_KEY_FILE, load_or_create_identity};
pub use libp2p::gossipsub::MessageId;
pub use libp2p::identity::{Keypair, PublicKey as PeerPublicKey};
pub use libp2p::{Multiaddr, PeerId};
pub use membership::PeerInfo;

/// Default limit on the peers a membership view tracks: full membership is for small and
/// medium meshes (docs/mesh.md).
pub const DEFAULT_MAX_MEMBERS: usize = 16 * 1024;

/// Default limit on a gossip message, record value, request or response.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// Everything the mesh needs, as plain values (the node fills it from host.toml with
/// [`MeshConfig::from_host`] or field by field). Its `Debug` output shows only the public half
/// of the ticket key, whose secret half makes a fleet ticket admit its holder.
#[derive(Clone)]
pub struct MeshConfig {
    /// The node's identity ([`load_or_create_identity`]).
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`, `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers dialed at start and re-dialed with backoff whenever the connection drops
    /// (ideally with `/p2p/<peer-id>`, so noise checks who answers).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// The key whose tickets admit nodes (`[trust] admission`).
    pub admission_key: PublicKey,
    /// This node's ticket: the ticket file's bytes (empty: none; every peer will refuse us).
    pub ticket: Vec<u8>,
    /// The ticket secret key of a fleet ticket (`None` for a peer ticket): the node signs its
    /// proofs with it, and it never leaves the node.
    pub ticket_key: Option<Arc<SecretKey>>,
    /// The first announcement payload (see [`MeshHandle::set_announcement`]).
    pub announcement: Vec<u8>,
    /// How often this node announces itself.
    pub announce_interval: Duration,
    /// A peer not heard from for this long is declared down.
    pub peer_timeout: Duration,
    /// Limit on a gossip message, record value, request or response.
    pub max_message_size: usize,
    /// Time a new connection has to complete the admission handshake.
    pub admission_timeout: Duration,
    /// How long a rejected peer is refused.
    pub reject_ban: Duration,
    /// Gossipsub heartbeat.
    pub gossip_heartbeat: Duration,
    /// Time a peer has to answer a request.
    pub request_timeout: Duration,
    /// Kademlia's periodic bootstrap.
    pub kad_bootstrap_interval: Duration,
    /// Most records kept in the local Kademlia store.
    pub max_records: usize,
    /// Most established connections (inbound ones get at most three quarters).
    pub max_connections: u32,
    /// Most peers the membership view tracks, up and down (longest-down ones make room).
    pub max_members: usize,
    /// The wall clock used for ticket expiry (injectable for tests).
    pub clock: fn() -> OffsetDateTime,
}

impl MeshConfig {
    /// A configuration with BeeMesh's defaults: no listeners, no bootstrap peers, no mDNS.
    /// `ticket_key` is the fleet ticket's secret key (`None` for a peer ticket).
    pub fn new(
        keypair: Keypair,
        admission_key: PublicKey,
        ticket: Vec<u8>,
        ticket_key: Option<SecretKey>,
    ) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            admission_key,
            ticket,
            ticket_key: ticket_key.map(Arc::new),
            announcement: Vec::new(),
            announce_interval: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(8),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            admission_timeout: Duration::from_secs(5),
            reject_ban: Duration::from_secs(60),
            gossip_heartbeat: Duration::from_millis(700),
            request_timeout: Duration::from_secs(30),
            kad_bootstrap_interval: Duration::from_secs(300),
            max_records: 16 * 1024,
            max_connections: 256,
            max_members: DEFAULT_MAX_MEMBERS,
            clock: OffsetDateTime::now_utc,
        }
    }

    /// A configuration from the host config's `[mesh]` section.
    pub fn from_host(
        keypair: Keypair,
        mesh: &MeshSection,
        admission_key: PublicKey,
        ticket: Vec<u8>,
        ticket_key: Option<SecretKey>,
    ) -> Result<Self, MeshError> {
        let mut cfg = Self::new(keypair, admission_key, ticket, ticket_key);
        cfg.listen = parse_addrs(&mesh.listen)?;
        cfg.bootstrap = parse_addrs(&mesh.bootstrap)?;
        cfg.mdns = mesh.mdns;
        cfg.announce_interval = mesh.announce_interval.to_std();
        cfg.peer_timeout = mesh.peer_timeout.to_std();
        Ok(cfg)
    }

    fn check(&self) -> Result<(), MeshError> {
        let bad = |what: String| Err(MeshError::Config(what));
        if self.announce_interval.is_zero() {
            return bad("announce_interval must be positive".into());
        }
        if self.peer_timeout <= self.announce_interval {
            return bad(format!(
                "peer_timeout ({:?}) must exceed announce_interval ({:?}), or every peer would flap",
                self.peer_timeout, self.announce_interval
            ));
        }
        if self.max_message_size < 1024 || self.max_message_size > 64 * 1024 * 1024 {
            return bad(format!(
                "max_message_size {} is outside 1 KiB..64 MiB",
                self.max_message_size
            ));
        }
        for (name, d) in [
            ("admission_timeout", self.admission_timeout),
            ("gossip_heartbeat", self.gossip_heartbeat),
            ("request_timeout", self.request_timeout),
            ("kad_bootstrap_interval", self.kad_bootstrap_interval),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.max_connections == 0 {
            return bad("max_connections must be positive".into());
        }
        if self.announcement.len() > MAX_ANNOUNCEMENT_BYTES {
            return bad(format!(
                "the announcement is {} bytes; the limit is {MAX_ANNOUNCEMENT_BYTES}",
                self.announcement.len()
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConfig")
            .field("peer_id", &self.keypair.public().to_peer_id())
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("mdns", &self.mdns)
            .field("admission_key", &self.admission_key)
            .field("ticket", &format_args!("<{} bytes>", self.ticket.len()))
            .field("ticket_key", &self.ticket_key.as_ref().map(|k| k.public()))
            .field(
                "announcement",
                &format_args!("<{} bytes>", self.announcement.len()),
            )
            .field("announce_interval", &self.announce_interval)
            .field("peer_timeout", &self.peer_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("admission_timeout", &self.admission_timeout)
            .field("reject_ban", &self.reject_ban)
            .field("gossip_heartbeat", &self.gossip_heartbeat)
            .field("request_timeout", &self.request_timeout)
            .field("kad_bootstrap_interval", &self.kad_bootstrap_interval)
            .field("max_records", &self.max_records)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

fn parse_addrs(values: &[String]) -> Result<Vec<Multiaddr>, MeshError> {
    values
        .iter()
        .map(|v| {
            v.parse()
                .map_err(|e: libp2p::multiaddr::Error| MeshError::BadAddress {
                    value: v.clone(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Starts the mesh: builds the swarm, binds every listen address (a listen error is returned
/// here), dials the bootstrap peers and spawns the event loop on the current Tokio runtime.
/// The loop stops when `shutdown` is cancelled or every [`MeshHandle`] is dropped.
pub async fn spawn(
    config: MeshConfig,
    shutdown: CancellationToken,
) -> Result<(MeshHandle, mpsc::Receiver<MeshEvent>), MeshError> {
    config.check()?;
    event_loop::start(config, shutdown).await
}
