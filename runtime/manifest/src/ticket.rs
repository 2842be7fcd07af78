//! Admission tickets: what lets a node into a mesh.
//!
//! A ticket is signed by the `[trust] admission` key. A *fleet* ticket admits any node that
//! holds it (one ticket on the config partition of a generic image); a *peer* ticket admits
//! exactly one PeerId. Tickets may expire. The file is TOML:
//!
//! ```toml
//! version = 1
//! peer = "12D3KooW..."            # absent for a fleet ticket
//! issued = "2026-11-21T12:00:00Z"
//! expires = "2027-11-21T12:00:00Z" # optional
//! key = "ed25519:..."              # the admission key that signed it
//! sig = "BASE64"
//! ```
//!
//! The signature covers a domain-separated, length-prefixed encoding of the fields (never the
//! TOML text), so it cannot be confused with a manifest signature and needs no canonical TOML.
//! The `key` field only says which key signed; it is trusted only when it equals the
//! verifier's configured admission key.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::diag::{self, Invalid, KeyPath, Problems};
use crate::keys::{PublicKey, SecretKey, decode_signature, encode_signature};

/// Domain separation for admission tickets. Never reuse this string for another purpose.
pub const TICKET_CONTEXT: &[u8] = b"beemesh/v1/admission-ticket\0";
/// Largest ticket accepted (file or wire).
pub const MAX_TICKET_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTicket {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    issued: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    key: PublicKey,
    sig: String,
}

/// A parsed (not yet verified) admission ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The PeerId (base58 text) this ticket is bound to; `None` for a fleet ticket.
    pub peer: Option<String>,
    pub issued: OffsetDateTime,
    pub expires: Option<OffsetDateTime>,
    pub key: PublicKey,
    sig: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket was signed by {found}, not by the admission key {expected}")]
    WrongKey {
        found: PublicKey,
        expected: PublicKey,
    },
    #[error("ticket signature by {0} does not verify (the ticket was altered or forged)")]
    BadSignature(PublicKey),
    #[error("ticket is bound to peer {bound}, but was presented by {presenter}")]
    WrongPeer { bound: String, presenter: String },
    #[error("ticket expired at {0}")]
    Expired(String),
    #[error("ticket is issued in the future ({0}); check the clocks")]
    NotYetValid(String),
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

impl Ticket {
    /// Issues a ticket. `peer = None` makes a fleet ticket.
    pub fn issue(
        admission: &SecretKey,
        peer: Option<String>,
        issued: OffsetDateTime,
        expires: Option<OffsetDateTime>,
    ) -> Self {
        let issued = issued.replace_nanosecond(0).unwrap_or(issued);
        let expires = expires.map(|e| e.replace_nanosecond(0).unwrap_or(e));
        let key = admission.public();
        let msg = signing_message(peer.as_deref(), issued, expires);
        Self {
            peer,
            issued,
            expires,
            key,
            sig: admission.sign(&msg),
        }
    }

    pub fn is_fleet(&self) -> bool {
        self.peer.is_none()
    }

    /// Parses a ticket file or wire message. `source` names it in diagnostics.
    pub fn parse(source: &str, text: &str) -> Result<Self, Invalid> {
        let raw: RawTicket = diag::from_toml(source, text)?;
        let mut p = Problems::new();
        let root = KeyPath::root();
        if raw.version != 1 {
            p.push(
                root.key("version"),
                format!("unsupported ticket version {}", raw.version),
            );
        }
        let issued = OffsetDateTime::parse(&raw.issued, &Rfc3339);
        if issued.is_err() {
            p.push(
                root.key("issued"),
                format!("{:?} is not an RFC 3339 time", raw.issued),
            );
        }
        let expires = raw
            .expires
            .as_deref()
            .map(|e| OffsetDateTime::parse(e, &Rfc3339));
        if let Some(Err(_)) = expires {
            p.push(root.key("expires"), "not an RFC 3339 time");
        }
        if let Some(peer) = &raw.peer
            && (peer.is_empty()
                || peer.len() > 128
                || !peer.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            p.push(root.key("peer"), format!("{peer:?} is not a peer id"));
        }
        let sig = decode_signature(&raw.sig);
        if let Err(e) = &sig {
            p.push(root.key("sig"), e.clone());
        }
        p.locate(source, Some(text))?;
        match (issued, expires.transpose(), sig) {
            (Ok(issued), Ok(expires), Ok(sig)) => Ok(Self {
                peer: raw.peer,
                issued,
                expires,
                key: raw.key,
                sig,
            }),
            // Every error above was pushed to `p`, which returned already.
            _ => Err(Invalid::single(crate::Diagnostic {
                source: source.to_owned(),
                line: None,
                column: None,
                key: String::new(),
                reason: "malformed ticket".into(),
            })),
        }
    }

