//! The trust policy: which signatures make a manifest trusted, and when it stops being so.
//!
//! A manifest is trusted when at least `threshold` *distinct* keys from `signers` have made a
//! valid signature over its content id (two signatures by one key count once; a key named
//! inside the document but absent from `signers` counts for nothing), its text parses and
//! validates, and it has not expired at the time given by the caller's clock.

use std::collections::BTreeSet;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::diag::Invalid;
use crate::host::TrustSection;
use crate::keys::PublicKey;
use crate::signed::{ContentId, SignedManifest, signing_message};
use crate::workload::Manifest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    signers: BTreeSet<PublicKey>,
    threshold: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("threshold must be at least 1")]
    ZeroThreshold,
    #[error("threshold {threshold} can never be met by {signers} distinct signer(s)")]
    Unreachable { threshold: usize, signers: usize },
}

/// Why one signature in an envelope did not count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    pub index: usize,
    pub key: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "{content_id}: {valid} valid signature(s) from trusted signers, {threshold} needed{}",
        fmt_rejected(.rejected)
    )]
    Threshold {
        content_id: ContentId,
        valid: usize,
        threshold: usize,
        rejected: Vec<Rejected>,
    },
    #[error("the signed manifest is not a valid workload")]
    Manifest(#[source] Invalid),
    #[error("{id} generation {generation} expired at {expires}; the time is now {now}")]
    Expired {
        id: String,
        generation: u64,
        expires: String,
        now: String,
    },
}

fn fmt_rejected(r: &[Rejected]) -> String {
    if r.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = r
        .iter()
        .map(|x| format!("signature[{}] by {}: {}", x.index, x.key, x.reason))
        .collect();
    format!(" ({})", parts.join("; "))
}

/// A manifest that passed the trust policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub manifest: Manifest,
    pub content_id: ContentId,
    /// The distinct trusted keys whose signatures counted.
    pub signed_by: Vec<PublicKey>,
}

impl TrustPolicy {
    pub fn new(
        signers: impl IntoIterator<Item = PublicKey>,
        threshold: usize,
    ) -> Result<Self, PolicyError> {
        let signers: BTreeSet<_> = signers.into_iter().collect();
        if threshold == 0 {
            return Err(PolicyError::ZeroThreshold);
        }
        if threshold > signers.len() {
            return Err(PolicyError::Unreachable {
                threshold,
                signers: signers.len(),
            });
        }
        Ok(Self { signers, threshold })
    }

