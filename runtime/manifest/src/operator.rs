//! Signed operator requests: an operator's read or write of a workload's key-value store
//! (`beemesh kv get|put|del|ls`), signed with an operator key and checked by the node that
//! carries it out.
//!
//! The envelope is JSON and embeds the request's exact text:
//!
//! ```json
//! {"request": "{\"version\":1,\"op\":\"put\",...}", "key": "ed25519:BASE64", "sig": "BASE64"}
//! ```
//!
//! The request is a JSON object ([`KvRequest`]): the operation, the workload, its arguments,
//! the time it was issued (Unix seconds), a random nonce, and the peer id of the node that is
//! to carry it out. The signature is Ed25519 over [`signing_message`]: the context string
//! [`OPERATOR_CONTEXT`] followed by the SHA-256 of the request's bytes. The context differs
//! from the manifests' ([`crate::signed::SIGNATURE_CONTEXT`]), so a signature over a request is
//! never a valid manifest signature, and the other way round.
//!
//! A receiving node checks, in this order: the size, the envelope, that the key is one of its
//! trusted signers (`[trust] signers`; **one** trusted signature suffices, the manifests'
//! `threshold` does not apply) and that the signature verifies; only then does it parse the
//! request, check that it was issued within [`FRESHNESS_SECS`] of its own clock (either way),
//! and admit its nonce into a [`ReplayGuard`] (a nonce seen before is refused, and a full
//! guard refuses rather than forgets).

use std::collections::{BTreeSet, HashMap};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{PublicKey, SecretKey, decode_signature, encode_signature};
use crate::names::check_dns_label;
use crate::trust::TrustPolicy;

/// Domain separation for operator requests. Never reuse this string for another purpose.
pub const OPERATOR_CONTEXT: &[u8] = b"beemesh/v1/operator-kv-request\0";
/// The request format this code writes and reads.
pub const REQUEST_VERSION: u32 = 1;
/// Largest signed request (envelope included): a value of [`MAX_VALUE_BYTES`] in base64 and
/// room for the rest.
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;
/// Largest value a request may carry: the stores' limit (`beemesh_state::kv::MAX_VALUE_BYTES`).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest key or prefix a request may carry: the stores' limit.
pub const MAX_KEY_BYTES: usize = 512;
/// Most items a listing may ask for: the stores' page limit.
pub const MAX_LIST_LIMIT: u32 = 1000;
/// How far a request's issue time may be from the receiving node's clock, either way.
pub const FRESHNESS_SECS: u64 = 300;
/// Nonces a node remembers (each until its request can no longer be fresh).
pub const REPLAY_CACHE: usize = 4096;
/// Bytes of randomness in a nonce.
pub const NONCE_BYTES: usize = 16;
/// Longest `node` (a peer id is about 52 characters).
const MAX_NODE_LEN: usize = 128;

/// Why an operator request was refused. Each names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    #[error("the request is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("{field} is {size} bytes; the limit is {limit}")]
    FieldTooLarge {
        field: String,
        size: usize,
        limit: usize,
    },
    #[error("not a signed operator request: {0}")]
    Envelope(String),
    #[error(
        "key {key} is not among this node's trusted signers ([trust] signers); sign with an operator key listed there"
    )]
    Untrusted { key: PublicKey },
    #[error(
        "the signature by {key} does not verify: the request was altered after signing, or the signature was made for another purpose"
    )]
    BadSignature { key: PublicKey },
    #[error("malformed request: {field}: {reason}")]
    Malformed { field: String, reason: String },
    #[error(
        "the request was issued at {issued_at} (Unix seconds) and this node's clock says {now}: {} s apart, at most {FRESHNESS_SECS} s are allowed; check the clocks (NTP), then sign a new request",
        apart(.issued_at, .now)
    )]
    Stale { issued_at: u64, now: u64 },
    #[error(
        "a request with nonce {nonce} was received already: a signed request runs at most once; sign a new one"
    )]
    Replay { nonce: String },
    #[error(
        "this node holds {limit} recent requests' nonces already and refuses more until the oldest expire (within {} s); try again later",
        2 * FRESHNESS_SECS
    )]
    ReplayCacheFull { limit: usize },
    #[error("no randomness available for a nonce: {0}")]
    Random(String),
}

