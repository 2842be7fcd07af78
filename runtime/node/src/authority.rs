//! Award signatures with the node's identity key: the scheduler's [`Authority`].
//!
//! A BeeMesh peer id is the identity multihash of the node's Ed25519 public key, so any node
//! checks any other's signature from the peer id alone, without a key exchange and without
//! trusting a key carried in a message. The key is the one noise authenticates on every
//! connection; awards are domain-separated (`beemesh_scheduler::AWARD_CONTEXT`), so an award
//! signature can never be mistaken for anything else the key signs.

use beemesh_mesh::{Keypair, PeerId, PeerPublicKey as PublicKey};
use beemesh_scheduler::{Authority, Signature};

/// Signs with this node's identity key; checks signatures against the signer's peer id.
pub struct PeerKeys {
    keypair: Keypair,
}

impl PeerKeys {
    pub fn new(keypair: Keypair) -> Self {
        Self { keypair }
    }
}

/// The public key inside a peer id (Ed25519 peer ids carry it inline); `None` for peer ids
/// that only hash their key.
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    (key.to_peer_id() == *peer).then_some(key)
}

impl Authority<String> for PeerKeys {
    fn sign(&self, message: &[u8]) -> Signature {
        match self.keypair.sign(message) {
            Ok(sig) => match <[u8; 64]>::try_from(sig.as_slice()) {
                Ok(bytes) => Signature(bytes),
                Err(_) => {
                    tracing::error!("the node key's signatures are not Ed25519 signatures");
                    Signature::default()
                }
            },
            Err(e) => {
                tracing::error!("cannot sign an award: {e}");
                Signature::default()
            }
        }
    }

    fn verify(&self, signer: &String, message: &[u8], sig: &Signature) -> bool {
        signer
            .parse::<PeerId>()
            .ok()
            .and_then(|p| public_key_of(&p))
            .is_some_and(|key| key.verify(message, &sig.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_award_verifies_under_the_signers_peer_id_only() {
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let (pa, pb) = (a.public().to_peer_id(), b.public().to_peer_id());
        let keys = PeerKeys::new(a);
        let sig = keys.sign(b"an award");
        let other = PeerKeys::new(b);
        assert!(other.verify(&pa.to_base58(), b"an award", &sig));
        assert!(!other.verify(&pb.to_base58(), b"an award", &sig));
        assert!(!other.verify(&pa.to_base58(), b"another award", &sig));
        assert!(!other.verify(&"not a peer id".to_owned(), b"an award", &sig));
        assert!(!other.verify(&pa.to_base58(), b"an award", &Signature::default()));
    }
}
