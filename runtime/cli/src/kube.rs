//! `beemesh kube convert`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use beemesh_manifest::input::{self, MAX_KUBE_BYTES};
use beemesh_manifest::kube::{self as k, KubeOptions};
use clap::Args;
use serde_json::json;

use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Kubernetes YAML (one or more documents; `-` reads standard input).
    #[arg(value_name = "FILE.yaml")]
    file: PathBuf,

    /// Generation to give the manifests (raise it for every change you apply).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    generation: u64,

    /// Write one file per manifest (NAMESPACE.NAME.toml) into DIR instead of standard output.
    /// Existing files are never overwritten.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

pub fn convert(a: &ConvertArgs, format: Format) -> anyhow::Result<()> {
    let source = if a.file == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        a.file.display().to_string()
    };
    let yaml = input::read_file(&a.file, MAX_KUBE_BYTES, "Kubernetes YAML")?;
    let converted = k::convert(
        &source,
        &yaml,
        &KubeOptions {
            generation: a.generation,
        },
    )?;

    let mut written = Vec::new();
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Check every target first, so that a clash writes nothing rather than half the set.
        let targets: Vec<PathBuf> = converted
            .iter()
            .map(|c| dir.join(format!("{}.{}.toml", c.manifest.namespace, c.manifest.name)))
            .collect();
        if let Some(t) = targets.iter().find(|t| t.exists()) {
            anyhow::bail!("{} already exists; refusing to overwrite it", t.display());
        }
        for (c, t) in converted.iter().zip(&targets) {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(t)
                .with_context(|| format!("cannot create {}", t.display()))?;
            f.write_all(c.manifest.to_toml().as_bytes())
                .with_context(|| format!("cannot write {}", t.display()))?;
            written.push(t.clone());
        }
    }

    match format {
        Format::Json => output::json(&json!(
            converted
                .iter()
                .enumerate()
                .map(|(i, c)| json!({
                    "source": c.source,
                    "namespace": c.manifest.namespace,
                    "name": c.manifest.name,
                    "manifest": c.manifest.to_toml(),
                    "file": written.get(i),
                    "notes": c.notes,
                }))
                .collect::<Vec<_>>()
        ))?,
        Format::Text => {
            let mut stdout = std::io::stdout().lock();
            for (i, c) in converted.iter().enumerate() {
                for n in &c.notes {
                    eprintln!("note: {}: {}: {}", c.source, n.path, n.message);
                }
                match written.get(i) {
                    Some(path) => eprintln!("{}: written to {}", c.source, path.display()),
                    None => {
                        if i > 0 {
                            writeln!(stdout)?;
                        }
                        writeln!(stdout, "# {} (converted from {source})", c.source)?;
                        write!(stdout, "{}", c.manifest.to_toml())?;
                    }
                }
            }
        }
    }
    Ok(())
}
