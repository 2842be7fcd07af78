//! Confinement of the BeeMesh daemon itself (DESIGN.md section 6): drop every capability it
//! does not need, set no_new_privs, and restrict its filesystem access with Landlock to its
//! configuration, data directory, API socket and the Podman socket, before it handles any
//! input from the network.
//!
//! ```no_run
//! # fn main() -> Result<(), beemesh_sandbox::SandboxError> {
//! # let host = beemesh_manifest::HostConfig::load(std::path::Path::new("/etc/beemesh/host.toml")).unwrap();
//! use beemesh_sandbox::{SandboxPolicy, confine};
//! let policy = SandboxPolicy::for_daemon(&host, &["/etc/beemesh/host.toml".into()], None);
//! // Before any thread is started (before building the tokio runtime):
//! let status = confine(&policy)?;
//! println!("{}", serde_json::to_string(&status).unwrap());
//! # Ok(()) }
//! ```
//!
//! Landlock, capabilities and no_new_privs are per thread and inherited by threads created
//! afterwards, so [`confine`] refuses to run in a process that already has several threads.
//! Confinement is irreversible.
//!
//! `[sandbox] landlock = "required"` makes [`confine`] fail where Landlock cannot be
//! enforced; `"best-effort"` confines as far as the kernel allows and says what it could not
//! do in [`SandboxStatus::not_enforced`]; `"off"` skips Landlock (capabilities and
//! no_new_privs are still applied).

use std::path::{Path, PathBuf};

use beemesh_manifest::HostConfig;
use beemesh_manifest::host::LandlockMode;
use caps::{CapSet, Capability, CapsHashSet};
use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, RestrictSelf, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
};
use serde::{Deserialize, Serialize};

/// TEST-ONLY: when set to `1`, the sandbox behaves as if the kernel had no Landlock. Tests
/// use it to check that `landlock = "required"` refuses to start; it can only make
/// confinement fail (required) or weaker-and-reported (best-effort), and a warning is
/// logged whenever it is honoured. Never set it in production.
pub const SIMULATE_NO_LANDLOCK_ENV: &str = "BEEMESH_SANDBOX_SIMULATE_NO_LANDLOCK";

/// The Landlock ABI the daemon's ruleset is written for. ABI 9 adds control over
/// connecting to unix sockets; older kernels enforce the subset they know.
pub const TARGET_ABI: ABI = ABI::V9;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "[sandbox] landlock = \"required\" but Landlock cannot be enforced on this host: {reason}; \
         use a kernel with Landlock enabled (5.13 or later, `lsm=landlock,...`) or set landlock = \"best-effort\""
    )]
    LandlockUnavailable { reason: String },

    #[error(
        "the sandbox must be applied before any thread is started, but this process has {threads} threads \
         (call confine() before building the async runtime)"
    )]
    Threads { threads: usize },

    #[error("{role} path {} does not exist; create it before confining the daemon", path.display())]
    MissingPath { role: &'static str, path: PathBuf },

    #[error(
        "{} is to be read-only for the daemon (its configuration, ticket or token) but lies beneath {}, \
         which the daemon may write: a compromised daemon could change it for its next start. \
         Keep the configuration outside the data directory and the API socket's directory \
         (give the API socket a directory of its own, e.g. /run/beemesh/api.sock)",
        read_only.display(), writable.display()
    )]
    ReadOnlyBeneathWritable {
        read_only: PathBuf,
        writable: PathBuf,
    },

    #[error("building the Landlock ruleset ({step}): {message}")]
    Landlock { step: &'static str, message: String },

    #[error("capabilities: {op}: {message}")]
    Capabilities { op: String, message: String },

    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(nix::Error),

    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the daemon may keep. Build it with [`SandboxPolicy::for_daemon`] and extend it for
/// what the node needs beyond that (e.g. read/execute on system paths when the process
/// driver spawns workloads: they inherit the daemon's domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPolicy {
    pub landlock: LandlockMode,
    /// Read (files and directories).
    pub read_only: Vec<PathBuf>,
    /// Read and execute.
    pub read_exec: Vec<PathBuf>,
    /// Everything beneath (data directory, API socket directory).
    pub read_write: Vec<PathBuf>,
    /// Unix sockets the daemon connects to (the Podman API).
    pub sockets: Vec<PathBuf>,
    /// Paths that must exist (the data directory, the config file); the rest are skipped
    /// when missing.
    pub required: Vec<PathBuf>,
    /// Capabilities kept in the effective and permitted sets (and the bounding set); all
    /// others are dropped. Empty for an unprivileged daemon.
    pub keep_capabilities: Vec<Capability>,
}

