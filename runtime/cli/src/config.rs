//! `beemesh config check`.

use std::path::Path;

use beemesh_manifest::HostConfig;
use beemesh_manifest::host::LoadError;
use serde_json::json;

use crate::output::{self, Format};

pub fn check(path: &Path, format: Format) -> anyhow::Result<()> {
    match (HostConfig::load(path), format) {
        (Ok(c), Format::Text) => {
            println!(
                "{}: ok (node {}, {} signer(s), threshold {}, driver {:?}, landlock {:?})",
                path.display(),
                c.node.name.as_deref().unwrap_or("<hostname>"),
                c.trust.signers.len(),
                c.trust.threshold,
                c.runtime.driver,
                c.sandbox.landlock,
            );
            Ok(())
        }
        (Ok(c), Format::Json) => output::json(&json!({
            "file": path,
            "valid": true,
            "diagnostics": [],
            "config": c,
        })),
        (Err(LoadError::Invalid(invalid)), Format::Json) => {
            output::json(&json!({
                "file": path,
                "valid": false,
                "diagnostics": invalid.diagnostics,
            }))?;
            Err(invalid.into())
        }
        (Err(e), _) => Err(e.into()),
    }
}
