//! `beemesh logs NS/NAME`: a replica's output, from whichever node runs it, through the one
//! node API the CLI talks to (`GET /v1/workloads/{ns}/{name}/logs`, JSON lines).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

use crate::client::Client;
use crate::output::Format;

/// Most lines `--tail` may ask for (the node's limit).
const MAX_TAIL: u64 = 10_000;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The workload, as NAMESPACE/NAME.
    #[arg(value_name = "NS/NAME", value_parser = parse_target)]
    target: (String, String),

    /// The replica's index (default: the lowest one that is running).
    #[arg(long, value_name = "N")]
    replica: Option<u32>,

    /// Only the last N lines of each container (default and most: 10000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=MAX_TAIL))]
    tail: Option<u64>,

    /// Keep streaming new lines until the replica stops (Ctrl-C ends it).
    #[arg(short = 'f', long)]
    follow: bool,
}

/// `NAMESPACE/NAME`, both DNS labels.
pub fn parse_target(s: &str) -> Result<(String, String), String> {
    let (ns, name) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME, e.g. default/hello"))?;
    for (what, v) in [("namespace", ns), ("name", name)] {
        beemesh_manifest::names::check_dns_label(v).map_err(|e| format!("{what} {v:?}: {e}"))?;
    }
    Ok((ns.to_owned(), name.to_owned()))
}

/// The API path for these arguments.
fn path(a: &LogsArgs) -> String {
    let (ns, name) = &a.target;
    let mut p = format!("/v1/workloads/{ns}/{name}/logs?format=json");
    if let Some(r) = a.replica {
        p.push_str(&format!("&replica={r}"));
    }
    if let Some(t) = a.tail {
        p.push_str(&format!("&tail={t}"));
    }
    if a.follow {
        p.push_str("&follow=true");
    }
    p
}

pub fn logs(client: &Client, a: &LogsArgs, format: Format) -> anyhow::Result<()> {
    let rt = crate::remote::runtime()?;
    // Without --follow the answer must keep coming; with it, silence is normal.
    let idle = (!a.follow).then_some(Duration::from_secs(60));
    let mut stdout = std::io::stdout().lock();
    let mut failure = None;
    rt.block_on(client.get_lines(&path(a), idle, |raw| {
        let v: Value = serde_json::from_slice(raw).with_context(|| {
            format!(
                "the node sent a log record that is not JSON: {}",
                String::from_utf8_lossy(raw)
            )
        })?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            failure = Some(e.to_owned());
            return Ok(false);
        }
        if let Some(n) = v.get("note").and_then(Value::as_str) {
            eprintln!("beemesh: note: {n}");
            return Ok(true);
        }
        let written = match format {
            Format::Json => serde_json::to_writer(&mut stdout, &v)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(stdout)),
            Format::Text => writeln!(
                stdout,
                "{} | {}",
                v["container"].as_str().unwrap_or("?"),
                v["line"].as_str().unwrap_or("")
            ),
        };
        match written {
            Ok(()) => Ok(true),
            // `beemesh logs ... | head`: the reader has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).context("writing to stdout"),
        }
    }))?;
    if let Some(e) = failure {
        bail!("the log stream broke off: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_namespace_and_name() {
        assert_eq!(
            parse_target("default/hello"),
            Ok(("default".to_owned(), "hello".to_owned()))
        );
        assert!(parse_target("hello").is_err());
        assert!(parse_target("Default/hello").is_err());
        assert!(parse_target("default/").is_err());
    }

    #[test]
    fn the_path_carries_every_option() {
        let a = LogsArgs {
            target: ("default".into(), "hello".into()),
            replica: Some(2),
            tail: Some(5),
            follow: true,
        };
        assert_eq!(
            path(&a),
            "/v1/workloads/default/hello/logs?format=json&replica=2&tail=5&follow=true"
        );
    }
}
