//! The Podman driver: one Podman pod per replica on the rootless Podman API socket of the
//! user the daemon runs as.
//!
//! - The pod's infra container holds the replica's network namespace, created by
//!   slirp4netns, with a port forward (on the publish address, loopback by default) for
//!   every declared port. All of the replica's containers join it.
//! - Every container: read-only root (unless the manifest says otherwise), no_new_privileges,
//!   all capabilities dropped except the ones the manifest names, the manifest's command,
//!   args, env and limits, catatonit as PID 1.
//! - Pods and containers carry the replica's labels; a new driver instance finds and adopts
//!   them, and `list` reports them.
//! - Restarts are done by `ensure` (the node calls it periodically), not by a Podman restart
//!   policy: the driver sees every restart, applies back-off and reports it.
//!
//! Limits: where Podman can use cgroups (rootful, or rootless on cgroup v2 with delegated
//! controllers) memory and CPU limits go into the container spec. Rootless Podman on a
//! cgroup v1 host ignores resource limits altogether; there the driver applies the memory
//! limit as RLIMIT_DATA to the container's processes right after start (see
//! docs/drivers.md for what that misses) and reports CPU as not enforced.

mod raw;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use beemesh_manifest::host::RuntimeSection;
use beemesh_manifest::workload::{Container, Health};
use futures_util::StreamExt;
use podman_api::Podman;
use podman_api::conn::TtyChunk;
use podman_api::models::{ListContainer, Namespace};
use podman_api::opts::{
    ContainerListFilter, ContainerListOpts, ContainerLogsOpts, ExecCreateOpts, PodCreateOpts,
    PullOpts, VolumeCreateOpts, VolumeListFilter, VolumeListOpts,
};
use tokio::sync::mpsc;

use crate::driver::ContainerDriver;
use crate::error::DriverError;
use crate::labels::{self, ReplicaLabels};
use crate::procfs;
use crate::tracker::{Tracker, human};
use crate::types::{
    BackoffPolicy, ContainerHealth, ContainerState, ContainerStatus, Control, DriverReport,
    Enforcement, EnsureAction, HealthReport, LogLine, LogOptions, LogSource, LogStream,
    PortBinding, ProbeOutcome, ReplicaId, ReplicaInfo, ReplicaSpec, ReplicaState, ReplicaStatus,
    SIDECAR_CONTAINER, Usage,
};
use spec::{CgroupLimits, ContainerDefaults};

/// How the Podman driver talks to Podman and shapes containers.
#[derive(Debug, Clone)]
pub struct PodmanConfig {
    /// The Podman API socket (`podman system service`).
    pub socket: PathBuf,
    /// Address port forwards listen on. Loopback by default: workload traffic enters
    /// through the node's proxy, which enforces `policy.allow_from`.
    pub publish_address: IpAddr,
    /// Grace period between SIGTERM and SIGKILL when a replica is stopped.
    pub stop_timeout: Duration,
    /// catatonit as PID 1 in every container.
    pub init: bool,
    pub backoff: BackoffPolicy,
    /// Bound on every API call except image pulls.
    pub api_timeout: Duration,
    pub pull_timeout: Duration,
}

impl PodmanConfig {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            publish_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            stop_timeout: Duration::from_secs(10),
            init: true,
            backoff: BackoffPolicy::default(),
            api_timeout: Duration::from_secs(60),
            pull_timeout: Duration::from_secs(600),
        }
    }

    /// From the host config's `[runtime]` section (socket defaulting to the daemon user's
    /// rootless socket).
    pub fn from_host(runtime: &RuntimeSection) -> Self {
        Self::new(runtime.podman_socket.clone().unwrap_or_else(default_socket))
    }
}

