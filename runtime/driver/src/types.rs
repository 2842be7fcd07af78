//! The vocabulary shared by every driver: which replica, what it should run, what is running.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use beemesh_manifest::Manifest;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::DriverError;

/// One replica of a workload: `namespace/name#index`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaId {
    pub namespace: String,
    pub name: String,
    pub index: u32,
}

impl ReplicaId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, index: u32) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            index,
        }
    }

    /// The name drivers give the replica's objects (Podman pod, state directory):
    /// `bm_<namespace>_<name>_<index>`. Namespaces and names are DNS labels, which never
    /// contain `_`, so distinct replicas never share an object name.
    pub fn object_name(&self) -> String {
        format!("bm_{}_{}_{}", self.namespace, self.name, self.index)
    }

    /// Checks that the id can name host objects safely (DNS labels, as manifests guarantee).
    pub fn validate(&self) -> Result<(), DriverError> {
        for (what, v) in [("namespace", &self.namespace), ("name", &self.name)] {
            beemesh_manifest::names::check_dns_label(v).map_err(|reason| {
                DriverError::InvalidSpec {
                    replica: self.to_string(),
                    reason: format!("{what}: {reason}"),
                }
            })?;
        }
        Ok(())
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.namespace, self.name, self.index)
    }
}

/// What the node wants running: one replica of a verified manifest.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub id: ReplicaId,
    /// The manifest's content id (`sha256:HEX`); a running replica with another content id
    /// is replaced.
    pub content_id: String,
    /// The node's name, recorded on the replica's objects.
    pub node: String,
    pub manifest: Arc<Manifest>,
    /// Environment the node adds to every container (e.g. `BEEMESH_STATE_URL`,
    /// `BEEMESH_SERVICE_<NAME>`); the manifest's `env` wins on a clash. Applied when a
    /// container is created: changing it alone does not replace a running replica.
    pub env: BTreeMap<String, String>,
    /// The replica's channel to its node, where the driver can give one inside the replica's
    /// own network namespace (Podman: one more container in the pod). `None`: none.
    pub sidecar: Option<Sidecar>,
}

/// A `beemesh sidecar` container in the replica's pod: it listens on `127.0.0.1:port` inside
/// the pod's network namespace (which only the replica's containers share) and relays to the
/// node's per-replica Unix socket, which the node creates in `socket_dir`. Only the sidecar
/// container sees `socket_dir` (bind-mounted at [`SIDECAR_SOCKET_DIR`]); the socket is the
/// identity: the node knows which replica each of its sockets belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// A root file system holding the sidecar's program (the node assembles it once).
    pub rootfs: PathBuf,
    /// The program and its arguments, inside `rootfs`.
    pub command: Vec<String>,
    /// Host directory for the replica's socket, bind-mounted into the sidecar only.
    pub socket_dir: PathBuf,
    /// The port the sidecar listens on, on 127.0.0.1 inside the pod.
    pub port: u16,
}

/// Where the sidecar container sees the replica's socket directory.
pub const SIDECAR_SOCKET_DIR: &str = "/run/beemesh";
/// The name of the sidecar among a replica's containers (not a valid manifest container name:
/// it has a dot, so a manifest can never declare it).
pub const SIDECAR_CONTAINER: &str = "beemesh.sidecar";

impl ReplicaSpec {
    /// A spec for replica `index` of `manifest`.
    pub fn new(
        manifest: Arc<Manifest>,
        index: u32,
        content_id: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        Self {
            id: ReplicaId::new(manifest.namespace.clone(), manifest.name.clone(), index),
            content_id: content_id.into(),
            node: node.into(),
            manifest,
            env: BTreeMap::new(),
            sidecar: None,
        }
    }

    /// Checks what drivers rely on before touching the host: a valid id that matches the
    /// manifest, label-safe content id and node name, and at least one container.
    pub fn validate(&self) -> Result<(), DriverError> {
        self.id.validate()?;
        let bad = |reason: String| DriverError::InvalidSpec {
            replica: self.id.to_string(),
            reason,
        };
        if self.id.namespace != self.manifest.namespace || self.id.name != self.manifest.name {
            return Err(bad(format!(
                "replica id names {}/{} but the manifest is {}",
                self.id.namespace,
                self.id.name,
                self.manifest.id()
            )));
        }
        crate::labels::check_label_value("content id", &self.content_id).map_err(bad)?;
        crate::labels::check_label_value("node", &self.node).map_err(bad)?;
        if self.manifest.deleted {
            return Err(bad("the manifest is a tombstone (deleted = true)".into()));
        }
        if self.manifest.containers.is_empty() {
            return Err(bad("the manifest has no [[container]]".into()));
        }
        Ok(())
    }
}

/// A replica's state, as DESIGN.md section 7 names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ReplicaState {
    /// Known but not started (e.g. waiting for an image or a restart back-off).
    Pending,
    /// Started; a readiness probe has not passed yet.
    Starting,
    /// Every container runs (and is ready, where a readiness probe is declared).
    Running,
    /// Cannot run as specified; `reason` says why in words an operator can act on.
    Failed { reason: String },
}

