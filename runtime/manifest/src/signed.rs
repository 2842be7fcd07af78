//! Signed manifests: the exact manifest bytes embedded in a TOML envelope with one or more
//! Ed25519 signatures.
//!
//! ```toml
//! manifest = """...exact bytes..."""
//! [[signature]]
//! key = "ed25519:BASE64PUBKEY"
//! sig = "BASE64SIG"
//! ```
//!
//! The content id is the SHA-256 of the manifest bytes. A signature is made over
//! [`signing_message`]: a fixed context string followed by the digest, so that a signature made
//! for any other purpose (an admission ticket, an identity document) can never be replayed as a
//! manifest signature, and the other way round.

use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::diag::{self, Invalid, KeyPath, Problems};
use crate::keys::{PublicKey, SecretKey, decode_signature, encode_signature};

/// Domain separation for manifest signatures. Never reuse this string for another purpose.
pub const SIGNATURE_CONTEXT: &[u8] = b"beemesh/v1/workload-manifest-signature\0";

/// The SHA-256 of a manifest's bytes: the workload's content id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses `sha256:HEX` or bare hex.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

impl serde::Serialize for ContentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ContentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a sha256 digest")))
    }
}

/// The bytes a manifest signature covers: the context string, then the 32-byte digest.
pub fn signing_message(id: &ContentId) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + 32);
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(&id.0);
    m
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureEntry {
    pub key: PublicKey,
    pub sig: [u8; 64],
}

/// A manifest's exact text plus the signatures over it. Parsing checks the envelope only;
/// [`crate::trust::TrustPolicy::verify`] decides whether it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    manifest: String,
    signatures: Vec<SignatureEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the manifest is not valid")]
    Manifest(#[from] Invalid),
    #[error(
        "the existing signature[{index}] by {key} does not verify against this manifest; refusing to add a signature to a file that was altered after signing"
    )]
    ExistingSignatureInvalid { index: usize, key: PublicKey },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    manifest: String,
    #[serde(default)]
    signature: Vec<RawSignature>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    key: String,
    sig: String,
}

impl SignedManifest {
    /// An unsigned envelope around a manifest's exact text.
    pub fn new(manifest: impl Into<String>) -> Self {
        Self {
            manifest: manifest.into(),
            signatures: Vec::new(),
        }
    }

    /// Whether a document looks like a signed envelope (a top-level `manifest` string) rather
    /// than a bare manifest.
    pub fn looks_signed(text: &str) -> bool {
        toml::de::DeTable::parse(text)
            .map(|t| {
                t.get_ref()
                    .get("manifest")
                    .is_some_and(|v| v.get_ref().is_str())
            })
            .unwrap_or(false)
    }

    /// Parses the envelope. Every key and signature must be well-formed; whether they are
    /// trusted and valid is the trust policy's question.
    pub fn parse(source: &str, text: &str) -> Result<Self, Invalid> {
        let raw: RawEnvelope = diag::from_toml(source, text)?;
        let mut p = Problems::new();
        let mut signatures = Vec::with_capacity(raw.signature.len());
        for (i, s) in raw.signature.iter().enumerate() {
            let at = KeyPath::root().key("signature").index(i);
            let key = s.key.parse::<PublicKey>();
            let sig = decode_signature(&s.sig);
            match (key, sig) {
                (Ok(key), Ok(sig)) => signatures.push(SignatureEntry { key, sig }),
                (k, s) => {
                    if let Err(e) = k {
                        p.push(at.key("key"), e.to_string());
                    }
                    if let Err(e) = s {
                        p.push(at.key("sig"), e);
                    }
                }
            }
        }
        p.locate(source, Some(text))?;
        Ok(Self {
            manifest: raw.manifest,
            signatures,
        })
    }

    /// The exact manifest text that was signed.
    pub fn manifest_text(&self) -> &str {
        &self.manifest
    }

    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    pub fn content_id(&self) -> ContentId {
        ContentId::of(self.manifest.as_bytes())
    }