/// The rootless Podman socket of the current user: `$XDG_RUNTIME_DIR/podman/podman.sock`,
/// or `/run/user/UID/podman/podman.sock`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("podman/podman.sock"),
        _ => PathBuf::from(format!(
            "/run/user/{}/podman/podman.sock",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// What Podman told us about the host at connect time.
#[derive(Debug, Clone)]
struct HostFacts {
    version: String,
    oci_runtime: String,
    cgroup_version: String,
    rootless: bool,
    limits: CgroupLimits,
}

pub struct PodmanDriver {
    podman: Podman,
    config: PodmanConfig,
    host: HostFacts,
    tracker: Tracker,
}

/// A replica as found on the host.
#[derive(Debug)]
struct Observed {
    labels: Option<ReplicaLabels>,
    infra: Option<ListContainer>,
    /// (manifest container name, container), from the `io.beemesh.container` label.
    members: Vec<(String, ListContainer)>,
}

impl Observed {
    fn member(&self, name: &str) -> Option<&ListContainer> {
        self.members.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Why the replica cannot be repaired in place, if it cannot: its network namespace is
    /// gone, or its containers are not exactly the manifest's.
    fn broken(&self, spec: &ReplicaSpec) -> Option<String> {
        match &self.infra {
            None => return Some("its pod has no infra container".into()),
            Some(i) if !is_running(i) => {
                return Some(format!(
                    "its infra container (network namespace) is {}",
                    i.state.as_deref().unwrap_or("unknown")
                ));
            }
            Some(_) => {}
        }
        let sidecar = spec.sidecar.is_some().then_some(SIDECAR_CONTAINER);
        let wanted = spec
            .manifest
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .chain(sidecar);
        for name in wanted.clone() {
            match self.members.iter().filter(|(n, _)| n == name).count() {
                1 => {}
                0 => return Some(format!("container {name:?} is missing")),
                n => return Some(format!("container {name:?} exists {n} times")),
            }
        }
        if let Some((n, _)) = self
            .members
            .iter()
            .find(|(n, _)| !wanted.clone().any(|w| w == n))
        {
            return Some(format!(
                "it has a container {n:?} the manifest does not declare"
            ));
        }
        None
    }
}

fn is_running(c: &ListContainer) -> bool {
    c.state.as_deref() == Some("running")
}

fn container_state(c: &ListContainer) -> ContainerState {
    match c.state.as_deref() {
        Some("running") => ContainerState::Running,
        Some("created") | Some("configured") | Some("initialized") => ContainerState::Created,
        Some("exited") | Some("stopped") => ContainerState::Exited { code: c.exit_code },
        other => ContainerState::Other {
            detail: other.unwrap_or("unknown").to_owned(),
        },
    }
}

fn pid_of(c: &ListContainer) -> Option<u32> {
    c.pid.and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0)
}

fn is_not_found(e: &podman_api::Error) -> bool {
    matches!(e, podman_api::Error::Fault { code, .. } if code.as_u16() == 404)
}

/// The message of a Podman error without podman-api's "error 500 - " decoration.
fn podman_message(e: &podman_api::Error) -> String {
    match e {
        podman_api::Error::Fault { message, .. } => message.trim().to_owned(),
        other => other.to_string(),
    }
}

impl PodmanDriver {
    /// Connects to the Podman API and learns what the host can enforce.
    pub async fn connect(config: PodmanConfig) -> Result<Self, DriverError> {
        let unreachable = |message: String| DriverError::Unreachable {
            socket: config.socket.clone(),
            message,
        };
        if !config.socket.exists() {
            return Err(unreachable(
                "no such socket; start the API service as the daemon's user with `podman system service --time=0`"
                    .into(),
            ));
        }
        let podman = Podman::unix(&config.socket);
        let info = tokio::time::timeout(config.api_timeout, podman.info())
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", config.api_timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        let host = info
            .host
            .ok_or_else(|| unreachable("`podman info` has no host section".into()))?;
        let cgroup_version = host.cgroup_version.clone().unwrap_or_default();
        let controllers = host.cgroup_controllers.clone().unwrap_or_default();
        let rootless = host
            .security
            .as_ref()
            .and_then(|s| s.rootless)
            .unwrap_or(true);
        let v2 = cgroup_version == "v2";
        let has = |c: &str| controllers.iter().any(|x| x == c);
        // Rootful Podman limits through cgroups on v1 and v2; rootless only on v2, and only
        // with the controllers delegated to the user.
        let limits = CgroupLimits {
            memory: !rootless || (v2 && has("memory")),
            cpu: !rootless || (v2 && has("cpu")),
        };
        let host = HostFacts {
            version: info
                .version
                .and_then(|v| v.version)
                .unwrap_or_else(|| "unknown".into()),
            oci_runtime: host
                .oci_runtime
                .and_then(|r| r.name)
                .unwrap_or_else(|| "unknown".into()),
            cgroup_version,
            rootless,
            limits,
        };
        tracing::info!(
            socket = %config.socket.display(),
            version = %host.version,
            cgroups = %host.cgroup_version,
            rootless = host.rootless,
            "connected to Podman"
        );
        Ok(Self {
            podman,
            tracker: Tracker::new(config.backoff),
            config,
            host,
        })
    }

    pub fn config(&self) -> &PodmanConfig {
        &self.config
    }

    fn api_err(
        &self,
        call: &'static str,
        target: impl Into<String>,
        e: podman_api::Error,
    ) -> DriverError {
        DriverError::Podman {
            call,
            target: target.into(),
            message: podman_message(&e),
        }
    }

    async fn timed<T>(
        &self,
        call: &'static str,
        target: &str,
        fut: impl Future<Output = Result<T, podman_api::Error>>,
    ) -> Result<Result<T, podman_api::Error>, DriverError> {
        tokio::time::timeout(self.config.api_timeout, fut)
            .await
            .map_err(|_| DriverError::Podman {
                call,
                target: target.to_owned(),
                message: format!("no answer within {:?}", self.config.api_timeout),
            })
    }

    async fn list_containers(
        &self,
        filter: ContainerListFilter,
        target: &str,
    ) -> Result<Vec<ListContainer>, DriverError> {
        let opts = ContainerListOpts::builder()
            .all(true)
            .filter([filter])
            .build();
        self.timed(
            "list containers",
            target,
            self.podman.containers().list(&opts),
        )
        .await?
        .map_err(|e| self.api_err("list containers", target, e))
    }

    /// Finds the replica's pod and containers.
    async fn observe(&self, id: &ReplicaId) -> Result<Option<Observed>, DriverError> {
        let pod = spec::pod_name(id);
        let all = self
            .list_containers(ContainerListFilter::Pod(pod.clone()), &pod)
            .await?;
        let mut obs = Observed {
            labels: None,
            infra: None,
            members: Vec::new(),
        };
        // The filter may match by prefix; keep the exact pod only.
        for c in all
            .into_iter()
            .filter(|c| c.pod_name.as_deref() == Some(pod.as_str()))
        {
            if c.is_infra == Some(true) {
                obs.infra = Some(c);
                continue;
            }
            let object = format!(
                "container {}",
                c.names.as_ref().and_then(|n| n.first()).map_or("?", |s| s)
            );
            let map = c.labels.clone().unwrap_or_default();
            match ReplicaLabels::parse(&object, &map) {
                Ok(Some(l)) if l.id == *id => {
                    let name = map.get(labels::CONTAINER).cloned().unwrap_or_default();
                    obs.labels.get_or_insert(l);
                    obs.members.push((name, c));
                }
                Ok(_) => {
                    // A container someone else put in our pod: treat as foreign member.
                    obs.members.push((String::new(), c));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a container with damaged labels");
                    obs.members.push((String::new(), c));
                }
            }
        }
        if obs.infra.is_none() && obs.members.is_empty() {
            let exists = self
                .timed("pod exists", &pod, self.podman.pods().get(&pod).exists())
                .await?
                .map_err(|e| self.api_err("pod exists", &pod, e))?;
            if !exists {
                return Ok(None);
            }
        }
        Ok(Some(obs))
    }

    /// Removes the replica's pod, containers and volumes. Absent objects are fine.
    async fn remove(&self, id: &ReplicaId) -> Result<(), DriverError> {
        let pod_name = spec::pod_name(id);
        let pod = self.podman.pods().get(&pod_name);
        let grace = usize::try_from(self.config.stop_timeout.as_secs()).unwrap_or(usize::MAX);
        match self
            .timed("stop pod", &pod_name, pod.stop_with_timeout(grace))
            .await?
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                tracing::warn!(pod = %pod_name, error = %podman_message(&e), "stopping pod failed; removing it by force")
            }
        }
        match self.timed("remove pod", &pod_name, pod.remove()).await? {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                // Podman resolves the name to an id first; a pod that vanishes in between
                // (its cleanup finishing) fails with a 500 "no such pod". What counts is
                // that it is gone, so look again before calling it a failure.
                let exists = self
                    .timed("pod exists", &pod_name, pod.exists())
                    .await?
                    .map_err(|e| self.api_err("pod exists", &pod_name, e))?;
                if exists {
                    return Err(self.api_err("remove pod", pod_name, e));
                }
                tracing::debug!(pod = %pod_name, error = %podman_message(&e), "pod vanished while being removed");
            }
        }
        self.remove_volumes(id).await
    }

    async fn remove_volumes(&self, id: &ReplicaId) -> Result<(), DriverError> {
        let target = spec::pod_name(id);
        let opts = VolumeListOpts::builder()
            .filter([VolumeListFilter::LabelKeyVal(
                labels::WORKLOAD.into(),
                id.name.clone(),
            )])
            .build();
        let vols = self
            .timed("list volumes", &target, self.podman.volumes().list(&opts))
            .await?
            .map_err(|e| self.api_err("list volumes", &target, e))?;
        for v in vols {
            let map = v.labels.clone();
            let ours = matches!(ReplicaLabels::parse(&v.name, &map), Ok(Some(l)) if l.id == *id);
            if !ours {
                continue;
            }
            match self
                .timed(
                    "remove volume",
                    &v.name,
                    self.podman.volumes().get(&v.name).remove(),
                )
                .await?
            {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.api_err("remove volume", v.name.clone(), e)),
            }
        }
        Ok(())
    }

    /// Makes sure `image` is present, pulling it if not. The error names the image.
    async fn ensure_image(&self, image: &str, container: &str) -> Result<(), String> {
        let fail = |what: String| format!("image {image:?} (container {container:?}): {what}");
        match tokio::time::timeout(
            self.config.api_timeout,
            self.podman.images().get(image).exists(),
        )
        .await
        {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                return Err(fail(format!(
                    "cannot check whether it exists: {}",
                    podman_message(&e)
                )));
            }
            Err(_) => return Err(fail("Podman did not answer whether it exists".into())),
        }
        tracing::info!(image, "pulling missing image");
        let opts = PullOpts::builder().reference(image).quiet(true).build();
        let images = self.podman.images();
        let pull = async {
            let mut stream = images.pull(&opts);
            let mut error = None;
            let mut pulled = false;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(report) => {
                        if let Some(e) = report.error.filter(|e| !e.is_empty()) {
                            error = Some(e);
                        }
                        if report.id.is_some() || report.images.is_some_and(|i| !i.is_empty()) {
                            pulled = true;
                        }
                    }
                    Err(e) => error = Some(podman_message(&e)),
                }
            }
            match (pulled, error) {
                (true, None) => Ok(()),
                (_, Some(e)) => Err(e),
                (false, None) => Err("the pull reported no image".into()),
            }
        };
        match tokio::time::timeout(self.config.pull_timeout, pull).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(fail(format!(
                "not present on this host and the pull failed: {e}"
            ))),
            Err(_) => Err(fail(format!(
                "pull did not finish within {:?}",
                self.config.pull_timeout
            ))),
        }
    }

    /// Refuses images that would run as root when the manifest says `run_as_non_root`.
    async fn check_non_root(&self, c: &Container) -> Result<(), String> {
        if !c.security.run_as_non_root || c.security.run_as_user.is_some() {
            return Ok(());
        }
        let inspect = tokio::time::timeout(
            self.config.api_timeout,
            self.podman.images().get(&c.image).inspect(),
        )
        .await
        .map_err(|_| format!("image {:?}: inspect timed out", c.image))?
        .map_err(|e| {
            format!(
                "image {:?}: inspect failed: {}",
                c.image,
                podman_message(&e)
            )
        })?;
        let user = inspect.config.and_then(|cfg| cfg.user).unwrap_or_default();
        let user_name = user.split(':').next().unwrap_or_default();
        if user_name.is_empty() || user_name == "0" || user_name == "root" {
            return Err(format!(
                "container {:?}: run_as_non_root is set but image {:?} runs as {:?} and no run_as_user is given",
                c.name,
                c.image,
                if user.is_empty() {
                    "root (no USER)"
                } else {
                    user.as_str()
                }
            ));
        }
        Ok(())
    }

    /// Creates and starts the replica. `Err` is a reason for a Failed status.
    async fn create(&self, spec: &ReplicaSpec) -> Result<(), String> {
        let id = &spec.id;
        for c in &spec.manifest.containers {
            self.ensure_image(&c.image, &c.name).await?;
            self.check_non_root(c).await?;
        }
        let replica_labels = spec::replica_labels(spec).to_map();
        for c in &spec.manifest.containers {
            for (name, _) in spec::disk_volumes(spec, c) {
                let opts = VolumeCreateOpts::builder()
                    .name(&name)
                    .labels(replica_labels.clone())
                    .build();
                match tokio::time::timeout(
                    self.config.api_timeout,
                    self.podman.volumes().create(&opts),
                )
                .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if matches!(&e, podman_api::Error::Fault { code, .. } if code.as_u16() == 409) =>
                        {}
                    Ok(Err(e)) => {
                        return Err(format!("creating volume {name:?}: {}", podman_message(&e)));
                    }
                    Err(_) => return Err(format!("creating volume {name:?}: no answer")),
                }
            }
        }
        let pod_name = spec::pod_name(id);
        let pod_opts = PodCreateOpts::builder()
            .name(&pod_name)
            .hostname(spec::hostname(id))
            .labels(replica_labels)
            .netns(Namespace {
                nsmode: Some("slirp4netns".into()),
                value: None,
            })
            .portmappings(spec::port_mappings(spec, self.config.publish_address))
            .build();
        match tokio::time::timeout(
            self.config.api_timeout,
            self.podman.pods().create(&pod_opts),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("creating pod {pod_name}: {}", podman_message(&e))),
            Err(_) => return Err(format!("creating pod {pod_name}: no answer")),
        }
        let defaults = ContainerDefaults {
            init: self.config.init,
            stop_timeout_secs: self.config.stop_timeout.as_secs(),
        };
        // The sidecar first: the replica's channel to its node is up when its containers start.
        if let Some(sidecar) = &spec.sidecar {
            let body = spec::sidecar_body(spec, sidecar, &defaults, self.host.limits);
            let name = spec::container_name(id, SIDECAR_CONTAINER);
            let response = tokio::time::timeout(
                self.config.api_timeout,
                raw::request(
                    &self.config.socket,
                    "POST",
                    "/containers/create",
                    Some(&body),
                ),
            )
            .await
            .map_err(|_| format!("creating container {name}: no answer"))?
            .map_err(|e| format!("creating container {name}: {e}"))?;
            if response.status != 201 {
                return Err(format!(
                    "creating the sidecar from {}: {} (HTTP {})",
                    sidecar.rootfs.display(),
                    response.message(),
                    response.status
                ));
            }
        }
        for c in &spec.manifest.containers {
            let body = spec::container_body(spec, c, &defaults, self.host.limits);
            let name = spec::container_name(id, &c.name);
            let response = tokio::time::timeout(
                self.config.api_timeout,
                raw::request(
                    &self.config.socket,
                    "POST",
                    "/containers/create",
                    Some(&body),
                ),
            )
            .await
            .map_err(|_| format!("creating container {name}: no answer"))?
            .map_err(|e| format!("creating container {name}: {e}"))?;
            if response.status != 201 {
                return Err(format!(
                    "creating container {:?} from image {:?}: {} (HTTP {})",
                    c.name,
                    c.image,
                    response.message(),
                    response.status
                ));
            }
        }
        let report = tokio::time::timeout(
            self.config.api_timeout,
            self.podman.pods().get(&pod_name).start(),
        )
        .await
        .map_err(|_| format!("starting pod {pod_name}: no answer"))?
        .map_err(|e| format!("starting pod {pod_name}: {}", podman_message(&e)))?;
        if let Some(errs) = report.errs.filter(|e| !e.is_empty()) {
            return Err(format!("starting pod {pod_name}: {}", errs.join("; ")));
        }
        Ok(())
    }

    /// Where cgroups cannot limit memory, caps the data segment of every process of the
    /// container (children inherit it). A process may fork while its parent is being
    /// limited, so passes repeat until one finds every process already limited. Returns
    /// what could not be applied.
    async fn apply_memory_rlimit(&self, spec: &ReplicaSpec, obs: &Observed) -> Vec<String> {
        if self.host.limits.memory {
            return Vec::new();
        }
        let mut problems = Vec::new();
        for c in &spec.manifest.containers {
            let Some(root) = obs.member(&c.name).and_then(pid_of) else {
                continue;
            };
            let bytes = c.resources.memory.bytes();
            let limited = |pid: u32| {
                procfs::limit(pid, "Max data size").is_some_and(|(soft, hard)| {
                    soft.is_some_and(|s| s <= bytes) && hard.is_some_and(|h| h <= bytes)
                })
            };
            let mut converged = false;
            for _ in 0..20 {
                let todo: Vec<u32> = procfs::tree(&procfs::all(), root)
                    .iter()
                    .map(|p| p.pid)
                    .filter(|p| !limited(*p))
                    .collect();
                if todo.is_empty() {
                    converged = true;
                    break;
                }
                for pid in todo {
                    if let Err(e) = set_data_limit(pid, bytes)
                        && procfs::alive(pid, None)
                    {
                        problems.push(format!(
                            "RLIMIT_DATA on pid {pid} of container {:?}: {e}",
                            c.name
                        ));
                    }
                }
                if !problems.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !converged && problems.is_empty() {
                problems.push(format!(
                    "RLIMIT_DATA of container {:?}: processes kept appearing unlimited",
                    c.name
                ));
            }
        }
        problems
    }

    /// Controls a manifest asks for that this host cannot (fully) enforce.
    fn not_enforced(&self, spec: &ReplicaSpec) -> Vec<String> {
        let mut out = Vec::new();
        if !self.host.limits.memory {
            out.push(format!(
                "memory limit: rootless Podman on cgroup {} has no memory cgroup; applied as RLIMIT_DATA per process",
                self.host.cgroup_version
            ));
        }
        if !self.host.limits.cpu {
            out.push(format!(
                "cpu limit: rootless Podman on cgroup {} has no cpu cgroup; not enforced",
                self.host.cgroup_version
            ));
        }
        for c in &spec.manifest.containers {
            for v in c.volumes.iter().filter(|v| !v.memory && v.size.is_some()) {
                out.push(format!(
                    "volume {:?} of container {:?}: size is not enforced for disk volumes",
                    v.name, c.name
                ));
            }
        }
        out
    }

    fn ports(&self, obs: &Observed, spec: Option<&ReplicaSpec>) -> Vec<PortBinding> {
        let Some(infra) = &obs.infra else {
            return Vec::new();
        };
        let mappings = infra.ports.clone().unwrap_or_default();
        let name_of = |port: u16| -> String {
            spec.and_then(|s| {
                s.manifest
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter())
                    .find(|p| p.container == port)
                    .map(|p| p.name.clone())
            })
            .unwrap_or_default()
        };
        mappings
            .iter()
            .filter_map(|m| {
                let container_port = m.container_port?;
                let range = m.range.unwrap_or(1).max(1);
                let host_port = m.host_port?;
                Some((0..range).map(move |i| {
                    PortBinding {
                        name: String::new(),
                        container_port: container_port.saturating_add(i),
                        host_ip: m
                            .host_ip
                            .clone()
                            .filter(|h| !h.is_empty())
                            .unwrap_or_else(|| "0.0.0.0".into()),
                        host_port: host_port.saturating_add(i),
                        protocol: m.protocol.clone().unwrap_or_else(|| "tcp".into()),
                    }
                }))
            })
            .flatten()
            .map(|mut b| {
                b.name = name_of(b.container_port);
                b
            })
            .collect()
    }

    fn containers(&self, obs: &Observed, spec: Option<&ReplicaSpec>) -> Vec<ContainerStatus> {
        let status = |name: &str, c: Option<&ListContainer>| ContainerStatus {
            name: name.to_owned(),
            state: c.map_or(ContainerState::Missing, container_state),
            id: c.and_then(|c| c.id.clone()),
            pid: c.and_then(pid_of).filter(|_| c.is_some_and(is_running)),
        };
        match spec {
            Some(s) => s
                .manifest
                .containers
                .iter()
                .map(|c| c.name.as_str())
                .chain(s.sidecar.as_ref().map(|_| SIDECAR_CONTAINER))
                .map(|name| status(name, obs.member(name)))
                .collect(),
            None => obs
                .members
                .iter()
                .map(|(n, c)| status(n, Some(c)))
                .collect(),
        }
    }

    /// Running unless some container is not; the reason names the first that is not.
    fn derive_state(containers: &[ContainerStatus]) -> ReplicaState {
        match containers
            .iter()
            .find(|c| c.state != ContainerState::Running)
        {
            None if !containers.is_empty() => ReplicaState::Running,
            None => ReplicaState::Failed {
                reason: "the replica has no containers".into(),
            },
            Some(c) => ReplicaState::Failed {
                reason: format!("container {:?} is {}", c.name, describe(&c.state)),
            },
        }
    }

    fn status_from(
        &self,
        spec: &ReplicaSpec,
        obs: &Observed,
        action: EnsureAction,
        state: ReplicaState,
        not_enforced: Vec<String>,
    ) -> ReplicaStatus {
        ReplicaStatus {
            id: spec.id.clone(),
            content_id: spec.content_id.clone(),
            state,
            action,
            containers: self.containers(obs, Some(spec)),
            ports: self.ports(obs, Some(spec)),
            restarts: self.tracker.restarts(&spec.id),
            not_enforced,
        }
    }

    fn failed(
        &self,
        spec: &ReplicaSpec,
        reason: String,
        not_enforced: Vec<String>,
    ) -> ReplicaStatus {
        ReplicaStatus {
            id: spec.id.clone(),
            content_id: spec.content_id.clone(),
            state: ReplicaState::Failed { reason },
            action: EnsureAction::None,
            containers: Vec::new(),
            ports: Vec::new(),
            restarts: self.tracker.restarts(&spec.id),
            not_enforced,
        }
    }

    async fn start_container(&self, c: &ListContainer) -> Result<(), String> {
        let id = c.id.clone().unwrap_or_default();
        tokio::time::timeout(
            self.config.api_timeout,
            self.podman.containers().get(&id).start(None),
        )
        .await
        .map_err(|_| format!("starting container {id}: no answer"))?
        .map_err(|e| podman_message(&e))
    }

    /// The replica's state after creation or repair, with readiness applied.
    async fn settle(
        &self,
        spec: &ReplicaSpec,
        action: EnsureAction,
        mut not_enforced: Vec<String>,
        apply_rlimit: bool,
    ) -> Result<ReplicaStatus, DriverError> {
        let Some(obs) = self.observe(&spec.id).await? else {
            return Ok(self.failed(
                spec,
                "the replica vanished right after it was started".into(),
                not_enforced,
            ));
        };
        if apply_rlimit {
            not_enforced.extend(self.apply_memory_rlimit(spec, &obs).await);
        }
        let containers = self.containers(&obs, Some(spec));
        let mut state = Self::derive_state(&containers);
        if state.is_running() {
            let ports = self.ports(&obs, Some(spec));
            for c in &spec.manifest.containers {
                if let Some(ready) = &c.ready {
                    let outcome = self.probe(&obs, &ports, c, ready).await;
                    if !outcome.passed() {
                        state = ReplicaState::Starting;
                        break;
                    }
                }
            }
        }
        Ok(self.status_from(spec, &obs, action, state, not_enforced))
    }

    async fn probe(
        &self,
        obs: &Observed,
        ports: &[PortBinding],
        c: &Container,
        h: &Health,
    ) -> ProbeOutcome {
        let timeout = h.timeout.to_std();
        let host_ip = match self.config.publish_address {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        let forwarded = |port: u16| -> Result<SocketAddr, ProbeOutcome> {
            ports
                .iter()
                .find(|p| p.container_port == port && p.protocol == "tcp")
                .map(|p| SocketAddr::new(host_ip, p.host_port))
                .ok_or_else(|| ProbeOutcome::Failed {
                    detail: format!(
                        "port {port} of container {:?} has no port forward; declare it in ports or use an exec probe",
                        c.name
                    ),
                })
        };
        if let Some(path) = &h.http {
            let port = h.port.unwrap_or(80);
            return match forwarded(port) {
                Ok(addr) => crate::probe::http(addr, path, timeout).await,
                Err(o) => o,
            };
        }
        if let Some(port) = h.tcp {
            return match forwarded(port) {
                Ok(addr) => crate::probe::tcp(addr, timeout).await,
                Err(o) => o,
            };
        }
        if let Some(cmd) = &h.exec {
            let Some(member) = obs.member(&c.name) else {
                return ProbeOutcome::Failed {
                    detail: format!("container {:?} does not exist", c.name),
                };
            };
            return match tokio::time::timeout(timeout, self.exec(member, cmd)).await {
                Ok(Ok(0)) => ProbeOutcome::Passed {
                    detail: format!("exec {cmd:?}: exit 0"),
                },
                Ok(Ok(code)) => ProbeOutcome::Failed {
                    detail: format!("exec {cmd:?}: exit {code}"),
                },
                Ok(Err(e)) => ProbeOutcome::Failed {
                    detail: format!("exec {cmd:?}: {e}"),
                },
                Err(_) => ProbeOutcome::Failed {
                    detail: format!("exec {cmd:?}: no result within {timeout:?}"),
                },
            };
        }
        ProbeOutcome::NotConfigured
    }

    /// Runs `cmd` in the container (`podman exec`) and returns its exit code.
    async fn exec(&self, member: &ListContainer, cmd: &[String]) -> Result<i64, String> {
        let container = self
            .podman
            .containers()
            .get(member.id.clone().unwrap_or_default());
        let exec = container
            .create_exec(
                &ExecCreateOpts::builder()
                    .command(cmd.to_vec())
                    .attach_stdout(true)
                    .attach_stderr(true)
                    .build(),
            )
            .await
            .map_err(|e| podman_message(&e))?;
        let opts = Default::default();
        if let Some(mut output) = exec.start(&opts).await.map_err(|e| podman_message(&e))? {
            while output.next().await.is_some() {}
        }
        let info = exec.inspect().await.map_err(|e| podman_message(&e))?;
        info.get("ExitCode")
            .and_then(|c| c.as_i64())
            .ok_or_else(|| format!("exec inspect has no exit code: {info}"))
    }
}

