//! The process driver: runs each `[[container]]`'s command as a plain child process, for
//! hosts without Podman and for `beemesh dev`. Images are not used.
//!
//! Each container process is confined before exec (see [`confine`]):
//! - Landlock: read and execute on system paths, read-write on the replica's private
//!   directory only, signals and abstract sockets scoped to its own domain (ABI 6);
//! - no_new_privs, every capability cleared (and the bounding set emptied and securebits
//!   locked when the daemon holds CAP_SETPCAP, e.g. when it runs as root, and always when
//!   the node's files are hidden);
//! - the node's files hidden ([`isolation`]): with [`ProcessConfig::hide`] set (the node
//!   sets the API socket's directory, data_dir, the config, ticket and token), processes
//!   run in a user and mount namespace of their own where those paths are covered, so a
//!   workload cannot connect to the node's API socket (Landlock ABI < 9 does not mediate
//!   that);
//! - memory and CPU limits through a delegated cgroup v2 subtree if there is one, else the
//!   memory limit as RLIMIT_DATA and no CPU limit;
//! - its own process group (stopped as a group), stdin from /dev/null, stdout and stderr
//!   appended to a log file in the replica directory.
//!
//! Layout under the configured root: `bm_<ns>_<name>_<index>/` holding `replica.json` (the
//! labels, pids and start times: a restarted daemon adopts live processes from it),
//! `data/` (the private writable directory: HOME, TMPDIR, volumes) and
//! `logs/<container>.log`. Whatever the host cannot enforce is listed in each replica's
//! status (`not_enforced`) and in [`ContainerDriver::report`].

pub mod cgroup;
pub mod confine;
pub mod isolation;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use beemesh_manifest::host::LandlockMode;
use beemesh_manifest::workload::{Container, Health};
use tokio::sync::mpsc;

use crate::driver::ContainerDriver;
use crate::error::DriverError;
use crate::labels::ReplicaLabels;
use crate::podman::{LineSplitter, receiver_stream};
use crate::procfs;
use crate::tracker::{Tracker, human};
use crate::types::{
    BackoffPolicy, ContainerHealth, ContainerState, ContainerStatus, Control, DriverReport,
    Enforcement, EnsureAction, HealthReport, LogLine, LogOptions, LogSource, LogStream,
    PortBinding, ProbeOutcome, ReplicaId, ReplicaInfo, ReplicaSpec, ReplicaState, ReplicaStatus,
    Usage,
};
use confine::{Confinement, FsPolicy};
use state::{ProcRecord, Record};

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Where replica directories live (e.g. `<data_dir>/process`).
    pub root: PathBuf,
    /// Paths a workload may read and execute (directories or files); missing ones are
    /// skipped.
    pub read_exec_paths: Vec<PathBuf>,
    /// Device files a workload may read and write.
    pub device_files: Vec<PathBuf>,
    /// `required`: a replica fails rather than run without Landlock; `best-effort`: runs
    /// and reports; `off`: no Landlock (development only).
    pub landlock: LandlockMode,
    pub stop_timeout: Duration,
    pub backoff: BackoffPolicy,
    /// A delegated cgroup v2 directory for limits; `None` detects the daemon's own cgroup.
    pub cgroup_parent: Option<PathBuf>,
    /// A log file larger than this is rotated (copied to `.1` and truncated) by `ensure`.
    pub max_log_bytes: u64,
    /// Paths workloads must not see: the node's API socket directory, data_dir, its config,
    /// ticket and token files. Not empty: [`ProcessDriver::new`] makes the workloads' user
    /// and mount namespace with these covered, and fails if it cannot (it must then run
    /// before the daemon confines itself with Landlock). Empty: no namespace, and the status
    /// says the node's API is not hidden.
    pub hide: Vec<PathBuf>,
}

impl ProcessConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            read_exec_paths: default_read_exec_paths(),
            device_files: [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            landlock: LandlockMode::Required,
            stop_timeout: Duration::from_secs(10),
            backoff: BackoffPolicy::default(),
            cgroup_parent: None,
            max_log_bytes: 16 << 20,
            hide: Vec::new(),
        }
    }
}

