//! Admission tickets: what lets a node into a mesh, and how a node proves it holds one.
//!
//! A ticket is signed by the `[trust] admission` key and binds one of two things:
//!
//! - a *peer* ticket binds one PeerId (`peer`). Noise authenticates the PeerId of every
//!   connection and gossipsub's signature the author of every message, so a peer ticket needs
//!   no further proof: it admits its peer and nobody else, and showing it gives nothing away.
//! - a *fleet* ticket (one ticket on the config partition of a generic image) binds a *ticket
//!   key* (`holder`), an Ed25519 key pair made by `beemesh ticket issue`. The ticket itself is
//!   public; the ticket secret key is written beside it (`FILE.key`) and never leaves the node.
//!   A node presents a fleet ticket together with a *proof*: a signature by the ticket secret
//!   key over a [`Presentation`] (who proves to whom, in which role, with the verifier's nonce
//!   where there is one), so a proof seen by anyone admits nobody else.
//!
//! Tickets may expire. The file is TOML:
//!
//! ```toml
//! version = 2
//! peer = "12D3KooW..."            # a peer ticket, or:
//! holder = "ed25519:..."           # a fleet ticket: the ticket public key
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
//!
//! Format version 1 had no `holder`: its fleet tickets were bearer credentials, admitting
//! whoever had seen one. They are refused ([`TicketError::BearerTicket`]); version 1 *peer*
//! tickets still verify, under their own signing context.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::diag::{self, Invalid, KeyPath, Problems};
use crate::keys::{KeyError, PublicKey, SecretKey, decode_signature, encode_signature};

/// Domain separation for version 1 tickets (peer tickets of that format still verify).
pub const TICKET_CONTEXT_V1: &[u8] = b"beemesh/v1/admission-ticket\0";
/// Domain separation for version 2 tickets. Never reuse this string for another purpose.
pub const TICKET_CONTEXT: &[u8] = b"beemesh/v2/admission-ticket\0";
/// Domain separation for proofs of holding a ticket key. Never reuse it for another purpose.
pub const PROOF_CONTEXT: &[u8] = b"beemesh/v1/admission-proof\0";
/// The ticket format `Ticket::issue` writes.
pub const TICKET_VERSION: u32 = 2;
/// Largest ticket accepted (file or wire).
pub const MAX_TICKET_BYTES: u64 = 4096;
/// Length of the nonce a requester sends for the reply's proof.
pub const NONCE_BYTES: usize = 32;
/// Longest nonce accepted from a peer.
pub const MAX_NONCE_BYTES: usize = 64;
/// Length of a proof (an Ed25519 signature).
pub const PROOF_BYTES: usize = 64;

/// Where the ticket secret key lives when nothing else is configured: beside the ticket, with
/// `.key` appended to its file name (`/etc/beemesh/ticket` → `/etc/beemesh/ticket.key`).
pub fn default_key_path(ticket: &Path) -> PathBuf {
    let mut name = ticket.file_name().unwrap_or_default().to_os_string();
    name.push(".key");
    ticket.with_file_name(name)
}

/// A fresh nonce from the operating system's randomness.
pub fn fresh_nonce() -> Result<[u8; NONCE_BYTES], KeyError> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(n)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTicket {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder: Option<PublicKey>,
    issued: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    key: PublicKey,
    sig: String,
}

/// What a ticket admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Exactly this PeerId (base58 text).
    Peer(String),
    /// Whoever proves it holds the secret half of this ticket key (a fleet ticket).
    Holder(PublicKey),
}

/// A parsed (not yet verified) admission ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The format version (1 or 2).
    pub version: u32,
    /// The PeerId (base58 text) this ticket is bound to; `None` for a fleet ticket.
    pub peer: Option<String>,
    /// The ticket public key of a fleet ticket (version 2); `None` for a peer ticket.
    pub holder: Option<PublicKey>,
    pub issued: OffsetDateTime,
    pub expires: Option<OffsetDateTime>,
    pub key: PublicKey,
    sig: [u8; 64],
}

/// The role in which a node presents its ticket. Each role signs a different message, so a
/// proof made in one role is worthless in another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The admission request: the side that starts the handshake (normally the dialer).
    Request,
    /// The admission reply, answering the requester's nonce.
    Reply,
    /// A membership announcement on gossip, bound to its author.
    Announcement,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Request => b"request",
            Role::Reply => b"reply",
            Role::Announcement => b"announcement",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Request => "an admission request",
            Role::Reply => "an admission reply",
            Role::Announcement => "an announcement",
        })
    }
}