    /// Adds a signature by `key`. Validates the manifest first (nobody should sign what no
    /// node will accept) and refuses when an existing signature does not verify. Returns
    /// `false` when `key` had already signed (Ed25519 is deterministic: nothing changes).
    pub fn add_signature(&mut self, source: &str, key: &SecretKey) -> Result<bool, SignError> {
        crate::workload::Manifest::from_toml(source, &self.manifest)?;
        let msg = signing_message(&self.content_id());
        for (index, s) in self.signatures.iter().enumerate() {
            if s.key.verify(&msg, &s.sig).is_err() {
                return Err(SignError::ExistingSignatureInvalid { index, key: s.key });
            }
        }
        let public = key.public();
        if self.signatures.iter().any(|s| s.key == public) {
            return Ok(false);
        }
        self.signatures.push(SignatureEntry {
            key: public,
            sig: key.sign(&msg),
        });
        Ok(true)
    }

    /// Writes the envelope. The manifest is embedded as a TOML multi-line basic string with
    /// every character that a parser could alter escaped (`\r`, control characters, quotes,
    /// backslashes), so that parsing the output gives back exactly the same bytes.
    pub fn to_toml(&self) -> String {
        let mut out = String::with_capacity(self.manifest.len() + 64 + 140 * self.signatures.len());
        out.push_str("manifest = \"\"\"\n");
        for c in self.manifest.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' | '\t' => out.push(c),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push_str("\"\"\"\n");
        for s in &self.signatures {
            out.push_str("\n[[signature]]\n");
            out.push_str(&format!("key = \"{}\"\n", s.key));
            out.push_str(&format!("sig = \"{}\"\n", encode_signature(&s.sig)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = 1\n\n[[container]]\nname = \"web\"\nimage = \"localhost/hello:1\"\ncommand = [\"echo\", \"a \\\"quoted\\\" \\\\ word\"]\n";

    #[test]
    fn envelope_round_trips_exact_bytes() {
        let k = SecretKey::from_seed([3; 32]);
        let mut s = SignedManifest::new(M);
        assert!(s.add_signature("m", &k).expect("signs"));
        assert!(!s.add_signature("m", &k).expect("same key again is a no-op"));
        let text = s.to_toml();
        let back = SignedManifest::parse("s", &text).expect("parses");
        assert_eq!(back.manifest_text(), M);
        assert_eq!(back, s);
        assert!(SignedManifest::looks_signed(&text));
        assert!(!SignedManifest::looks_signed(M));
    }

    #[test]
    fn awkward_bytes_survive_embedding() {
        for m in [
            "a\r\nb",
            "\"\"\"",
            "x\\",
            "\u{7f}\u{1}\t",
            "\"",
            "trailing\"",
            "\u{2028}é",
        ] {
            let s = SignedManifest::new(m);
            let back = SignedManifest::parse("s", &s.to_toml()).expect("parses");
            assert_eq!(back.manifest_text(), m);
        }
    }

    #[test]
    fn content_id_is_sha256_of_the_bytes() {
        let id = SignedManifest::new("abc").content_id();
        assert_eq!(
            id.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ContentId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn malformed_signature_entries_are_located() {
        let text = "manifest = \"x\"\n[[signature]]\nkey = \"ed25519:AAAA\"\nsig = \"!!\"\n";
        let e = SignedManifest::parse("s.toml", text).expect_err("bad");
        assert_eq!(e.diagnostics.len(), 2);
        assert_eq!(e.diagnostics[0].key, "signature[0].key");
        assert_eq!(e.diagnostics[0].line, Some(3));
        assert_eq!(e.diagnostics[1].key, "signature[0].sig");
    }

    #[test]
    fn refuses_to_sign_an_invalid_manifest() {
        let mut s = SignedManifest::new("api = \"beemesh/v1\"\n");
        let k = SecretKey::from_seed([3; 32]);
        assert!(matches!(
            s.add_signature("m", &k),
            Err(SignError::Manifest(_))
        ));
    }
}
