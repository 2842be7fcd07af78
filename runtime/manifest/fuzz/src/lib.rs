//! Fixtures shared by the fuzz targets and by the seed generator (`examples/make_seeds.rs`):
//! the signing key the `signed_manifest` target trusts and the clock it verifies against.
//!
//! Both are fixed so that a crash reproduces from its input file alone.

use std::sync::LazyLock;

use beemesh_manifest::{SecretKey, TrustPolicy};
use time::OffsetDateTime;
use time::macros::datetime;

/// Seed of the one operator key the fuzzed trust policy accepts. Exactly 32 bytes.
pub const KEY_SEED: [u8; 32] = *b"beemesh-fuzz-signed-manifest-key";

/// The time every verification in the fuzz targets runs at.
pub const NOW: OffsetDateTime = datetime!(2027-01-01 00:00 UTC);

/// The trusted operator key, derived once per process.
pub fn signing_key() -> &'static SecretKey {
    static KEY: LazyLock<SecretKey> = LazyLock::new(|| SecretKey::from_seed(KEY_SEED));
    &KEY
}

/// A 1-of-1 policy over [`signing_key`], built once per process.
pub fn policy() -> &'static TrustPolicy {
    static POLICY: LazyLock<TrustPolicy> = LazyLock::new(|| {
        TrustPolicy::new([signing_key().public()], 1).expect("a 1-of-1 policy is always reachable")
    });
    &POLICY
}