impl ReplicaState {
    pub fn is_running(&self) -> bool {
        matches!(self, ReplicaState::Running)
    }
    /// The lowercase name used in JSON (`pending`, `starting`, `running`, `failed`).
    pub fn name(&self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Starting => "starting",
            ReplicaState::Running => "running",
            ReplicaState::Failed { .. } => "failed",
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaState::Failed { reason } => write!(f, "failed: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}

/// What `ensure` did to reach the returned status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnsureAction {
    /// Nothing existed; the replica was created and started.
    Created,
    /// A matching replica was already running (e.g. after a daemon restart) and was taken over.
    Adopted,
    /// The replica was already running under this driver instance.
    Unchanged,
    /// One or more dead containers were started again.
    Restarted,
    /// A replica with another content id (or a broken one) was removed and created anew.
    Replaced,
    /// Nothing was done: the replica is failed or waiting out a back-off.
    None,
}

/// A container's state as the driver observes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Exited {
        code: Option<i32>,
    },
    /// Declared by the manifest but not present.
    Missing,
    Other {
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// The manifest's container name.
    pub name: String,
    pub state: ContainerState,
    /// Podman container id, absent for the process driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Host pid of the container's main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// A declared port and where it can be reached from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    pub name: String,
    pub container_port: u16,
    pub host_ip: String,
    pub host_port: u16,
    pub protocol: String,
}

/// The result of `ensure` (and of `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    pub content_id: String,
    #[serde(flatten)]
    pub state: ReplicaState,
    pub action: EnsureAction,
    pub containers: Vec<ContainerStatus>,
    pub ports: Vec<PortBinding>,
    /// Restarts of dead containers by this driver instance.
    pub restarts: u32,
    /// Confinement or limits the manifest asks for that this host cannot enforce.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_enforced: Vec<String>,
}

impl ReplicaStatus {
    /// The host port forwarded to a container port, if any.
    pub fn host_port(&self, container_port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.container_port == container_port)
            .map(|p| p.host_port)
    }
}

/// A replica found on the host by its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: ReplicaId,
    pub content_id: String,
    pub node: String,
    #[serde(flatten)]
    pub state: ReplicaState,
    pub containers: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOptions {
    /// Only the last `tail` lines (of each container); all when `None`.
    pub tail: Option<usize>,
    /// Keep the stream open and yield lines as they are written.
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    Stdout,
    Stderr,
    /// stdout and stderr written to one file in order (the process driver).
    Output,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub container: String,
    pub source: LogSource,
    /// One line without its newline; invalid UTF-8 is replaced.
    pub line: String,
}

pub type LogStream = BoxStream<'static, Result<LogLine, DriverError>>;

/// Resource use of a replica, read from `/proc` (works rootless and on every cgroup
/// version). CPU time is cumulative: divide the difference of two samples by the interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_time_ms: u64,
    pub memory_rss_bytes: u64,
    pub processes: u32,
    pub containers: Vec<ContainerUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerUsage {
    pub name: String,
    pub cpu_time_ms: u64,
    pub memory_rss_bytes: u64,
    pub processes: u32,
}

/// One round of a replica's declared probes. The node counts consecutive failures against
/// the manifest's `failures` and restarts (liveness) or withholds traffic (readiness).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub id: ReplicaId,
    pub containers: Vec<ContainerHealth>,
}

impl HealthReport {
    /// True when no declared liveness probe failed.
    pub fn alive(&self) -> bool {
        self.containers
            .iter()
            .all(|c| !matches!(c.liveness, ProbeOutcome::Failed { .. }))
    }
    /// True when no declared readiness probe failed.
    pub fn ready(&self) -> bool {
        self.containers
            .iter()
            .all(|c| !matches!(c.readiness, ProbeOutcome::Failed { .. }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerHealth {
    pub name: String,
    pub liveness: ProbeOutcome,
    pub readiness: ProbeOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ProbeOutcome {
    NotConfigured,
    Passed { detail: String },
    Failed { detail: String },
}

impl ProbeOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, ProbeOutcome::Passed { .. })
    }
}

/// How far a driver enforces one control on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    Enforced,
    /// Enforced by a weaker mechanism; `detail` says which and what it misses.
    Partial,
    NotEnforced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// e.g. `memory-limit`, `cpu-limit`, `read-only-root`, `landlock`.
    pub control: String,
    pub enforcement: Enforcement,
    pub detail: String,
}

/// What a driver enforces on this host and what it cannot (shown by `beemesh status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverReport {
    pub driver: String,
    /// e.g. the Podman version and cgroup setup.
    pub runtime: String,
    pub controls: Vec<Control>,
}

impl DriverReport {
    pub fn control(&self, name: &str) -> Option<&Control> {
        self.controls.iter().find(|c| c.control == name)
    }
}

/// Restart and retry back-off: the first restart of a dead container is immediate, the next
/// ones wait `initial`, doubling up to `max`; a replica that stayed up for `reset_after` starts
/// again from zero. Failed image pulls and creates back off the same way, so a broken
/// manifest is retried slowly instead of in a crash loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl BackoffPolicy {
    /// The wait before attempt number `attempt` (0-based; attempt 0 waits nothing).
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_cannot_collide() {
        let a = ReplicaId::new("a-b", "c", 1).object_name();
        let b = ReplicaId::new("a", "b-c", 1).object_name();
        assert_ne!(a, b);
        assert_eq!(a, "bm_a-b_c_1");
    }

    #[test]
    fn invalid_ids_are_refused() {
        let err = ReplicaId::new("Default", "web", 0)
            .validate()
            .expect_err("must fail");
        assert!(err.to_string().contains("namespace"), "{err}");
        assert!(ReplicaId::new("default", "web_1", 0).validate().is_err());
        assert!(ReplicaId::new("default", "web", 0).validate().is_ok());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(60),
        };
        let d: Vec<u64> = (0..7).map(|a| p.delay(a).as_secs()).collect();
        assert_eq!(d, [0, 1, 2, 4, 8, 10, 10]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn state_serialises_with_design_names() {
        let s =
            serde_json::to_value(ReplicaState::Failed { reason: "x".into() }).unwrap_or_default();
        assert_eq!(s["state"], "failed");
        assert_eq!(s["reason"], "x");
        assert_eq!(ReplicaState::Running.name(), "running");
    }
}
