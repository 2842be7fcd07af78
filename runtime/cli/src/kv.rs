//! `beemesh kv get|put|del|ls NS/NAME ...`: a workload's state, for operators, through the
//! node API (`POST /v1/kv`). Each request is signed with the operator's key and names the node
//! that is to carry it out: a host of one of the workload's replicas, picked from the
//! placements (this node first when it is one); the node the CLI talks to forwards it there.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine as _;
use beemesh_manifest::SecretKey;
use beemesh_manifest::operator::{
    KvOp, KvRequest, MAX_LIST_LIMIT, MAX_VALUE_BYTES, SignedKvRequest,
};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use crate::client::Client;
use crate::output::{self, Format};

/// Shown after `beemesh kv --help`.
pub const EXAMPLES: &str = "Examples:
  beemesh kv put default/ledger greeting hello --key operator.key
  printf 42 | beemesh kv put default/ledger counter - --if-revision 7 --key operator.key
  beemesh kv get default/ledger greeting --key operator.key
  beemesh kv ls default/ledger --prefix user/ --key operator.key -o json
  beemesh kv del default/ledger greeting --key operator.key";

/// Hosts tried, in turn, when one cannot be reached or holds no store of the workload.
const TRIES: usize = 3;

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value: exactly its bytes (-o json: with its revision and the node that
    /// answered). A key that is absent is an error.
    Get(GetArgs),
    /// Write a key's value.
    Put(PutArgs),
    /// Delete a key (absent is fine, unless --if-revision says otherwise).
    #[command(visible_alias = "delete")]
    Del(DelArgs),
    /// List keys in key order, with their revisions and values.
    #[command(visible_alias = "list")]
    Ls(LsArgs),
}

#[derive(Debug, Args)]
pub struct Common {
    /// The workload, as NAMESPACE/NAME.
    #[arg(value_name = "NS/NAME", value_parser = crate::logs::parse_target)]
    target: (String, String),

    /// The operator's secret key file. It signs the request, which the nodes accept if the key
    /// is one of their [trust] signers, within 5 minutes of its time, once (`beemesh kv
    /// --help`).
    #[arg(long = "key", value_name = "FILE")]
    key_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    common: Common,
    /// The key.
    #[arg(value_name = "KEY")]
    key: String,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    common: Common,
    /// The key: UTF-8, 1 to 512 bytes, no control characters.
    #[arg(value_name = "KEY")]
    key: String,
    /// The value, as given (at most 64 KiB); `-` reads it from standard input.
    #[arg(value_name = "VALUE", allow_hyphen_values = true)]
    value: OsString,
    /// Write only if the key is at this revision (0: only if it is absent). Strong workloads
    /// only: an eventual workload refuses conditional writes.
    #[arg(long, value_name = "N")]
    if_revision: Option<u64>,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    #[command(flatten)]
    common: Common,
    /// The key.
    #[arg(value_name = "KEY")]
    key: String,
    /// Delete only if the key is at this revision. Strong workloads only.
    #[arg(long, value_name = "N")]
    if_revision: Option<u64>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    common: Common,
    /// Only keys that start with this.
    #[arg(long, value_name = "P", default_value = "")]
    prefix: String,
    /// Only keys after this one (where the previous page ended).
    #[arg(long, value_name = "KEY")]
    after: Option<String>,
    /// At most this many keys (1 to 1000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_LIST_LIMIT))
    )]
    limit: u32,
}

impl KvCommand {
    fn common(&self) -> &Common {
        match self {
            KvCommand::Get(a) => &a.common,
            KvCommand::Put(a) => &a.common,
            KvCommand::Del(a) => &a.common,
            KvCommand::Ls(a) => &a.common,
        }
    }

    /// The operation, reading a value from standard input for `put ... -`.
    fn op(&self) -> anyhow::Result<KvOp> {
        Ok(match self {
            KvCommand::Get(a) => KvOp::Get { key: a.key.clone() },
            KvCommand::Put(a) => KvOp::Put {
                key: a.key.clone(),
                value: value_of(&a.value)?,
                if_revision: a.if_revision,
            },
            KvCommand::Del(a) => KvOp::Delete {
                key: a.key.clone(),
                if_revision: a.if_revision,
            },
            KvCommand::Ls(a) => KvOp::List {
                prefix: a.prefix.clone(),
                after: a.after.clone(),
                limit: Some(a.limit),
            },
        })
    }
}

