//! The membership view: admitted peers that announced themselves, their latest announcement
//! and when it was seen. Pure state with an explicit clock, driven by the event loop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use time::OffsetDateTime;

/// What the mesh knows about one member, as returned by
/// [`MeshHandle::peers`](crate::MeshHandle::peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub peer_id: PeerId,
    /// The addresses the peer announced.
    pub addrs: Vec<Multiaddr>,
    /// The peer's latest announcement payload.
    pub announcement: Vec<u8>,
    /// When the latest announcement arrived.
    pub last_seen: Instant,
    /// Whether this node has a connection to the peer (otherwise it is known through gossip).
    pub connected: bool,
}

#[derive(Debug)]
struct Member {
    payload: Vec<u8>,
    addrs: Vec<Multiaddr>,
    last_seen: Instant,
    seq: u64,
    up: bool,
    /// The ticket bytes last verified for this peer, and their expiry.
    ticket: Vec<u8>,
    expires: Option<OffsetDateTime>,
    /// The announcement proof verified with `ticket` for this peer (as author), so that a
    /// repeated announcement is not verified again. `None` until an announcement verified.
    announce_proof: Option<Vec<u8>>,
}

/// How an announcement changed the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The peer was unknown or down and is now up.
    Up,
    /// The peer was up and its payload changed.
    Updated,
    /// Same payload (or only a newer last-seen time).
    Refreshed,
    /// An older or repeated announcement (replay): ignored.
    Stale,
    /// A new peer, but the view holds its limit of members and none of them is down:
    /// ignored (and counted).
    Full,
}

/// One announcement, as the event loop hands it over after checking its ticket.
pub(crate) struct Announcement<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
    pub addrs: Vec<Multiaddr>,
    pub ticket: &'a [u8],
    /// The proof of an announcement that arrived through gossip (`None` for a handshake's,
    /// which is never reused).
    pub announce_proof: Option<&'a [u8]>,
    pub expires: Option<OffsetDateTime>,
    /// Received over a live, authenticated connection from the peer itself (the admission
    /// handshake) rather than through gossip: proves liveness, so the sequence number is reset.
    pub direct: bool,
}

#[derive(Debug)]
pub(crate) struct Members {
    members: HashMap<PeerId, Member>,
    /// Most members tracked, up and down together (a fleet ticket admits any number of
    /// peer ids, so the view must not grow with what peers make up).
    max: usize,
}

impl Members {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            members: HashMap::new(),
            max: max.max(1),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn observe(&mut self, peer: PeerId, a: Announcement<'_>, now: Instant) -> Change {
        if !self.members.contains_key(&peer) && self.members.len() >= self.max {
            // Room for a newcomer: the member down the longest goes first; if every member
            // is up, the newcomer waits (its next announcement tries again).
            let oldest_down = self
                .members
                .iter()
                .filter(|(_, m)| !m.up)
                .min_by_key(|(_, m)| m.last_seen)
                .map(|(p, _)| *p);
            match oldest_down {
                Some(p) => {
                    self.members.remove(&p);
                }
                None => return Change::Full,
            }
        }
        match self.members.get_mut(&peer) {
            None => {
                self.members.insert(
                    peer,
                    Member {
                        payload: a.payload.to_vec(),
                        addrs: a.addrs,
                        last_seen: now,
                        seq: a.seq,
                        up: true,
                        ticket: a.ticket.to_vec(),
                        expires: a.expires,
                        announce_proof: a.announce_proof.map(<[u8]>::to_vec),
                    },
                );
                Change::Up
            }
            Some(m) => {
                if a.seq <= m.seq && !a.direct {
                    return Change::Stale;
                }
                m.seq = a.seq;
                m.last_seen = now;
                if !a.addrs.is_empty() {
                    m.addrs = a.addrs;
                }
                if m.ticket != a.ticket {
                    m.ticket = a.ticket.to_vec();
                    m.expires = a.expires;
                    m.announce_proof = None;
                }
                if let Some(proof) = a.announce_proof {
                    m.announce_proof = Some(proof.to_vec());
                }
                let changed = m.payload != a.payload;
                if changed {
                    m.payload = a.payload.to_vec();
                }
                if !m.up {
                    m.up = true;
                    Change::Up
                } else if changed {
                    Change::Updated
                } else {
                    Change::Refreshed
                }
            }
        }
    }