/// Who presents a ticket to whom, and how: the statement a proof signs. The caller must have
/// authenticated `prover` itself (noise for a connection's peer, gossipsub's signature for a
/// message's author): a ticket only decides whether that authenticated peer is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presentation<'a> {
    pub role: Role,
    /// The PeerId (base58) presenting the ticket.
    pub prover: &'a str,
    /// The PeerId (base58) it is presented to (empty for an announcement, which is for all).
    pub verifier: &'a str,
    /// The verifier's nonce (a reply's), empty where there is none.
    pub nonce: &'a [u8],
}

impl<'a> Presentation<'a> {
    /// `prover` starts the admission handshake with `verifier`.
    pub fn request(prover: &'a str, verifier: &'a str) -> Self {
        Self {
            role: Role::Request,
            prover,
            verifier,
            nonce: &[],
        }
    }

    /// `prover` answers the admission request of `verifier`, which sent `nonce`.
    pub fn reply(prover: &'a str, verifier: &'a str, nonce: &'a [u8]) -> Self {
        Self {
            role: Role::Reply,
            prover,
            verifier,
            nonce,
        }
    }

    /// `author` announces itself to the whole mesh.
    pub fn announcement(author: &'a str) -> Self {
        Self {
            role: Role::Announcement,
            prover: author,
            verifier: "",
            nonce: &[],
        }
    }

    /// The signed bytes: context, then role, prover, verifier, nonce and the ticket's id, each
    /// length-prefixed (u32 big-endian).
    fn message(&self, ticket_id: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(PROOF_CONTEXT.len() + 200);
        m.extend_from_slice(PROOF_CONTEXT);
        for f in [
            self.role.tag(),
            self.prover.as_bytes(),
            self.verifier.as_bytes(),
            self.nonce,
            ticket_id,
        ] {
            push_field(&mut m, f);
        }
        m
    }
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
    #[error(
        "fleet ticket issued {issued} by {key} has no ticket key (format version 1): anyone \
         who saw it could use it, so it is no longer accepted; reissue it with `beemesh ticket \
         issue`, which writes the ticket and its key"
    )]
    BearerTicket { issued: String, key: PublicKey },
    #[error("fleet ticket of ticket key {holder} came without a proof of holding that key")]
    NoProof { holder: PublicKey },
    #[error("proof is {len} bytes; a proof is an Ed25519 signature of {PROOF_BYTES} bytes")]
    MalformedProof { len: usize },
    #[error(
        "proof by ticket key {holder} does not verify for {role} by {prover} (it was made for \
         another peer, role or session, or forged)"
    )]
    BadProof {
        holder: PublicKey,
        role: Role,
        prover: String,
    },
    #[error(
        "fleet ticket of ticket key {holder} needs its ticket secret key (the file `beemesh \
         ticket issue` wrote beside the ticket), and none was given"
    )]
    NoTicketKey { holder: PublicKey },
    #[error("the ticket key {found} is not this ticket's key {holder}; use the key issued with it")]
    TicketKeyMismatch { holder: PublicKey, found: PublicKey },
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn push_field(m: &mut Vec<u8>, b: &[u8]) {
    m.extend_from_slice(&(b.len() as u32).to_be_bytes());
    m.extend_from_slice(b);
}

impl Ticket {
    /// Issues a ticket (format version 2) binding `binding`.
    pub fn issue(
        admission: &SecretKey,
        binding: Binding,
        issued: OffsetDateTime,
        expires: Option<OffsetDateTime>,
    ) -> Self {
        let issued = issued.replace_nanosecond(0).unwrap_or(issued);
        let expires = expires.map(|e| e.replace_nanosecond(0).unwrap_or(e));
        let (peer, holder) = match binding {
            Binding::Peer(p) => (Some(p), None),
            Binding::Holder(k) => (None, Some(k)),
        };
        let mut t = Self {
            version: TICKET_VERSION,
            peer,
            holder,
            issued,
            expires,
            key: admission.public(),
            sig: [0; 64],
        };
        t.sig = admission.sign(&t.signing_message());
        t
    }

