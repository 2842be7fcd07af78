//! Gossip: announcements (membership) and the mesh's verdict on every message.

use std::time::Instant;

use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId, PublishError};
use libp2p::{Multiaddr, PeerId};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use beemesh_manifest::ticket::{Presentation, fresh_nonce};

use super::EventLoop;
use crate::handle::{MAX_ANNOUNCEMENT_BYTES, MeshEvent};
use crate::membership::{Announcement, Change};
use crate::wire::{self, ANNOUNCE_TOPIC, Hello, MAX_ANNOUNCED_ADDRS};

impl EventLoop {
    /// This node's introduction, with a fresh sequence number and without a proof.
    pub(super) fn hello(&mut self) -> Hello {
        let millis = u64::try_from(self.wall().unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        self.seq = (self.seq + 1).max(millis);
        let mut addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
        for a in self.swarm.external_addresses() {
            if !addrs.contains(a) {
                addrs.push(a.clone());
            }
        }
        let mut hello = Hello {
            ticket: self.cfg.ticket.clone(),
            proof: Vec::new(),
            nonce: Vec::new(),
            seq: self.seq,
            payload: self.announcement.clone(),
            addrs: Vec::new(),
        };
        hello.set_addrs(addrs.iter().take(MAX_ANNOUNCED_ADDRS));
        hello
    }

    /// The proof of this node's ticket for `presentation` (empty with a peer ticket, or when
    /// the node cannot make one: its peers then refuse it and say why).
    pub(super) fn prove(&self, presentation: &Presentation<'_>) -> Vec<u8> {
        let Some(ticket) = &self.own_ticket else {
            return Vec::new();
        };
        ticket
            .prove(self.cfg.ticket_key.as_deref(), presentation)
            .unwrap_or_else(|e| {
                debug!("no proof for {}: {e}", presentation.role);
                Vec::new()
            })
    }

    /// The admission request to `peer`: a proof bound to this node (requester) and `peer`, and
    /// a fresh nonce for the proof of the reply.
    pub(super) fn request_hello(&mut self, peer: PeerId) -> Hello {
        let mut hello = self.hello();
        let remote = peer.to_base58();
        hello.proof = self.prove(&Presentation::request(&self.local_b58, &remote));
        hello.nonce = match fresh_nonce() {
            Ok(n) => n.to_vec(),
            Err(e) => {
                // The reply's proof is then bound to both peer ids only (docs/mesh.md).
                warn!("admission request to {peer} without a nonce: {e}");
                Vec::new()
            }
        };
        hello
    }

    /// The admission reply to `peer`, whose request carried `nonce`.
    pub(super) fn reply_hello(&mut self, peer: PeerId, nonce: &[u8]) -> Hello {
        let mut hello = self.hello();
        let remote = peer.to_base58();
        hello.proof = self.prove(&Presentation::reply(&self.local_b58, &remote, nonce));
        hello
    }

    pub(super) fn announce(&mut self) {
        let mut hello = self.hello();
        hello.proof = self.announce_proof.clone();
        let hello = wire::encode(&hello);
        match self
            .gossipsub()
            .publish(IdentTopic::new(ANNOUNCE_TOPIC), hello)
        {
            Ok(_) | Err(PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => debug!("announcement not published: {e}"),
        }
    }

    pub(super) fn observe(
        &mut self,
        peer: PeerId,
        hello: &Hello,
        expires: Option<OffsetDateTime>,
        direct: bool,
    ) -> Change {
        if hello.payload.len() > MAX_ANNOUNCEMENT_BYTES {
            debug!(%peer, size = hello.payload.len(), "announcement too large: ignored");
            return Change::Stale;
        }
        let announcement = Announcement {
            seq: hello.seq,
            payload: &hello.payload,
            addrs: hello.parsed_addrs(),
            ticket: &hello.ticket,
            // Only a gossip announcement's proof is remembered: the cache of
            // `verify_announcement` must never take a handshake's proof for an announcement's.
            announce_proof: (!direct).then_some(hello.proof.as_slice()),
            expires,
            direct,
        };
        let change = self.members.observe(peer, announcement, Instant::now());
        match change {
            Change::Up => {
                info!(%peer, "peer up");
                self.emit(MeshEvent::PeerUp {
                    peer,
                    announcement: hello.payload.clone(),
                });
            }
            Change::Updated => {
                self.emit(MeshEvent::PeerUpdated {
                    peer,
                    announcement: hello.payload.clone(),
                });
            }
            Change::Full => {
                debug!(%peer, "membership view full: peer not tracked");
                self.emit(MeshEvent::MembershipFull { peer });
            }
            Change::Refreshed | Change::Stale => {}
        }
        change
    }

    pub(super) fn on_gossipsub(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                if let Some(verdict) = self.judge(propagation_source, &message_id, message) {
                    self.gossipsub().report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        verdict,
                    );
                }
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } if self.is_admitted(&peer_id) => {
                warn!(peer = %peer_id, "admitted peer does not speak {}", wire::GOSSIP_PROTOCOL);
            }
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
                ..
            } => debug!(peer = %peer_id, ?failed_messages, "slow gossip peer"),
            _ => {}
        }
    }

    /// The mesh's verdict on a gossip message, or `None` when the node decides.
    pub(super) fn judge(
        &mut self,
        from: PeerId,
        id: &MessageId,
        message: gossipsub::Message,
    ) -> Option<MessageAcceptance> {
        // The gate keeps gossip from unadmitted peers away; this is the second lock.
        if !self.is_admitted(&from) {
            debug!(peer = %from, "gossip forwarded by a peer that is not admitted: rejected");
            return Some(MessageAcceptance::Reject);
        }
        let Some(author) = message.source else {
            return Some(MessageAcceptance::Reject);
        };
        if message.topic.as_str() == ANNOUNCE_TOPIC {
            return Some(self.on_announcement(author, &message.data));
        }
        let wall = self.wall();
        if !(self.is_admitted(&author) || self.members.is_trusted(&author, wall)) {
            // Its announcement (with its ticket) has not reached us yet, or it has none.
            debug!(%author, "gossip by an author not known to be admitted: ignored");
            return Some(MessageAcceptance::Ignore);
        }
        if message.data.len() > self.cfg.max_message_size {
            debug!(%author, size = message.data.len(), "gossip message over the size limit: rejected");
            return Some(MessageAcceptance::Reject);
        }
        let event = MeshEvent::Gossip {
            topic: message.topic.into_string(),
            source: author,
            propagation_source: from,
            message_id: id.clone(),
            data: message.data,
        };
        if self.emit(event) {
            None
        } else {
            Some(MessageAcceptance::Ignore)
        }
    }

    /// Verifies an announcement's ticket and proof for its author, reusing an earlier
    /// verification of exactly these bytes for this author.
    fn verify_announcement(
        &self,
        author: &PeerId,
        hello: &Hello,
    ) -> Result<Option<OffsetDateTime>, crate::AdmissionError> {
        let now = self.wall();
        match self
            .members
            .verified_announcement(author, &hello.ticket, &hello.proof)
        {
            Some(Some(expires)) if expires <= now => {
                Err(crate::AdmissionError::Expired(super::rfc3339(expires)))
            }
            Some(expires) => Ok(expires),
            None => {
                let author = author.to_base58();
                crate::admission::check_ticket(
                    &hello.ticket,
                    &hello.proof,
                    &Presentation::announcement(&author),
                    &self.cfg.admission_key,
                    now,
                )
            }
        }
    }

    pub(super) fn on_announcement(&mut self, author: PeerId, data: &[u8]) -> MessageAcceptance {
        if author == self.local {
            return MessageAcceptance::Ignore;
        }
        let hello: Hello = match wire::decode(data) {
            Ok(h) => h,
            Err(e) => {
                debug!(%author, "announcement rejected: {e}");
                return MessageAcceptance::Reject;
            }
        };
        match self.verify_announcement(&author, &hello) {
            Err(e) => {
                debug!(%author, "announcement rejected: its author {e}");
                MessageAcceptance::Reject
            }
            Ok(expires) => match self.observe(author, &hello, expires, false) {
                Change::Stale | Change::Full => MessageAcceptance::Ignore,
                _ => MessageAcceptance::Accept,
            },
        }
    }
}
