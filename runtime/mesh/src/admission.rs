//! Admission: checking the ticket and proof a peer presents.
//!
//! The handshake itself lives in the event loop (`/beemesh/admission/1`, see `docs/mesh.md`);
//! this module holds the pure decision so it can be tested with an explicit clock.

use beemesh_manifest::PublicKey;
use beemesh_manifest::ticket::{MAX_NONCE_BYTES, MAX_TICKET_BYTES, Presentation, Ticket};
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
    #[error("sent a nonce of {size} bytes; the limit is {MAX_NONCE_BYTES}")]
    NonceTooLarge { size: usize },
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

/// Parses a ticket as it arrived from a peer (`ticket`: the ticket file's bytes), bounded in
/// size. `prover` names it in diagnostics.
pub fn parse_ticket(ticket: &[u8], prover: &str) -> Result<Ticket, AdmissionError> {
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
    let source = format!("ticket of {prover}");
    Ticket::parse(&source, text).map_err(|e| AdmissionError::Malformed(e.to_string()))
}

/// Checks the nonce of an admission request: at most [`MAX_NONCE_BYTES`]. (An empty one, from
/// a node of an earlier release, leaves the reply's proof bound to both PeerIds only.)
pub(crate) fn check_nonce(nonce: &[u8]) -> Result<(), AdmissionError> {
    if nonce.len() > MAX_NONCE_BYTES {
        return Err(AdmissionError::NonceTooLarge { size: nonce.len() });
    }
    Ok(())
}

/// Checks that `ticket` (the ticket file's bytes) with `proof` admits `presentation.prover`
/// at `now` under the `admission` key. The caller has authenticated the prover (noise, or
/// gossipsub's signature). Returns the ticket's expiry (`None`: it never expires).
pub fn check_ticket(
    ticket: &[u8],
    proof: &[u8],
    presentation: &Presentation<'_>,
    admission: &PublicKey,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, AdmissionError> {
    let parsed = parse_ticket(ticket, presentation.prover)?;
    parsed.verify(admission, presentation, proof, now)?;
    Ok(parsed.expires)
}

#[cfg(test)]
mod tests {
    use super::*;
    use beemesh_manifest::SecretKey;
    use beemesh_manifest::ticket::{Binding, TicketError};
    use libp2p::PeerId;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);

    fn peer() -> String {
        libp2p::identity::Keypair::ed25519_from_bytes([3; 32])
            .expect("key")
            .public()
            .to_peer_id()
            .to_base58()
    }

    #[test]
    fn tickets_are_checked_against_key_peer_proof_and_clock() {
        let adm = SecretKey::from_seed([1; 32]);
        let p = peer();
        let listener = PeerId::random().to_base58();
        let req = Presentation::request(&p, &listener);
        let ticket_key = SecretKey::from_seed([4; 32]);
        let fleet = Ticket::issue(
            &adm,
            Binding::Holder(ticket_key.public()),
            NOW,
            Some(datetime!(2026-12-01 0:00 UTC)),
        );
        let proof = fleet.prove(Some(&ticket_key), &req).expect("proves");
        let bytes = fleet.to_toml().into_bytes();
        assert_eq!(
            check_ticket(&bytes, &proof, &req, &adm.public(), NOW),
            Ok(Some(datetime!(2026-12-01 0:00 UTC)))
        );
        // The injected clock decides expiry.
        assert!(matches!(
            check_ticket(
                &bytes,
                &proof,
                &req,
                &adm.public(),
                datetime!(2026-12-02 0:00 UTC)
            ),
            Err(AdmissionError::Refused(TicketError::Expired(_)))
        ));
        // The fleet ticket without its proof, or its proof presented by someone else.
        assert!(matches!(
            check_ticket(&bytes, &[], &req, &adm.public(), NOW),
            Err(AdmissionError::Refused(TicketError::NoProof { .. }))
        ));
        let other = PeerId::random().to_base58();
        let e = check_ticket(
            &bytes,
            &proof,
            &Presentation::request(&other, &listener),
            &adm.public(),
            NOW,
        )
        .expect_err("replayed");
        assert!(e.to_string().contains(&other), "{e}");
        // A peer ticket for someone else.
        let bound = Ticket::issue(&adm, Binding::Peer(other.clone()), NOW, None)
            .to_toml()
            .into_bytes();
        let e = check_ticket(&bound, &[], &req, &adm.public(), NOW).expect_err("wrong peer");
        assert!(e.to_string().contains(&other), "{e}");
        // A peer ticket for the right peer, never expiring: no proof needed.
        let own = Ticket::issue(&adm, Binding::Peer(p.clone()), NOW, None)
            .to_toml()
            .into_bytes();
        assert_eq!(check_ticket(&own, &[], &req, &adm.public(), NOW), Ok(None));
        // Signed by a foreign admission key.
        let foreign = SecretKey::from_seed([2; 32]);
        let forged = Ticket::issue(&foreign, Binding::Peer(p.clone()), NOW, None)
            .to_toml()
            .into_bytes();
        assert!(matches!(
            check_ticket(&forged, &[], &req, &adm.public(), NOW),
            Err(AdmissionError::Refused(TicketError::WrongKey { .. }))
        ));
    }

    #[test]
    fn nonces_are_bounded() {
        assert_eq!(check_nonce(&[]), Ok(()));
        assert_eq!(check_nonce(&[1; MAX_NONCE_BYTES]), Ok(()));
        let e = check_nonce(&[1; 65]).expect_err("too long");
        assert_eq!(e, AdmissionError::NonceTooLarge { size: 65 });
        assert!(e.to_string().contains("65 bytes"), "{e}");
    }

    #[test]
    fn malformed_tickets_are_errors() {
        let adm = SecretKey::from_seed([1; 32]).public();
        let p = peer();
        let ann = Presentation::announcement(&p);
        assert_eq!(
            check_ticket(b"", &[], &ann, &adm, NOW),
            Err(AdmissionError::NoTicket)
        );
        assert_eq!(
            check_ticket(&[0xff, 0xfe], &[], &ann, &adm, NOW),
            Err(AdmissionError::NotText)
        );
        assert!(matches!(
            check_ticket(&vec![b'a'; 5000], &[], &ann, &adm, NOW),
            Err(AdmissionError::TooLarge { size: 5000, .. })
        ));
        let e =
            check_ticket(b"version = 1\nsig = 3\n", &[], &ann, &adm, NOW).expect_err("malformed");
        assert!(matches!(e, AdmissionError::Malformed(_)), "{e}");
    }
}
