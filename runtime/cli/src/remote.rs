//! Commands that talk to a running node through its API: `status`, `get`, `apply`, `delete`
//! (`beemesh logs` is in [`crate::logs`], `--wait` in [`crate::wait`]).

use std::path::PathBuf;

use anyhow::Context;
use beemesh_manifest::input::{self, MAX_SIGNED_BYTES};
use beemesh_manifest::{SecretKey, SignedManifest};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::client::Client;
use crate::output::{self, Format};
use crate::wait;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The desired state: every workload the mesh knows, with its placements.
    Workloads,
    /// The admitted peers this node sees.
    Peers,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A signed manifest (from `beemesh sign`); `-` reads standard input.
    #[arg(value_name = "SIGNED")]
    signed: PathBuf,

    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until every replica of the applied generation runs (for a delete: until no
    /// replica is left), showing progress on stderr.
    #[arg(long)]
    wait: bool,

    /// How long --wait waits before failing with what is missing (e.g. 90s, 5m, 1h).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "5m",
        requires = "wait",
        value_parser = wait::parse_timeout
    )]
    timeout: std::time::Duration,
}

impl WaitArgs {
    /// Waits for the workload of an apply answer when --wait was given; with text output,
    /// a summary line on stdout (JSON output keeps stdout to the one answer document).
    fn run(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &Client,
        answer: &Value,
        format: Format,
    ) -> anyhow::Result<()> {
        if !self.wait {
            return Ok(());
        }
        let goal = wait::Goal::from_answer(answer)?;
        let progress = rt.block_on(wait::wait(client, &goal, self.timeout))?;
        if format == Format::Text {
            println!("{}", progress.summary(&goal));
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The workload, as NAMESPACE/NAME.
    #[arg(value_name = "NS/NAME")]
    target: String,

    /// The operator key that signs the tombstone.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Write the signed tombstone here instead of submitting it (to collect more signatures
    /// when the mesh's threshold is above 1; then `beemesh apply` it).
    #[arg(long, value_name = "FILE", conflicts_with = "wait")]
    out: Option<PathBuf>,

    #[command(flatten)]
    wait: WaitArgs,
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

pub fn status(client: &Client, format: Format) -> anyhow::Result<()> {
    let v = runtime()?.block_on(client.get_json("/v1/status"))?;
    match format {
        Format::Json => output::json(&v),
        Format::Text => {
            println!("name:      {}", str_of(&v, "name"));
            println!("peer id:   {}", str_of(&v, "peer_id"));
            println!("version:   {}", str_of(&v, "version"));
            println!("uptime:    {}s", v["uptime_seconds"]);
            println!("peers:     {}", v["peers"]);
            println!("workloads: {}", v["workloads"]);
            println!("labels:    {}", v["labels"]);
            let c = &v["capacity"];
            println!(
                "capacity:  cpu {} of {}, memory {} of {} allocatable",
                c["allocatable_cpu"].as_str().unwrap_or("?"),
                c["total_cpu"].as_str().unwrap_or("?"),
                c["allocatable_memory"].as_str().unwrap_or("?"),
                c["total_memory"].as_str().unwrap_or("?"),
            );
            println!("sandbox:   {}", v["sandbox"]);
            if let Some(addrs) = v["listen"].as_array() {
                for a in addrs {
                    println!("listen:    {}", a.as_str().unwrap_or(""));
                }
            }
            Ok(())
        }
    }
}

pub fn get(client: &Client, kind: Kind, format: Format) -> anyhow::Result<()> {
    let path = match kind {
        Kind::Workloads => "/v1/workloads",
        Kind::Peers => "/v1/peers",
    };
    let v = runtime()?.block_on(client.get_json(path))?;
    if format == Format::Json {
        return output::json(&v);
    }
    let items = v.as_array().cloned().unwrap_or_default();
    match kind {
        Kind::Workloads => {
            println!(
                "{:<32} {:>4} {:>8} {:<8} {:<19} PLACEMENTS",
                "WORKLOAD", "GEN", "REPLICAS", "MODE", "DIGEST"
            );
            for w in &items {
                let digest = str_of(w, "digest");
                let short = digest.get(..19).unwrap_or(digest);
                let placements: Vec<String> = w["placements"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| format!("{}={}", str_of(p, "node"), str_of(p, "state")))
                            .collect()
                    })
                    .unwrap_or_default();
                let replicas = if w["deleted"].as_bool() == Some(true) {
                    "deleted".to_owned()
                } else {
                    w["replicas"].to_string()
                };
                println!(
                    "{:<32} {:>4} {:>8} {:<8} {:<19} {}{}",
                    format!("{}/{}", str_of(w, "namespace"), str_of(w, "name")),
                    w["generation"],
                    replicas,
                    str_of(w, "consistency"),
                    short,
                    if placements.is_empty() {
                        "-".to_owned()
                    } else {
                        placements.join(" ")
                    },
                    group_summary(w)
                );
            }
        }
        Kind::Peers => {
            println!("{:<54} {:<20} LABELS", "PEER ID", "NAME");
            for p in &items {
                let labels = p["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                println!(
                    "{:<54} {:<20} {}",
                    str_of(p, "peer_id"),
                    str_of(p, "name"),
                    labels
                );
            }
        }
    }
    Ok(())
}

/// A strong workload's Raft group, after its placements: `  [leader b, term 3, voters a b c]`,
/// or why it failed.
fn group_summary(w: &Value) -> String {
    if let Some(reason) = w["failed"].as_str() {
        return format!("  [FAILED: {reason}]");
    }
    let g = &w["group"];
    if g.is_null() {
        return if w.get("group").is_some() {
            "  [group: no host answered]".to_owned()
        } else {
            String::new()
        };
    }
    let names = |k: &str| -> String {
        g[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let mut s = format!(
        "  [leader {}, term {}, voters {}",
        g["leader"].as_str().unwrap_or("none"),
        g["term"],
        names("voters")
    );
    let learners = names("learners");
    if !learners.is_empty() {
        s.push_str(&format!(", learners {learners}"));
    }
    s.push(']');
    s
}

pub fn apply(client: &Client, a: &ApplyArgs, format: Format) -> anyhow::Result<()> {
    let text = input::read_file(&a.signed, MAX_SIGNED_BYTES, "a signed manifest")?;
    let rt = runtime()?;
    let v = rt.block_on(client.post_json("/v1/workloads", text.into_bytes()))?;
    match format {
        Format::Json => output::json(&v)?,
        Format::Text => {
            println!(
                "{}/{} generation {} {} ({})",
                str_of(&v, "namespace"),
                str_of(&v, "name"),
                v["generation"],
                str_of(&v, "status"),
                str_of(&v, "content_id")
            );
        }
    }
    a.wait.run(&rt, client, &v, format)
}

pub fn delete(client: &Client, a: &DeleteArgs, format: Format) -> anyhow::Result<()> {
    let (namespace, name) = a
        .target
        .split_once('/')
        .with_context(|| format!("{:?}: expected NAMESPACE/NAME", a.target))?;
    let key = SecretKey::load(&a.key)?;
    let rt = runtime()?;
    let current = rt
        .block_on(client.get_json(&format!("/v1/workloads/{namespace}/{name}")))
        .with_context(|| format!("cannot look up {namespace}/{name}"))?;
    let generation = current["generation"]
        .as_u64()
        .context("the node's answer has no generation")?;
    let tombstone = format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nnamespace = \"{namespace}\"\nname = \"{name}\"\ngeneration = {}\ndeleted = true\n",
        generation + 1
    );
    let mut signed = SignedManifest::new(tombstone);
    signed.add_signature("tombstone", &key)?;
    let text = signed.to_toml();
    if let Some(out) = &a.out {
        input::write_atomically(out, text.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!(
            "tombstone for {namespace}/{name} generation {} written to {}",
            generation + 1,
            out.display()
        );
        return Ok(());
    }
    let v = rt.block_on(client.post_json("/v1/workloads", text.into_bytes()))?;
    match format {
        Format::Json => output::json(&v)?,
        Format::Text => {
            println!(
                "{namespace}/{name} deleted (generation {})",
                v["generation"]
            );
        }
    }
    a.wait.run(&rt, client, &v, format)
}