fn apart(a: &u64, b: &u64) -> u64 {
    a.abs_diff(*b)
}

impl OperatorError {
    /// A short, stable name for the refusal (for APIs, metrics and scripts).
    pub fn reason(&self) -> &'static str {
        match self {
            OperatorError::TooLarge { .. } | OperatorError::FieldTooLarge { .. } => "too_large",
            OperatorError::Envelope(_) => "envelope",
            OperatorError::Untrusted { .. } => "untrusted",
            OperatorError::BadSignature { .. } => "bad_signature",
            OperatorError::Malformed { .. } => "malformed",
            OperatorError::Stale { .. } => "stale",
            OperatorError::Replay { .. } => "replay",
            OperatorError::ReplayCacheFull { .. } => "replay_cache_full",
            OperatorError::Random(_) => "random",
        }
    }
}

fn malformed(field: &str, reason: impl Into<String>) -> OperatorError {
    OperatorError::Malformed {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// What an operator asks of a workload's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Get {
        key: String,
    },
    /// Writes `value`; with `if_revision`, only if the key is at that revision (0: absent).
    Put {
        key: String,
        value: Vec<u8>,
        if_revision: Option<u64>,
    },
    /// Deletes `key`; `if_revision` as for a put.
    Delete {
        key: String,
        if_revision: Option<u64>,
    },
    /// Keys starting with `prefix`, after `after` (exclusive), at most `limit`.
    List {
        prefix: String,
        after: Option<String>,
        limit: Option<u32>,
    },
}

impl KvOp {
    /// The operation's name in a request: `get`, `put`, `delete` or `list`.
    pub fn name(&self) -> &'static str {
        match self {
            KvOp::Get { .. } => "get",
            KvOp::Put { .. } => "put",
            KvOp::Delete { .. } => "delete",
            KvOp::List { .. } => "list",
        }
    }

    /// Whether it changes the store.
    pub fn writes(&self) -> bool {
        matches!(self, KvOp::Put { .. } | KvOp::Delete { .. })
    }
}

/// An operator's request, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRequest {
    pub namespace: String,
    pub name: String,
    /// The peer id of the node that is to carry it out (a host of the workload's store); any
    /// other node only forwards it there.
    pub node: String,
    /// When it was issued, in Unix seconds.
    pub issued_at: u64,
    pub nonce: [u8; NONCE_BYTES],
    pub op: KvOp,
}

