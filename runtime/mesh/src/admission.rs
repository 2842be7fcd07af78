//! Admission: checking the ticket a peer presents.
//!
//! The handshake itself lives in the event loop (`/beemesh/admission/1`, see `docs/mesh.md`);
//! this module holds the pure decision so it can be tested with an explicit clock.

use beemesh_manifest::PublicKey;
use beemesh_manifest::ticket::{MAX_TICKET_BYTES, Ticket};
use libp2p::PeerId;
use time::OffsetDateTime;

/// Why a presented ticket does not admit its presenter. The text is what operators see in
/// logs and in [`MeshEvent::PeerRejected`](crate::MeshEvent::PeerRejected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("presented no admission ticket")]
    NoTicket,
    #[error("presented a ticket of {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: u64 },
    #[error("presented a ticket that is not UTF-8 text")]
    NotText,
    #[error("presented a malformed ticket: {0}")]
    Malformed(String),
    #[error("presented a ticket that does not admit it: {0}")]
    Refused(#[from] beemesh_manifest::ticket::TicketError),
    #[error("sent no admission ticket within {0:?}")]
    Timeout(std::time::Duration),
    #[error("did not complete admission within {timeout:?}: {last_error}")]
    Incomplete {
        timeout: std::time::Duration,
        last_error: String,
    },
    #[error("does not speak {}", crate::wire::ADMISSION_PROTOCOL)]
    NotBeeMesh,
    #[error("answered the admission request with neither a ticket nor a refusal")]
    EmptyReply,
    #[error("its admission ticket expired at {0}")]
    Expired(String),
}

/// Checks that `ticket` (the ticket file's bytes) admits `peer` at `now` under the `admission`
/// key. Returns the ticket's expiry (`None`: it never expires).
pub fn check_ticket(
    ticket: &[u8],
    admission: &PublicKey,
    peer: &PeerId,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, AdmissionError> {
    if ticket.is_empty() {
        return Err(AdmissionError::NoTicket);
    }
    if ticket.len() as u64 > MAX_TICKET_BYTES {
        return Err(AdmissionError::TooLarge {
            size: ticket.len(),
            limit: MAX_TICKET_BYTES,
        });
    }
    let text = std::str::from_utf8(ticket).map_err(|_| AdmissionError::NotText)?;
    let source = format!("ticket of {peer}");
    let parsed =
        Ticket::parse(&source, text).map_err(|e| AdmissionError::Malformed(e.to_string()))?;
    parsed.verify(admission, &peer.to_base58(), now)?;
    Ok(parsed.expires)
}

#[cfg(test)]
mod tests {
    use super::*;
    use beemesh_manifest::SecretKey;
    use beemesh_manifest::ticket::TicketError;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);

    fn peer() -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([3; 32])
            .expect("key")
            .public()
            .to_peer_id()
    }

    #[test]
    fn tickets_are_checked_against_key_peer_and_clock() {
        let adm = SecretKey::from_seed([1; 32]);
        let p = peer();
        let fleet = Ticket::issue(&adm, None, NOW, Some(datetime!(2026-12-01 0:00 UTC)));
        let bytes = fleet.to_toml().into_bytes();
        assert_eq!(
            check_ticket(&bytes, &adm.public(), &p, NOW),
            Ok(Some(datetime!(2026-12-01 0:00 UTC)))
        );
        // The injected clock decides expiry.
        assert!(matches!(
            check_ticket(&bytes, &adm.public(), &p, datetime!(2026-12-02 0:00 UTC)),
            Err(AdmissionError::Refused(TicketError::Expired(_)))
        ));
        // A peer ticket for someone else.
        let other = PeerId::random();
        let bound = Ticket::issue(&adm, Some(other.to_base58()), NOW, None)
            .to_toml()
            .into_bytes();
        let e = check_ticket(&bound, &adm.public(), &p, NOW).expect_err("wrong peer");
        assert!(e.to_string().contains(&other.to_base58()), "{e}");
        // A ticket for the right peer never expiring.
        let own = Ticket::issue(&adm, Some(p.to_base58()), NOW, None)
            .to_toml()
            .into_bytes();
        assert_eq!(check_ticket(&own, &adm.public(), &p, NOW), Ok(None));
        // Signed by a foreign admission key.
        let foreign = SecretKey::from_seed([2; 32]);
        let forged = Ticket::issue(&foreign, None, NOW, None)
            .to_toml()
            .into_bytes();
        assert!(matches!(
            check_ticket(&forged, &adm.public(), &p, NOW),
            Err(AdmissionError::Refused(TicketError::WrongKey { .. }))
        ));
    }

    #[test]
    fn malformed_tickets_are_errors() {
        let adm = SecretKey::from_seed([1; 32]).public();
        let p = peer();
        assert_eq!(
            check_ticket(b"", &adm, &p, NOW),
            Err(AdmissionError::NoTicket)
        );
        assert_eq!(
            check_ticket(&[0xff, 0xfe], &adm, &p, NOW),
            Err(AdmissionError::NotText)
        );
        assert!(matches!(
            check_ticket(&vec![b'a'; 5000], &adm, &p, NOW),
            Err(AdmissionError::TooLarge { size: 5000, .. })
        ));
        let e = check_ticket(b"version = 1\nsig = 3\n", &adm, &p, NOW).expect_err("malformed");
        assert!(matches!(e, AdmissionError::Malformed(_)), "{e}");
    }
}
