//! The admission handshake on `/beemesh/admission/1`: admitting and rejecting peers.

use std::time::Instant;

use beemesh_manifest::ticket::Presentation;
use libp2p::PeerId;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::{EventLoop, PeerState, REJECT_GRACE, Status, clip, rfc3339};
use crate::admission::{AdmissionError, check_nonce, check_ticket};
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
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => self.on_hello_reply(peer, request_id, response),
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.hello_nonces.remove(&request_id);
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

    /// Verifies the ticket and proof of a handshake message from `peer` (authenticated by
    /// noise). Always verified afresh: a handshake proof is good for one presentation only.
    fn verify_hello(
        &self,
        hello: &Hello,
        presentation: &Presentation<'_>,
    ) -> Result<Option<OffsetDateTime>, AdmissionError> {
        check_ticket(
            &hello.ticket,
            &hello.proof,
            presentation,
            &self.cfg.admission_key,
            self.wall(),
        )
    }

    /// Checks an admission request from `peer`: its ticket, and its proof bound to `peer` as
    /// requester and this node as the one asked.
    fn verify_request(
        &self,
        peer: &PeerId,
        hello: &Hello,
    ) -> Result<Option<OffsetDateTime>, AdmissionError> {
        check_nonce(&hello.nonce)?;
        let remote = peer.to_base58();
        self.verify_hello(hello, &Presentation::request(&remote, &self.local_b58))
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
            Some(Status::Admitted { .. }) => match self.verify_request(&peer, &hello) {
                Ok(expires) => {
                    self.observe(peer, &hello, expires, true);
                    HelloReply {
                        hello: Some(self.reply_hello(peer, &hello.nonce)),
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
            Some(Status::Pending { .. }) => match self.verify_request(&peer, &hello) {
                Ok(expires) => {
                    self.admit(peer, expires);
                    self.observe(peer, &hello, expires, true);
                    HelloReply {
                        hello: Some(self.reply_hello(peer, &hello.nonce)),
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
    pub(super) fn on_hello_reply(
        &mut self,
        peer: PeerId,
        request: OutboundRequestId,
        reply: HelloReply,
    ) {
        let nonce = self.hello_nonces.remove(&request).unwrap_or_default();
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
        let remote = peer.to_base58();
        let presentation = Presentation::reply(&remote, &self.local_b58, &nonce);
        match self.verify_hello(&hello, &presentation) {
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
