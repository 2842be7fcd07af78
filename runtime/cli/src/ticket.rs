//! `beemesh ticket issue`.

use std::path::PathBuf;

use anyhow::Context;
use beemesh_manifest::SecretKey;
use beemesh_manifest::ticket::{Binding, Ticket, default_key_path};
use clap::Args;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The admission secret key (its public half is `[trust] admission` in host.toml).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Bind the ticket to one node's PeerId (`beemesh status` shows it). Without it, the
    /// ticket is a fleet ticket bound to a new ticket key pair: it admits any node that holds
    /// the ticket *and* its ticket secret key, written to `OUT.key`.
    #[arg(long, value_name = "PEER_ID")]
    peer: Option<String>,

    /// When the ticket stops admitting: an RFC 3339 time, or a duration from now such as
    /// `720h`. Default: never (prefer an expiry for fleet tickets).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_expiry)]
    expires: Option<Expiry>,

    /// Where to write the ticket (a new file; existing files are not overwritten). A fleet
    /// ticket's secret key goes to FILE.key (0600), which must not exist either.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum Expiry {
    At(OffsetDateTime),
    After(beemesh_manifest::Duration),
}

fn parse_expiry(s: &str) -> Result<Expiry, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(Expiry::At(t));
    }
    s.parse::<beemesh_manifest::Duration>()
        .map(Expiry::After)
        .map_err(|_| {
            format!(
                "{s:?} is neither an RFC 3339 time (2027-01-01T00:00:00Z) nor a duration (720h)"
            )
        })
}

fn check_peer_id(p: &str) -> anyhow::Result<()> {
    let base58 = |c: char| c.is_ascii_alphanumeric() && !matches!(c, '0' | 'O' | 'I' | 'l');
    if p.len() < 40 || p.len() > 128 || !p.chars().all(base58) {
        anyhow::bail!("--peer {p:?} is not a libp2p PeerId (base58, like 12D3KooW...)");
    }
    Ok(())
}

pub fn issue(a: &IssueArgs, format: Format) -> anyhow::Result<()> {
    if let Some(p) = &a.peer {
        check_peer_id(p)?;
    }
    let key = SecretKey::load(&a.key)?;
    let now = OffsetDateTime::now_utc();
    let expires = a.expires.map(|e| match e {
        Expiry::At(t) => t,
        Expiry::After(d) => {
            now + time::Duration::milliseconds(d.as_millis().min(i64::MAX as u64) as i64)
        }
    });
    if let Some(e) = expires
        && e <= now
    {
        anyhow::bail!("--expires is in the past; the ticket would admit nobody");
    }
    let key_file = default_key_path(&a.out);
    let (ticket, ticket_key) = match &a.peer {
        Some(p) => (
            Ticket::issue(&key, Binding::Peer(p.clone()), now, expires),
            None,
        ),
        None => {
            // Refuse before anything is written: the ticket and its key go together.
            for f in [&a.out, &key_file] {
                if f.exists() {
                    anyhow::bail!("{}: already exists; refusing to overwrite it", f.display());
                }
            }
            let (t, k) = Ticket::issue_fleet(&key, now, expires)?;
            (t, Some(k))
        }
    };
    if let Some(k) = &ticket_key {
        k.save_new(&key_file)?;
    }
    if let Err(e) = write_new(&a.out, ticket.to_toml().as_bytes()) {
        if ticket_key.is_some() {
            // The key was created by this call a moment ago; without its ticket it is useless.
            let _ = std::fs::remove_file(&key_file);
        }
        return Err(e);
    }
    let expires_text = ticket.expires.and_then(|e| e.format(&Rfc3339).ok());
    let key_written = ticket_key.as_ref().map(|_| &key_file);
    match format {
        Format::Text => {
            eprintln!(
                "{} ticket written to {} (admission key {}, {})",
                if ticket.is_fleet() { "fleet" } else { "peer" },
                a.out.display(),
                ticket.key,
                expires_text
                    .as_deref()
                    .map_or("never expires".to_owned(), |e| format!("expires {e}")),
            );
            if let Some(f) = key_written {
                eprintln!(
                    "its ticket secret key written to {} (0600): install it beside the ticket; \
                     the ticket alone admits nobody",
                    f.display()
                );
            }
        }
        Format::Json => output::json(&json!({
            "file": a.out,
            "fleet": ticket.is_fleet(),
            "peer": ticket.peer,
            "key_file": key_written,
            "ticket_key": ticket.holder.map(|k| k.to_string()),
            "admission_key": ticket.key.to_string(),
            "expires": expires_text,
        }))?,
    }
    Ok(())
}

/// A fleet ticket admits whoever holds it: created 0600, atomically, never over another file.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    match beemesh_manifest::input::write_new_atomically(path, bytes, 0o600) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            anyhow::bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            )
        }
        r => r.with_context(|| format!("cannot create {}", path.display())),
    }
}
