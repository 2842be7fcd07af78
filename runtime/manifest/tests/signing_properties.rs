//! Property tests of signing and verification: what a signer writes, a node accepts; and a
//! change to an envelope either leaves the signed bytes and signatures as they were or makes
//! the envelope fail to parse or to verify.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use beemesh_manifest::keys::encode_signature;
use beemesh_manifest::signed::signing_message;
use beemesh_manifest::trust::VerifyError;
use beemesh_manifest::{ContentId, Manifest, PublicKey, SecretKey, SignedManifest, TrustPolicy};
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use proptest::sample::Index;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::{OffsetDateTime, UtcOffset};

/// The verifier's clock in every property.
const NOW: OffsetDateTime = datetime!(2027-01-01 00:00 UTC);

/// The smallest valid manifest; the strategies overwrite the fields they vary, so fields other
/// code may add later keep their defaults.
const BASE: &str = r#"api = "beemesh/v1"
kind = "Workload"
name = "base"
generation = 1

[[container]]
name = "main"
image = "localhost/app:1"
"#;

const DNS_LABEL: &str = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";
const ENV_NAME: &str = "[A-Za-z_][A-Za-z0-9_]{0,15}";

/// Characters that a writer has to escape or that a careless one mangles, mixed with any
/// character at all. Never NUL: validation refuses it in values and arguments.
fn awkward_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => any::<char>(),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just('\r'),
        1 => Just('\n'),
        1 => Just('\t'),
        1 => Just('\''),
        1 => prop::char::range('\u{1}', '\u{1f}'),
        1 => prop::char::range('\u{7f}', '\u{9f}'),
        1 => prop::sample::select(vec!['é', 'ß', '\u{2028}', '\u{feff}', '🐝', '\u{10ffff}']),
    ]
    .prop_filter("NUL is refused by validation", |c| *c != '\0')
}

fn awkward_string() -> impl Strategy<Value = String> {
    vec(awkward_char(), 0..24).prop_map(String::from_iter)
}

/// An RFC 3339 time after [`NOW`], written in a whole-minute UTC offset.
fn future_expiry() -> impl Strategy<Value = String> {
    (
        1i64..3_000_000_000,
        -12i8..=14,
        prop::sample::select(vec![0i8, 30, 45]),
    )
        .prop_map(|(secs, hours, minutes)| {
            let minutes = if hours < 0 { -minutes } else { minutes };
            let offset = UtcOffset::from_hms(hours, minutes, 0).expect("offset within ±14h");
            (NOW + time::Duration::seconds(secs))
                .to_offset(offset)
                .format(&Rfc3339)
                .expect("a whole-minute offset formats as RFC 3339")
        })
}

/// A valid manifest with awkward strings in its environment and command.
fn manifest() -> impl Strategy<Value = Manifest> {
    (
        (DNS_LABEL, DNS_LABEL, 1..u64::MAX / 2, 1u32..100),
        (DNS_LABEL, btree_map(ENV_NAME, awkward_string(), 0..4)),
        (vec(awkward_string(), 0..4), vec(awkward_string(), 0..3)),
        prop::option::of(future_expiry()),
    )
        .prop_map(
            |(
                (name, namespace, generation, replicas),
                (container, env),
                (command, args),
                expires,
            )| {
                let mut m =
                    Manifest::from_toml("base.toml", BASE).expect("the base manifest is valid");
                m.name = name;
                m.namespace = namespace;
                m.generation = generation;
                m.expires = expires;
                m.placement.replicas = replicas;
                let c = &mut m.containers[0];
                c.name = container;
                c.env = env;
                c.command = command;
                c.args = args;
                m
            },
        )
}

/// A manifest's text as an operator might hand it to the signer: the canonical form, possibly
/// with a comment (CRLF-terminated or not, non-ASCII) before it and blank space after it.
fn manifest_text() -> impl Strategy<Value = (Manifest, String)> {
    let prefix = prop::sample::select(vec![
        "",
        "# signed by proptest\r\n",
        "#\tnote: é 🐝 \"x\" \\ y\n",
    ]);
    let suffix = prop::sample::select(vec!["", "\n\n", "  \t\r\n"]);
    (manifest(), prefix, suffix).prop_map(|(m, prefix, suffix)| {
        let text = format!("{prefix}{}{suffix}", m.to_toml());
        (m, text)
    })
}

/// Secret keys from 1..=`max` distinct seeds.
fn keys(max: usize) -> impl Strategy<Value = Vec<SecretKey>> {
    btree_set(any::<[u8; 32]>(), 1..=max)
        .prop_map(|seeds| seeds.into_iter().map(SecretKey::from_seed).collect())
}