    /// Issues a fleet ticket bound to a new ticket key pair; returns the ticket and the ticket
    /// secret key (which goes beside the ticket, and nowhere else).
    pub fn issue_fleet(
        admission: &SecretKey,
        issued: OffsetDateTime,
        expires: Option<OffsetDateTime>,
    ) -> Result<(Self, SecretKey), KeyError> {
        let key = SecretKey::generate()?;
        let ticket = Self::issue(admission, Binding::Holder(key.public()), issued, expires);
        Ok((ticket, key))
    }

    pub fn is_fleet(&self) -> bool {
        self.peer.is_none()
    }

    /// What this ticket admits; an error for a version 1 fleet ticket, which binds nothing
    /// (a bearer credential, refused).
    pub fn binding(&self) -> Result<Binding, TicketError> {
        match (&self.peer, self.holder) {
            (Some(p), _) => Ok(Binding::Peer(p.clone())),
            (None, Some(k)) => Ok(Binding::Holder(k)),
            (None, None) => Err(self.bearer()),
        }
    }

    /// Parses a ticket file or wire message. `source` names it in diagnostics.
    pub fn parse(source: &str, text: &str) -> Result<Self, Invalid> {
        let raw: RawTicket = diag::from_toml(source, text)?;
        let mut p = Problems::new();
        let root = KeyPath::root();
        match raw.version {
            1 if raw.holder.is_some() => p.push(
                root.key("holder"),
                "a version 1 ticket has no holder key (version 2 added it)",
            ),
            1 => {}
            2 => match (&raw.peer, &raw.holder) {
                (Some(_), Some(_)) => p.push(
                    root.key("holder"),
                    "a ticket binds either a peer or a ticket key (holder), not both",
                ),
                (None, None) => p.push(
                    root.key("version"),
                    "a version 2 ticket binds a peer (`peer`) or a ticket key (`holder`)",
                ),
                _ => {}
            },
            v => p.push(
                root.key("version"),
                format!("unsupported ticket version {v}"),
            ),
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
                version: raw.version,
                peer: raw.peer,
                holder: raw.holder,
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
            version: self.version,
            peer: self.peer.clone(),
            holder: self.holder,
            issued: rfc3339(self.issued),
            expires: self.expires.map(rfc3339),
            key: self.key,
            sig: encode_signature(&self.sig),
        };
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot serialise ticket: {e}\n"))
    }

