//! Ed25519 keys: public keys written `ed25519:BASE64` (as in host.toml), secret keys stored as
//! PKCS#8 PEM files (readable by `openssl pkey`) with mode 0600.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PREFIX: &str = "ed25519:";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a public key; expected \"ed25519:\" followed by 32 bytes in base64")]
    BadPublicKey(String),
    #[error("{}: not an Ed25519 secret key in PKCS#8 PEM form ({reason})", path.display())]
    BadSecretKey { path: PathBuf, reason: String },
    #[error(
        "{}: the key file is empty or cut short ({len} bytes), as a write interrupted by a crash or power loss leaves it; \
         it is not used. Restore the key from a backup, or remove the file to make a new key \
         (for a node key: a new node identity, whose per-node tickets must be issued again)",
        path.display()
    )]
    Truncated { path: PathBuf, len: usize },
    #[error("{}: already exists; refusing to overwrite a key", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] crate::input::ReadError),
    #[error("no randomness available from the operating system: {0}")]
    Random(String),
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::BadPublicKey(self.to_string()))
    }

    /// Verifies `sig` over `msg` with the strict rules (no malleable or small-order forms).
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> Result<(), String> {
        let vk =
            VerifyingKey::from_bytes(&self.0).map_err(|_| "not a valid curve point".to_owned())?;
        vk.verify_strict(msg, &Signature::from_bytes(sig))
            .map_err(|_| "signature does not verify".to_owned())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadPublicKey(s.to_owned());
        let b64 = s.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let bytes = B64.decode(b64).map_err(|_| bad())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        VerifyingKey::from_bytes(&arr).map_err(|_| bad())?;
        Ok(PublicKey(arr))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 secret key.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// A key from a 32-byte seed (deterministic keys for tests and simulations).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// The 32-byte seed, for deriving other identities (for example a libp2p keypair).
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.0
            .to_pkcs8_pem(Default::default())
            .map(|z| z.to_string())
            .map_err(|e| KeyError::BadSecretKey {
                path: PathBuf::new(),
                reason: e.to_string(),
            })
    }

    pub fn from_pem(path: &Path, pem: &str) -> Result<Self, KeyError> {
        let text = pem.trim();
        // What a write cut short by a crash leaves (BeeMesh's own writes are atomic since
        // `save_new` links a complete file into place; older versions and other tools were not).
        if text.is_empty() || (text.starts_with("-----BEGIN") && !text.contains("-----END")) {
            return Err(KeyError::Truncated {
                path: path.to_owned(),
                len: pem.len(),
            });
        }
        SigningKey::from_pkcs8_pem(text)
            .map(Self)
            .map_err(|e| KeyError::BadSecretKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Reads a secret key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = crate::input::read_file(path, crate::input::MAX_KEY_BYTES, "a key file")?;
        Self::from_pem(path, &pem)
    }

    /// Writes the key to a new file with mode 0600; refuses to overwrite an existing file.
    /// The write is atomic and durable ([`crate::input::write_new_atomically`]): after a
    /// crash or power loss the file is either absent or complete, never empty or cut short.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self.to_pem()?;
        crate::input::write_new_atomically(path, pem.as_bytes(), 0o600).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                KeyError::Io {
                    path: path.to_owned(),
                    cause: e,
                }
            }
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

/// Reads a public key given either inline (`ed25519:...`) or as a path to a file holding a
/// public key line or a secret key (whose public half is used).
pub fn public_key_from_arg(arg: &str) -> Result<PublicKey, KeyError> {
    if arg.starts_with(PREFIX) {
        return arg.parse();
    }
    let path = Path::new(arg);
    let text = crate::input::read_file(path, crate::input::MAX_KEY_BYTES, "a key file")?;
    if text.trim().starts_with(PREFIX) {
        return text.trim().parse();
    }
    SecretKey::from_pem(path, &text).map(|k| k.public())
}

/// Decodes a base64 signature into 64 bytes.
pub fn decode_signature(s: &str) -> Result<[u8; 64], String> {
    let bytes = B64
        .decode(s.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let n = bytes.len();
    bytes
        .try_into()
        .map_err(|_| format!("signature is {n} bytes long; Ed25519 signatures are 64"))
}

pub fn encode_signature(sig: &[u8; 64]) -> String {
    B64.encode(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_text_round_trip() {
        let k = SecretKey::from_seed([7; 32]);
        let s = k.public().to_string();
        assert!(s.starts_with("ed25519:"));
        assert_eq!(s.parse::<PublicKey>().expect("parses"), k.public());
        for bad in [
            "",
            "ed25519:",
            "ed25519:AAAA",
            "rsa:AAAA",
            &s[..s.len() - 2],
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_key_file_is_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("op.key");
        let k = SecretKey::generate().expect("random");
        k.save_new(&path).expect("saved");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = SecretKey::load(&path).expect("loads");
        assert_eq!(loaded.public(), k.public());
        let other = SecretKey::generate().expect("random");
        assert!(matches!(
            other.save_new(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(
            SecretKey::load(&path).expect("still there").public(),
            k.public()
        );
        assert_eq!(
            public_key_from_arg(path.to_str().expect("utf8")).expect("pub"),
            k.public()
        );
    }

    #[test]
    fn empty_or_cut_short_key_file_is_refused_with_what_to_do() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = SecretKey::from_seed([3; 32]).to_pem().expect("pem");
        for (name, text) in [("empty.key", ""), ("cut.key", &pem[..40])] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let err = SecretKey::load(&path).expect_err("truncated");
            let msg = err.to_string();
            assert!(matches!(err, KeyError::Truncated { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("remove the file"), "{msg}");
        }
    }

    #[test]
    fn sign_verify() {
        let k = SecretKey::from_seed([1; 32]);
        let sig = k.sign(b"msg");
        assert!(k.public().verify(b"msg", &sig).is_ok());
        assert!(k.public().verify(b"msh", &sig).is_err());
    }
}
