//! `SignedManifest::parse`, then `TrustPolicy::verify` against a fixed 1-of-1 policy at a fixed
//! time (see `src/lib.rs`).
//!
//! Invariants checked on every envelope that parses:
//! - the CLI's cheap sniffing (`looks_signed`) agrees with the parser;
//! - `to_toml` writes an envelope that parses to an equal one with the same content id, and
//!   writing that one again gives the same text;
//! - verification gives the same verdict on the original and the re-written envelope;
//! - a verified manifest is exactly `Manifest::from_toml` of the embedded bytes, carries the
//!   envelope's content id, was signed by the trusted key and has not expired;
//! - whatever `add_signature` agrees to sign, the policy over that key accepts (unless it has
//!   expired): a signer never produces an envelope that every node refuses.

#![no_main]

use beemesh_manifest::signed::SignError;
use beemesh_manifest::trust::VerifyError;
use beemesh_manifest::{Manifest, SignedManifest, Verified};
use beemesh_manifest_fuzz::{NOW, policy, signing_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(signed) = SignedManifest::parse("fuzz.toml", text) else {
        return;
    };
    assert!(
        SignedManifest::looks_signed(text),
        "parse accepted an envelope that looks_signed does not recognise"
    );

    let written = signed.to_toml();
    let again = match SignedManifest::parse("written.toml", &written) {
        Ok(s) => s,
        Err(e) => panic!(
            "to_toml wrote an envelope that does not read back: {e}\n--- written ---\n{written}"
        ),
    };
    assert_eq!(
        signed, again,
        "round trip changed the envelope\n--- written ---\n{written}"
    );
    assert_eq!(signed.content_id(), again.content_id());
    assert_eq!(written, again.to_toml(), "to_toml is not a fixed point");

    let verdict = policy().verify(&signed, NOW);
    match (&verdict, &policy().verify(&again, NOW)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("verdict changed by the round trip: {a:?} then {b:?}"),
    }
    if let Ok(v) = &verdict {
        check_verified(&signed, v);
    }

    // Sign what the fuzzer made (when the signer agrees to) and verify that.
    let mut resigned = signed.clone();
    match resigned.add_signature("fuzz.toml", signing_key()) {
        Ok(_) => match policy().verify(&resigned, NOW) {
            Ok(v) => check_verified(&resigned, &v),
            Err(VerifyError::Expired { .. }) => {}
            Err(e) => panic!("an envelope that add_signature produced does not verify: {e}"),
        },
        Err(SignError::Manifest(_) | SignError::ExistingSignatureInvalid { .. }) => {}
    }
});

fn check_verified(signed: &SignedManifest, v: &Verified) {
    assert_eq!(v.content_id, signed.content_id());
    assert_eq!(v.signed_by, vec![signing_key().public()]);
    let direct = Manifest::from_toml("direct.toml", signed.manifest_text())
        .expect("a verified manifest parses on its own");
    assert_eq!(v.manifest, direct);
    if let Some(expires) = v.manifest.expires_at() {
        assert!(
            expires > NOW,
            "verified a manifest that expired at {expires}"
        );
    }
}
