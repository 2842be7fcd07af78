//! Signed awards: the only thing that lets a host claim a replica.
//!
//! A coordinator signs every replica slot it awards: (workload, generation, content id, index,
//! epoch, host, issuer), under a domain-separated context so that the signature can never be
//! replayed for another purpose. The host keeps the signature with the replica, persists it,
//! and presents it in every report ([`crate::ReportedReplica::award`]); a coordinator counts a
//! claim only when the award verifies under the issuer's key. Since an honest host accepts an
//! award only from the workload's coordinator in its own view, a claim signed by any other
//! node can only be presented by that node itself: a claim signed by yourself for yourself.
//! The total order on claims ranks the issuer's ring distance from the workload before the
//! epoch, so such a claim never beats the claims of a coordinator that precedes its issuer on
//! the ring (docs/security.md).
//!
//! The state machine does no cryptography of its own: the node hands it an [`Authority`] (the
//! node's Ed25519 identity key, which is also its peer id). [`testing::SeededKeys`] is a real
//! Ed25519 authority with keys derived from node ids, for tests and the simulator.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::types::{Digest, NodeKey, ReplicaIndex, WorkloadId};

/// Domain separation of award signatures. Never reuse this string for another purpose.
pub const AWARD_CONTEXT: &[u8] = b"beemesh/v1/scheduler-award\0";

/// An Ed25519 signature (64 bytes), base64 on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl Default for Signature {
    fn default() -> Self {
        Self([0; 64])
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sig:{:02x}{:02x}{:02x}{:02x}…",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        if s.len() > 128 {
            return Err(serde::de::Error::custom("signature too long"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("signature is not base64: {e}")))?;
        let arr: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
            serde::de::Error::custom(format!("a signature has 64 bytes, not {}", b.len()))
        })?;
        Ok(Self(arr))
    }
}

/// Who awarded a claim, and the proof: the issuer's signature over [`award_message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwardProof<I> {
    pub issuer: I,
    pub sig: Signature,
}

/// Signs and checks award signatures. The node implements it with its identity key (the
/// peer id carries the public key, so any node can check any other's signature).
pub trait Authority<I>: Send + Sync {
    /// Signs `message` with this node's key.
    fn sign(&self, message: &[u8]) -> Signature;
    /// Whether `sig` is `signer`'s signature over `message`.
    fn verify(&self, signer: &I, message: &[u8], sig: &Signature) -> bool;
}

/// The shared handle the scheduler keeps.
#[derive(Clone)]
pub(crate) struct Keys<I>(pub Arc<dyn Authority<I>>);

impl<I> fmt::Debug for Keys<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authority")
    }
}

/// The signed bytes of one awarded slot: the context, then every field length-prefixed or of
/// fixed width, so no two different awards share an encoding.
#[allow(clippy::too_many_arguments)]
pub fn award_message<I: NodeKey>(
    workload: &WorkloadId,
    generation: u64,
    content: &Digest,
    index: ReplicaIndex,
    epoch: u64,
    host: &I,
    issuer: &I,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(AWARD_CONTEXT.len() + 160);
    m.extend_from_slice(AWARD_CONTEXT);
    let field = |m: &mut Vec<u8>, b: &[u8]| {
        m.extend_from_slice(&(b.len() as u32).to_be_bytes());
        m.extend_from_slice(b);
    };
    field(&mut m, workload.namespace.as_bytes());
    field(&mut m, workload.name.as_bytes());
    m.extend_from_slice(&generation.to_be_bytes());
    m.extend_from_slice(&content.0);
    m.extend_from_slice(&index.to_be_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    field(&mut m, &host.key_bytes());
    field(&mut m, &issuer.key_bytes());
    m
}

/// Authorities for tests and simulators.
pub mod testing {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use beemesh_manifest::keys::{PublicKey, SecretKey};

    use super::{Authority, Signature};
    use crate::hash::stable_hash;
    use crate::types::NodeKey;

    /// Real Ed25519 keys derived from node ids (the seed is a hash of the id): every node of a
    /// test or a simulation can check every other's signatures without a key exchange. Not for
    /// production: anyone who knows an id knows its key. A node's own authority is
    /// [`SeededKeys::of`]; a public key is derived once and cached.
    pub struct SeededKeys<I> {
        me: SecretKey,
        publics: Arc<Mutex<HashMap<I, PublicKey>>>,
    }

    fn seed<I: NodeKey>(id: &I) -> [u8; 32] {
        let mut s = [0u8; 32];
        let bytes = id.key_bytes();
        for (i, chunk) in s.chunks_mut(8).enumerate() {
            let mut input = bytes.to_vec();
            input.push(i as u8);
            chunk.copy_from_slice(&stable_hash(&input).to_le_bytes());
        }
        s
    }

    impl<I: NodeKey + Send + 'static> SeededKeys<I> {
        /// The authority of node `id`; `shared` caches public keys across nodes.
        pub fn of(id: &I, shared: &Arc<Mutex<HashMap<I, PublicKey>>>) -> Arc<dyn Authority<I>> {
            Arc::new(Self {
                me: SecretKey::from_seed(seed(id)),
                publics: shared.clone(),
            })
        }

        /// A fresh public-key cache to share between nodes.
        pub fn cache() -> Arc<Mutex<HashMap<I, PublicKey>>> {
            Arc::new(Mutex::new(HashMap::new()))
        }
    }

    impl<I: NodeKey + Send> Authority<I> for SeededKeys<I> {
        fn sign(&self, message: &[u8]) -> Signature {
            Signature(self.me.sign(message))
        }

        fn verify(&self, signer: &I, message: &[u8], sig: &Signature) -> bool {
            let public = {
                let mut cache = self.publics.lock().unwrap_or_else(|p| p.into_inner());
                *cache
                    .entry(signer.clone())
                    .or_insert_with(|| SecretKey::from_seed(seed(signer)).public())
            };
            public.verify(message, &sig.0).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::SeededKeys;
    use super::*;

    #[test]
    fn an_award_verifies_only_for_its_fields_and_its_issuer() {
        let cache = SeededKeys::<u32>::cache();
        let one = SeededKeys::of(&1u32, &cache);
        let two = SeededKeys::of(&2u32, &cache);
        let w = WorkloadId::new("default", "web");
        let d = Digest([7; 32]);
        let m = award_message(&w, 3, &d, 0, 9, &5u32, &1u32);
        let sig = one.sign(&m);
        assert!(two.verify(&1, &m, &sig), "anyone can check node 1's award");
        assert!(!two.verify(&2, &m, &sig), "it is not node 2's");
        for other in [
            award_message(&w, 4, &d, 0, 9, &5u32, &1u32),
            award_message(&w, 3, &Digest([8; 32]), 0, 9, &5u32, &1u32),
            award_message(&w, 3, &d, 1, 9, &5u32, &1u32),
            award_message(&w, 3, &d, 0, 10, &5u32, &1u32),
            award_message(&w, 3, &d, 0, 9, &6u32, &1u32),
            award_message(
                &WorkloadId::new("default", "weby"),
                3,
                &d,
                0,
                9,
                &5u32,
                &1u32,
            ),
        ] {
            assert!(!two.verify(&1, &other, &sig), "a changed field breaks it");
        }
    }

    #[test]
    fn signatures_round_trip_as_base64_and_refuse_other_lengths() {
        let s = Signature([0xab; 64]);
        let text = serde_json::to_string(&s).expect("encode");
        let back: Signature = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, s);
        assert!(serde_json::from_str::<Signature>("\"AAAA\"").is_err());
        assert!(serde_json::from_str::<Signature>("\"%%%\"").is_err());
    }
}