/// System paths a workload needs to run programs: binaries, libraries, the loader's cache,
/// name resolution, time zones, certificates, `/proc`. Not all of `/etc`: no shadow files,
/// no host configuration beyond these.
pub fn default_read_exec_paths() -> Vec<PathBuf> {
    [
        "/usr",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/nix/store",
        "/run/current-system/sw",
        "/proc",
        "/sys/devices/system/cpu",
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/localtime",
        "/etc/resolv.conf",
        "/etc/hosts",
        "/etc/host.conf",
        "/etc/gai.conf",
        "/etc/nsswitch.conf",
        "/etc/passwd",
        "/etc/group",
        "/etc/os-release",
        "/etc/alternatives",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/mime.types",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

const PATH: &str =
    "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin:/run/current-system/sw/bin";

pub struct ProcessDriver {
    config: ProcessConfig,
    landlock_abi: Option<i32>,
    cgroup: Result<PathBuf, String>,
    /// The workloads' namespaces, when `config.hide` names paths.
    namespace: Option<isolation::WorkloadNamespace>,
    tracker: Tracker,
    /// Exit codes of children this instance spawned, by pid (`None`: killed by a signal).
    exits: Arc<Mutex<HashMap<u32, Option<i32>>>>,
}

impl ProcessDriver {
    /// Prepares the driver: creates the root directory, learns what the host enforces and,
    /// when `config.hide` names paths, makes the workloads' namespace (which a process
    /// already confined by Landlock cannot: call this before confining the daemon).
    pub fn new(config: ProcessConfig) -> Result<Self, DriverError> {
        std::fs::create_dir_all(&config.root)
            .map_err(|e| DriverError::io("creating", &config.root, e))?;
        let landlock_abi = confine::landlock_abi();
        let cgroup = cgroup::detect(config.cgroup_parent.as_deref());
        let namespace = if config.hide.is_empty() {
            None
        } else {
            let needed: Vec<PathBuf> = config
                .read_exec_paths
                .iter()
                .chain(&config.device_files)
                .cloned()
                .collect();
            Some(isolation::WorkloadNamespace::create(
                &config.hide,
                &config.root,
                &needed,
            )?)
        };
        tracing::info!(
            root = %config.root.display(),
            landlock_abi = ?landlock_abi,
            cgroup = ?cgroup,
            hidden = ?namespace.as_ref().map(|n| n.hidden().iter().map(|h| h.path.display().to_string()).collect::<Vec<_>>()),
            "process driver ready"
        );
        Ok(Self {
            tracker: Tracker::new(config.backoff),
            config,
            landlock_abi,
            cgroup,
            namespace,
            exits: Arc::default(),
        })
    }

    fn dir(&self, id: &ReplicaId) -> PathBuf {
        self.config.root.join(id.object_name())
    }

    fn landlock_missing(&self) -> Option<String> {
        match (self.config.landlock, self.landlock_abi) {
            (LandlockMode::Off, _) | (_, Some(_)) => None,
            (_, None) => Some("this kernel does not support Landlock".into()),
        }
    }

    /// Controls the manifest asks for that this host or driver cannot enforce.
    fn not_enforced(&self, spec: &ReplicaSpec) -> Vec<String> {
        let mut out = vec!["network: the process shares the host's network namespace".to_owned()];
        if self.namespace.is_none() {
            out.push(
                "node API: not hidden (the driver was given no paths to hide): the process can connect to the node's API socket"
                    .into(),
            );
        }
        if let Some(why) = self.landlock_missing() {
            out.push(format!("filesystem confinement (Landlock): {why}"));
        } else if self.config.landlock == LandlockMode::Off {
            out.push("filesystem confinement (Landlock): disabled by configuration".into());
        }
        if let Err(why) = &self.cgroup {
            out.push(format!("cpu limit: no delegated cgroup v2 ({why})"));
            out.push(
                "memory limit: applied as RLIMIT_DATA per process (no delegated cgroup v2)".into(),
            );
        }
        for c in &spec.manifest.containers {
            if c.command.is_empty() && c.args.is_empty() {
                continue;
            }
            for p in &c.ports {
                if p.host.is_some_and(|h| h != p.container) {
                    out.push(format!(
                        "container {:?} port {:?}: host port {} cannot be remapped; the process listens on {}",
                        c.name,
                        p.name,
                        p.host.unwrap_or_default(),
                        p.container
                    ));
                }
            }
            if !c.security.capabilities.is_empty() {
                out.push(format!(
                    "container {:?}: capabilities {:?} are not granted (the process driver grants none)",
                    c.name, c.security.capabilities
                ));
            }
            if c.security.run_as_user.is_some() || c.security.run_as_group.is_some() {
                out.push(format!(
                    "container {:?}: run_as_user/run_as_group are not applied (runs as the daemon's user)",
                    c.name
                ));
            }
            if !c.volumes.is_empty() {
                out.push(format!(
                    "container {:?}: volumes are directories under the replica directory (BEEMESH_VOLUME_<NAME>), not mounted at their paths",
                    c.name
                ));
            }
        }
        out
    }

    fn fs_policy(&self, data: &Path) -> FsPolicy {
        FsPolicy {
            read_exec: self.config.read_exec_paths.clone(),
            read_write: vec![data.to_path_buf()],
            device_files: self.config.device_files.clone(),
        }
    }

    /// Prepares the confinement of one child, which starts in `cwd`. `Err` is a reason for
    /// a Failed status.
    fn confinement(
        &self,
        data: &Path,
        cwd: &Path,
        cgroup_name: Option<(&str, &Container)>,
    ) -> Result<(Confinement, Option<PathBuf>), String> {
        let namespace = match &self.namespace {
            Some(ns) => Some(ns.entry(cwd)?),
            None => None,
        };
        let ruleset = match self.config.landlock {
            LandlockMode::Off => None,
            mode => {
                let fd = confine::build_ruleset(&self.fs_policy(data))?;
                if fd.is_none() && mode == LandlockMode::Required {
                    return Err(
                        "Landlock is required ([sandbox] landlock = \"required\") but this kernel does not support it"
                            .into(),
                    );
                }
                fd
            }
        };
        let (cgroup_dir, procs, data_limit) = match (&self.cgroup, cgroup_name) {
            (Ok(parent), Some((name, c))) => {
                let (dir, procs) = cgroup::create(
                    parent,
                    name,
                    c.resources.memory.bytes(),
                    c.resources.cpu.millis(),
                )
                .map_err(|e| format!("creating cgroup {name} under {}: {e}", parent.display()))?;
                (Some(dir), Some(procs), None)
            }
            (_, Some((_, c))) => (None, None, Some(c.resources.memory.bytes())),
            (_, None) => (None, None, None),
        };
        Ok((
            Confinement {
                ruleset,
                cgroup_procs: procs,
                data_limit,
                // Asked at every start, not once: the daemon may have dropped its
                // capabilities (confined itself) since the driver was made.
                drop_bounding: confine::holds_setpcap(),
                namespace,
            },
            cgroup_dir,
        ))
    }

    fn env(&self, spec: &ReplicaSpec, c: &Container, data: &Path) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), PATH.to_owned());
        env.insert("HOME".to_owned(), data.display().to_string());
        env.insert("TMPDIR".to_owned(), data.join("tmp").display().to_string());
        env.insert("BEEMESH_REPLICA".to_owned(), spec.id.to_string());
        for v in &c.volumes {
            let key = format!(
                "BEEMESH_VOLUME_{}",
                v.name.to_ascii_uppercase().replace('-', "_")
            );
            env.insert(
                key,
                volume_dir(data, &c.name, &v.name).display().to_string(),
            );
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// Starts one container process. `Err` is a reason for a Failed status.
    fn spawn(&self, spec: &ReplicaSpec, c: &Container, dir: &Path) -> Result<ProcRecord, String> {
        let argv: Vec<String> = c.command.iter().chain(c.args.iter()).cloned().collect();
        let Some(program) = argv.first() else {
            return Err(format!(
                "container {:?} has no command; the process driver runs commands, not images",
                c.name
            ));
        };
        let data = dir.join("data");
        let mut dirs = vec![data.join("tmp")];
        dirs.extend(
            c.volumes
                .iter()
                .map(|v| volume_dir(&data, &c.name, &v.name)),
        );
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
        let log_path = logs.join(format!("{}.log", c.name));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;

        let cgroup_name = format!("{}_{}", spec.id.object_name(), c.name);
        let cwd = c.workdir.as_deref().map_or(data.clone(), PathBuf::from);
        let (confinement, cgroup_dir) = self.confinement(&data, &cwd, Some((&cgroup_name, c)))?;

        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(self.env(spec, c, &data))
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        confinement.install(&mut cmd);
        let child = cmd.spawn();
        drop(confinement);
        let mut child = child.map_err(|e| {
            if let Some(d) = &cgroup_dir {
                cgroup::remove(d);
            }
            format!("container {:?}: cannot start {argv:?}: {e}", c.name)
        })?;
        let pid = child
            .id()
            .ok_or_else(|| format!("container {:?}: the process exited at once", c.name))?;
        let start_time = procfs::stat(pid).map(|s| s.start_time).unwrap_or_default();
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let code = child.wait().await.ok().and_then(|s| s.code());
            exits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pid, code);
        });
        tracing::info!(replica = %spec.id, container = %c.name, pid, "started process");
        Ok(ProcRecord {
            name: c.name.clone(),
            pid,
            start_time,
            command: argv,
            cgroup: cgroup_dir,
        })
    }

    fn container_state(&self, rec: &ProcRecord) -> ContainerState {
        if procfs::alive(rec.pid, Some(rec.start_time)) {
            return ContainerState::Running;
        }
        let code = self
            .exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rec.pid)
            .copied()
            .flatten();
        ContainerState::Exited { code }
    }

    fn container_statuses(
        &self,
        record: &Record,
        spec: Option<&ReplicaSpec>,
    ) -> Vec<ContainerStatus> {
        let status = |name: &str, rec: Option<&ProcRecord>| {
            let state = rec.map_or(ContainerState::Missing, |r| self.container_state(r));
            ContainerStatus {
                name: name.to_owned(),
                pid: rec
                    .map(|r| r.pid)
                    .filter(|_| state == ContainerState::Running),
                state,
                id: None,
            }
        };
        match spec {
            Some(s) => s
                .manifest
                .containers
                .iter()
                .map(|c| status(&c.name, record.container(&c.name)))
                .collect(),
            None => record
                .containers
                .iter()
                .map(|r| status(&r.name, Some(r)))
                .collect(),
        }
    }

    fn ports(spec: &ReplicaSpec) -> Vec<PortBinding> {
        spec.manifest
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .map(|p| PortBinding {
                name: p.name.clone(),
                container_port: p.container,
                host_ip: "127.0.0.1".into(),
                host_port: p.container,
                protocol: crate::podman::spec::protocol_name(p.protocol).into(),
            })
            .collect()
    }

    fn derive_state(containers: &[ContainerStatus]) -> ReplicaState {
        match containers
            .iter()
            .find(|c| c.state != ContainerState::Running)
        {
            None if !containers.is_empty() => ReplicaState::Running,
            None => ReplicaState::Failed {
                reason: "the replica has no processes".into(),
            },
            Some(c) => ReplicaState::Failed {
                reason: format!("container {:?} is {}", c.name, describe(&c.state)),
            },
        }
    }

    fn status_of(
        &self,
        spec: &ReplicaSpec,
        record: &Record,
        action: EnsureAction,
        state: Option<ReplicaState>,
        not_enforced: Vec<String>,
    ) -> ReplicaStatus {
        let containers = self.container_statuses(record, Some(spec));
        ReplicaStatus {
            id: spec.id.clone(),
            content_id: spec.content_id.clone(),
            state: state.unwrap_or_else(|| Self::derive_state(&containers)),
            action,
            containers,
            ports: Self::ports(spec),
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

    /// Processes still in the group led by `rec` (the leader and anything it started).
    fn group_alive(rec: &ProcRecord) -> bool {
        if procfs::alive(rec.pid, Some(rec.start_time)) {
            return true;
        }
        procfs::all()
            .iter()
            .any(|p| p.pgrp == rec.pid && p.start_time >= rec.start_time && p.state != 'Z')
    }

    fn signal_group(rec: &ProcRecord, signal: rustix::process::Signal) {
        if !Self::group_alive(rec) {
            return;
        }
        let Some(pgid) = i32::try_from(rec.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        if let Err(e) = rustix::process::kill_process_group(pgid, signal)
            && e != rustix::io::Errno::SRCH
        {
            tracing::warn!(pid = rec.pid, error = %e, "cannot signal process group");
        }
    }

    /// Stops the processes of `record`: SIGTERM to each group, SIGKILL after the grace.
    async fn kill_all(&self, record: &Record) {
        use rustix::process::Signal;
        for rec in &record.containers {
            Self::signal_group(rec, Signal::TERM);
        }
        let deadline = tokio::time::Instant::now() + self.config.stop_timeout;
        while record.containers.iter().any(Self::group_alive)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for rec in &record.containers {
            Self::signal_group(rec, Signal::KILL);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while record.containers.iter().any(Self::group_alive)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut exits = self.exits.lock().unwrap_or_else(|p| p.into_inner());
        for rec in &record.containers {
            exits.remove(&rec.pid);
            if let Some(c) = &rec.cgroup {
                cgroup::remove(c);
            }
        }
    }

    async fn remove(&self, id: &ReplicaId) -> Result<(), DriverError> {
        let dir = self.dir(id);
        match state::load(&dir) {
            Ok(Some(record)) => self.kill_all(&record).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(replica = %id, error = %e, "removing a replica whose record is unreadable")
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::io("removing", dir, e)),
        }
    }

    /// Creates the replica directory and starts every container. `Err` is a reason.
    fn create(&self, spec: &ReplicaSpec, dir: &Path) -> Result<Record, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let labels = ReplicaLabels {
            id: spec.id.clone(),
            content_id: spec.content_id.clone(),
            node: spec.node.clone(),
        };
        let mut record = Record::new(&labels);
        for c in &spec.manifest.containers {
            let rec = self.spawn(spec, c, dir)?;
            record.upsert(rec);
            // Record each process as soon as it runs, so a crash here leaves nothing unknown.
            state::store(dir, &record).map_err(|e| e.to_string())?;
        }
        Ok(record)
    }

    fn rotate_logs(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir.join("logs")) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "log") {
                continue;
            }
            if e.metadata()
                .is_ok_and(|m| m.len() > self.config.max_log_bytes)
            {
                let old = path.with_extension("log.1");
                let result = std::fs::copy(&path, &old).and_then(|_| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(0)
                });
                if let Err(err) = result {
                    tracing::warn!(log = %path.display(), error = %err, "cannot rotate log");
                }
            }
        }
    }

    async fn settle(
        &self,
        spec: &ReplicaSpec,
        record: &Record,
        action: EnsureAction,
        not_enforced: Vec<String>,
    ) -> ReplicaStatus {
        let mut status = self.status_of(spec, record, action, None, not_enforced);
        if status.state.is_running() {
            for c in &spec.manifest.containers {
                if let Some(ready) = &c.ready
                    && !self.probe(spec, c, ready).await.passed()
                {
                    status.state = ReplicaState::Starting;
                    break;
                }
            }
        }
        status
    }

    async fn probe(&self, spec: &ReplicaSpec, c: &Container, h: &Health) -> ProbeOutcome {
        let timeout = h.timeout.to_std();
        let local = |port: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        if let Some(path) = &h.http {
            return crate::probe::http(local(h.port.unwrap_or(80)), path, timeout).await;
        }
        if let Some(port) = h.tcp {
            return crate::probe::tcp(local(port), timeout).await;
        }
        if let Some(cmd) = &h.exec {
            return self.exec_probe(spec, c, cmd, timeout).await;
        }
        ProbeOutcome::NotConfigured
    }

    /// Runs an exec probe as a confined child in the replica's data directory.
    async fn exec_probe(
        &self,
        spec: &ReplicaSpec,
        c: &Container,
        cmd: &[String],
        timeout: Duration,
    ) -> ProbeOutcome {
        let Some(program) = cmd.first() else {
            return ProbeOutcome::Failed {
                detail: "empty exec probe".into(),
            };
        };
        let data = self.dir(&spec.id).join("data");
        let confinement = match self.confinement(&data, &data, None) {
            Ok((conf, _)) => conf,
            Err(e) => return ProbeOutcome::Failed { detail: e },
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(&cmd[1..])
            .env_clear()
            .envs(self.env(spec, c, &data))
            .current_dir(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        confinement.install(&mut command);
        let child = command.spawn();
        drop(confinement);
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                return ProbeOutcome::Failed {
                    detail: format!("exec {cmd:?}: {e}"),
                };
            }
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(s)) if s.success() => ProbeOutcome::Passed {
                detail: format!("exec {cmd:?}: exit 0"),
            },
            Ok(Ok(s)) => ProbeOutcome::Failed {
                detail: format!("exec {cmd:?}: {s}"),
            },
            Ok(Err(e)) => ProbeOutcome::Failed {
                detail: format!("exec {cmd:?}: {e}"),
            },
            Err(_) => ProbeOutcome::Failed {
                detail: format!("exec {cmd:?}: no result within {timeout:?}"),
            },
        }
    }

    fn load_record(&self, id: &ReplicaId) -> Result<Option<Record>, DriverError> {
        state::load(&self.dir(id))
    }
}

