//! `beemesh sign` and `beemesh verify`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use beemesh_manifest::input::{self, MAX_MANIFEST_BYTES, MAX_SIGNED_BYTES};
use beemesh_manifest::keys::public_key_from_arg;
use beemesh_manifest::{HostConfig, Manifest, SecretKey, SignedManifest, TrustPolicy};
use clap::Args;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The manifest to sign (TOML), or an already signed manifest to add a signature to.
    /// `-` reads standard input.
    #[arg(value_name = "MANIFEST")]
    manifest: PathBuf,

    /// The secret key file to sign with (from `beemesh key gen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Where to write the signed manifest (default: standard output). May name the input
    /// file itself; the file is replaced atomically.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The signed manifest (`-` reads standard input).
    #[arg(value_name = "SIGNED")]
    signed: PathBuf,

    /// Take signers and threshold from this host config's [trust] section.
    #[arg(
        long,
        value_name = "HOST.toml",
        conflicts_with = "signer",
        required_unless_present = "signer"
    )]
    trust: Option<PathBuf>,

    /// A trusted signer: "ed25519:BASE64", or a key file (public or secret). Repeat for several.
    #[arg(long = "signer", value_name = "KEY")]
    signer: Vec<String>,

    /// Signatures needed from distinct signers (default: the host config's, or 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threshold: Option<u32>,

    /// Check expiry as of this time instead of now (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    at: Option<OffsetDateTime>,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time such as 2027-01-01T00:00:00Z: {e}"))
}

fn source_name(p: &Path) -> String {
    if p == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        p.display().to_string()
    }
}

pub fn sign(a: &SignArgs, format: Format) -> anyhow::Result<()> {
    let key = SecretKey::load(&a.key)?;
    let source = source_name(&a.manifest);
    let text = input::read_file(&a.manifest, MAX_SIGNED_BYTES, "a manifest")?;
    let mut signed = if SignedManifest::looks_signed(&text) {
        SignedManifest::parse(&source, &text)?
    } else {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            bail!("{source}: larger than the limit of {MAX_MANIFEST_BYTES} bytes for a manifest");
        }
        SignedManifest::new(text)
    };
    let added = signed
        .add_signature(&source, &key)
        .with_context(|| format!("cannot sign {source}"))?;
    let manifest = Manifest::from_toml(&source, signed.manifest_text())?;
    let doc = signed.to_toml();
    if let Some(out) = &a.out {
        input::write_atomically(out, doc.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    let summary = json!({
        "namespace": manifest.namespace,
        "name": manifest.name,
        "generation": manifest.generation,
        "content_id": signed.content_id().to_string(),
        "signed_by": key.public().to_string(),
        "added": added,
        "signatures": signed.signatures().iter().map(|s| s.key.to_string()).collect::<Vec<_>>(),
        "out": a.out,
    });
    match (format, &a.out) {
        (Format::Json, None) => {
            let mut v = summary;
            v["signed"] = doc.into();
            output::json(&v)?;
        }
        (Format::Json, Some(_)) => output::json(&summary)?,
        (Format::Text, out) => {
            if out.is_none() {
                print!("{doc}");
            }
            eprintln!(
                "{} {} generation {} ({}) with {}: {} signature(s){}",
                if added { "signed" } else { "already signed" },
                manifest.id(),
                manifest.generation,
                signed.content_id(),
                key.public(),
                signed.signatures().len(),
                out.as_ref()
                    .map(|o| format!(", written to {}", o.display()))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(())
}

pub fn verify(a: &VerifyArgs, format: Format) -> anyhow::Result<()> {
    let policy = if let Some(host) = &a.trust {
        let cfg = HostConfig::load(host)?;
        let threshold = a.threshold.unwrap_or(cfg.trust.threshold);
        TrustPolicy::new(cfg.trust.signers.iter().copied(), threshold as usize)
            .with_context(|| format!("trust policy of {}", host.display()))?
    } else {
        let keys = a
            .signer
            .iter()
            .map(|s| public_key_from_arg(s).with_context(|| format!("--signer {s}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        TrustPolicy::new(keys, a.threshold.unwrap_or(1) as usize).context("--signer/--threshold")?
    };
    let source = source_name(&a.signed);
    let text = input::read_file(&a.signed, MAX_SIGNED_BYTES, "a signed manifest")?;
    let now = a.at.unwrap_or_else(OffsetDateTime::now_utc);
    let result = SignedManifest::parse(&source, &text)
        .map_err(anyhow::Error::from)
        .and_then(|s| policy.verify(&s, now).map_err(anyhow::Error::from))
        .with_context(|| format!("{source} is not trusted"));
    match (result, format) {
        (Ok(v), Format::Text) => {
            println!(
                "{source}: ok: {} generation {} ({}), {} of {} required signature(s): {}",
                v.manifest.id(),
                v.manifest.generation,
                v.content_id,
                v.signed_by.len(),
                policy.threshold(),
                v.signed_by
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        (Ok(v), Format::Json) => output::json(&json!({
            "valid": true,
            "namespace": v.manifest.namespace,
            "name": v.manifest.name,
            "generation": v.manifest.generation,
            "content_id": v.content_id.to_string(),
            "signed_by": v.signed_by.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "threshold": policy.threshold(),
        })),
        (Err(e), Format::Json) => {
            output::json(&json!({ "valid": false, "error": format!("{e:#}") }))?;
            Err(e)
        }
        (Err(e), Format::Text) => Err(e),
    }
}