fn describe(s: &ContainerState) -> String {
    match s {
        ContainerState::Running => "running".into(),
        ContainerState::Created => "created but not started".into(),
        ContainerState::Exited { code: Some(c) } => format!("exited with code {c}"),
        ContainerState::Exited { code: None } => "exited".into(),
        ContainerState::Missing => "missing".into(),
        ContainerState::Other { detail } => detail.clone(),
    }
}

/// Lowers RLIMIT_DATA of another process to `bytes` (prlimit(2)).
///
/// The kernel allows it to a caller whose uid owns the target (the unprivileged daemon and
/// its rootless containers: container root is the daemon's uid) or that holds
/// CAP_SYS_RESOURCE in the target's user namespace (which the owner of a rootless
/// container's namespace does). A daemon running as another user than the Podman socket's
/// owner (root in CI, talking to a test user's Podman) does it from a short-lived thread
/// whose credentials are switched to the target's owner; that needs CAP_SETUID/CAP_SETGID.
fn set_data_limit(pid: u32, bytes: u64) -> Result<(), String> {
    match lower_data_limit(pid, bytes) {
        Err(rustix::io::Errno::PERM) => {}
        other => return other.map_err(|e| e.to_string()),
    }
    let (uid, gid) = procfs::owner(pid).ok_or_else(|| format!("process {pid} is gone"))?;
    if uid == rustix::process::getuid().as_raw() {
        return Err("not permitted".into());
    }
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<(), String> {
                use rustix::process::{Gid, Uid};
                // Per-thread credentials (raw setresgid/setresuid): only this thread changes,
                // and it ends right after.
                let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
                rustix::thread::set_thread_res_gid(g, g, g).map_err(|e| {
                    format!("switching to gid {gid} to reach uid {uid}'s process: {e}")
                })?;
                rustix::thread::set_thread_res_uid(u, u, u)
                    .map_err(|e| format!("switching to uid {uid} to reach its process: {e}"))?;
                lower_data_limit(pid, bytes).map_err(|e| format!("as uid {uid}: {e}"))
            })
            .join()
            .unwrap_or_else(|_| Err("the helper thread panicked".into()))
    })
}