/// Signs through the signer's API: `add_signature` validates the manifest and re-checks every
/// signature already present.
fn sign(text: &str, keys: &[SecretKey]) -> SignedManifest {
    let mut s = SignedManifest::new(text);
    for k in keys {
        assert!(
            s.add_signature("proptest.toml", k)
                .expect("a valid manifest can be signed"),
            "each key signs once"
        );
    }
    s
}

/// An envelope around `text` with a signature by each of `keys`, written the way anyone who
/// holds the keys could write it: without the signer's checks. Verification must not depend on
/// who wrote the file; and this skips the signer's re-verification of the signatures already
/// present, which costs about 20 ms each in a debug build.
fn envelope_signed_by<'k>(text: &str, keys: impl IntoIterator<Item = &'k SecretKey>) -> String {
    let msg = signing_message(&ContentId::of(text.as_bytes()));
    let mut envelope = SignedManifest::new(text).to_toml();
    for k in keys {
        let sig = encode_signature(&k.sign(&msg));
        writeln!(
            envelope,
            "\n[[signature]]\nkey = \"{}\"\nsig = \"{sig}\"",
            k.public()
        )
        .expect("writing to a String cannot fail");
    }
    envelope
}

fn all_of(keys: &[SecretKey]) -> TrustPolicy {
    TrustPolicy::new(keys.iter().map(SecretKey::public), keys.len())
        .expect("n of n distinct keys is reachable")
}

fn publics<'k>(keys: impl IntoIterator<Item = &'k SecretKey>) -> BTreeSet<PublicKey> {
    keys.into_iter().map(SecretKey::public).collect()
}