/// VALUE's bytes: the argument itself, or standard input for `-`.
fn value_of(arg: &OsString) -> anyhow::Result<Vec<u8>> {
    let value = if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .take(MAX_VALUE_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .context("cannot read the value from standard input")?;
        if buf.len() > MAX_VALUE_BYTES {
            bail!(
                "the value on standard input is more than {MAX_VALUE_BYTES} bytes, the limit of a value; \
                 store large data elsewhere and keep a reference in the key"
            );
        }
        buf
    } else {
        arg.clone().into_vec()
    };
    if value.len() > MAX_VALUE_BYTES {
        bail!(
            "the value is {} bytes; the limit of a value is {MAX_VALUE_BYTES}",
            value.len()
        );
    }
    Ok(value)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(client: &Client, cmd: &KvCommand, format: Format) -> anyhow::Result<()> {
    let common = cmd.common();
    let op = cmd.op()?;
    let secret = SecretKey::load(&common.key_file).with_context(|| {
        format!(
            "cannot use {} as the operator key (--key): it must be an operator's secret key file, as `beemesh key gen` writes",
            common.key_file.display()
        )
    })?;
    let (ns, name) = &common.target;
    let rt = crate::remote::runtime()?;
    let answer = rt.block_on(send(client, ns, name, &op, &secret))?;
    print(&op, ns, name, &answer, format)
}

/// The nodes that host the workload's store, best first: running replicas before the others,
/// this node first among equals, then by replica index. At most [`TRIES`].
async fn hosts(
    client: &Client,
    ns: &str,
    name: &str,
    local: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let w = client
        .get_json(&format!("/v1/workloads/{ns}/{name}"))
        .await
        .with_context(|| format!("cannot look up {ns}/{name}"))?;
    if w["deleted"] == Value::Bool(true) {
        bail!(
            "{ns}/{name} was deleted (generation {}); its state went with it",
            w["generation"]
        );
    }
    let mut placed: Vec<(u8, bool, u64, String, String)> = w["placements"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let rank = match p["state"].as_str()? {
                "running" => 0,
                "starting" => 1,
                "pending" => 2,
                _ => return None,
            };
            let peer = p["peer_id"].as_str()?.to_owned();
            let node = p["node"].as_str().unwrap_or(&peer).to_owned();
            Some((rank, peer != local, p["index"].as_u64()?, peer, node))
        })
        .collect();
    placed.sort();
    let mut out: Vec<(String, String)> = Vec::new();
    for (_, _, _, peer, node) in placed {
        if out.len() < TRIES && !out.iter().any(|(p, _)| *p == peer) {
            out.push((peer, node));
        }
    }
    if out.is_empty() {
        bail!(
            "no replica of {ns}/{name} is placed yet: its state lives on the nodes that run its replicas; \
             wait until one runs (`beemesh get workloads`)"
        );
    }
    Ok(out)
}

/// Signs the request for each host in turn and sends it, until one answers (or refuses for
/// a reason another host would share).
async fn send(
    client: &Client,
    ns: &str,
    name: &str,
    op: &KvOp,
    secret: &SecretKey,
) -> anyhow::Result<Value> {
    let status = client.get_json("/v1/status").await?;
    let local = status["peer_id"]
        .as_str()
        .context("the node's status names no peer id")?
        .to_owned();
    let hosts = hosts(client, ns, name, &local).await?;
    let last = hosts.len() - 1;
    for (i, (peer, node)) in hosts.iter().enumerate() {
        let request = KvRequest::new(ns, name, peer, op.clone(), unix_now())?;
        let body = SignedKvRequest::sign(&request, secret).to_json();
        let (code, bytes) = client
            .send(Method::POST, "/v1/kv", Some(body.into_bytes()))
            .await?;
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("node API answered {code} with a body that is not JSON"))?;
        if code.is_success() {
            return Ok(v);
        }
        let reason = v["reason"].as_str().unwrap_or("");
        let message = v["error"].as_str().unwrap_or("no reason given");
        // Another host may do: it certainly did not run here (or it was only a read).
        let next = matches!(reason, "unreachable" | "no_store" | "busy")
            || (!op.writes() && matches!(reason, "no_answer" | "unavailable"));
        if next && i < last {
            eprintln!("beemesh: note: {node}: {message}; trying the next host");
            continue;
        }
        if reason == "not_found" {
            bail!("{message}");
        }
        bail!("node refused ({code}): {message}");
    }
    bail!("no host of {ns}/{name} answered")
}