/// prlimit(RLIMIT_DATA) to `min(bytes, current hard limit)` for both limits: lowering only,
/// which the owner of a process may always do.
fn lower_data_limit(pid: u32, bytes: u64) -> Result<(), rustix::io::Errno> {
    use rustix::process::{Pid, Resource, Rlimit, prlimit};
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(rustix::io::Errno::SRCH)?;
    let hard = procfs::limit(pid, "Max data size").and_then(|(_, hard)| hard);
    let value = hard.map_or(bytes, |h| h.min(bytes));
    prlimit(
        Some(target),
        Resource::Data,
        Rlimit {
            current: Some(value),
            maximum: Some(value),
        },
    )
    .map(|_| ())
}

#[async_trait]
impl ContainerDriver for PodmanDriver {
    fn name(&self) -> &'static str {
        "podman"
    }

    async fn ensure(&self, spec: &ReplicaSpec) -> Result<ReplicaStatus, DriverError> {
        spec.validate()?;
        let _guard = self.tracker.lock(&spec.id).await;
        let not_enforced = self.not_enforced(spec);
        let observed = self.observe(&spec.id).await?;

        if let Some(obs) = &observed {
            let same = obs
                .labels
                .as_ref()
                .is_some_and(|l| l.content_id == spec.content_id);
            if same && obs.broken(spec).is_none() {
                let seen = self.tracker.mark_seen(&spec.id);
                let dead: Vec<(&String, &ListContainer)> = obs
                    .members
                    .iter()
                    .filter(|(_, c)| !is_running(c))
                    .map(|(n, c)| (n, c))
                    .collect();
                if dead.is_empty() {
                    let action = if seen {
                        EnsureAction::Unchanged
                    } else {
                        EnsureAction::Adopted
                    };
                    // An adopted replica may predate this instance's RLIMIT fallback.
                    return self.settle(spec, action, not_enforced, !seen).await;
                }
                let what = dead
                    .iter()
                    .map(|(n, c)| format!("container {n:?} {}", describe(&container_state(c))))
                    .collect::<Vec<_>>()
                    .join(", ");
                if let Err(left) = self.tracker.may_restart(&spec.id) {
                    return Ok(self.status_from(
                        spec,
                        obs,
                        EnsureAction::None,
                        ReplicaState::Failed {
                            reason: format!(
                                "{what}; restart {} in {}",
                                self.tracker.restarts(&spec.id) + 1,
                                human(left)
                            ),
                        },
                        not_enforced,
                    ));
                }
                self.tracker.record_restart(&spec.id);
                tracing::info!(replica = %spec.id, "restarting: {what}");
                for (name, c) in &dead {
                    if let Err(e) = self.start_container(c).await {
                        return Ok(self.status_from(
                            spec,
                            obs,
                            EnsureAction::None,
                            ReplicaState::Failed {
                                reason: format!("restarting container {name:?}: {e}"),
                            },
                            not_enforced,
                        ));
                    }
                }
                return self
                    .settle(spec, EnsureAction::Restarted, not_enforced, true)
                    .await;
            }
        }

        if let Some(p) = self.tracker.pending_failure(&spec.id, &spec.content_id) {
            return Ok(self.failed(
                spec,
                format!("{} (next attempt in {})", p.reason, human(p.retry_in)),
                not_enforced,
            ));
        }
        let replacing = match &observed {
            Some(obs) => {
                let why = match &obs.labels {
                    Some(l) if l.content_id != spec.content_id => {
                        format!("content id {} replaces {}", spec.content_id, l.content_id)
                    }
                    None => "it has no labelled containers".into(),
                    Some(_) => obs.broken(spec).unwrap_or_default(),
                };
                tracing::info!(replica = %spec.id, "replacing the replica: {why}");
                self.remove(&spec.id).await?;
                true
            }
            None => false,
        };
        match self.create(spec).await {
            Ok(()) => {
                self.tracker.clear_failure(&spec.id);
                self.tracker.mark_seen(&spec.id);
                let action = if replacing {
                    EnsureAction::Replaced
                } else {
                    EnsureAction::Created
                };
                self.settle(spec, action, not_enforced, true).await
            }
            Err(reason) => {
                tracing::warn!(replica = %spec.id, %reason, "replica failed to start");
                // Leave nothing half-created behind; the next attempt starts clean.
                if let Err(e) = self.remove(&spec.id).await {
                    tracing::warn!(replica = %spec.id, error = %e, "cleanup after a failed start failed");
                }
                let message = self
                    .tracker
                    .record_failure(&spec.id, &spec.content_id, reason);
                Ok(self.failed(spec, message, not_enforced))
            }
        }
    }

    async fn status(&self, id: &ReplicaId) -> Result<Option<ReplicaStatus>, DriverError> {
        let Some(obs) = self.observe(id).await? else {
            return Ok(None);
        };
        let containers = self.containers(&obs, None);
        let state = if obs.infra.as_ref().is_some_and(|i| !is_running(i)) {
            ReplicaState::Failed {
                reason: "the pod's infra container (network namespace) is not running".into(),
            }
        } else {
            Self::derive_state(&containers)
        };
        Ok(Some(ReplicaStatus {
            id: id.clone(),
            content_id: obs
                .labels
                .as_ref()
                .map(|l| l.content_id.clone())
                .unwrap_or_default(),
            state,
            action: EnsureAction::None,
            ports: self.ports(&obs, None),
            containers,
            restarts: self.tracker.restarts(id),
            not_enforced: Vec::new(),
        }))
    }

    async fn stop(&self, id: &ReplicaId) -> Result<(), DriverError> {
        id.validate()?;
        let _guard = self.tracker.lock(id).await;
        self.remove(id).await?;
        self.tracker.forget(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ReplicaInfo>, DriverError> {
        let all = self
            .list_containers(
                ContainerListFilter::LabelKeyVal(
                    labels::MANAGED_BY.into(),
                    labels::MANAGED_BY_VALUE.into(),
                ),
                "all replicas",
            )
            .await?;
        let mut by_replica: BTreeMap<ReplicaId, (ReplicaLabels, Vec<ContainerStatus>)> =
            BTreeMap::new();
        for c in &all {
            let object = format!("container {}", c.id.as_deref().unwrap_or("?"));
            let map: HashMap<String, String> = c.labels.clone().unwrap_or_default();
            let l = match ReplicaLabels::parse(&object, &map) {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a container with damaged labels");
                    continue;
                }
            };
            let entry = by_replica
                .entry(l.id.clone())
                .or_insert_with(|| (l, Vec::new()));
            entry.1.push(ContainerStatus {
                name: map.get(labels::CONTAINER).cloned().unwrap_or_default(),
                state: container_state(c),
                id: c.id.clone(),
                pid: pid_of(c).filter(|_| is_running(c)),
            });
        }
        Ok(by_replica
            .into_values()
            .map(|(l, containers)| ReplicaInfo {
                state: Self::derive_state(&containers),
                id: l.id,
                content_id: l.content_id,
                node: l.node,
                containers,
            })
            .collect())
    }

    async fn logs(&self, id: &ReplicaId, opts: LogOptions) -> Result<LogStream, DriverError> {
        let obs = self
            .observe(id)
            .await?
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        let (tx, rx) = mpsc::channel::<Result<LogLine, DriverError>>(256);
        for (name, c) in obs.members.iter().filter(|(n, _)| !n.is_empty()) {
            let container = self
                .podman
                .containers()
                .get(c.id.clone().unwrap_or_default());
            let tx = tx.clone();
            let name = name.clone();
            let mut builder = ContainerLogsOpts::builder()
                .stdout(true)
                .stderr(true)
                .follow(opts.follow);
            if let Some(n) = opts.tail {
                builder = builder.tail(n.to_string());
            }
            let log_opts = builder.build();
            tokio::spawn(async move {
                let mut stream = container.logs(&log_opts);
                let mut out = LineSplitter::default();
                let mut err = LineSplitter::default();
                while let Some(chunk) = stream.next().await {
                    let (source, splitter, bytes) = match chunk {
                        Ok(TtyChunk::StdOut(b)) => (LogSource::Stdout, &mut out, b),
                        Ok(TtyChunk::StdErr(b)) => (LogSource::Stderr, &mut err, b),
                        Ok(TtyChunk::StdIn(_)) => continue,
                        Err(e) => {
                            let _ = tx
                                .send(Err(DriverError::Podman {
                                    call: "logs",
                                    target: name.clone(),
                                    message: podman_message(&e),
                                }))
                                .await;
                            return;
                        }
                    };
                    for line in splitter.push(&bytes) {
                        let item = LogLine {
                            container: name.clone(),
                            source,
                            line,
                        };
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                }
                for (source, splitter) in
                    [(LogSource::Stdout, &mut out), (LogSource::Stderr, &mut err)]
                {
                    if let Some(line) = splitter.finish() {
                        let _ = tx
                            .send(Ok(LogLine {
                                container: name.clone(),
                                source,
                                line,
                            }))
                            .await;
                    }
                }
            });
        }
        drop(tx);
        Ok(receiver_stream(rx))
    }

    async fn usage(&self, id: &ReplicaId) -> Result<Usage, DriverError> {
        let obs = self
            .observe(id)
            .await?
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        let snapshot = procfs::all();
        let mut usage = Usage::default();
        for (name, c) in &obs.members {
            let procs = match pid_of(c).filter(|_| is_running(c)) {
                Some(pid) => procfs::tree(&snapshot, pid),
                None => Vec::new(),
            };
            let u = procfs::sum_usage(name, &procs);
            usage.cpu_time_ms += u.cpu_time_ms;
            usage.memory_rss_bytes += u.memory_rss_bytes;
            usage.processes += u.processes;
            usage.containers.push(u);
        }
        Ok(usage)
    }

    async fn health(&self, spec: &ReplicaSpec) -> Result<HealthReport, DriverError> {
        let obs = self
            .observe(&spec.id)
            .await?
            .ok_or_else(|| DriverError::NotFound(spec.id.to_string()))?;
        let ports = self.ports(&obs, Some(spec));
        let mut containers = Vec::new();
        for c in &spec.manifest.containers {
            let liveness = match &c.health {
                Some(h) => self.probe(&obs, &ports, c, h).await,
                None => ProbeOutcome::NotConfigured,
            };
            let readiness = match &c.ready {
                Some(h) => self.probe(&obs, &ports, c, h).await,
                None => ProbeOutcome::NotConfigured,
            };
            containers.push(ContainerHealth {
                name: c.name.clone(),
                liveness,
                readiness,
            });
        }
        Ok(HealthReport {
            id: spec.id.clone(),
            containers,
        })
    }

    async fn report(&self) -> DriverReport {
        let h = &self.host;
        let mut controls = vec![
            Control {
                control: "network".into(),
                enforcement: Enforcement::Enforced,
                detail: format!(
                    "a network namespace per replica (slirp4netns); declared ports forwarded on {}",
                    self.config.publish_address
                ),
            },
            Control {
                control: "user-namespace".into(),
                enforcement: if h.rootless {
                    Enforcement::Enforced
                } else {
                    Enforcement::NotEnforced
                },
                detail: if h.rootless {
                    "rootless Podman: container root is the daemon's user on the host".into()
                } else {
                    "Podman runs as root: container root is host root (confined by capabilities only)".into()
                },
            },
            Control {
                control: "read-only-root".into(),
                enforcement: Enforcement::Enforced,
                detail: "root filesystem read-only unless a manifest sets read_only_root = false"
                    .into(),
            },
            Control {
                control: "no-new-privileges".into(),
                enforcement: Enforcement::Enforced,
                detail: "set on every container (libpod create called directly)".into(),
            },
            Control {
                control: "capabilities".into(),
                enforcement: Enforcement::Enforced,
                detail: "all dropped; a manifest may add named ones".into(),
            },
        ];
        controls.push(if h.limits.memory {
            Control {
                control: "memory-limit".into(),
                enforcement: Enforcement::Enforced,
                detail: format!("memory cgroup ({} {})", h.cgroup_version, if h.rootless { "delegated" } else { "rootful" }),
            }
        } else {
            Control {
                control: "memory-limit".into(),
                enforcement: Enforcement::Partial,
                detail: format!(
                    "rootless Podman on cgroup {} cannot use a memory cgroup; the limit is applied as RLIMIT_DATA to each container process after start (per process, not per container; exec sessions are not covered)",
                    h.cgroup_version
                ),
            }
        });
        controls.push(Control {
            control: "cpu-limit".into(),
            enforcement: if h.limits.cpu { Enforcement::Enforced } else { Enforcement::NotEnforced },
            detail: if h.limits.cpu {
                format!("CFS quota, period {}us", spec::CPU_PERIOD_US)
            } else {
                format!(
                    "rootless Podman on cgroup {} has no cpu controller (cgroup v2 with the cpu controller delegated to the user is needed)",
                    h.cgroup_version
                )
            },
        });
        DriverReport {
            driver: "podman".into(),
            runtime: format!(
                "podman {} ({}, cgroup {}, {}) at {}",
                h.version,
                h.oci_runtime,
                h.cgroup_version,
                if h.rootless { "rootless" } else { "rootful" },
                self.config.socket.display()
            ),
            controls,
        }
    }
}

/// Splits byte chunks into lines (without the newline).
#[derive(Default)]
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    const MAX_LINE: usize = 64 << 10;

    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(self.take());
            } else {
                self.buf.push(b);
                if self.buf.len() >= Self::MAX_LINE {
                    lines.push(self.take());
                }
            }
        }
        lines
    }

    pub(crate) fn finish(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let mut line = String::from_utf8_lossy(&self.buf).into_owned();
        if line.ends_with('\r') {
            line.pop();
        }
        self.buf.clear();
        line
    }
}

pub(crate) fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> futures_util::stream::BoxStream<'static, T> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

/// True if a Podman API socket answers at `socket`.
pub async fn socket_answers(socket: &Path) -> bool {
    if !socket.exists() {
        return false;
    }
    let podman = Podman::unix(socket);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), podman.ping()).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"hel"), Vec::<String>::new());
        assert_eq!(s.push(b"lo\r\nwor"), vec!["hello".to_owned()]);
        assert_eq!(s.push(b"ld\n\n"), vec!["world".to_owned(), String::new()]);
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn default_socket_uses_xdg_runtime_dir_or_uid() {
        let p = default_socket();
        assert!(p.ends_with("podman/podman.sock"), "{}", p.display());
    }
}
