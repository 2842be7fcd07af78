//! The task that owns the swarm: the loop, the node's commands, connections, discovery and
//! housekeeping. The admission handshake is in [`handshake`], gossip and membership in
//! [`gossip`], Kademlia records and requests in [`records`].

mod gossip;
mod handshake;
mod records;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, PublishError};
use libp2p::kad::{self, QueryId, Quorum, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use beemesh_manifest::ticket::{Presentation, Ticket};

use crate::admission::{AdmissionError, parse_ticket};
use crate::behaviour::{Behaviour, BehaviourEvent, GatedEvent, build_swarm};
use crate::error::show_key;
use crate::handle::{Command, MeshEvent, MeshHandle, Reply, Validation};
use crate::membership::Members;
use crate::wire::{self, ANNOUNCE_TOPIC, MAX_ANNOUNCED_ADDRS, RpcRequest, RpcResponse};
use crate::{MeshConfig, MeshError};

/// Housekeeping period: admission deadlines, bans, membership timeouts, bootstrap redials.
const TICK: Duration = Duration::from_millis(250);
const COMMAND_QUEUE: usize = 256;
const EVENT_QUEUE: usize = 1024;
/// Events kept while the node is slow to take them; beyond this they are dropped (gossip is
/// then ignored and requests answered with an error), never the loop blocked.
const MAX_BACKLOG: usize = 16 * 1024;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Time a refusal has to reach a rejected peer before its connections are closed.
const REJECT_GRACE: Duration = Duration::from_millis(300);
/// A member that is down is forgotten after this long.
const FORGET_DOWN_AFTER: Duration = Duration::from_secs(600);
/// Longest error text taken from a peer.
const MAX_REMOTE_TEXT: usize = 512;

pub(crate) async fn start(
    cfg: MeshConfig,
    shutdown: CancellationToken,
) -> Result<(MeshHandle, mpsc::Receiver<MeshEvent>), MeshError> {
    let mut swarm = build_swarm(&cfg)?;
    let local = *swarm.local_peer_id();
    let local_b58 = local.to_base58();
    // This node's own ticket and its announcement proof. A ticket that does not admit this
    // node is presented anyway (peers refuse it and say why), so that the fault shows on both
    // sides; `beemesh node` refuses to start with one before it gets here.
    let own_ticket = parse_ticket(&cfg.ticket, &local_b58);
    let own = Presentation::announcement(&local_b58);
    let own_check = own_ticket
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|t| {
            let proof = t
                .prove(cfg.ticket_key.as_deref(), &own)
                .map_err(|e| e.to_string())?;
            t.verify(&cfg.admission_key, &own, &proof, (cfg.clock)())
                .map_err(|e| e.to_string())?;
            Ok(proof)
        });
    let announce_proof = match own_check {
        Ok(proof) => {
            let expires = own_ticket
                .as_ref()
                .ok()
                .and_then(|t| t.expires)
                .map(rfc3339);
            info!(peer = %local, expires = ?expires, "mesh identity and ticket ready");
            proof
        }
        Err(e) => {
            warn!(
                peer = %local,
                "this node's own admission ticket does not admit it, so peers will refuse it: {e}"
            );
            Vec::new()
        }
    };

    // Bind every listener before returning, so that listen errors surface here.
    let mut waiting = HashMap::new();
    for addr in &cfg.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        waiting.insert(id, addr.clone());
    }
    let mut backlog = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !waiting.is_empty() {
        let Ok(event) = tokio::time::timeout_at(deadline, swarm.select_next_some()).await else {
            let addr = waiting
                .into_values()
                .next()
                .unwrap_or_else(Multiaddr::empty);
            return Err(MeshError::Listen {
                addr,
                reason: "no address bound within 10 s".into(),
            });
        };
        match &event {
            SwarmEvent::NewListenAddr { listener_id, .. } => {
                waiting.remove(listener_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } if waiting.contains_key(listener_id) => {
                let reason = match reason {
                    Err(e) => e.to_string(),
                    Ok(()) => "the listener closed".into(),
                };
                let addr = waiting.remove(listener_id).unwrap_or_else(Multiaddr::empty);
                return Err(MeshError::Listen { addr, reason });
            }
            SwarmEvent::ListenerError { listener_id, error }
                if waiting.contains_key(listener_id) =>
            {
                let addr = waiting.remove(listener_id).unwrap_or_else(Multiaddr::empty);
                return Err(MeshError::Listen {
                    addr,
                    reason: error.to_string(),
                });
            }
            _ => {}
        }
        backlog.push(event);
    }

    swarm
        .behaviour_mut()
        .gated
        .inner_mut()
        .gossipsub
        .subscribe(&IdentTopic::new(ANNOUNCE_TOPIC))
        .map_err(|e| MeshError::Subscribe {
            topic: ANNOUNCE_TOPIC.into(),
            reason: e.to_string(),
        })?;

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let handle = MeshHandle {
        tx: cmd_tx,
        local_peer_id: local,
        max_message_size: cfg.max_message_size,
    };
    let now = Instant::now();
    let bootstrap = cfg
        .bootstrap
        .iter()
        .filter_map(|addr| {
            let peer = match addr.iter().last() {
                Some(Protocol::P2p(p)) => Some(p),
                _ => None,
            };
            // One host.toml for a whole fleet may list this node too.
            (peer != Some(local)).then(|| Bootstrap {
                addr: addr.clone(),
                peer,
                next_attempt: now,
                backoff: BACKOFF_MIN,
                connection: None,
            })
        })
        .collect();
    let members = Members::new(cfg.max_members);
    let event_loop = EventLoop {
        local,
        local_b58,
        own_ticket: own_ticket.ok(),
        announce_proof,
        hello_nonces: HashMap::new(),
        seq: 0,
        announcement: cfg.announcement.clone(),
        cfg,
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        backlog: VecDeque::new(),
        shutdown,
        peers: HashMap::new(),
        bans: HashMap::new(),
        manual_blocks: HashSet::new(),
        to_ban: Vec::new(),
        members,
        bootstrap,
        kad_bootstrapped: false,
        pending_get: HashMap::new(),
        pending_put: HashMap::new(),
        pending_requests: HashMap::new(),
        answers: FuturesUnordered::new(),
    };
    tokio::spawn(event_loop.run(backlog));
    Ok((handle, ev_rx))
}