fn volume_dir(data: &Path, container: &str, volume: &str) -> PathBuf {
    data.join("volumes").join(container).join(volume)
}

fn describe(s: &ContainerState) -> String {
    match s {
        ContainerState::Running => "running".into(),
        ContainerState::Created => "created".into(),
        ContainerState::Exited { code: Some(c) } => format!("exited with code {c}"),
        ContainerState::Exited { code: None } => "exited".into(),
        ContainerState::Missing => "missing".into(),
        ContainerState::Other { detail } => detail.clone(),
    }
}

#[async_trait]
impl ContainerDriver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn ensure(&self, spec: &ReplicaSpec) -> Result<ReplicaStatus, DriverError> {
        spec.validate()?;
        let _guard = self.tracker.lock(&spec.id).await;
        let not_enforced = self.not_enforced(spec);
        let dir = self.dir(&spec.id);
        self.rotate_logs(&dir);
        let record = match self.load_record(&spec.id) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(replica = %spec.id, error = %e, "replacing a replica with an unreadable record");
                self.remove(&spec.id).await?;
                None
            }
        };

        if let Some(mut record) = record.clone() {
            let labels = record.labels(&dir)?;
            let same_names = spec.manifest.containers.len() == record.containers.len()
                && spec
                    .manifest
                    .containers
                    .iter()
                    .all(|c| record.container(&c.name).is_some());
            if labels.content_id == spec.content_id && same_names {
                let seen = self.tracker.mark_seen(&spec.id);
                let dead: Vec<&Container> = spec
                    .manifest
                    .containers
                    .iter()
                    .filter(|c| {
                        record
                            .container(&c.name)
                            .is_none_or(|r| !procfs::alive(r.pid, Some(r.start_time)))
                    })
                    .collect();
                if dead.is_empty() {
                    let action = if seen {
                        EnsureAction::Unchanged
                    } else {
                        EnsureAction::Adopted
                    };
                    return Ok(self.settle(spec, &record, action, not_enforced).await);
                }
                let what = dead
                    .iter()
                    .map(|c| {
                        let state = record
                            .container(&c.name)
                            .map_or(ContainerState::Missing, |r| self.container_state(r));
                        format!("container {:?} {}", c.name, describe(&state))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                if let Err(left) = self.tracker.may_restart(&spec.id) {
                    let reason = format!(
                        "{what}; restart {} in {}",
                        self.tracker.restarts(&spec.id) + 1,
                        human(left)
                    );
                    return Ok(self.status_of(
                        spec,
                        &record,
                        EnsureAction::None,
                        Some(ReplicaState::Failed { reason }),
                        not_enforced,
                    ));
                }
                self.tracker.record_restart(&spec.id);
                tracing::info!(replica = %spec.id, "restarting: {what}");
                for c in dead {
                    // Whatever the dead leader left in its group goes with it.
                    if let Some(old) = record.container(&c.name).cloned() {
                        let single = Record {
                            containers: vec![old],
                            ..record.clone()
                        };
                        self.kill_all(&single).await;
                    }
                    match self.spawn(spec, c, &dir) {
                        Ok(rec) => {
                            record.upsert(rec);
                            state::store(&dir, &record)?;
                        }
                        Err(reason) => {
                            return Ok(self.status_of(
                                spec,
                                &record,
                                EnsureAction::None,
                                Some(ReplicaState::Failed { reason }),
                                not_enforced,
                            ));
                        }
                    }
                }
                return Ok(self
                    .settle(spec, &record, EnsureAction::Restarted, not_enforced)
                    .await);
            }
        }

        if let Some(p) = self.tracker.pending_failure(&spec.id, &spec.content_id) {
            return Ok(self.failed(
                spec,
                format!("{} (next attempt in {})", p.reason, human(p.retry_in)),
                not_enforced,
            ));
        }
        let replacing = record.is_some();
        if replacing {
            self.remove(&spec.id).await?;
        }
        match self.create(spec, &dir) {
            Ok(record) => {
                self.tracker.clear_failure(&spec.id);
                self.tracker.mark_seen(&spec.id);
                let action = if replacing {
                    EnsureAction::Replaced
                } else {
                    EnsureAction::Created
                };
                Ok(self.settle(spec, &record, action, not_enforced).await)
            }
            Err(reason) => {
                tracing::warn!(replica = %spec.id, %reason, "replica failed to start");
                self.remove(&spec.id).await?;
                let message = self
                    .tracker
                    .record_failure(&spec.id, &spec.content_id, reason);
                Ok(self.failed(spec, message, not_enforced))
            }
        }
    }

    async fn status(&self, id: &ReplicaId) -> Result<Option<ReplicaStatus>, DriverError> {
        let Some(record) = self.load_record(id)? else {
            return Ok(None);
        };
        let labels = record.labels(&self.dir(id))?;
        let containers = self.container_statuses(&record, None);
        Ok(Some(ReplicaStatus {
            id: id.clone(),
            content_id: labels.content_id,
            state: Self::derive_state(&containers),
            action: EnsureAction::None,
            containers,
            ports: Vec::new(),
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
        let entries = std::fs::read_dir(&self.config.root)
            .map_err(|e| DriverError::io("listing", &self.config.root, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let record = match state::load(&dir) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a replica directory");
                    continue;
                }
            };
            let labels = match record.labels(&dir) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a replica directory");
                    continue;
                }
            };
            let containers = self.container_statuses(&record, None);
            out.push(ReplicaInfo {
                state: Self::derive_state(&containers),
                id: labels.id,
                content_id: labels.content_id,
                node: labels.node,
                containers,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn logs(&self, id: &ReplicaId, opts: LogOptions) -> Result<LogStream, DriverError> {
        let record = self
            .load_record(id)?
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        let dir = self.dir(id);
        let (tx, rx) = mpsc::channel::<Result<LogLine, DriverError>>(256);
        for rec in record.containers {
            let path = dir.join("logs").join(format!("{}.log", rec.name));
            let tx = tx.clone();
            tokio::spawn(follow_log(path, rec, opts, tx));
        }
        drop(tx);
        Ok(receiver_stream(rx))
    }

    async fn usage(&self, id: &ReplicaId) -> Result<Usage, DriverError> {
        let record = self
            .load_record(id)?
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        let snapshot = procfs::all();
        let mut usage = Usage::default();
        for rec in &record.containers {
            let procs = if procfs::alive(rec.pid, Some(rec.start_time)) {
                procfs::tree(&snapshot, rec.pid)
            } else {
                Vec::new()
            };
            let u = procfs::sum_usage(&rec.name, &procs);
            usage.cpu_time_ms += u.cpu_time_ms;
            usage.memory_rss_bytes += u.memory_rss_bytes;
            usage.processes += u.processes;
            usage.containers.push(u);
        }
        Ok(usage)
    }

    async fn health(&self, spec: &ReplicaSpec) -> Result<HealthReport, DriverError> {
        if self.load_record(&spec.id)?.is_none() {
            return Err(DriverError::NotFound(spec.id.to_string()));
        }
        let mut containers = Vec::new();
        for c in &spec.manifest.containers {
            let liveness = match &c.health {
                Some(h) => self.probe(spec, c, h).await,
                None => ProbeOutcome::NotConfigured,
            };
            let readiness = match &c.ready {
                Some(h) => self.probe(spec, c, h).await,
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
        let landlock = match (self.config.landlock, self.landlock_abi) {
            (LandlockMode::Off, _) => Control {
                control: "landlock".into(),
                enforcement: Enforcement::NotEnforced,
                detail: "disabled by configuration".into(),
            },
            (_, Some(abi)) => Control {
                control: "landlock".into(),
                enforcement: if abi >= confine::TARGET_ABI as i32 {
                    Enforcement::Enforced
                } else {
                    Enforcement::Partial
                },
                detail: format!(
                    "kernel ABI {abi}: read/execute on system paths, read-write on the replica directory{}",
                    if abi >= 6 {
                        ", signals and abstract sockets scoped"
                    } else {
                        ""
                    }
                ),
            },
            (mode, None) => Control {
                control: "landlock".into(),
                enforcement: Enforcement::NotEnforced,
                detail: if mode == LandlockMode::Required {
                    "this kernel has no Landlock: replicas fail (landlock = \"required\")".into()
                } else {
                    "this kernel has no Landlock: replicas run unconfined (best-effort)".into()
                },
            },
        };
        let (memory, cpu) = match &self.cgroup {
            Ok(parent) => (
                Control {
                    control: "memory-limit".into(),
                    enforcement: Enforcement::Enforced,
                    detail: format!("memory.max in a cgroup under {}", parent.display()),
                },
                Control {
                    control: "cpu-limit".into(),
                    enforcement: Enforcement::Enforced,
                    detail: format!("cpu.max in a cgroup under {}", parent.display()),
                },
            ),
            Err(why) => (
                Control {
                    control: "memory-limit".into(),
                    enforcement: Enforcement::Partial,
                    detail: format!("RLIMIT_DATA per process (no delegated cgroup v2: {why})"),
                },
                Control {
                    control: "cpu-limit".into(),
                    enforcement: Enforcement::NotEnforced,
                    detail: format!("no delegated cgroup v2: {why}"),
                },
            ),
        };
        DriverReport {
            driver: "process".into(),
            runtime: format!(
                "child processes under {} (uid {})",
                self.config.root.display(),
                rustix::process::getuid().as_raw()
            ),
            controls: vec![
                landlock,
                Control {
                    control: "no-new-privileges".into(),
                    enforcement: Enforcement::Enforced,
                    detail: "set before exec".into(),
                },
                Control {
                    control: "capabilities".into(),
                    enforcement: Enforcement::Enforced,
                    detail: if confine::holds_setpcap() || self.namespace.is_some() {
                        "effective, permitted, inheritable and ambient sets cleared; bounding set emptied; securebits locked".into()
                    } else {
                        "effective, permitted, inheritable and ambient sets cleared; no_new_privs prevents regaining any (bounding set kept: the daemon lacks CAP_SETPCAP)".into()
                    },
                },
                memory,
                cpu,
                Control {
                    control: "network".into(),
                    enforcement: Enforcement::NotEnforced,
                    detail: "processes share the host's network namespace; ports are not remapped"
                        .into(),
                },
                Control {
                    control: "user-namespace".into(),
                    enforcement: Enforcement::NotEnforced,
                    detail: if self.namespace.is_some() {
                        "processes run as the daemon's user (in a user namespace of their own that maps only that uid and gid, for the mount namespace below)".into()
                    } else {
                        "processes run as the daemon's user".into()
                    },
                },
                self.node_api_control(),
            ],
        }
    }
}

impl ProcessDriver {
    /// Whether workloads can reach the node's API socket and files.
    fn node_api_control(&self) -> Control {
        let control = "node-api".to_owned();
        let Some(ns) = &self.namespace else {
            return Control {
                control,
                enforcement: Enforcement::NotEnforced,
                detail: "no paths to hide were configured: processes can connect to the node's API socket".into(),
            };
        };
        let hidden = ns
            .hidden()
            .iter()
            .map(|h| h.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Control {
            control,
            enforcement: Enforcement::Enforced,
            detail: format!(
                "processes run in a user and mount namespace of their own where {hidden} are covered (directories by an empty read-only tmpfs, files by /dev/null); from there /proc/PID/root of processes outside is denied (no ptrace access across the user namespace)"
            ),
        }
    }
}

/// Streams one container's log file: the last `tail` lines, then (with `follow`) new lines
/// until the process has exited and the file is drained, or the replica is removed.
async fn follow_log(
    path: PathBuf,
    rec: ProcRecord,
    opts: LogOptions,
    tx: mpsc::Sender<Result<LogLine, DriverError>>,
) {
    let send_lines = |lines: Vec<String>| {
        let tx = tx.clone();
        let name = rec.name.clone();
        async move {
            for line in lines {
                let item = LogLine {
                    container: name.clone(),
                    source: LogSource::Output,
                    line,
                };
                if tx.send(Ok(item)).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    let (lines, mut offset) = match read_tail(&path, opts.tail) {
        Ok(v) => v,
        Err(e) => {
            let _ = tx.send(Err(DriverError::io("reading", &path, e))).await;
            return;
        }
    };
    if !send_lines(lines).await || !opts.follow {
        return;
    }
    let mut splitter = LineSplitter::default();
    loop {
        let exited = !procfs::alive(rec.pid, Some(rec.start_time));
        let chunk = match read_from(&path, &mut offset) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => {
                let _ = tx.send(Err(DriverError::io("reading", &path, e))).await;
                return;
            }
        };
        if !send_lines(splitter.push(&chunk)).await {
            return;
        }
        if exited && chunk.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(line) = splitter.finish() {
        let _ = send_lines(vec![line]).await;
    }
}

/// The last `tail` lines of the file (all when `None`) and the offset after them.
fn read_tail(path: &Path, tail: Option<usize>) -> std::io::Result<(Vec<String>, u64)> {
    const WINDOW: u64 = 4 << 20;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(WINDOW);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(len - start).read_to_end(&mut bytes)?;
    // Only complete lines; a partial last line is picked up by `follow`.
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut splitter = LineSplitter::default();
    let mut lines = splitter.push(&bytes[..complete]);
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    if let Some(n) = tail {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    Ok((lines, start + complete as u64))
}

/// New bytes of the file after `offset`; a truncated (rotated) file is read from its start.
fn read_from(path: &Path, offset: &mut u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    f.seek(SeekFrom::Start(*offset))?;
    let mut bytes = Vec::new();
    f.take((len - *offset).min(1 << 20))
        .read_to_end(&mut bytes)?;
    *offset += bytes.len() as u64;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_complete_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.log");
        std::fs::write(&p, "one\ntwo\nthree\npart").expect("write");
        let (lines, off) = read_tail(&p, Some(2)).expect("tail");
        assert_eq!(lines, ["two", "three"]);
        assert_eq!(off, 14);
        let (all, _) = read_tail(&p, None).expect("tail");
        assert_eq!(all.len(), 3);
        let mut o = off;
        assert_eq!(read_from(&p, &mut o).expect("read"), b"part");
        std::fs::write(&p, "x\n").expect("truncate");
        assert_eq!(read_from(&p, &mut o).expect("read"), b"x\n");
        assert_eq!(
            read_tail(&dir.path().join("missing"), None)
                .expect("ok")
                .0
                .len(),
            0
        );
    }
}
