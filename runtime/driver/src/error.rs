//! Driver errors. Each names the object and the value at fault.
//!
//! A replica that cannot run as specified (missing image, create refused, crash loop) is not
//! an error: `ensure` returns it as `ReplicaState::Failed` with the reason. These errors are
//! for the driver itself failing (runtime unreachable, host I/O, a spec no driver accepts).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot reach the Podman API at {}: {message}", socket.display())]
    Unreachable { socket: PathBuf, message: String },

    #[error("Podman API {call} for {target} failed: {message}")]
    Podman {
        call: &'static str,
        target: String,
        message: String,
    },

    #[error("replica {replica}: {reason}")]
    InvalidSpec { replica: String, reason: String },

    #[error("replica {0} does not exist on this host")]
    NotFound(String),

    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot start {command:?} for replica {replica}: {source}")]
    Spawn {
        replica: String,
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot confine replica {replica}: {reason}")]
    Confinement { replica: String, reason: String },

    #[error("process driver: {0}")]
    Isolation(#[from] crate::process::isolation::IsolationError),

    #[error("state file {} is unreadable: {reason}", path.display())]
    CorruptState { path: PathBuf, reason: String },

    #[error("label {key}={value:?} on {object} is invalid: {reason}")]
    BadLabel {
        object: String,
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl DriverError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DriverError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
