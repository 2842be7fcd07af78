//! Regenerates `seeds/signed_manifest/` from `seeds/manifest_toml/` and checks that the
//! hand-written seeds of the other targets still mean what their names say: a seed whose name
//! starts with `invalid_` must be refused, every other one accepted.
//!
//! Run from `runtime/manifest/fuzz`: `cargo run --example make_seeds`. Ed25519 is
//! deterministic, so the output only changes when the seeds, the key or the format do.

use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::Path;

use beemesh_manifest::kube::{self, KubeOptions};
use beemesh_manifest::{HostConfig, Manifest, SecretKey, SignedManifest};
use beemesh_manifest_fuzz::{NOW, policy, signing_key};

/// A key the fuzzed policy does not trust.
const FOREIGN_SEED: [u8; 32] = [1; 32];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let key = signing_key();
    let foreign = SecretKey::from_seed(FOREIGN_SEED);

    let manifests = check_seeds(&seeds.join("manifest_toml"), |source, text| {
        Manifest::from_toml(source, text)
            .map(drop)
            .map_err(|e| e.to_string())
    })?;
    check_seeds(&seeds.join("host_config"), |source, text| {
        HostConfig::from_toml(source, text)
            .map(drop)
            .map_err(|e| e.to_string())
    })?;
    check_seeds(&seeds.join("kube_yaml"), |source, yaml| {
        kube::convert(source, yaml, &KubeOptions::default())
            .map(drop)
            .map_err(|e| e.to_string())
    })?;

    let out = seeds.join("signed_manifest");
    fs::create_dir_all(&out)?;
    let write =
        |name: &str, s: &SignedManifest| fs::write(out.join(format!("{name}.toml")), s.to_toml());
    for (name, text) in &manifests {
        let mut s = SignedManifest::new(text.as_str());
        s.add_signature(name, key)?;
        write(name, &s)?;
        let verdict = policy().verify(&s, NOW);
        println!(
            "signed_manifest/{name}.toml: {}",
            verdict.map_or_else(
                |e| e.to_string(),
                |v| format!("verifies as {}", v.content_id)
            )
        );
    }
    let (name, hello) = manifests
        .iter()
        .find(|(n, _)| n == "hello")
        .ok_or("seeds/manifest_toml/hello.toml is missing")?;
    write(
        &format!("{name}_unsigned"),
        &SignedManifest::new(hello.as_str()),
    )?;
    let mut by_foreign = SignedManifest::new(hello.as_str());
    by_foreign.add_signature(name, &foreign)?;
    write(&format!("{name}_foreign_key"), &by_foreign)?;
    by_foreign.add_signature(name, key)?;
    write(&format!("{name}_two_keys"), &by_foreign)?;
    // Bytes the envelope writer has to escape; not a valid manifest, so it cannot be signed.
    write(
        "awkward_bytes",
        &SignedManifest::new("a\r\nb \"\"\" x\\ \u{7f}\u{1}\t \u{2028}é"),
    )?;
    println!(
        "foreign key for the *_foreign_key seeds: {}",
        foreign.public()
    );
    println!("trusted key: {}", key.public());
    Ok(())
}

/// Checks every seed in `dir` against `accept`; returns the accepted ones as (stem, text), sorted.
fn check_seeds(
    dir: &Path,
    accept: impl Fn(&str, &str) -> Result<(), String>,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error>> {
    let mut accepted = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let text = fs::read_to_string(&path)?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("seed name is not UTF-8")?
            .to_owned();
        // A seed that panics the parser is a library bug (a regression seed before its fix):
        // name it instead of dying on it.
        let source = path.display().to_string();
        let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| accept(&source, &text)))
            .map_err(|_| format!("seed {source} panics the parser (see the message above)"))?;
        match (stem.starts_with("invalid_"), verdict) {
            (false, Err(e)) => {
                return Err(format!("seed {} should be accepted: {e}", path.display()).into());
            }
            (true, Ok(())) => {
                return Err(format!("seed {} should be refused", path.display()).into());
            }
            (false, Ok(())) => accepted.push((stem, text)),
            (true, Err(_)) => {}
        }
    }
    accepted.sort();
    Ok(accepted)
}