    /// The expiry of `ticket` if it is exactly the ticket, with exactly the announcement
    /// proof, already verified in an announcement of `peer`.
    pub(crate) fn verified_announcement(
        &self,
        peer: &PeerId,
        ticket: &[u8],
        proof: &[u8],
    ) -> Option<Option<OffsetDateTime>> {
        self.members
            .get(peer)
            .filter(|m| {
                !m.ticket.is_empty()
                    && m.ticket == ticket
                    && m.announce_proof.as_deref() == Some(proof)
            })
            .map(|m| m.expires)
    }

    /// Whether `peer` is known to hold a ticket valid at `now` (up or recently down).
    pub(crate) fn is_trusted(&self, peer: &PeerId, now: OffsetDateTime) -> bool {
        self.members
            .get(peer)
            .is_some_and(|m| m.expires.is_none_or(|e| e > now))
    }

    pub(crate) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.members
            .get(peer)
            .map(|m| m.addrs.clone())
            .unwrap_or_default()
    }

    /// Declares down every member not heard from for `timeout`; returns them.
    pub(crate) fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<PeerId> {
        let mut down = Vec::new();
        for (peer, m) in &mut self.members {
            if m.up && now.saturating_duration_since(m.last_seen) >= timeout {
                m.up = false;
                down.push(*peer);
            }
        }
        down.sort();
        down
    }

    /// Members whose ticket has expired at `now`.
    pub(crate) fn expired_tickets(&self, now: OffsetDateTime) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, m)| m.expires.is_some_and(|e| e <= now))
            .map(|(p, _)| *p)
            .collect();
        v.sort();
        v
    }

    /// Forgets a peer; returns whether it was up.
    pub(crate) fn remove(&mut self, peer: &PeerId) -> bool {
        self.members.remove(peer).is_some_and(|m| m.up)
    }

    /// Forgets members that have been down for longer than `keep` (the entry is kept a while
    /// so that a replayed old announcement is still recognised as stale).
    pub(crate) fn forget_down(&mut self, now: Instant, keep: Duration) {
        self.members
            .retain(|_, m| m.up || now.saturating_duration_since(m.last_seen) < keep);
    }

    /// The members that are up, sorted by peer id.
    pub(crate) fn list(&self, connected: impl Fn(&PeerId) -> bool) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .members
            .iter()
            .filter(|(_, m)| m.up)
            .map(|(p, m)| PeerInfo {
                peer_id: *p,
                addrs: m.addrs.clone(),
                announcement: m.payload.clone(),
                last_seen: m.last_seen,
                connected: connected(p),
            })
            .collect();
        v.sort_by_key(|i| i.peer_id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn ann(seq: u64, payload: &[u8], direct: bool) -> Announcement<'_> {
        Announcement {
            seq,
            payload,
            addrs: vec![],
            ticket: b"t",
            announce_proof: (!direct).then_some(b"p".as_slice()),
            expires: Some(datetime!(2030-01-01 0:00 UTC)),
            direct,
        }
    }

    #[test]
    fn up_updated_down_and_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let p = PeerId::random();
        let mut m = Members::new(100);
        assert_eq!(m.observe(p, ann(10, b"a", false), t0), Change::Up);
        assert_eq!(
            m.observe(p, ann(11, b"a", false), t0 + s),
            Change::Refreshed
        );
        assert_eq!(
            m.observe(p, ann(12, b"b", false), t0 + 2 * s),
            Change::Updated
        );
        assert_eq!(m.list(|_| false)[0].announcement, b"b");
        // Silent for less than the timeout: still up.
        assert!(m.expire(t0 + 9 * s, 8 * s).is_empty());
        assert_eq!(m.expire(t0 + 10 * s, 8 * s), vec![p]);
        assert!(m.list(|_| false).is_empty());
        assert!(m.expire(t0 + 20 * s, 8 * s).is_empty(), "down only once");
        assert_eq!(m.observe(p, ann(13, b"b", false), t0 + 21 * s), Change::Up);
        assert_eq!(m.list(|_| true)[0].last_seen, t0 + 21 * s);
    }

    #[test]
    fn replays_are_stale_unless_direct() {
        let t0 = Instant::now();
        let p = PeerId::random();
        let mut m = Members::new(100);
        m.observe(p, ann(10, b"new", false), t0);
        assert_eq!(m.observe(p, ann(9, b"old", false), t0), Change::Stale);
        assert_eq!(m.observe(p, ann(10, b"old", false), t0), Change::Stale);
        assert_eq!(m.list(|_| false)[0].announcement, b"new");
        // A restarted node whose clock went back is heard again through its handshake.
        assert_eq!(
            m.observe(p, ann(3, b"restarted", true), t0),
            Change::Updated
        );
        assert_eq!(
            m.observe(p, ann(4, b"restarted", false), t0),
            Change::Refreshed
        );
    }

    #[test]
    fn tickets_are_remembered_with_their_expiry() {
        let t0 = Instant::now();
        let p = PeerId::random();
        let mut m = Members::new(100);
        m.observe(p, ann(1, b"", false), t0);
        assert!(m.verified_announcement(&p, b"t", b"p").is_some());
        assert!(m.verified_announcement(&p, b"other", b"p").is_none());
        // The same ticket with another proof (another author's, say) is verified again.
        assert!(m.verified_announcement(&p, b"t", b"q").is_none());
        assert!(
            m.verified_announcement(&PeerId::random(), b"t", b"p")
                .is_none()
        );
        assert!(m.is_trusted(&p, datetime!(2029-01-01 0:00 UTC)));
        assert!(!m.is_trusted(&p, datetime!(2030-01-01 0:00 UTC)));
        assert_eq!(m.expired_tickets(datetime!(2030-01-01 0:00 UTC)), vec![p]);
        assert!(m.remove(&p));
        assert!(!m.is_trusted(&p, datetime!(2029-01-01 0:00 UTC)));
    }

    #[test]
    fn only_announcements_fill_the_verification_cache() {
        let t0 = Instant::now();
        let p = PeerId::random();
        let mut m = Members::new(100);
        // A handshake's proof is for one connection: it is never taken for an announcement's.
        m.observe(p, ann(1, b"", true), t0);
        assert!(m.verified_announcement(&p, b"t", b"p").is_none());
        assert!(m.verified_announcement(&p, b"t", b"").is_none());
        m.observe(p, ann(2, b"", false), t0);
        assert!(m.verified_announcement(&p, b"t", b"p").is_some());
        // A new ticket forgets the proof verified with the old one.
        let mut renewed = ann(3, b"", true);
        renewed.ticket = b"t2";
        m.observe(p, renewed, t0);
        assert!(m.verified_announcement(&p, b"t2", b"p").is_none());
        assert!(m.verified_announcement(&p, b"t", b"p").is_none());
    }

    #[test]
    fn the_view_is_bounded_and_makes_room_from_down_members_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut m = Members::new(3);
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        for p in &peers[..3] {
            assert_eq!(m.observe(*p, ann(1, b"", false), t0), Change::Up);
        }
        // Full of live members: a fourth is not tracked, however often it announces.
        assert_eq!(m.observe(peers[3], ann(1, b"", false), t0), Change::Full);
        assert_eq!(m.observe(peers[3], ann(2, b"", true), t0), Change::Full);
        assert_eq!(m.len(), 3);
        // Known members are still heard.
        let half = Duration::from_millis(500);
        assert_eq!(
            m.observe(peers[0], ann(2, b"x", false), t0 + half),
            Change::Updated
        );
        // Two go down (2 heard last at t0, 0 half a second later); 1 stays up. Newcomers
        // replace the longest-down first.
        m.observe(peers[1], ann(3, b"", false), t0 + 5 * s);
        m.expire(t0 + 9 * s, 8 * s);
        assert_eq!(m.list(|_| false).len(), 1, "0 and 2 are down");
        assert_eq!(
            m.observe(peers[3], ann(3, b"", false), t0 + 10 * s),
            Change::Up
        );
        assert!(
            m.verified_announcement(&peers[2], b"t", b"p").is_none(),
            "2 went first"
        );
        assert!(m.verified_announcement(&peers[0], b"t", b"p").is_some());
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn down_members_are_forgotten_after_a_while() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let p = PeerId::random();
        let mut m = Members::new(100);
        m.observe(p, ann(1, b"", false), t0);
        m.expire(t0 + 10 * s, 8 * s);
        m.forget_down(t0 + 11 * s, 60 * s);
        assert!(m.verified_announcement(&p, b"t", b"p").is_some());
        m.forget_down(t0 + 61 * s, 60 * s);
        assert!(m.verified_announcement(&p, b"t", b"p").is_none());
    }
}