/// `cases` unless PROPTEST_CASES asks for another number (for a longer soak, ideally with
/// `--release`: a verification costs about 20 ms in a debug build and 50 µs in release).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config(128))]

    /// (a) Sign with 1..=3 keys through the signer's API, write, parse, verify with the n-of-n
    /// policy: trusted, the same manifest, the same bytes, and the content id is the SHA-256 of
    /// those bytes.
    #[test]
    fn signed_envelope_verifies((manifest, text) in manifest_text(), keys in keys(3)) {
        let envelope = sign(&text, &keys).to_toml();
        let parsed = SignedManifest::parse("envelope.toml", &envelope)
            .expect("a written envelope parses");
        prop_assert_eq!(parsed.manifest_text(), text.as_str());
        prop_assert_eq!(parsed.signatures().len(), keys.len());

        let verified = all_of(&keys)
            .verify(&parsed, NOW)
            .expect("verifies with the signers' policy");
        prop_assert_eq!(&verified.manifest, &manifest);
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        prop_assert_eq!(verified.content_id.0, digest);
        prop_assert_eq!(parsed.content_id().0, digest);
        prop_assert_eq!(
            verified.signed_by.iter().copied().collect::<BTreeSet<_>>(),
            publics(&keys)
        );
    }

    /// (c) Flip any one bit of any one signature (in its `sig = "..."` line, re-encoded as
    /// valid base64): verification falls one short of the threshold and names that signature.
    #[test]
    fn flipped_signature_bit_breaks_the_threshold(
        (_, text) in manifest_text(),
        keys in keys(3),
        which in any::<Index>(),
        bit in 0usize..512,
    ) {
        let envelope = envelope_signed_by(&text, &keys);
        let target = which.index(keys.len());
        let mut seen = 0;
        let mut tampered = String::with_capacity(envelope.len());
        for line in envelope.split_inclusive('\n') {
            // Every quote of the manifest is escaped in the envelope, so a line that starts
            // with `sig = "` is a signature entry.
            match line.strip_prefix("sig = \"").and_then(|rest| rest.strip_suffix("\"\n")) {
                Some(b64) => {
                    if seen == target {
                        let mut sig = B64.decode(b64).expect("the writer emits base64");
                        sig[bit / 8] ^= 1 << (bit % 8);
                        writeln!(tampered, "sig = \"{}\"", B64.encode(&sig))
                            .expect("writing to a String cannot fail");
                    } else {
                        tampered.push_str(line);
                    }
                    seen += 1;
                }
                None => tampered.push_str(line),
            }
        }
        prop_assert_eq!(seen, keys.len());
        prop_assert_ne!(&tampered, &envelope);

        let parsed = SignedManifest::parse("tampered.toml", &tampered)
            .expect("still a well-formed envelope");
        match all_of(&keys).verify(&parsed, NOW) {
            Err(VerifyError::Threshold { valid, threshold, rejected, .. }) => {
                prop_assert_eq!(threshold, keys.len());
                prop_assert_eq!(valid, keys.len() - 1);
                prop_assert_eq!(rejected.len(), 1);
                prop_assert_eq!(rejected[0].index, target);
                let reason = &rejected[0].reason;
                prop_assert!(reason.contains("does not verify"), "{}", reason);
            }
            other => prop_assert!(false, "expected a threshold error, got {:?}", other),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// (b) Replace any one byte of a written envelope with any other value: the result is not
    /// UTF-8, or does not parse, or does not verify, or it carries exactly the original
    /// manifest bytes and signatures (the change hit insignificant space or a comment, or made
    /// an escape-equivalent spelling such as `\u001f` for `\u001F`), and then it verifies.
    #[test]
    fn tampered_envelope_never_verifies_as_something_else(
        (_, text) in manifest_text(),
        keys in keys(2),
        at in any::<Index>(),
        mask in 1u8..=255,
    ) {
        let signed = sign(&text, &keys);
        let mut bytes = signed.to_toml().into_bytes();
        let i = at.index(bytes.len());
        bytes[i] ^= mask;
        let Ok(tampered) = String::from_utf8(bytes) else {
            return Ok(()); // refused by input::read_bounded before any parsing
        };
        let Ok(parsed) = SignedManifest::parse("tampered.toml", &tampered) else {
            return Ok(());
        };
        let unchanged =
            parsed.manifest_text() == text && parsed.signatures() == signed.signatures();
        match all_of(&keys).verify(&parsed, NOW) {
            Ok(_) => prop_assert!(
                unchanged,
                "byte {} ^ {:#04x} verified with other content: {:?}",
                i,
                mask,
                parsed
            ),
            // The converse: an edit that leaves bytes and signatures as they were is harmless.
            Err(e) => {
                prop_assert!(!unchanged, "byte {} ^ {:#04x} changed nothing, yet: {}", i, mask, e);
            }
        }
    }

    /// (d) A valid signature by a key outside the policy never counts: the verdict and the
    /// counted signers depend only on which trusted keys signed, wherever the untrusted
    /// signatures stand in the envelope.
    #[test]
    fn untrusted_signatures_never_count(
        (_, text) in manifest_text(),
        trusted in keys(3),
        untrusted in keys(2),
        signing_mask in any::<u8>(),
        threshold in any::<Index>(),
        rotation in any::<Index>(),
    ) {
        prop_assume!(publics(&trusted).is_disjoint(&publics(&untrusted)));
        let threshold = threshold.index(trusted.len()) + 1;
        let policy = TrustPolicy::new(trusted.iter().map(SecretKey::public), threshold)
            .expect("a threshold of at most the signer count is reachable");

        // Each trusted key signs when its bit in the mask is set; every untrusted key signs.
        let mut signers: Vec<&SecretKey> = trusted
            .iter()
            .enumerate()
            .filter(|(i, _)| signing_mask & (1 << i) != 0)
            .map(|(_, k)| k)
            .chain(&untrusted)
            .collect();
        let rotation = rotation.index(signers.len());
        signers.rotate_left(rotation);
        let envelope = envelope_signed_by(&text, signers.iter().copied());
        let parsed = SignedManifest::parse("envelope.toml", &envelope).expect("parses");

        let trusted_keys = publics(&trusted);
        let counted_ok: BTreeSet<PublicKey> = signers
            .iter()
            .map(|k| k.public())
            .filter(|p| trusted_keys.contains(p))
            .collect();
        let untrusted_at: BTreeSet<usize> = signers
            .iter()
            .enumerate()
            .filter(|(_, k)| !trusted_keys.contains(&k.public()))
            .map(|(i, _)| i)
            .collect();
        prop_assert_eq!(untrusted_at.len(), untrusted.len());

        match policy.verify(&parsed, NOW) {
            Ok(v) => {
                prop_assert!(counted_ok.len() >= threshold);
                prop_assert_eq!(v.signed_by.into_iter().collect::<BTreeSet<_>>(), counted_ok);
            }
            Err(VerifyError::Threshold { valid, rejected, .. }) => {
                prop_assert!(counted_ok.len() < threshold);
                prop_assert_eq!(valid, counted_ok.len());
                for r in &rejected {
                    let reason = &r.reason;
                    prop_assert!(reason.contains("not among the trusted signers"), "{}", reason);
                }
                let rejected: BTreeSet<usize> = rejected.iter().map(|r| r.index).collect();
                prop_assert_eq!(rejected, untrusted_at);
            }
            Err(e) => prop_assert!(false, "unexpected verdict: {}", e),
        }
    }
}