/// A value's bytes from an answer: `value` (UTF-8) or `value_base64`.
fn value_bytes(v: &Value) -> anyhow::Result<Vec<u8>> {
    if let Some(text) = v["value"].as_str() {
        return Ok(text.as_bytes().to_vec());
    }
    let encoded = v["value_base64"]
        .as_str()
        .context("the node's answer holds no value")?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .context("the node's answer holds a value that is not base64")
}

/// A value for a table: text up to 60 characters, control characters escaped.
fn shown(v: &Value) -> String {
    match v["value"].as_str() {
        Some(text) => {
            let mut s: String = text.chars().flat_map(char::escape_debug).collect();
            if s.chars().count() > 60 {
                s = s.chars().take(59).collect::<String>() + "…";
            }
            s
        }
        None => {
            let n = value_bytes(v).map_or(0, |b| b.len());
            format!("({n} bytes, not UTF-8)")
        }
    }
}

fn print(op: &KvOp, ns: &str, name: &str, v: &Value, format: Format) -> anyhow::Result<()> {
    let node = v["node_name"].as_str().unwrap_or("?");
    if format == Format::Json {
        output::json(v)?;
    } else {
        match op {
            KvOp::Get { .. } => {
                let value = value_bytes(v)?;
                let mut out = std::io::stdout().lock();
                out.write_all(&value)?;
                if out.is_terminal() && !value.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
                out.flush()?;
            }
            KvOp::Put { key, .. } => println!(
                "{ns}/{name}: {key:?} written at revision {} (node {node})",
                v["revision"]
            ),
            KvOp::Delete { key, .. } => println!(
                "{ns}/{name}: {key:?} deleted at revision {} (node {node})",
                v["revision"]
            ),
            KvOp::List { .. } => {
                let items = v["items"].as_array().cloned().unwrap_or_default();
                let width = items
                    .iter()
                    .filter_map(|i| i["key"].as_str())
                    .map(|k| k.chars().count())
                    .max()
                    .unwrap_or(0)
                    .clamp(3, 40);
                println!("{:<width$} {:>20} VALUE", "KEY", "REVISION");
                for i in &items {
                    println!(
                        "{:<width$} {:>20} {}",
                        i["key"].as_str().unwrap_or(""),
                        i["revision"],
                        shown(i)
                    );
                }
            }
        }
    }
    if let (KvOp::List { .. }, Some(next)) = (op, v["next"].as_str()) {
        eprintln!("beemesh: note: more keys follow; continue with --after {next:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_as_sent() {
        let text = serde_json::json!({ "value": "héllo\n" });
        assert_eq!(value_bytes(&text).expect("value"), "héllo\n".as_bytes());
        let bin = serde_json::json!({ "value_base64": "/wA=" });
        assert_eq!(value_bytes(&bin).expect("value"), vec![0xff, 0]);
        assert!(value_bytes(&serde_json::json!({})).is_err());
        assert_eq!(shown(&bin), "(2 bytes, not UTF-8)");
        assert_eq!(shown(&text), "héllo\\n");
        let long = serde_json::json!({ "value": "x".repeat(100) });
        assert_eq!(shown(&long).chars().count(), 60);
    }

    #[test]
    fn a_value_of_more_than_64_kib_is_refused_before_anything_is_sent() {
        let ok = OsString::from("x".repeat(MAX_VALUE_BYTES));
        assert_eq!(value_of(&ok).expect("fits").len(), MAX_VALUE_BYTES);
        let big = OsString::from("x".repeat(MAX_VALUE_BYTES + 1));
        let e = value_of(&big).expect_err("too large");
        assert!(e.to_string().contains("limit of a value"), "{e}");
        // Not UTF-8 is fine: a value is bytes.
        let bytes = OsString::from_vec(vec![0xff, b'a']);
        assert_eq!(value_of(&bytes).expect("bytes"), vec![0xff, b'a']);
    }
}