/// System files an unprivileged network daemon reads at run time.
pub fn default_system_read_only() -> Vec<PathBuf> {
    [
        "/etc/resolv.conf",
        "/etc/hosts",
        "/etc/host.conf",
        "/etc/gai.conf",
        "/etc/nsswitch.conf",
        "/etc/localtime",
        "/etc/passwd",
        "/etc/group",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/usr/share/zoneinfo",
        "/usr/share/ca-certificates",
        "/proc",
        "/sys/fs/cgroup",
        "/sys/devices/system/cpu",
        "/dev/urandom",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

impl SandboxPolicy {
    /// Refuses a policy under which a read-only path (the daemon's configuration, ticket,
    /// token) lies beneath a read-write one: Landlock rules only add access, so it would be
    /// writable. Paths are compared after resolving symlinks; missing paths are skipped.
    /// [`confine`] calls this before applying anything.
    pub fn check(&self) -> Result<(), SandboxError> {
        let resolve = |p: &PathBuf| std::fs::canonicalize(p).ok();
        let writable: Vec<(PathBuf, PathBuf)> = self
            .read_write
            .iter()
            .filter_map(|w| resolve(w).map(|r| (w.clone(), r)))
            .filter(|(_, r)| r.is_dir())
            .collect();
        for ro in &self.read_only {
            let Some(resolved) = resolve(ro) else {
                continue;
            };
            if let Some((w, _)) = writable.iter().find(|(_, r)| resolved.starts_with(r)) {
                return Err(SandboxError::ReadOnlyBeneathWritable {
                    read_only: ro.clone(),
                    writable: w.clone(),
                });
            }
        }
        Ok(())
    }

    /// The daemon's policy from its host config: read its config files, read-write its data
    /// directory and its API socket's directory, connect to the Podman socket. The config
    /// files must not lie beneath either writable directory ([`SandboxPolicy::check`]).
    pub fn for_daemon(
        host: &HostConfig,
        config_files: &[PathBuf],
        podman_socket: Option<&Path>,
    ) -> Self {
        let mut read_only = config_files.to_vec();
        read_only.extend(host.trust.ticket.iter().cloned());
        read_only.extend(host.api.token_file.iter().cloned());
        read_only.extend(default_system_read_only());
        let mut read_write = vec![host.node.data_dir.clone()];
        let api_dir = host
            .api
            .socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf);
        read_write.extend(api_dir.clone());
        read_write.push(PathBuf::from("/dev/null"));
        let mut required = vec![host.node.data_dir.clone()];
        required.extend(config_files.iter().cloned());
        required.extend(api_dir);
        Self {
            landlock: host.sandbox.landlock,
            read_only,
            read_exec: Vec::new(),
            read_write,
            sockets: podman_socket.map(Path::to_path_buf).into_iter().collect(),
            required,
            keep_capabilities: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    Enforced,
    Partial,
    NotEnforced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockReport {
    /// The kernel's Landlock ABI version; `None` without Landlock.
    pub abi: Option<i32>,
    pub enforcement: Enforcement,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapabilityReport {
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
    pub inheritable: Vec<String>,
    pub ambient: Vec<String>,
    /// Capabilities left in the bounding set (what exec could ever grant).
    pub bounding: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AllowedPaths {
    pub read_only: Vec<String>,
    pub read_exec: Vec<String>,
    pub read_write: Vec<String>,
    pub sockets: Vec<String>,
}

/// What the daemon's confinement is; `beemesh status` shows it (JSON field `sandbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// The configured `[sandbox] landlock` mode.
    pub mode: LandlockMode,
    pub landlock: LandlockReport,
    pub no_new_privs: bool,
    pub capabilities: CapabilityReport,
    pub allowed: AllowedPaths,
    /// What could not be enforced, in words.
    pub not_enforced: Vec<String>,
}

impl SandboxStatus {
    /// True when Landlock, no_new_privs and the capability drop are all in force.
    pub fn fully_confined(&self) -> bool {
        self.landlock.enforcement == Enforcement::Enforced
            && self.no_new_privs
            && self.capabilities.effective.is_empty()
    }
}

fn simulated() -> bool {
    std::env::var_os(SIMULATE_NO_LANDLOCK_ENV).is_some_and(|v| v == "1")
}

/// The kernel's Landlock ABI, or why there is none. Probing has no side effect.
pub fn landlock_abi() -> Result<i32, String> {
    if simulated() {
        tracing::warn!(
            "{SIMULATE_NO_LANDLOCK_ENV}=1: behaving as if the kernel had no Landlock (test-only)"
        );
        return Err(format!(
            "Landlock absence simulated by {SIMULATE_NO_LANDLOCK_ENV}=1 (test-only)"
        ));
    }
    let status = RestrictSelf::default()
        .no_new_privs(false)
        .apply()
        .map_err(|e| format!("probing Landlock failed: {e}"))?;
    match status.landlock {
        landlock::LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => Ok(kernel_abi.unwrap_or(effective_abi as i32)),
        landlock::LandlockStatus::NotEnabled => {
            Err("the kernel supports Landlock but it is not enabled (add landlock to the lsm= boot parameter)".into())
        }
        landlock::LandlockStatus::NotImplemented => Err("the kernel has no Landlock support".into()),
    }
}

/// The status of a process that has not been confined (mode `off`, or before `confine`).
pub fn current_status(policy: &SandboxPolicy) -> SandboxStatus {
    let abi = landlock_abi();
    SandboxStatus {
        mode: policy.landlock,
        landlock: LandlockReport {
            abi: abi.as_ref().ok().copied(),
            enforcement: Enforcement::NotEnforced,
            detail: match &abi {
                Ok(_) => "not applied".into(),
                Err(why) => why.clone(),
            },
        },
        no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
        capabilities: capability_report(),
        allowed: allowed(policy),
        not_enforced: vec!["the daemon is not confined".into()],
    }
}

fn thread_count() -> Result<usize, SandboxError> {
    let path = PathBuf::from("/proc/self/status");
    let text =
        std::fs::read_to_string(&path).map_err(|source| SandboxError::Io { path, source })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(1))
}

fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v
}

fn capability_report() -> CapabilityReport {
    let read = |set| caps::read(None, set).map(|s| names(&s)).unwrap_or_default();
    CapabilityReport {
        effective: read(CapSet::Effective),
        permitted: read(CapSet::Permitted),
        inheritable: read(CapSet::Inheritable),
        ambient: read(CapSet::Ambient),
        bounding: read(CapSet::Bounding),
    }
}

fn allowed(policy: &SandboxPolicy) -> AllowedPaths {
    let s = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect();
    AllowedPaths {
        read_only: s(&policy.read_only),
        read_exec: s(&policy.read_exec),
        read_write: s(&policy.read_write),
        sockets: s(&policy.sockets),
    }
}

fn ruleset(policy: &SandboxPolicy) -> Result<landlock::RulesetCreated, SandboxError> {
    let abi = TARGET_ABI;
    let err = |step: &'static str| {
        move |e: landlock::RulesetError| SandboxError::Landlock {
            step,
            message: e.to_string(),
        }
    };
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err("handled accesses"))?
        .create()
        .map_err(err("create"))?
        .add_rules(path_beneath_rules(
            &policy.read_only,
            AccessFs::ReadFile | AccessFs::ReadDir,
        ))
        .map_err(err("read-only paths"))?
        .add_rules(path_beneath_rules(
            &policy.read_exec,
            AccessFs::from_read(abi),
        ))
        .map_err(err("read-exec paths"))?
        .add_rules(path_beneath_rules(
            &policy.read_write,
            AccessFs::from_all(abi),
        ))
        .map_err(err("read-write paths"))?
        .add_rules(path_beneath_rules(
            &policy.sockets,
            AccessFs::from_file(abi),
        ))
        .map_err(err("sockets"))
}

/// Confines the calling process as `policy` says. Irreversible; call it once, early, from
/// the main thread before any other thread exists.
pub fn confine(policy: &SandboxPolicy) -> Result<SandboxStatus, SandboxError> {
    let threads = thread_count()?;
    if threads > 1 {
        return Err(SandboxError::Threads { threads });
    }
    for p in &policy.required {
        if !p.exists() {
            return Err(SandboxError::MissingPath {
                role: "required",
                path: p.clone(),
            });
        }
    }
    policy.check()?;
    let mut not_enforced = Vec::new();

    // 1. Landlock: decide and build the ruleset while every path can still be opened.
    let abi = landlock_abi();
    let ruleset = match (policy.landlock, &abi) {
        (LandlockMode::Off, _) => {
            not_enforced.push("Landlock: disabled by [sandbox] landlock = \"off\"".into());
            None
        }
        (LandlockMode::Required, Err(reason)) => {
            return Err(SandboxError::LandlockUnavailable {
                reason: reason.clone(),
            });
        }
        (LandlockMode::BestEffort, Err(reason)) => {
            not_enforced.push(format!("Landlock: {reason}"));
            None
        }
        (_, Ok(_)) => Some(ruleset(policy)?),
    };

    // 2. Capabilities: keep only what the policy names (and what we actually hold).
    let keep: CapsHashSet = policy.keep_capabilities.iter().copied().collect();
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(|e| cap_err("reading permitted", e))?;
    let kept: CapsHashSet = keep.intersection(&permitted).copied().collect();
    for missing in keep.difference(&permitted) {
        not_enforced.push(format!(
            "capability {missing} was to be kept but the daemon does not hold it"
        ));
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| cap_err("clearing ambient", e))?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all().difference(&kept) {
            // EINVAL: a capability this kernel does not know.
            if let Err(e) = caps::drop(None, CapSet::Bounding, *cap)
                && caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false)
            {
                return Err(cap_err(&format!("dropping {cap} from the bounding set"), e));
            }
        }
    } else if !caps::read(None, CapSet::Bounding)
        .map(|b| b.is_empty())
        .unwrap_or(true)
    {
        not_enforced.push(
            "capability bounding set: kept (dropping it needs CAP_SETPCAP); no_new_privs prevents regaining capabilities through exec"
                .into(),
        );
    }
    caps::set(None, CapSet::Effective, &kept).map_err(|e| cap_err("setting effective", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| cap_err("setting permitted", e))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .map_err(|e| cap_err("clearing inheritable", e))?;

    // 3. no_new_privs, then 4. Landlock.
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    let landlock = match ruleset {
        None => LandlockReport {
            abi: abi.as_ref().ok().copied(),
            enforcement: Enforcement::NotEnforced,
            detail: match &abi {
                Err(why) => why.clone(),
                Ok(_) => "disabled by configuration".into(),
            },
        },
        Some(r) => {
            let status = r.restrict_self().map_err(|e| SandboxError::Landlock {
                step: "restrict_self",
                message: e.to_string(),
            })?;
            let v = abi.as_ref().ok().copied().unwrap_or_default();
            let (enforcement, detail) = match status.ruleset {
                RulesetStatus::FullyEnforced => {
                    (Enforcement::Enforced, format!("ABI {v}: fully enforced"))
                }
                RulesetStatus::PartiallyEnforced => (
                    Enforcement::Partial,
                    format!("ABI {v}: enforced with the access rights this kernel knows"),
                ),
                RulesetStatus::NotEnforced => {
                    (Enforcement::NotEnforced, format!("ABI {v}: not enforced"))
                }
            };
            if enforcement == Enforcement::NotEnforced && policy.landlock == LandlockMode::Required
            {
                return Err(SandboxError::LandlockUnavailable {
                    reason: "the kernel accepted no rule of the ruleset".into(),
                });
            }
            if v < 9 {
                not_enforced.push(format!(
                    "Landlock ABI {v}: connecting to unix sockets is not restricted (ABI 9 restricts it to the allowed sockets)"
                ));
            }
            if enforcement == Enforcement::NotEnforced {
                not_enforced.push(format!("Landlock: {detail}"));
            }
            LandlockReport {
                abi: Some(v),
                enforcement,
                detail,
            }
        }
    };
    let status = SandboxStatus {
        mode: policy.landlock,
        landlock,
        no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
        capabilities: capability_report(),
        allowed: allowed(policy),
        not_enforced,
    };
    tracing::info!(
        landlock = ?status.landlock.enforcement,
        abi = ?status.landlock.abi,
        no_new_privs = status.no_new_privs,
        kept = ?status.capabilities.effective,
        "daemon confined"
    );
    Ok(status)
}

