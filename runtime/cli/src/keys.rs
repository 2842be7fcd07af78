//! `beemesh key gen` and `beemesh key show`.

use std::path::Path;

use anyhow::Context;
use beemesh_manifest::SecretKey;
use serde_json::json;

use crate::output::{self, Format};

pub fn gen_key(path: &Path, format: Format) -> anyhow::Result<()> {
    let key = SecretKey::generate()?;
    key.save_new(path)
        .with_context(|| format!("cannot write a new key to {}", path.display()))?;
    print_public(path, &key, format)
}

pub fn show_key(path: &Path, format: Format) -> anyhow::Result<()> {
    let key = SecretKey::load(path)?;
    print_public(path, &key, format)
}

fn print_public(path: &Path, key: &SecretKey, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Text => println!("{}", key.public()),
        Format::Json => output::json(&json!({
            "file": path,
            "public_key": key.public().to_string(),
        }))?,
    }
    Ok(())
}