/// Where a connected peer stands in the admission handshake.
#[derive(Debug)]
enum Status {
    Pending {
        deadline: Instant,
        hello_sent: bool,
        last_error: Option<String>,
    },
    Admitted {
        expires: Option<OffsetDateTime>,
    },
    /// Rejected by us or refusing us: its connections are being closed.
    Closing,
}

#[derive(Debug)]
struct PeerState {
    connections: HashSet<ConnectionId>,
    /// Addresses we reached it at (dialable, unlike a listener's view of a remote port).
    dialed: Vec<Multiaddr>,
    /// Addresses it reported through identify.
    listen_addrs: Vec<Multiaddr>,
    status: Status,
}

#[derive(Debug)]
struct Bootstrap {
    addr: Multiaddr,
    peer: Option<PeerId>,
    next_attempt: Instant,
    backoff: Duration,
    connection: Option<ConnectionId>,
}

struct Answer {
    channel: ResponseChannel<RpcResponse>,
    peer: PeerId,
    protocol: String,
    result: Result<Result<RpcResponse, oneshot::error::RecvError>, tokio::time::error::Elapsed>,
}

type RecordReply = Reply<Option<Vec<u8>>>;

struct EventLoop {
    cfg: MeshConfig,
    local: PeerId,
    /// `local` in base58, as proofs name it.
    local_b58: String,
    /// This node's ticket, parsed (`None` if it does not parse: presented as is, and refused).
    own_ticket: Option<Ticket>,
    /// This node's proof for its announcements (empty with a peer ticket or without a key).
    announce_proof: Vec<u8>,
    /// The nonce of each admission request in flight, which the reply's proof must cover.
    hello_nonces: HashMap<OutboundRequestId, Vec<u8>>,
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<MeshEvent>,
    backlog: VecDeque<MeshEvent>,
    shutdown: CancellationToken,
    peers: HashMap<PeerId, PeerState>,
    /// Rejected peers and when their ban ends.
    bans: HashMap<PeerId, Instant>,
    manual_blocks: HashSet<PeerId>,
    /// Rejected peers whose refusal is on its way; banned at the instant given.
    to_ban: Vec<(Instant, PeerId)>,
    members: Members,
    announcement: Vec<u8>,
    seq: u64,
    bootstrap: Vec<Bootstrap>,
    kad_bootstrapped: bool,
    /// Record lookups and stores in flight, with their keys.
    pending_get: HashMap<QueryId, (Vec<u8>, RecordReply)>,
    pending_put: HashMap<QueryId, (Vec<u8>, Reply<()>)>,
    /// Requests in flight: peer, protocol, reply.
    pending_requests: HashMap<OutboundRequestId, (PeerId, String, Reply<Vec<u8>>)>,
    answers: FuturesUnordered<BoxFuture<'static, Answer>>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_REMOTE_TEXT {
        let mut end = MAX_REMOTE_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl EventLoop {
    async fn run(mut self, startup: Vec<SwarmEvent<BehaviourEvent>>) {
        for event in startup {
            self.on_swarm_event(event);
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announce = tokio::time::interval(self.cfg.announce_interval);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A permit borrows its sender; this clone keeps that borrow off `self`.
        let events = self.events.clone();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => self.housekeeping(),
                _ = announce.tick() => self.announce(),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => {
                        debug!("every mesh handle was dropped");
                        break;
                    }
                },
                Some(answer) = self.answers.next(), if !self.answers.is_empty() => self.on_answer(answer),
                permit = events.reserve(), if !self.backlog.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.backlog.pop_front() {
                            permit.send(event);
                        }
                    }
                    Err(_) => self.backlog.clear(),
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
        info!(peer = %self.local, "mesh stopped");
    }