fn cap_err(op: &str, e: caps::errors::CapsError) -> SandboxError {
    SandboxError::Capabilities {
        op: op.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = r#"
[node]
data_dir = "/var/lib/beemesh"
[trust]
domain = "example.org"
signers = ["ed25519:Wl7TJmUNtlOsCpkmT0DMSB2e41W/NmcBK7c1uRjE+BU="]
[api]
socket = "/run/beemesh/api.sock"
[sandbox]
landlock = "best-effort"
"#;

    #[test]
    fn daemon_policy_follows_the_host_config() {
        let host = HostConfig::from_toml("host.toml", HOST).expect("valid host config");
        let p = SandboxPolicy::for_daemon(
            &host,
            &[PathBuf::from("/etc/beemesh/host.toml")],
            Some(Path::new("/run/user/1000/podman/podman.sock")),
        );
        assert_eq!(p.landlock, LandlockMode::BestEffort);
        assert!(p.read_write.contains(&PathBuf::from("/var/lib/beemesh")));
        assert!(p.read_write.contains(&PathBuf::from("/run/beemesh")));
        assert!(
            p.read_only
                .contains(&PathBuf::from("/etc/beemesh/host.toml"))
        );
        assert_eq!(
            p.sockets,
            [PathBuf::from("/run/user/1000/podman/podman.sock")]
        );
        assert!(p.required.contains(&PathBuf::from("/var/lib/beemesh")));
        assert!(p.keep_capabilities.is_empty());
    }

    #[test]
    fn read_only_paths_beneath_writable_ones_are_refused_also_through_symlinks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (run, etc) = (tmp.path().join("run"), tmp.path().join("etc"));
        std::fs::create_dir_all(run.join("config")).expect("mkdir");
        std::fs::create_dir_all(&etc).expect("mkdir");
        std::fs::write(run.join("config/host.toml"), "").expect("write");
        std::fs::write(etc.join("host.toml"), "").expect("write");
        std::os::unix::fs::symlink(run.join("config/host.toml"), etc.join("link.toml"))
            .expect("symlink");
        let policy = |ro: PathBuf| SandboxPolicy {
            landlock: LandlockMode::Required,
            read_only: vec![PathBuf::from("/proc"), ro],
            read_exec: Vec::new(),
            read_write: vec![run.clone(), PathBuf::from("/dev/null")],
            sockets: Vec::new(),
            required: Vec::new(),
            keep_capabilities: Vec::new(),
        };
        policy(etc.join("host.toml"))
            .check()
            .expect("beside, not beneath");
        for ro in [run.join("config/host.toml"), etc.join("link.toml")] {
            match policy(ro.clone()).check() {
                Err(SandboxError::ReadOnlyBeneathWritable {
                    read_only,
                    writable,
                }) => {
                    assert_eq!(read_only, ro);
                    assert_eq!(writable, run);
                }
                other => panic!("{}: expected a refusal, got {other:?}", ro.display()),
            }
        }
    }

    #[test]
    fn status_serialises_for_beemesh_status() {
        let host = HostConfig::from_toml("host.toml", HOST).expect("valid host config");
        let p = SandboxPolicy::for_daemon(&host, &[], None);
        let s = current_status(&p);
        let v = serde_json::to_value(&s).expect("serialises");
        assert_eq!(v["mode"], "best-effort");
        assert_eq!(v["landlock"]["enforcement"], "not-enforced");
        assert!(v["capabilities"]["bounding"].is_array());
        assert!(!s.fully_confined());
        let back: SandboxStatus = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, s);
    }

    #[test]
    fn confine_refuses_a_multithreaded_process() {
        // The test harness runs tests on their own threads: this process has several.
        let host = HostConfig::from_toml("host.toml", HOST).expect("valid host config");
        let p = SandboxPolicy::for_daemon(&host, &[], None);
        match confine(&p) {
            Err(SandboxError::Threads { threads }) => assert!(threads > 1),
            other => panic!("expected a thread error, got {other:?}"),
        }
    }
}