    /// The ticket's identity: the SHA-256 of its signed fields and signature. Proofs cover it,
    /// so a proof made for one ticket says nothing about another.
    pub fn id(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.signing_message());
        h.update(self.sig);
        h.finalize().into()
    }

    /// The proof that this node holds the ticket, for `presentation`: a signature by the
    /// ticket secret key for a fleet ticket, nothing (empty) for a peer ticket, whose PeerId
    /// the transport authenticates.
    pub fn prove(
        &self,
        ticket_key: Option<&SecretKey>,
        presentation: &Presentation<'_>,
    ) -> Result<Vec<u8>, TicketError> {
        match self.binding()? {
            Binding::Peer(_) => Ok(Vec::new()),
            Binding::Holder(holder) => {
                let key = ticket_key.ok_or(TicketError::NoTicketKey { holder })?;
                if key.public() != holder {
                    return Err(TicketError::TicketKeyMismatch {
                        holder,
                        found: key.public(),
                    });
                }
                Ok(key.sign(&presentation.message(&self.id())).to_vec())
            }
        }
    }

    /// Checks that this ticket, with `proof`, admits `presentation.prover` at `now` under the
    /// configured `admission` key: the admission signature, the validity period, and the
    /// binding (the PeerId of a peer ticket; the proof of a fleet ticket's ticket key).
    pub fn verify(
        &self,
        admission: &PublicKey,
        presentation: &Presentation<'_>,
        proof: &[u8],
        now: OffsetDateTime,
    ) -> Result<(), TicketError> {
        if self.key != *admission {
            return Err(TicketError::WrongKey {
                found: self.key,
                expected: *admission,
            });
        }
        admission
            .verify(&self.signing_message(), &self.sig)
            .map_err(|_| TicketError::BadSignature(self.key))?;
        match self.binding()? {
            Binding::Peer(bound) => {
                if bound != presentation.prover {
                    return Err(TicketError::WrongPeer {
                        bound,
                        presenter: presentation.prover.to_owned(),
                    });
                }
            }
            Binding::Holder(holder) => {
                if proof.is_empty() {
                    return Err(TicketError::NoProof { holder });
                }
                let sig: &[u8; PROOF_BYTES] = proof
                    .try_into()
                    .map_err(|_| TicketError::MalformedProof { len: proof.len() })?;
                holder
                    .verify(&presentation.message(&self.id()), sig)
                    .map_err(|_| TicketError::BadProof {
                        holder,
                        role: presentation.role,
                        prover: presentation.prover.to_owned(),
                    })?;
            }
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

    /// Checks that `ticket_key` makes this ticket admit `peer` (base58) at `now`: what a node
    /// checks about its own ticket before it joins.
    pub fn check_own(
        &self,
        admission: &PublicKey,
        ticket_key: Option<&SecretKey>,
        peer: &str,
        now: OffsetDateTime,
    ) -> Result<(), TicketError> {
        let own = Presentation::announcement(peer);
        let proof = self.prove(ticket_key, &own)?;
        self.verify(admission, &own, &proof, now)
    }

    fn bearer(&self) -> TicketError {
        TicketError::BearerTicket {
            issued: rfc3339(self.issued),
            key: self.key,
        }
    }

    /// The signed bytes: the version's context, then each field length-prefixed (u32
    /// big-endian). Version 2 adds the holder key.
    fn signing_message(&self) -> Vec<u8> {
        let context = if self.version == 1 {
            TICKET_CONTEXT_V1
        } else {
            TICKET_CONTEXT
        };
        let mut m = Vec::with_capacity(context.len() + 160);
        m.extend_from_slice(context);
        push_field(&mut m, self.peer.as_deref().unwrap_or("").as_bytes());
        if self.version != 1 {
            push_field(&mut m, self.holder.as_ref().map_or(&[][..], |k| &k.0[..]));
        }
        push_field(&mut m, &self.issued.unix_timestamp().to_be_bytes());
        match self.expires {
            Some(e) => push_field(&mut m, &e.unix_timestamp().to_be_bytes()),
            None => push_field(&mut m, b""),
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);
    const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    const OTHER: &str = "12D3KooWother";
    const THIRD: &str = "12D3KooWthird";

    fn fleet(adm: &SecretKey, expires: Option<OffsetDateTime>) -> (Ticket, SecretKey) {
        let key = SecretKey::from_seed([5; 32]);
        let t = Ticket::issue(adm, Binding::Holder(key.public()), NOW, expires);
        (t, key)
    }

    /// A ticket of format version 1, as earlier releases wrote it.
    fn v1(adm: &SecretKey, peer: Option<&str>) -> Ticket {
        let mut t = Ticket {
            version: 1,
            peer: peer.map(str::to_owned),
            holder: None,
            issued: NOW,
            expires: None,
            key: adm.public(),
            sig: [0; 64],
        };
        t.sig = adm.sign(&t.signing_message());
        t
    }

    #[test]
    fn fleet_ticket_admits_whoever_proves_its_key_until_it_expires() {
        let adm = SecretKey::from_seed([9; 32]);
        let (t, key) = fleet(&adm, Some(datetime!(2026-12-01 0:00 UTC)));
        let text = t.to_toml();
        assert!(text.contains("version = 2") && text.contains(&key.public().to_string()));
        let back = Ticket::parse("t", &text).expect("parses");
        assert_eq!(back, t);
        assert!(back.is_fleet());
        for p in [PEER, OTHER] {
            let ann = Presentation::announcement(p);
            let proof = back.prove(Some(&key), &ann).expect("proves");
            assert_eq!(proof.len(), PROOF_BYTES);
            assert_eq!(back.verify(&adm.public(), &ann, &proof, NOW), Ok(()));
            assert_eq!(back.check_own(&adm.public(), Some(&key), p, NOW), Ok(()));
        }
        let ann = Presentation::announcement(PEER);
        let proof = back.prove(Some(&key), &ann).expect("proves");
        assert!(matches!(
            back.verify(&adm.public(), &ann, &proof, datetime!(2026-12-01 0:00 UTC)),
            Err(TicketError::Expired(_))
        ));
        // The ticket alone, without a proof, admits nobody.
        assert_eq!(
            back.verify(&adm.public(), &ann, &[], NOW),
            Err(TicketError::NoProof {
                holder: key.public()
            })
        );
        assert_eq!(
            back.prove(None, &ann),
            Err(TicketError::NoTicketKey {
                holder: key.public()
            })
        );
    }

    #[test]
    fn issue_fleet_makes_a_fresh_ticket_key() {
        let adm = SecretKey::from_seed([9; 32]);
        let (a, ka) = Ticket::issue_fleet(&adm, NOW, None).expect("random");
        let (b, kb) = Ticket::issue_fleet(&adm, NOW, None).expect("random");
        assert_ne!(ka.public(), kb.public());
        assert_eq!(a.holder, Some(ka.public()));
        assert_eq!(b.binding(), Ok(Binding::Holder(kb.public())));
        assert_eq!(a.check_own(&adm.public(), Some(&ka), PEER, NOW), Ok(()));
        // Another fleet ticket's key does not prove this one.
        assert!(matches!(
            a.check_own(&adm.public(), Some(&kb), PEER, NOW),
            Err(TicketError::TicketKeyMismatch { .. })
        ));
    }

    #[test]
    fn forged_proofs_are_refused() {
        let adm = SecretKey::from_seed([9; 32]);
        let (t, _key) = fleet(&adm, None);
        let req = Presentation::request(PEER, OTHER);
        // Signed by a key other than the ticket's (the same message, the wrong key).
        let stranger = SecretKey::from_seed([6; 32]);
        let by_stranger = stranger.sign(&req.message(&t.id()));
        assert!(matches!(
            t.verify(&adm.public(), &req, &by_stranger, NOW),
            Err(TicketError::BadProof { role: Role::Request, ref prover, .. }) if prover == PEER
        ));
        // Noise, and the wrong length.
        assert!(matches!(
            t.verify(&adm.public(), &req, &[7; 64], NOW),
            Err(TicketError::BadProof { .. })
        ));
        let e = t
            .verify(&adm.public(), &req, &[7; 63], NOW)
            .expect_err("short");
        assert_eq!(e, TicketError::MalformedProof { len: 63 });
        assert!(e.to_string().contains("63 bytes"), "{e}");
        // A proof for another ticket of the same ticket key does not carry over.
        let key = SecretKey::from_seed([5; 32]);
        let later = Ticket::issue(
            &adm,
            Binding::Holder(key.public()),
            NOW,
            Some(datetime!(2027-01-01 0:00 UTC)),
        );
        let for_later = later.prove(Some(&key), &req).expect("proves");
        assert!(later.verify(&adm.public(), &req, &for_later, NOW).is_ok());
        assert!(matches!(
            t.verify(&adm.public(), &req, &for_later, NOW),
            Err(TicketError::BadProof { .. })
        ));
    }

    #[test]
    fn a_proof_for_one_peer_admits_no_other() {
        let adm = SecretKey::from_seed([9; 32]);
        let (t, key) = fleet(&adm, None);
        let ok = |p: &Presentation<'_>, proof: &[u8]| t.verify(&adm.public(), p, proof, NOW);
        // PEER asked OTHER to admit it; THIRD recorded the proof.
        let req = Presentation::request(PEER, OTHER);
        let proof = t.prove(Some(&key), &req).expect("proves");
        assert_eq!(ok(&req, &proof), Ok(()));
        // Replayed by THIRD to OTHER, or by PEER's proof relayed to THIRD.
        let e = ok(&Presentation::request(THIRD, OTHER), &proof).expect_err("other prover");
        assert!(e.to_string().contains(THIRD), "{e}");
        assert!(ok(&Presentation::request(PEER, THIRD), &proof).is_err());
        // An announcement proof is bound to its author.
        let ann = t
            .prove(Some(&key), &Presentation::announcement(PEER))
            .expect("proves");
        assert_eq!(ok(&Presentation::announcement(PEER), &ann), Ok(()));
        assert!(ok(&Presentation::announcement(OTHER), &ann).is_err());
    }

    #[test]
    fn a_proof_for_one_role_or_nonce_is_worthless_in_another() {
        let adm = SecretKey::from_seed([9; 32]);
        let (t, key) = fleet(&adm, None);
        let ok = |p: &Presentation<'_>, proof: &[u8]| t.verify(&adm.public(), p, proof, NOW);
        let nonce = [1u8; NONCE_BYTES];
        let req = Presentation::request(PEER, OTHER);
        let reply = Presentation::reply(PEER, OTHER, &nonce);
        let ann = Presentation::announcement(PEER);
        let proofs: Vec<(Presentation<'_>, Vec<u8>)> = [req, reply, ann]
            .into_iter()
            .map(|p| (p, t.prove(Some(&key), &p).expect("proves")))
            .collect();
        for (made_for, proof) in &proofs {
            for (used_as, _) in &proofs {
                assert_eq!(
                    ok(used_as, proof).is_ok(),
                    made_for == used_as,
                    "a proof for {made_for:?} used as {used_as:?}"
                );
            }
        }
        // The request's proof with the roles swapped (PEER and OTHER trading places), and as
        // a reply without a nonce.
        let (_, req_proof) = &proofs[0];
        assert!(ok(&Presentation::request(OTHER, PEER), req_proof).is_err());
        assert!(ok(&Presentation::reply(PEER, OTHER, &[]), req_proof).is_err());
        // A reply answers one nonce only.
        let (_, reply_proof) = &proofs[1];
        assert!(
            ok(
                &Presentation::reply(PEER, OTHER, &[2u8; NONCE_BYTES]),
                reply_proof
            )
            .is_err()
        );
        assert!(matches!(
            ok(&Presentation::reply(OTHER, PEER, &nonce), reply_proof),
            Err(TicketError::BadProof {
                role: Role::Reply,
                ..
            })
        ));
    }

    #[test]
    fn a_version_1_fleet_ticket_is_refused_with_the_remedy() {
        let adm = SecretKey::from_seed([9; 32]);
        let old = v1(&adm, None);
        let text = old.to_toml();
        assert!(
            text.contains("version = 1") && !text.contains("holder"),
            "{text}"
        );
        let back = Ticket::parse("t", &text).expect("the old format still parses");
        assert!(matches!(
            back.binding(),
            Err(TicketError::BearerTicket { .. })
        ));
        let ann = Presentation::announcement(PEER);
        let e = back
            .verify(&adm.public(), &ann, &[], NOW)
            .expect_err("bearer");
        assert!(matches!(e, TicketError::BearerTicket { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("beemesh ticket issue") && text.contains(&adm.public().to_string()),
            "{text}"
        );
        // Whatever proof comes with it, and whatever key its holder has.
        let any = SecretKey::from_seed([5; 32]);
        assert!(matches!(
            back.verify(&adm.public(), &ann, &any.sign(b"x"), NOW),
            Err(TicketError::BearerTicket { .. })
        ));
        assert!(matches!(
            back.prove(Some(&any), &ann),
            Err(TicketError::BearerTicket { .. })
        ));
        assert!(matches!(
            back.check_own(&adm.public(), Some(&any), PEER, NOW),
            Err(TicketError::BearerTicket { .. })
        ));
    }

    #[test]
    fn a_version_1_peer_ticket_still_admits_its_peer() {
        let adm = SecretKey::from_seed([9; 32]);
        let old = Ticket::parse("t", &v1(&adm, Some(PEER)).to_toml()).expect("parses");
        assert_eq!(old.version, 1);
        assert_eq!(old.check_own(&adm.public(), None, PEER, NOW), Ok(()));
        let req = Presentation::request(PEER, OTHER);
        assert_eq!(old.verify(&adm.public(), &req, &[], NOW), Ok(()));
        assert!(matches!(
            old.verify(&adm.public(), &Presentation::request(OTHER, PEER), &[], NOW),
            Err(TicketError::WrongPeer { .. })
        ));
        // Relabelled as version 2, its signature no longer verifies (its context differs).
        let relabelled = Ticket::parse("t", &old.to_toml().replace("version = 1", "version = 2"))
            .expect("parses");
        assert!(matches!(
            relabelled.verify(&adm.public(), &req, &[], NOW),
            Err(TicketError::BadSignature(_))
        ));
    }

    #[test]
    fn a_tampered_ticket_key_breaks_the_admission_signature() {
        let adm = SecretKey::from_seed([9; 32]);
        let (t, key) = fleet(&adm, None);
        // An attacker puts its own ticket key into a copy of the fleet ticket.
        let mine = SecretKey::from_seed([66; 32]);
        let text = t
            .to_toml()
            .replace(&key.public().to_string(), &mine.public().to_string());
        let tampered = Ticket::parse("t", &text).expect("parses");
        assert_eq!(tampered.holder, Some(mine.public()));
        let ann = Presentation::announcement(PEER);
        let proof = mine.sign(&ann.message(&tampered.id()));
        assert!(matches!(
            tampered.verify(&adm.public(), &ann, &proof, NOW),
            Err(TicketError::BadSignature(_))
        ));
        // A fleet ticket turned into a version 1 one (dropping the key) is no better.
        let stripped = t
            .to_toml()
            .replace("version = 2", "version = 1")
            .lines()
            .filter(|l| !l.starts_with("holder"))
            .collect::<Vec<_>>()
            .join("\n");
        let stripped = Ticket::parse("t", &stripped).expect("parses");
        assert!(matches!(
            stripped.verify(&adm.public(), &ann, &[], NOW),
            Err(TicketError::BadSignature(_))
        ));
        // The right ticket with the wrong key file.
        assert_eq!(
            t.prove(Some(&mine), &ann),
            Err(TicketError::TicketKeyMismatch {
                holder: key.public(),
                found: mine.public()
            })
        );
    }

    #[test]
    fn peer_ticket_admits_only_its_peer_without_a_proof() {
        let adm = SecretKey::from_seed([9; 32]);
        let t = Ticket::issue(&adm, Binding::Peer(PEER.into()), NOW, None);
        assert!(!t.is_fleet());
        let back = Ticket::parse("t", &t.to_toml()).expect("parses");
        assert_eq!(back, t);
        assert_eq!(
            back.prove(None, &Presentation::announcement(PEER)),
            Ok(vec![])
        );
        assert!(back.check_own(&adm.public(), None, PEER, NOW).is_ok());
        assert!(matches!(
            back.check_own(&adm.public(), None, OTHER, NOW),
            Err(TicketError::WrongPeer { .. })
        ));
    }

    #[test]
    fn foreign_or_altered_tickets_are_refused() {
        let adm = SecretKey::from_seed([9; 32]);
        let other = SecretKey::from_seed([8; 32]);
        let (foreign, key) = fleet(&other, None);
        let ann = Presentation::announcement(PEER);
        let proof = foreign.prove(Some(&key), &ann).expect("proves");
        assert!(matches!(
            foreign.verify(&adm.public(), &ann, &proof, NOW),
            Err(TicketError::WrongKey { .. })
        ));
        // Claiming the right key does not help a forged signature.
        let text = foreign
            .to_toml()
            .replace(&other.public().to_string(), &adm.public().to_string());
        let forged = Ticket::parse("t", &text).expect("parses");
        assert!(matches!(
            forged.verify(&adm.public(), &ann, &proof, NOW),
            Err(TicketError::BadSignature(_))
        ));
        // Trading the peer binding for a ticket key breaks the signature.
        let bound = Ticket::issue(&adm, Binding::Peer(PEER.into()), NOW, None);
        let traded = Ticket::parse(
            "t",
            &bound.to_toml().replace(
                &format!("peer = \"{PEER}\""),
                &format!("holder = \"{}\"", key.public()),
            ),
        )
        .expect("parses");
        assert!(traded.is_fleet());
        let proof = traded.prove(Some(&key), &ann).expect("proves");
        assert!(matches!(
            traded.verify(&adm.public(), &ann, &proof, NOW),
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
        let adm = SecretKey::from_seed([9; 32]);
        let (t, key) = fleet(&adm, None);
        let text = t.to_toml();
        let cases = [
            (
                text.replace("holder", &format!("peer = \"{PEER}\"\nholder")),
                "holder",
                "not both",
            ),
            (
                text.lines()
                    .filter(|l| !l.starts_with("holder"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                "version",
                "binds a peer",
            ),
            (
                text.replace("version = 2", "version = 1"),
                "holder",
                "version 1",
            ),
            (
                text.replace("version = 2", "version = 3"),
                "version",
                "unsupported ticket version 3",
            ),
            (
                text.replace(&key.public().to_string(), "ed25519:nope"),
                "holder",
                "ed25519:nope",
            ),
        ];
        for (text, at, reason) in cases {
            let e = Ticket::parse("t.toml", &text).expect_err(reason);
            assert_eq!(e.diagnostics[0].key, at, "{e}");
            assert!(e.to_string().contains(reason), "{e}");
        }
    }

    #[test]
    fn the_key_file_goes_beside_the_ticket() {
        assert_eq!(
            default_key_path(Path::new("/etc/beemesh/ticket")),
            PathBuf::from("/etc/beemesh/ticket.key")
        );
        assert_eq!(
            default_key_path(Path::new("fleet.ticket")),
            PathBuf::from("fleet.ticket.key")
        );
        let a = fresh_nonce().expect("random");
        let b = fresh_nonce().expect("random");
        assert_ne!(a, b);
    }
}