/// The request's JSON form: every field of every operation, the absent ones left out.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    version: u32,
    op: String,
    namespace: String,
    name: String,
    node: String,
    issued_at: u64,
    nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// Base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    if_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn nonce_from_hex(s: &str) -> Result<[u8; NONCE_BYTES], OperatorError> {
    let bad = || {
        malformed(
            "nonce",
            format!(
                "{:?} is not {} lowercase hexadecimal digits",
                s.chars().take(64).collect::<String>(),
                2 * NONCE_BYTES
            ),
        )
    };
    if s.len() != 2 * NONCE_BYTES
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut out = [0u8; NONCE_BYTES];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn check_text(field: &str, value: &str, allow_empty: bool) -> Result<(), OperatorError> {
    if value.is_empty() && !allow_empty {
        return Err(malformed(field, "must not be empty"));
    }
    if value.len() > MAX_KEY_BYTES {
        return Err(OperatorError::FieldTooLarge {
            field: field.to_owned(),
            size: value.len(),
            limit: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

impl KvRequest {
    /// A request issued at `issued_at` (Unix seconds) with a fresh random nonce.
    pub fn new(
        namespace: &str,
        name: &str,
        node: &str,
        op: KvOp,
        issued_at: u64,
    ) -> Result<Self, OperatorError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|e| OperatorError::Random(e.to_string()))?;
        let req = Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            issued_at,
            nonce,
            op,
        };
        req.check()?;
        Ok(req)
    }

    /// `namespace/name`.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn nonce_hex(&self) -> String {
        to_hex(&self.nonce)
    }

    /// The rules every request follows (also applied when one is parsed).
    fn check(&self) -> Result<(), OperatorError> {
        check_dns_label(&self.namespace).map_err(|e| malformed("namespace", e))?;
        check_dns_label(&self.name).map_err(|e| malformed("name", e))?;
        if self.node.is_empty() || self.node.len() > MAX_NODE_LEN {
            return Err(malformed(
                "node",
                format!("must be a peer id (1 to {MAX_NODE_LEN} characters)"),
            ));
        }
        match &self.op {
            KvOp::Get { key } | KvOp::Delete { key, .. } => check_text("key", key, false),
            KvOp::Put { key, value, .. } => {
                check_text("key", key, false)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(OperatorError::FieldTooLarge {
                        field: "value".to_owned(),
                        size: value.len(),
                        limit: MAX_VALUE_BYTES,
                    });
                }
                Ok(())
            }
            KvOp::List {
                prefix,
                after,
                limit,
            } => {
                check_text("prefix", prefix, true)?;
                if let Some(a) = after {
                    check_text("after", a, false)?;
                }
                match limit {
                    Some(l) if *l == 0 || *l > MAX_LIST_LIMIT => Err(malformed(
                        "limit",
                        format!("{l}; must be 1 to {MAX_LIST_LIMIT}"),
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The request's JSON text: what is signed.
    pub fn to_json(&self) -> String {
        let mut raw = RawRequest {
            version: REQUEST_VERSION,
            op: self.op.name().to_owned(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            node: self.node.clone(),
            issued_at: self.issued_at,
            nonce: self.nonce_hex(),
            key: None,
            value: None,
            if_revision: None,
            prefix: None,
            after: None,
            limit: None,
        };
        match &self.op {
            KvOp::Get { key } => raw.key = Some(key.clone()),
            KvOp::Put {
                key,
                value,
                if_revision,
            } => {
                raw.key = Some(key.clone());
                raw.value = Some(B64.encode(value));
                raw.if_revision = *if_revision;
            }
            KvOp::Delete { key, if_revision } => {
                raw.key = Some(key.clone());
                raw.if_revision = *if_revision;
            }
            KvOp::List {
                prefix,
                after,
                limit,
            } => {
                raw.prefix = Some(prefix.clone());
                raw.after = after.clone();
                raw.limit = *limit;
            }
        }
        // Strings, integers and options only: serialising cannot fail.
        serde_json::to_string(&raw).unwrap_or_default()
    }

    /// Parses a request's text. Every field must fit its operation: a field another
    /// operation takes, or one nobody knows, is an error (a signed request means exactly what
    /// it says, or nothing).
    pub fn parse(text: &str) -> Result<Self, OperatorError> {
        let raw: RawRequest =
            serde_json::from_str(text).map_err(|e| malformed("request", e.to_string()))?;
        if raw.version != REQUEST_VERSION {
            return Err(malformed(
                "version",
                format!("{}; this node reads version {REQUEST_VERSION}", raw.version),
            ));
        }
        let nonce = nonce_from_hex(&raw.nonce)?;
        let refuse = |field: &str, present: bool| -> Result<(), OperatorError> {
            if present {
                Err(malformed(
                    field,
                    format!("a {} request takes no {field}", raw.op),
                ))
            } else {
                Ok(())
            }
        };
        let need = |field: &str, v: &Option<String>| -> Result<String, OperatorError> {
            v.clone()
                .ok_or_else(|| malformed(field, format!("a {} request needs a {field}", raw.op)))
        };
        let op = match raw.op.as_str() {
            "get" | "delete" => {
                refuse("value", raw.value.is_some())?;
                refuse("prefix", raw.prefix.is_some())?;
                refuse("after", raw.after.is_some())?;
                refuse("limit", raw.limit.is_some())?;
                let key = need("key", &raw.key)?;
                if raw.op == "get" {
                    refuse("if_revision", raw.if_revision.is_some())?;
                    KvOp::Get { key }
                } else {
                    KvOp::Delete {
                        key,
                        if_revision: raw.if_revision,
                    }
                }
            }
            "put" => {
                refuse("prefix", raw.prefix.is_some())?;
                refuse("after", raw.after.is_some())?;
                refuse("limit", raw.limit.is_some())?;
                let key = need("key", &raw.key)?;
                let encoded = need("value", &raw.value)?;
                let value = B64
                    .decode(encoded.as_bytes())
                    .map_err(|e| malformed("value", format!("not base64: {e}")))?;
                KvOp::Put {
                    key,
                    value,
                    if_revision: raw.if_revision,
                }
            }
            "list" => {
                refuse("key", raw.key.is_some())?;
                refuse("value", raw.value.is_some())?;
                refuse("if_revision", raw.if_revision.is_some())?;
                KvOp::List {
                    prefix: raw.prefix.clone().unwrap_or_default(),
                    after: raw.after.clone(),
                    limit: raw.limit,
                }
            }
            other => {
                return Err(malformed(
                    "op",
                    format!(
                        "{:?}; expected get, put, delete or list",
                        other.chars().take(32).collect::<String>()
                    ),
                ));
            }
        };
        let req = Self {
            namespace: raw.namespace,
            name: raw.name,
            node: raw.node,
            issued_at: raw.issued_at,
            nonce,
            op,
        };
        req.check()?;
        Ok(req)
    }
}

/// The bytes an operator request's signature covers: the context string, then the SHA-256 of
/// the request's text.
pub fn signing_message(request: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(OPERATOR_CONTEXT.len() + 32);
    m.extend_from_slice(OPERATOR_CONTEXT);
    m.extend_from_slice(&Sha256::digest(request));
    m
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    request: String,
    key: String,
    sig: String,
}

/// A request's exact text and one signature over it. Parsing checks the envelope only;
/// [`SignedKvRequest::verify`] decides whether it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKvRequest {
    request: String,
    key: PublicKey,
    sig: [u8; 64],
}

impl SignedKvRequest {
    /// Signs `request` with an operator key.
    pub fn sign(request: &KvRequest, key: &SecretKey) -> Self {
        let text = request.to_json();
        let sig = key.sign(&signing_message(text.as_bytes()));
        Self {
            request: text,
            key: key.public(),
            sig,
        }
    }

    /// An envelope around `request` text with a given key and signature (for tests and tools
    /// that sign elsewhere).
    pub fn from_parts(request: String, key: PublicKey, sig: [u8; 64]) -> Self {
        Self { request, key, sig }
    }

    /// The envelope's JSON text: what a node's API and the mesh carry.
    pub fn to_json(&self) -> String {
        let raw = RawEnvelope {
            request: self.request.clone(),
            key: self.key.to_string(),
            sig: encode_signature(&self.sig),
        };
        serde_json::to_string(&raw).unwrap_or_default()
    }

    /// Parses an envelope of at most [`MAX_REQUEST_BYTES`].
    pub fn parse(bytes: &[u8]) -> Result<Self, OperatorError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(OperatorError::TooLarge {
                size: bytes.len(),
                limit: MAX_REQUEST_BYTES,
            });
        }
        let raw: RawEnvelope = serde_json::from_slice(bytes).map_err(|e| {
            OperatorError::Envelope(format!(
                "{e} (expected {{\"request\": \"...\", \"key\": \"ed25519:...\", \"sig\": \"...\"}}, as `beemesh kv` sends)"
            ))
        })?;
        let key = raw
            .key
            .parse::<PublicKey>()
            .map_err(|e| OperatorError::Envelope(format!("key: {e}")))?;
        let sig =
            decode_signature(&raw.sig).map_err(|e| OperatorError::Envelope(format!("sig: {e}")))?;
        Ok(Self {
            request: raw.request,
            key,
            sig,
        })
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    /// The exact request text that was signed.
    pub fn request_text(&self) -> &str {
        &self.request
    }

    /// Checks the signer against `policy` (one of its signers suffices) and the signature,
    /// then parses the request. Nothing of the request is read before the signature holds.
    pub fn verify(&self, policy: &TrustPolicy) -> Result<KvRequest, OperatorError> {
        if !policy.signers().any(|s| *s == self.key) {
            return Err(OperatorError::Untrusted { key: self.key });
        }
        self.key
            .verify(&signing_message(self.request.as_bytes()), &self.sig)
            .map_err(|_| OperatorError::BadSignature { key: self.key })?;
        KvRequest::parse(&self.request)
    }
}

/// Refuses a request issued more than [`FRESHNESS_SECS`] from `now` (Unix seconds), either
/// way.
pub fn check_fresh(request: &KvRequest, now: u64) -> Result<(), OperatorError> {
    if now.abs_diff(request.issued_at) > FRESHNESS_SECS {
        return Err(OperatorError::Stale {
            issued_at: request.issued_at,
            now,
        });
    }
    Ok(())
}

/// The nonces of the requests a node accepted, each kept until its request can no longer be
/// fresh (issued_at + [`FRESHNESS_SECS`]). Bounded: when full of nonces that are still
/// needed, it refuses new requests rather than forget one (forgetting would let a replay in).
#[derive(Debug)]
pub struct ReplayGuard {
    capacity: usize,
    /// Nonce → the time after which it may be forgotten.
    seen: HashMap<[u8; NONCE_BYTES], u64>,
    /// The same, by time, for pruning.
    by_time: BTreeSet<(u64, [u8; NONCE_BYTES])>,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: HashMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Nonces held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn prune(&mut self, now: u64) {
        while let Some(&(until, nonce)) = self.by_time.first() {
            if until >= now {
                break;
            }
            self.by_time.remove(&(until, nonce));
            self.seen.remove(&nonce);
        }
    }

    /// Records the request's nonce; refuses one seen before, and refuses when full. Check
    /// freshness first ([`check_fresh`]): a stale request must not take a place.
    pub fn admit(&mut self, request: &KvRequest, now: u64) -> Result<(), OperatorError> {
        self.prune(now);
        if self.seen.contains_key(&request.nonce) {
            return Err(OperatorError::Replay {
                nonce: request.nonce_hex(),
            });
        }
        if self.seen.len() >= self.capacity {
            return Err(OperatorError::ReplayCacheFull {
                limit: self.capacity,
            });
        }
        let until = request.issued_at.saturating_add(FRESHNESS_SECS);
        self.seen.insert(request.nonce, until);
        self.by_time.insert((until, request.nonce));
        Ok(())
    }
}

impl Default for ReplayGuard {
    fn default() -> Self {
        Self::new(REPLAY_CACHE)
    }
}

/// Everything a receiving node checks, in order: size and envelope, signer and signature,
/// the request's form, freshness against `now` (Unix seconds), and its nonce.
pub fn check_request(
    bytes: &[u8],
    policy: &TrustPolicy,
    now: u64,
    guard: &mut ReplayGuard,
) -> Result<(KvRequest, PublicKey), OperatorError> {
    let signed = SignedKvRequest::parse(bytes)?;
    let request = signed.verify(policy)?;
    check_fresh(&request, now)?;
    guard.admit(&request, now)?;
    Ok((request, signed.key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::{ContentId, SignedManifest};

    const NOW: u64 = 1_800_000_000;
    const NODE: &str = "12D3KooWGzXv2iPfXrw8UMoc8S5E3hMe3Ym3zRnGQhNXqQk1JCKY";

    fn op_key() -> SecretKey {
        SecretKey::from_seed([1; 32])
    }

    fn policy() -> TrustPolicy {
        TrustPolicy::new(
            [op_key().public(), SecretKey::from_seed([2; 32]).public()],
            2,
        )
        .expect("policy")
    }

    fn put(issued_at: u64) -> KvRequest {
        KvRequest::new(
            "default",
            "ledger",
            NODE,
            KvOp::Put {
                key: "greeting".into(),
                value: b"hello \xff".to_vec(),
                if_revision: Some(3),
            },
            issued_at,
        )
        .expect("valid request")
    }

    fn check(bytes: &[u8], now: u64, guard: &mut ReplayGuard) -> Result<KvRequest, OperatorError> {
        check_request(bytes, &policy(), now, guard).map(|(r, _)| r)
    }

    #[test]
    fn a_signed_request_round_trips_and_verifies_with_one_signer_of_a_threshold_of_two() {
        for op in [
            KvOp::Get { key: "k".into() },
            KvOp::Put {
                key: "k".into(),
                value: vec![0, 1, 2],
                if_revision: None,
            },
            KvOp::Delete {
                key: "k".into(),
                if_revision: Some(0),
            },
            KvOp::List {
                prefix: String::new(),
                after: Some("a".into()),
                limit: Some(10),
            },
        ] {
            let req = KvRequest::new("default", "ledger", NODE, op, NOW).expect("valid");
            let signed = SignedKvRequest::sign(&req, &op_key());
            let text = signed.to_json();
            let mut guard = ReplayGuard::default();
            let back = check(text.as_bytes(), NOW, &mut guard).expect("trusted");
            assert_eq!(back, req);
            assert_eq!(SignedKvRequest::parse(text.as_bytes()), Ok(signed));
        }
        // Two requests never share a nonce.
        assert_ne!(put(NOW).nonce, put(NOW).nonce);
    }

    #[test]
    fn an_untrusted_key_is_refused_by_name() {
        let stranger = SecretKey::from_seed([9; 32]);
        let text = SignedKvRequest::sign(&put(NOW), &stranger).to_json();
        let e = check(text.as_bytes(), NOW, &mut ReplayGuard::default()).expect_err("untrusted");
        assert_eq!(
            e,
            OperatorError::Untrusted {
                key: stranger.public()
            }
        );
        assert!(
            e.to_string().contains(&stranger.public().to_string()),
            "{e}"
        );
        assert_eq!(e.reason(), "untrusted");
    }

    #[test]
    fn altered_bytes_do_not_verify() {
        let signed = SignedKvRequest::sign(&put(NOW), &op_key());
        let text = signed.request_text().replace("greeting", "greetinG");
        let altered = SignedKvRequest::from_parts(text, op_key().public(), signed.sig);
        let e = check(
            altered.to_json().as_bytes(),
            NOW,
            &mut ReplayGuard::default(),
        )
        .expect_err("altered");
        assert_eq!(
            e,
            OperatorError::BadSignature {
                key: op_key().public()
            }
        );
        // A signature taken from another request does not fit either.
        let other = SignedKvRequest::sign(&put(NOW), &op_key());
        let swapped =
            SignedKvRequest::from_parts(signed.request_text().to_owned(), other.key, other.sig);
        assert!(matches!(
            check(
                swapped.to_json().as_bytes(),
                NOW,
                &mut ReplayGuard::default()
            ),
            Err(OperatorError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_manifest_signature_is_no_request_signature_and_the_other_way_round() {
        let req = put(NOW).to_json();
        // The manifest context over the same bytes.
        let as_manifest = op_key().sign(&crate::signed::signing_message(&ContentId::of(
            req.as_bytes(),
        )));
        let forged = SignedKvRequest::from_parts(req.clone(), op_key().public(), as_manifest);
        assert!(matches!(
            check(
                forged.to_json().as_bytes(),
                NOW,
                &mut ReplayGuard::default()
            ),
            Err(OperatorError::BadSignature { .. })
        ));
        // The operator context over a manifest's bytes is no manifest signature.
        let manifest = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = 1\n\n[[container]]\nname = \"web\"\nimage = \"localhost/hello:1\"\n";
        let sig = op_key().sign(&signing_message(manifest.as_bytes()));
        let envelope = format!(
            "{}\n[[signature]]\nkey = \"{}\"\nsig = \"{}\"\n",
            SignedManifest::new(manifest).to_toml(),
            op_key().public(),
            encode_signature(&sig)
        );
        let signed = SignedManifest::parse("m", &envelope).expect("envelope parses");
        let one = TrustPolicy::new([op_key().public()], 1).expect("policy");
        let e = one
            .verify(&signed, time::OffsetDateTime::UNIX_EPOCH)
            .expect_err("not a manifest signature");
        assert!(e.to_string().contains("does not verify"), "{e}");
        // The two contexts are distinct, and neither is a prefix of the other.
        assert!(!OPERATOR_CONTEXT.starts_with(crate::signed::SIGNATURE_CONTEXT));
        assert!(!crate::signed::SIGNATURE_CONTEXT.starts_with(OPERATOR_CONTEXT));
    }

    #[test]
    fn requests_older_or_newer_than_five_minutes_are_stale() {
        for (issued, fresh) in [
            (NOW, true),
            (NOW - FRESHNESS_SECS, true),
            (NOW + FRESHNESS_SECS, true),
            (NOW - FRESHNESS_SECS - 1, false),
            (NOW + FRESHNESS_SECS + 1, false),
            (0, false),
            (u64::MAX, false),
        ] {
            let text = SignedKvRequest::sign(&put(issued), &op_key()).to_json();
            let r = check(text.as_bytes(), NOW, &mut ReplayGuard::default());
            if fresh {
                assert!(r.is_ok(), "issued {issued}: {r:?}");
            } else {
                let e = r.expect_err("stale");
                assert_eq!(
                    e,
                    OperatorError::Stale {
                        issued_at: issued,
                        now: NOW
                    }
                );
                assert!(e.to_string().contains("at most 300 s"), "{e}");
            }
        }
    }

    #[test]
    fn a_replay_is_refused_while_the_request_could_be_fresh() {
        let req = put(NOW);
        let text = SignedKvRequest::sign(&req, &op_key()).to_json();
        let mut guard = ReplayGuard::default();
        check(text.as_bytes(), NOW, &mut guard).expect("first time");
        let e = check(text.as_bytes(), NOW + 10, &mut guard).expect_err("replay");
        assert_eq!(
            e,
            OperatorError::Replay {
                nonce: req.nonce_hex()
            }
        );
        // Still remembered at the last second the request is fresh; after that it is stale
        // (and forgotten).
        assert!(matches!(
            check(text.as_bytes(), NOW + FRESHNESS_SECS, &mut guard),
            Err(OperatorError::Replay { .. })
        ));
        assert!(matches!(
            check(text.as_bytes(), NOW + FRESHNESS_SECS + 1, &mut guard),
            Err(OperatorError::Stale { .. })
        ));
        guard
            .admit(&put(NOW + 2 * FRESHNESS_SECS), NOW + 2 * FRESHNESS_SECS)
            .expect("room");
        assert_eq!(guard.len(), 1, "the old nonce was forgotten");
    }

    #[test]
    fn a_full_guard_refuses_rather_than_forgets() {
        let mut guard = ReplayGuard::new(3);
        let first = put(NOW);
        guard.admit(&first, NOW).expect("1");
        guard.admit(&put(NOW), NOW).expect("2");
        guard.admit(&put(NOW + 5), NOW).expect("3");
        let e = guard.admit(&put(NOW), NOW).expect_err("full");
        assert_eq!(e, OperatorError::ReplayCacheFull { limit: 3 });
        // The first is still refused as a replay (nothing was forgotten to make room)...
        assert!(matches!(
            guard.admit(&first, NOW + 1),
            Err(OperatorError::Replay { .. })
        ));
        // ...until the oldest can no longer be fresh.
        guard
            .admit(&put(NOW + FRESHNESS_SECS + 1), NOW + FRESHNESS_SECS + 1)
            .expect("room again");
        assert_eq!(guard.len(), 2);
    }

    #[test]
    fn malformed_envelopes_and_requests_name_what_is_wrong() {
        let signed = |text: &str| {
            SignedKvRequest::from_parts(
                text.to_owned(),
                op_key().public(),
                op_key().sign(&signing_message(text.as_bytes())),
            )
            .to_json()
        };
        let base = put(NOW).to_json();
        let with = |from: &str, to: &str| {
            assert!(base.contains(from), "{base} lacks {from}");
            base.replacen(from, to, 1)
        };
        let cases = [
            (with("\"version\":1", "\"version\":2"), "version"),
            (with("\"op\":\"put\"", "\"op\":\"drop\""), "op"),
            (with("\"op\":\"put\"", "\"op\":\"get\""), "value"),
            (with("\"op\":\"put\"", "\"op\":\"list\""), "key"),
            (
                with("\"namespace\":\"default\"", "\"namespace\":\"Default\""),
                "namespace",
            ),
            (with("\"nonce\":\"", "\"nonce\":\"zz"), "nonce"),
            (with("\"key\":\"greeting\"", "\"key\":\"\""), "key"),
            (
                with("\"issued_at\"", "\"extra\":1,\"issued_at\""),
                "request",
            ),
        ];
        for (text, field) in cases {
            let e =
                check(signed(&text).as_bytes(), NOW, &mut ReplayGuard::default()).expect_err(&text);
            match &e {
                OperatorError::Malformed { field: f, .. } => assert_eq!(f, field, "{text}: {e}"),
                other => panic!("{text}: {other}"),
            }
        }
        let list = |limit: u32| KvOp::List {
            prefix: String::new(),
            after: None,
            limit: Some(limit),
        };
        assert!(KvRequest::new("default", "x", NODE, list(0), NOW).is_err());
        assert!(KvRequest::new("default", "x", NODE, list(1001), NOW).is_err());
        let big = KvOp::Put {
            key: "k".into(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            if_revision: None,
        };
        assert_eq!(
            KvRequest::new("default", "x", NODE, big, NOW),
            Err(OperatorError::FieldTooLarge {
                field: "value".into(),
                size: MAX_VALUE_BYTES + 1,
                limit: MAX_VALUE_BYTES
            })
        );
        let long = KvOp::Get {
            key: "k".repeat(MAX_KEY_BYTES + 1),
        };
        assert_eq!(
            KvRequest::new("default", "x", NODE, long, NOW).map_err(|e| e.reason()),
            Err("too_large")
        );
        // The largest value fits in a request.
        let largest = KvOp::Put {
            key: "k".repeat(MAX_KEY_BYTES),
            value: vec![0xff; MAX_VALUE_BYTES],
            if_revision: Some(u64::MAX),
        };
        let req = KvRequest::new("default", "x", NODE, largest, NOW).expect("valid");
        let text = SignedKvRequest::sign(&req, &op_key()).to_json();
        assert!(text.len() <= MAX_REQUEST_BYTES, "{}", text.len());
        // Envelopes.
        for (bytes, reason) in [
            (b"not json".to_vec(), "envelope"),
            (
                b"{\"request\":\"\",\"key\":\"ed25519:AA\",\"sig\":\"\"}".to_vec(),
                "envelope",
            ),
            (vec![b' '; MAX_REQUEST_BYTES + 1], "too_large"),
        ] {
            let e = check(&bytes, NOW, &mut ReplayGuard::default()).expect_err("bad envelope");
            assert_eq!(e.reason(), reason, "{e}");
        }
    }
}