    /// The policy of a host config's `[trust]` section.
    pub fn from_host(t: &TrustSection) -> Result<Self, PolicyError> {
        Self::new(t.signers.iter().copied(), t.threshold as usize)
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn signers(&self) -> impl Iterator<Item = &PublicKey> {
        self.signers.iter()
    }

    /// Checks signatures, then the manifest, then expiry against `now`.
    ///
    /// Signatures come first so that nothing from an untrusted sender is parsed further.
    pub fn verify(
        &self,
        signed: &SignedManifest,
        now: OffsetDateTime,
    ) -> Result<Verified, VerifyError> {
        let content_id = signed.content_id();
        let msg = signing_message(&content_id);
        let mut counted: BTreeSet<PublicKey> = BTreeSet::new();
        let mut rejected = Vec::new();
        for (index, s) in signed.signatures().iter().enumerate() {
            let reason = if !self.signers.contains(&s.key) {
                Some("key is not among the trusted signers".to_owned())
            } else if let Err(e) = s.key.verify(&msg, &s.sig) {
                Some(format!("{e} (the manifest or the signature was altered)"))
            } else if !counted.insert(s.key) {
                Some("a second signature by the same key counts once".to_owned())
            } else {
                None
            };
            if let Some(reason) = reason {
                rejected.push(Rejected {
                    index,
                    key: s.key.to_string(),
                    reason,
                });
            }
        }
        if counted.len() < self.threshold {
            return Err(VerifyError::Threshold {
                content_id,
                valid: counted.len(),
                threshold: self.threshold,
                rejected,
            });
        }
        let manifest = Manifest::from_toml("signed manifest", signed.manifest_text())
            .map_err(VerifyError::Manifest)?;
        check_expiry(&manifest, now)?;
        Ok(Verified {
            manifest,
            content_id,
            signed_by: counted.into_iter().collect(),
        })
    }
}

/// Refuses a manifest whose `expires` is at or before `now`.
pub fn check_expiry(m: &Manifest, now: OffsetDateTime) -> Result<(), VerifyError> {
    if let Some(exp) = m.expires_at()
        && exp <= now
    {
        return Err(VerifyError::Expired {
            id: m.id(),
            generation: m.generation,
            expires: m.expires.clone().unwrap_or_default(),
            now: now.format(&Rfc3339).unwrap_or_else(|_| now.to_string()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use time::macros::datetime;

    fn manifest(generation: u64, expires: Option<&str>) -> String {
        let exp = expires
            .map(|e| format!("expires = \"{e}\"\n"))
            .unwrap_or_default();
        format!(
            "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = {generation}\n{exp}\n[[container]]\nname = \"web\"\nimage = \"localhost/hello:1\"\n"
        )
    }

    fn keys() -> (SecretKey, SecretKey, SecretKey) {
        (
            SecretKey::from_seed([1; 32]),
            SecretKey::from_seed([2; 32]),
            SecretKey::from_seed([3; 32]),
        )
    }

    const NOW: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);

    #[test]
    fn one_of_one() {
        let (a, _, _) = keys();
        let mut s = SignedManifest::new(manifest(1, None));
        s.add_signature("m", &a).expect("sign");
        let p = TrustPolicy::new([a.public()], 1).expect("policy");
        let v = p.verify(&s, NOW).expect("trusted");
        assert_eq!(v.manifest.name, "hello");
        assert_eq!(v.signed_by, vec![a.public()]);
        assert_eq!(v.content_id, s.content_id());
    }

    #[test]
    fn unknown_signer_does_not_count() {
        let (a, b, _) = keys();
        let mut s = SignedManifest::new(manifest(1, None));
        s.add_signature("m", &b).expect("sign");
        let p = TrustPolicy::new([a.public()], 1).expect("policy");
        let e = p.verify(&s, NOW).expect_err("untrusted");
        assert!(
            e.to_string()
                .contains("0 valid signature(s) from trusted signers, 1 needed"),
            "{e}"
        );
        assert!(
            e.to_string().contains("not among the trusted signers"),
            "{e}"
        );
    }

    #[test]
    fn threshold_needs_distinct_keys() {
        let (a, b, c) = keys();
        let p = TrustPolicy::new([a.public(), b.public(), c.public()], 2).expect("policy");
        let mut s = SignedManifest::new(manifest(1, None));
        s.add_signature("m", &a).expect("sign");
        assert!(matches!(
            p.verify(&s, NOW),
            Err(VerifyError::Threshold {
                valid: 1,
                threshold: 2,
                ..
            })
        ));
        s.add_signature("m", &b).expect("sign");
        assert_eq!(p.verify(&s, NOW).expect("2 of 3").signed_by.len(), 2);
    }

    #[test]
    fn duplicated_signature_counts_once() {
        let (a, b, _) = keys();
        let mut s = SignedManifest::new(manifest(1, None));
        s.add_signature("m", &a).expect("sign");
        // Forge a second copy of a's signature into the envelope by hand.
        let text = s.to_toml();
        let dup = text[text.find("[[signature]]").expect("has sig")..].to_owned();
        let doubled = SignedManifest::parse("d", &format!("{text}\n{dup}")).expect("parses");
        assert_eq!(doubled.signatures().len(), 2);
        let p = TrustPolicy::new([a.public(), b.public()], 2).expect("policy");
        let e = p.verify(&doubled, NOW).expect_err("one distinct key");
        assert!(e.to_string().contains("counts once"), "{e}");
    }

    #[test]
    fn expired_manifest_is_refused_by_the_injected_clock() {
        let (a, _, _) = keys();
        let mut s = SignedManifest::new(manifest(1, Some("2026-11-21T12:00:00Z")));
        s.add_signature("m", &a).expect("sign");
        let p = TrustPolicy::new([a.public()], 1).expect("policy");
        assert!(p.verify(&s, datetime!(2026-11-21 11:59:59 UTC)).is_ok());
        let e = p.verify(&s, NOW).expect_err("expired");
        assert!(matches!(e, VerifyError::Expired { .. }), "{e}");
        assert!(
            e.to_string().contains("expired at 2026-11-21T12:00:00Z"),
            "{e}"
        );
    }

    #[test]
    fn policy_refuses_impossible_thresholds() {
        let (a, _, _) = keys();
        assert!(matches!(
            TrustPolicy::new([a.public()], 0),
            Err(PolicyError::ZeroThreshold)
        ));
        assert!(matches!(
            TrustPolicy::new([a.public(), a.public()], 2),
            Err(PolicyError::Unreachable { .. })
        ));
    }
}
