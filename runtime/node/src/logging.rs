//! Logging: to journald when the host runs it (`/run/systemd/journal/socket` exists), else to
//! stderr. The filter comes from `BEEMESH_LOG` (or `RUST_LOG`), default `info`.

use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where logs went, for the start-up message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// Installs the global subscriber with `info` as the default level. Safe to call more than
/// once (later calls do nothing), so in-process tests that start several nodes can call it.
pub fn init() -> LogTarget {
    init_with_default("info")
}

/// Like [`init`], with another default level (`beemesh dev` keeps the terminal for its
/// instructions and logs only warnings unless `BEEMESH_LOG` says otherwise).
pub fn init_with_default(level: &str) -> LogTarget {
    let filter = std::env::var("BEEMESH_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    if Path::new(JOURNAL_SOCKET).exists()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry
            .with(journald.with_syslog_identifier("beemesh".into()))
            .try_init();
        return LogTarget::Journald;
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
    LogTarget::Stderr
}
