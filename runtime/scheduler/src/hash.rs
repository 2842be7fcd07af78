//! Deterministic hashing: the same value on every node, platform and version.
//!
//! Identities are hashed once with SHA-256 (truncated to 64 bits); combinations of two hashes
//! (rendezvous scores, tie-breaks, sampling seeds) use the MurmurHash3 64-bit finaliser, which
//! is a fixed bijection with full avalanche. Nothing here depends on `std`'s `RandomState`.

use sha2::{Digest as _, Sha256};

/// First 8 bytes (little endian) of SHA-256 of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let d = Sha256::digest(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// MurmurHash3's 64-bit finaliser.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Combines two hashes (order matters).
pub fn mix(a: u64, b: u64) -> u64 {
    fmix64(a ^ fmix64(b.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The rendezvous weight of `node` for `workload`'s replica `index`: the last word among equal
/// claims and equal bids, never arrival order.
pub fn tiebreak(workload: u64, index: u32, node: u64) -> u64 {
    mix(mix(workload, u64::from(index)), node)
}

/// A SplitMix64 stream: the scheduler's only source of "randomness", seeded from hashes.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        fmix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (bias below 2^-32 for our sizes).
    pub fn below(&mut self, n: usize) -> usize {
        let r = u128::from(self.next_u64()) * (n as u128);
        (r >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed() {
        // Pinned values: ring positions must never change between versions.
        assert_eq!(stable_hash(b"default/web"), 0x64d1_0cd0_e9ad_b382);
        assert_eq!(stable_hash(b""), 0x141c_fc98_42c4_b0e3);
        assert_eq!(fmix64(0), 0);
        assert_ne!(tiebreak(1, 0, 2), tiebreak(2, 0, 1));
    }

    #[test]
    fn below_is_in_range_and_spreads() {
        let mut r = SplitMix::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let i = r.below(10);
            seen[i] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