    /// Hands an event to the node; false if it cannot be delivered (nobody listens, or the node
    /// is too far behind).
    fn emit(&mut self, event: MeshEvent) -> bool {
        if self.backlog.is_empty() {
            match self.events.try_send(event) {
                Ok(()) => return true,
                Err(TrySendError::Closed(_)) => return false,
                Err(TrySendError::Full(event)) => {
                    self.backlog.push_back(event);
                    return true;
                }
            }
        }
        if self.backlog.len() >= MAX_BACKLOG {
            warn!("the node is not taking mesh events; dropping one");
            return false;
        }
        self.backlog.push_back(event);
        true
    }

    fn wall(&self) -> OffsetDateTime {
        (self.cfg.clock)()
    }

    fn is_admitted(&self, peer: &PeerId) -> bool {
        matches!(
            self.peers.get(peer).map(|s| &s.status),
            Some(Status::Admitted { .. })
        )
    }

    fn gossipsub(&mut self) -> &mut gossipsub::Behaviour {
        &mut self.swarm.behaviour_mut().gated.inner_mut().gossipsub
    }

    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        &mut self.swarm.behaviour_mut().gated.inner_mut().kad
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(tx) => {
                let _ = tx.send(self.swarm.listeners().cloned().collect());
            }
            Command::Peers(tx) => {
                let swarm = &self.swarm;
                let _ = tx.send(self.members.list(|p| swarm.is_connected(p)));
            }
            Command::ConnectedPeers(tx) => {
                let _ = tx.send(self.swarm.connected_peers().copied().collect());
            }
            Command::SetAnnouncement(payload) => {
                self.announcement = payload;
                self.announce();
            }
            Command::Subscribe(topic, tx) => {
                let r = self
                    .gossipsub()
                    .subscribe(&IdentTopic::new(topic.clone()))
                    .map(|_| ())
                    .map_err(|e| MeshError::Subscribe {
                        topic,
                        reason: e.to_string(),
                    });
                let _ = tx.send(r);
            }
            Command::Unsubscribe(topic, tx) => {
                self.gossipsub().unsubscribe(&IdentTopic::new(topic));
                let _ = tx.send(Ok(()));
            }
            Command::Publish(topic, data, tx) => {
                let r = match self
                    .gossipsub()
                    .publish(IdentTopic::new(topic.clone()), data)
                {
                    Ok(_) => Ok(()),
                    Err(PublishError::NoPeersSubscribedToTopic) => {
                        Err(MeshError::NoPeers { topic })
                    }
                    Err(e) => Err(MeshError::Publish {
                        topic,
                        reason: e.to_string(),
                    }),
                };
                let _ = tx.send(r);
            }
            Command::Validate(id, source, validation) => {
                let acceptance = match validation {
                    Validation::Accept => MessageAcceptance::Accept,
                    Validation::Reject => MessageAcceptance::Reject,
                    Validation::Ignore => MessageAcceptance::Ignore,
                };
                if !self
                    .gossipsub()
                    .report_message_validation_result(&id, &source, acceptance)
                {
                    debug!(message = %id, "validated a message that is no longer cached");
                }
            }
            Command::PutRecord(key, value, tx) => {
                let record = Record::new(RecordKey::new(&key), value);
                match self.kad().put_record(record, Quorum::One) {
                    Ok(id) => {
                        self.pending_put.insert(id, (key, tx));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(MeshError::Record {
                            key: show_key(&key),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::GetRecord(key, tx) => {
                let rkey = RecordKey::new(&key);
                let local = kad::store::RecordStore::get(self.kad().store_mut(), &rkey)
                    .map(|r| r.into_owned().value);
                if let Some(value) = local {
                    let _ = tx.send(Ok(Some(value)));
                } else {
                    let id = self.kad().get_record(rkey);
                    self.pending_get.insert(id, (key, tx));
                }
            }
            Command::Request(peer, protocol, data, tx) => {
                let wall = self.wall();
                if peer == self.local {
                    let _ = tx.send(Err(MeshError::Request {
                        peer,
                        protocol,
                        reason: "this is the local node".into(),
                    }));
                } else if !(self.is_admitted(&peer) || self.members.is_trusted(&peer, wall)) {
                    let _ = tx.send(Err(MeshError::NotAdmitted { peer }));
                } else {
                    let addrs = self.members.addrs(&peer);
                    let request = RpcRequest {
                        protocol: protocol.clone(),
                        data,
                    };
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .gated
                        .inner_mut()
                        .rpc
                        .send_request_with_addresses(&peer, request, addrs);
                    self.pending_requests.insert(id, (peer, protocol, tx));
                }
            }
            Command::Dial(addr, tx) => {
                let r = self.swarm.dial(addr.clone()).map_err(|e| MeshError::Dial {
                    addr,
                    reason: e.to_string(),
                });
                let _ = tx.send(r);
            }
            Command::Block(peer, true) => {
                info!(%peer, "peer blocked by the node");
                self.manual_blocks.insert(peer);
                self.swarm.behaviour_mut().blocked.block_peer(peer);
            }
            Command::Block(peer, false) => {
                info!(%peer, "peer unblocked by the node");
                self.manual_blocks.remove(&peer);
                self.bans.remove(&peer);
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, cause = ?cause, "connection closed");
                self.on_disconnected(peer_id, connection_id, num_established);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                for b in &mut self.bootstrap {
                    if b.connection == Some(connection_id) {
                        b.connection = None;
                        info!(addr = %b.addr, retry_in = ?b.next_attempt.saturating_duration_since(Instant::now()),
                            "cannot reach bootstrap peer: {error}");
                    }
                }
                debug!(peer = ?peer_id, "outgoing connection failed: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => debug!(from = %send_back_addr, "incoming connection failed: {error}"),
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(addr = %address, "listening");
                self.emit(MeshEvent::Listening { addr: address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(addr = %address, "no longer listening")
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                warn!(addrs = ?addresses, reason = ?reason, "listener closed")
            }
            SwarmEvent::ListenerError { error, .. } => warn!("listener error: {error}"),
            _ => {}
        }
    }

    fn on_connected(&mut self, peer: PeerId, connection: ConnectionId, endpoint: &ConnectedPoint) {
        let now = Instant::now();
        let deadline = now + self.cfg.admission_timeout;
        let state = self.peers.entry(peer).or_insert_with(|| PeerState {
            connections: HashSet::new(),
            dialed: Vec::new(),
            listen_addrs: Vec::new(),
            status: Status::Pending {
                deadline,
                hello_sent: false,
                last_error: None,
            },
        });
        state.connections.insert(connection);
        if let ConnectedPoint::Dialer { address, .. } = endpoint
            && !state.dialed.contains(address)
            && state.dialed.len() < MAX_ANNOUNCED_ADDRS
        {
            state.dialed.push(address.clone());
        }
        // The dialer presents its ticket first, with a proof bound to both peer ids (worthless
        // to the listener and to anyone else); the listener answers with its own only once the
        // dialer's is verified, with a proof that also covers the dialer's fresh nonce.
        let send = endpoint.is_dialer()
            && matches!(
                state.status,
                Status::Pending {
                    hello_sent: false,
                    ..
                }
            );
        if let Status::Pending { hello_sent, .. } = &mut state.status {
            *hello_sent |= send;
        }
        for b in &mut self.bootstrap {
            if b.connection == Some(connection) {
                b.peer.get_or_insert(peer);
                b.backoff = BACKOFF_MIN;
            }
        }
        debug!(%peer, dialer = endpoint.is_dialer(), "connection established");
        if send {
            let hello = self.request_hello(peer);
            let nonce = hello.nonce.clone();
            let id = self
                .swarm
                .behaviour_mut()
                .admission
                .send_request(&peer, hello);
            self.hello_nonces.insert(id, nonce);
        }
    }

    fn on_disconnected(&mut self, peer: PeerId, connection: ConnectionId, remaining: u32) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.connections.remove(&connection);
        }
        if remaining == 0 {
            // The next connection runs the handshake again.
            self.peers.remove(&peer);
            self.swarm.behaviour_mut().gated.revoke(&peer);
        }
        let now = Instant::now();
        for b in &mut self.bootstrap {
            if b.connection == Some(connection) {
                b.connection = None;
                b.next_attempt = now + b.backoff;
                b.backoff = (b.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Limits(never) | BehaviourEvent::Blocked(never) => match never {},
            BehaviourEvent::Admission(e) => self.on_admission(e),
            BehaviourEvent::Identify(e) => self.on_identify(e),
            BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Mdns(e) => self.on_mdns(e),
            BehaviourEvent::Gated(GatedEvent::Gossipsub(e)) => self.on_gossipsub(e),
            BehaviourEvent::Gated(GatedEvent::Kad(e)) => self.on_kad(e),
            BehaviourEvent::Gated(GatedEvent::Rpc(e)) => self.on_rpc(e),
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let wall = self.wall();

        // Admission deadlines and expired tickets of connected peers.
        let mut refuse = Vec::new();
        for (peer, state) in &self.peers {
            match &state.status {
                Status::Pending {
                    deadline,
                    last_error,
                    ..
                } if *deadline <= now => {
                    let timeout = self.cfg.admission_timeout;
                    let e = match last_error {
                        Some(last_error) => AdmissionError::Incomplete {
                            timeout,
                            last_error: last_error.clone(),
                        },
                        None => AdmissionError::Timeout(timeout),
                    };
                    refuse.push((*peer, e));
                }
                Status::Admitted { expires: Some(e) } if *e <= wall => {
                    refuse.push((*peer, AdmissionError::Expired(rfc3339(*e))));
                }
                _ => {}
            }
        }
        for (peer, e) in refuse {
            self.reject(peer, e.to_string(), false);
        }
        for peer in self.members.expired_tickets(wall) {
            if self.members.remove(&peer) {
                info!(%peer, "peer down: its admission ticket expired");
                self.emit(MeshEvent::PeerDown { peer });
            }
        }

        // Bans.
        let (due, later): (Vec<_>, Vec<_>) = self.to_ban.drain(..).partition(|(at, _)| *at <= now);
        self.to_ban = later;
        for (_, peer) in due {
            self.ban(peer);
        }
        let lifted: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in lifted {
            self.bans.remove(&peer);
            if !self.manual_blocks.contains(&peer) {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }

        // Membership.
        for peer in self.members.expire(now, self.cfg.peer_timeout) {
            info!(%peer, timeout = ?self.cfg.peer_timeout, "peer down: no announcement");
            self.emit(MeshEvent::PeerDown { peer });
        }
        self.members.forget_down(now, FORGET_DOWN_AFTER);

        self.dial_bootstrap(now);
    }

    fn dial_bootstrap(&mut self, now: Instant) {
        for b in &mut self.bootstrap {
            if b.connection.is_some() || now < b.next_attempt {
                continue;
            }
            if let Some(p) = b.peer
                && (self.swarm.is_connected(&p)
                    || self.bans.contains_key(&p)
                    || self.manual_blocks.contains(&p))
            {
                continue;
            }
            let opts = match b.peer {
                Some(p) => DialOpts::peer_id(p)
                    .addresses(vec![b.addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(b.addr.clone()).build(),
            };
            let id = opts.connection_id();
            b.next_attempt = now + b.backoff;
            b.backoff = (b.backoff * 2).min(BACKOFF_MAX);
            match self.swarm.dial(opts) {
                Ok(()) => b.connection = Some(id),
                Err(e) => debug!(addr = %b.addr, "bootstrap dial not started: {e}"),
            }
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        if info.protocol_version != wire::IDENTIFY_VERSION {
            debug!(peer = %peer_id, version = %info.protocol_version, "peer identifies with another protocol version");
        }
        let Some(state) = self.peers.get_mut(&peer_id) else {
            return;
        };
        state.listen_addrs = info
            .listen_addrs
            .into_iter()
            .take(MAX_ANNOUNCED_ADDRS)
            .collect();
        if matches!(state.status, Status::Admitted { .. }) {
            let kad = &mut self.swarm.behaviour_mut().gated.inner_mut().kad;
            for addr in &state.listen_addrs {
                kad.add_address(&peer_id, addr.clone());
            }
        }
    }

    fn on_mdns(&mut self, event: mdns::Event) {
        let mdns::Event::Discovered(found) = event else {
            return;
        };
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in found {
            by_peer.entry(peer).or_default().push(addr);
        }
        for (peer, addrs) in by_peer {
            if peer == self.local
                || self.swarm.is_connected(&peer)
                || self.bans.contains_key(&peer)
                || self.manual_blocks.contains(&peer)
            {
                continue;
            }
            debug!(%peer, "discovered on the local network");
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, "not dialing a discovered peer: {e}");
            }
        }
    }
}
