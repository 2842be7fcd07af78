//! The composed libp2p behaviour and the swarm that runs it.

use std::time::Duration;

use libp2p::allow_block_list::{self, BlockedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Swarm, SwarmBuilder, gossipsub, identify, identity::Keypair, kad, mdns, noise, ping, tcp, yamux,
};

use crate::gate::Gate;
use crate::wire::{self, Hello, HelloReply, RpcRequest, RpcResponse};
use crate::{MeshConfig, MeshError};

/// Room for framing around a message of `max_message_size` (protobuf envelopes, signatures).
const FRAMING_OVERHEAD: usize = 64 * 1024;

/// Everything a BeeMesh node speaks. Only `admission`, `identify` and `ping` run before a peer
/// is admitted; the protocols in [`Gated`] open when it is.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub limits: connection_limits::Behaviour,
    pub blocked: allow_block_list::Behaviour<BlockedPeers>,
    pub admission: request_response::cbor::Behaviour<Hello, HelloReply>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub gated: Gate<Gated>,
}

#[derive(NetworkBehaviour)]
pub(crate) struct Gated {
    pub gossipsub: gossipsub::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub rpc: request_response::cbor::Behaviour<RpcRequest, RpcResponse>,
}

fn behaviour(key: &Keypair, cfg: &MeshConfig) -> Result<Behaviour, MeshError> {
    let peer_id = key.public().to_peer_id();
    let max = cfg.max_message_size;
    let conns = cfg.max_connections;
    let limits = ConnectionLimits::default()
        .with_max_pending_incoming(Some(conns.div_ceil(4).max(8)))
        .with_max_pending_outgoing(Some(conns.div_ceil(4).max(8)))
        // Inbound connections (where an attacker could fill the table) get at most 3/4 of the
        // slots, so this node can always dial out to its bootstrap peers.
        .with_max_established_incoming(Some((conns * 3 / 4).max(1)))
        .with_max_established(Some(conns))
        .with_max_established_per_peer(Some(4));

    let admission = request_response::cbor::Behaviour::with_codec(
        request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(beemesh_manifest::ticket::MAX_TICKET_BYTES + 16 * 1024)
            .set_response_size_maximum(beemesh_manifest::ticket::MAX_TICKET_BYTES + 16 * 1024),
        [(wire::ADMISSION_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(cfg.admission_timeout)
            .with_max_concurrent_streams(8),
    );

    let identify = identify::Behaviour::new(
        identify::Config::new(wire::IDENTIFY_VERSION.to_owned(), key.public())
            .with_agent_version(format!("beemesh/{}", env!("CARGO_PKG_VERSION"))),
    );

    let mdns = if cfg.mdns {
        Some(
            // Re-query every 30 s (libp2p's default is 5 min): hosts of a fleet boot at about
            // the same time, and a node whose first query went out before its neighbours
            // listened would otherwise stay alone for minutes (seen in vm-tests/run).
            mdns::tokio::Behaviour::new(
                mdns::Config {
                    query_interval: std::time::Duration::from_secs(30),
                    ..mdns::Config::default()
                },
                peer_id,
            )
            .map_err(|e| MeshError::Transport(format!("cannot start mDNS: {e}")))?,
        )
    } else {
        None
    };

    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .protocol_id(wire::GOSSIP_PROTOCOL, gossipsub::Version::V1_1)
        // Messages are signed by their author and checked (Strict), and nothing is forwarded
        // before the event loop (and, for the node's topics, the node) has validated it.
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .heartbeat_interval(cfg.gossip_heartbeat)
        .heartbeat_initial_delay(Duration::from_millis(100))
        // Small meshes: keep every peer in the mesh up to a dozen, and flood our own messages
        // to every subscribed peer so a two-node mesh works before the mesh is built.
        .mesh_n_low(4)
        .mesh_n(6)
        .mesh_n_high(12)
        .mesh_outbound_min(2)
        .flood_publish(true)
        .max_transmit_size(max + FRAMING_OVERHEAD)
        .duplicate_cache_time(Duration::from_secs(120))
        .build()
        .map_err(|e| MeshError::Config(format!("gossipsub: {e}")))?;
    let gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_cfg,
    )
    .map_err(|e| MeshError::Config(format!("gossipsub: {e}")))?;

    let mut kad_cfg = kad::Config::new(wire::KAD_PROTOCOL);
    kad_cfg
        // Only admitted peers enter the routing table (the event loop adds them).
        .set_kbucket_inserts(kad::BucketInserts::Manual)
        // Inbound PUTs come to the event loop, which stores them only from admitted peers.
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_max_packet_size(max + FRAMING_OVERHEAD)
        .set_query_timeout(Duration::from_secs(10))
        // Manifests are replaced by newer generations, never by expiry.
        .set_record_ttl(None)
        .set_periodic_bootstrap_interval(Some(cfg.kad_bootstrap_interval));
    let store = kad::store::MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_records: cfg.max_records,
            max_value_bytes: max,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    kad.set_mode(Some(kad::Mode::Server));

    let rpc = request_response::cbor::Behaviour::with_codec(
        request_response::cbor::codec::Codec::default()
            .set_request_size_maximum((max + 4096) as u64)
            .set_response_size_maximum((max + 4096) as u64),
        [(wire::RPC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(cfg.request_timeout)
            .with_max_concurrent_streams(64),
    );

    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        blocked: allow_block_list::Behaviour::default(),
        admission,
        identify,
        ping: ping::Behaviour::default(),
        mdns: mdns.into(),
        gated: Gate::new(Gated {
            gossipsub,
            kad,
            rpc,
        }),
    })
}

/// Builds the swarm: TCP (noise, yamux) and QUIC, DNS resolution when the system has a resolver
/// configuration.
pub(crate) fn build_swarm(cfg: &MeshConfig) -> Result<Swarm<Behaviour>, MeshError> {
    let transport_err = |e: &dyn std::fmt::Display| MeshError::Transport(e.to_string());
    let behaviour = behaviour(&cfg.keypair, cfg)?;
    let idle = Duration::from_secs(60);
    let builder = SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport_err(&e))?
        .with_quic();
    let swarm = if std::path::Path::new("/etc/resolv.conf").exists() {
        builder
            .with_dns()
            .map_err(|e| transport_err(&e))?
            .with_behaviour(|_| behaviour)
            .map_err(|e| transport_err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build()
    } else {
        tracing::warn!("no /etc/resolv.conf: /dns multiaddrs cannot be resolved");
        builder
            .with_behaviour(|_| behaviour)
            .map_err(|e| transport_err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build()
    };
    Ok(swarm)
}