    pub fn to_toml(&self) -> String {
        let raw = RawTicket {
            version: 1,
            peer: self.peer.clone(),
            issued: rfc3339(self.issued),
            expires: self.expires.map(rfc3339),
            key: self.key,
            sig: encode_signature(&self.sig),
        };
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot serialise ticket: {e}\n"))
    }

    /// Checks that this ticket admits `presenter` (a PeerId in base58 text) at `now`, under
    /// the configured `admission` key.
    pub fn verify(
        &self,
        admission: &PublicKey,
        presenter: &str,
        now: OffsetDateTime,
    ) -> Result<(), TicketError> {
        if self.key != *admission {
            return Err(TicketError::WrongKey {
                found: self.key,
                expected: *admission,
            });
        }
        let msg = signing_message(self.peer.as_deref(), self.issued, self.expires);
        admission
            .verify(&msg, &self.sig)
            .map_err(|_| TicketError::BadSignature(self.key))?;
        if let Some(bound) = &self.peer
            && bound != presenter
        {
            return Err(TicketError::WrongPeer {
                bound: bound.clone(),
                presenter: presenter.to_owned(),
            });
        }
        if let Some(exp) = self.expires
            && exp <= now
        {
            return Err(TicketError::Expired(rfc3339(exp)));
        }
        // Allow a little clock skew between the issuer and this node.
        if self.issued > now + time::Duration::minutes(5) {
            return Err(TicketError::NotYetValid(rfc3339(self.issued)));
        }
        Ok(())
    }
}

/// The signed bytes: context, then each field length-prefixed (u32 big-endian).
fn signing_message(
    peer: Option<&str>,
    issued: OffsetDateTime,
    expires: Option<OffsetDateTime>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(TICKET_CONTEXT.len() + 96);
    m.extend_from_slice(TICKET_CONTEXT);
    let mut field = |b: &[u8]| {
        m.extend_from_slice(&(b.len() as u32).to_be_bytes());
        m.extend_from_slice(b);
    };
    field(peer.unwrap_or("").as_bytes());
    field(&issued.unix_timestamp().to_be_bytes());
    match expires {
        Some(e) => field(&e.unix_timestamp().to_be_bytes()),
        None => field(b""),
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);
    const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

    #[test]
    fn fleet_ticket_admits_anyone_until_it_expires() {
        let adm = SecretKey::from_seed([9; 32]);
        let t = Ticket::issue(&adm, None, NOW, Some(datetime!(2026-12-01 0:00 UTC)));
        let back = Ticket::parse("t", &t.to_toml()).expect("parses");
        assert_eq!(back, t);
        assert!(back.verify(&adm.public(), PEER, NOW).is_ok());
        assert!(back.verify(&adm.public(), "12D3KooWother", NOW).is_ok());
        assert!(matches!(
            back.verify(&adm.public(), PEER, datetime!(2026-12-01 0:00 UTC)),
            Err(TicketError::Expired(_))
        ));
    }

    #[test]
    fn peer_ticket_admits_only_its_peer() {
        let adm = SecretKey::from_seed([9; 32]);
        let t = Ticket::issue(&adm, Some(PEER.into()), NOW, None);
        assert!(t.verify(&adm.public(), PEER, NOW).is_ok());
        assert!(matches!(
            t.verify(&adm.public(), "12D3KooWother", NOW),
            Err(TicketError::WrongPeer { .. })
        ));
    }

    #[test]
    fn foreign_or_altered_tickets_are_refused() {
        let adm = SecretKey::from_seed([9; 32]);
        let other = SecretKey::from_seed([8; 32]);
        let foreign = Ticket::issue(&other, None, NOW, None);
        assert!(matches!(
            foreign.verify(&adm.public(), PEER, NOW),
            Err(TicketError::WrongKey { .. })
        ));
        // Claiming the right key does not help a forged signature.
        let text = foreign
            .to_toml()
            .replace(&other.public().to_string(), &adm.public().to_string());
        let forged = Ticket::parse("t", &text).expect("parses");
        assert!(matches!(
            forged.verify(&adm.public(), PEER, NOW),
            Err(TicketError::BadSignature(_))
        ));
        // Removing the peer binding breaks the signature.
        let bound = Ticket::issue(&adm, Some(PEER.into()), NOW, None);
        let unbound = Ticket::parse(
            "t",
            &bound.to_toml().replace(&format!("peer = \"{PEER}\"\n"), ""),
        )
        .expect("parses");
        assert!(unbound.is_fleet());
        assert!(matches!(
            unbound.verify(&adm.public(), PEER, NOW),
            Err(TicketError::BadSignature(_))
        ));
    }

    #[test]
    fn malformed_tickets_are_located() {
        let e = Ticket::parse(
            "t.toml",
            "version = 1\nissued = \"yesterday\"\nkey = \"ed25519:x\"\nsig = \"\"\n",
        )
        .expect_err("bad");
        assert_eq!(e.diagnostics[0].key, "key");
        assert_eq!(e.diagnostics[0].line, Some(3));
    }
}
