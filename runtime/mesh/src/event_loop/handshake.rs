//! The admission handshake on `/beemesh/admission/1`: admitting and rejecting peers.

use std::time::Instant;

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundFailure, ResponseChannel};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::{EventLoop, PeerState, REJECT_GRACE, Status, clip, rfc3339};
use crate::admission::{AdmissionError, check_ticket};
use crate::handle::MeshEvent;
use crate::wire::{Hello, HelloReply};

impl EventLoop {
    pub(super) fn on_admission(&mut self, event: request_response::Event<Hello, HelloReply>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_hello(peer, request, channel),
            Event::Message {
                peer,
                message: Message::Response { response, .. },
                ..
            } => self.on_hello_reply(peer, response),
            Event::OutboundFailure { peer, error, .. } => {
                let pending = matches!(
                    self.peers.get(&peer).map(|s| &s.status),
                    Some(Status::Pending { .. })
                );
                if !pending {
                    return;
                }
                if matches!(error, OutboundFailure::UnsupportedProtocols) {
                    self.reject(peer, AdmissionError::NotBeeMesh.to_string(), false);
                } else if let Some(PeerState {
                    status: Status::Pending { last_error, .. },
                    ..
                }) = self.peers.get_mut(&peer)
                {
                    *last_error = Some(error.to_string());
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "admission request failed: {error}")
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// Verifies a ticket, reusing an earlier verification of exactly these bytes.
    pub(super) fn verify_ticket(
        &self,
        peer: &PeerId,
        ticket: &[u8],
    ) -> Result<Option<OffsetDateTime>, AdmissionError> {
        let now = self.wall();
        match self.members.verified_ticket(peer, ticket) {
            Some(Some(expires)) if expires <= now => Err(AdmissionError::Expired(rfc3339(expires))),
            Some(expires) => Ok(expires),
            None => check_ticket(ticket, &self.cfg.admission_key, peer, now),
        }
    }

    /// The dialer's introduction (we are the listener).
    pub(super) fn on_hello(
        &mut self,
        peer: PeerId,
        hello: Hello,
        channel: ResponseChannel<HelloReply>,
    ) {
        let reply = match self.peers.get(&peer).map(|s| &s.status) {
            None | Some(Status::Closing) => return,
            Some(Status::Admitted { .. }) => match self.verify_ticket(&peer, &hello.ticket) {
                Ok(expires) => {
                    self.observe(peer, &hello, expires, true);
                    HelloReply {
                        hello: Some(self.hello()),
                        refused: None,
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    self.reject(peer, reason.clone(), true);
                    HelloReply {
                        hello: None,
                        refused: Some(reason),
                    }
                }
            },
            Some(Status::Pending { .. }) => match self.verify_ticket(&peer, &hello.ticket) {
                Ok(expires) => {
                    self.admit(peer, expires);
                    self.observe(peer, &hello, expires, true);
                    HelloReply {
                        hello: Some(self.hello()),
                        refused: None,
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    // Tell it why, then close once the answer had time to leave.
                    self.reject(peer, reason.clone(), true);
                    HelloReply {
                        hello: None,
                        refused: Some(reason),
                    }
                }
            },
        };
        if self
            .swarm
            .behaviour_mut()
            .admission
            .send_response(channel, reply)
            .is_err()
        {
            debug!(%peer, "admission answer not sent: the connection is gone");
        }
    }

    /// The listener's answer to our introduction (we are the dialer).
    pub(super) fn on_hello_reply(&mut self, peer: PeerId, reply: HelloReply) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if matches!(state.status, Status::Closing) {
            return;
        }
        if let Some(reason) = reply.refused {
            let reason = clip(reason);
            warn!(%peer, %reason, "peer refused this node's admission ticket");
            state.status = Status::Closing;
            let _ = self.swarm.disconnect_peer_id(peer);
            self.emit(MeshEvent::RefusedByPeer { peer, reason });
            return;
        }
        let Some(hello) = reply.hello else {
            self.reject(peer, AdmissionError::EmptyReply.to_string(), false);
            return;
        };
        match self.verify_ticket(&peer, &hello.ticket) {
            Ok(expires) => {
                if !self.is_admitted(&peer) {
                    self.admit(peer, expires);
                }
                self.observe(peer, &hello, expires, true);
            }
            Err(e) => self.reject(peer, e.to_string(), false),
        }
    }

    pub(super) fn admit(&mut self, peer: PeerId, expires: Option<OffsetDateTime>) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.status = Status::Admitted { expires };
        info!(%peer, expires = ?expires.map(rfc3339), "peer admitted");
        let behaviour = self.swarm.behaviour_mut();
        behaviour.gated.admit(peer);
        let kad = &mut behaviour.gated.inner_mut().kad;
        for addr in state.dialed.iter().chain(&state.listen_addrs) {
            kad.add_address(&peer, addr.clone());
        }
        if !self.kad_bootstrapped && kad.bootstrap().is_ok() {
            self.kad_bootstrapped = true;
        }
    }

    /// Refuses a connected peer: closes its connections (after `grace`, so a refusal can reach
    /// it) and refuses it for `reject_ban`.
    pub(super) fn reject(&mut self, peer: PeerId, reason: String, grace: bool) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if matches!(state.status, Status::Closing) {
            return;
        }
        state.status = Status::Closing;
        warn!(%peer, %reason, "peer rejected");
        let behaviour = self.swarm.behaviour_mut();
        behaviour.gated.revoke(&peer);
        behaviour.gated.inner_mut().kad.remove_peer(&peer);
        if self.members.remove(&peer) {
            self.emit(MeshEvent::PeerDown { peer });
        }
        if grace {
            self.to_ban.push((Instant::now() + REJECT_GRACE, peer));
        } else {
            self.ban(peer);
        }
        self.emit(MeshEvent::PeerRejected { peer, reason });
    }

    pub(super) fn ban(&mut self, peer: PeerId) {
        self.bans.insert(peer, Instant::now() + self.cfg.reject_ban);
        // Closes its connections and refuses new ones until unblocked.
        self.swarm.behaviour_mut().blocked.block_peer(peer);
    }
}
