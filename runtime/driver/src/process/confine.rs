//! Confinement of process-driver children, applied between fork and exec.
//!
//! Everything that allocates, opens paths or can fail in interesting ways happens in the
//! parent: the Landlock ruleset is built (its fd is close-on-exec), the cgroup's
//! `cgroup.procs` is opened, the decisions are made. The child then performs only raw
//! system calls through rustix (no allocation, no locks), in this order:
//!
//! 1. join the cgroup (write "0" to the pre-opened `cgroup.procs`), if there is one;
//! 2. lower RLIMIT_DATA to the memory limit when no cgroup enforces it;
//! 3. if the daemon holds CAP_SETPCAP: lock the securebits (no root privileges on exec, no
//!    setuid fixups, no ambient raise) and empty the capability bounding set;
//! 4. clear the ambient set, set no_new_privs;
//! 5. `landlock_restrict_self` with the prepared ruleset;
//! 6. clear the effective, permitted and inheritable sets.
//!
//! The `child` module below holds the workspace's only `unsafe` code (see docs/drivers.md
//! for why a `pre_exec` hook was chosen over a re-exec trampoline).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, RestrictSelf, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, path_beneath_rules,
};
use rustix::thread::CapabilitySet;

/// The Landlock ABI the rulesets are written for; older kernels get the subset they know.
pub const TARGET_ABI: ABI = ABI::V6;

/// What a child may touch on the filesystem.
#[derive(Debug, Clone, Default)]
pub struct FsPolicy {
    /// Read and execute (system directories and files).
    pub read_exec: Vec<PathBuf>,
    /// Everything (the replica's private directory).
    pub read_write: Vec<PathBuf>,
    /// Read and write existing files (`/dev/null` and friends).
    pub device_files: Vec<PathBuf>,
}

/// The kernel's Landlock ABI version, or `None` if Landlock is unavailable. Probing has no
/// side effect (no ruleset is applied, no_new_privs is not set).
pub fn landlock_abi() -> Option<i32> {
    let status = RestrictSelf::default().no_new_privs(false).apply().ok()?;
    match status.landlock {
        landlock::LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => Some(kernel_abi.unwrap_or(effective_abi as i32)),
        _ => None,
    }
}

/// Builds the ruleset for `policy`; `Ok(None)` when the kernel has no Landlock.
pub fn build_ruleset(policy: &FsPolicy) -> Result<Option<OwnedFd>, String> {
    let abi = TARGET_ABI;
    let err = |what: &str, e: landlock::RulesetError| format!("Landlock {what}: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err("handled accesses", e))?;
    // Scopes (ABI 6): no signals to, and no abstract sockets of, processes outside.
    ruleset = ruleset
        .scope(Scope::from_all(abi))
        .map_err(|e| err("scopes", e))?;
    let created = ruleset
        .create()
        .map_err(|e| err("ruleset", e))?
        .add_rules(path_beneath_rules(
            &policy.read_exec,
            AccessFs::from_read(abi),
        ))
        .map_err(|e| err("read-only rules", e))?
        .add_rules(path_beneath_rules(
            &policy.read_write,
            AccessFs::from_all(abi),
        ))
        .map_err(|e| err("read-write rules", e))?
        .add_rules(path_beneath_rules(
            &policy.device_files,
            AccessFs::ReadFile | AccessFs::WriteFile,
        ))
        .map_err(|e| err("device rules", e))?;
    Ok(created.into())
}

/// Whether this process may empty a child's bounding set and lock its securebits.
pub fn holds_setpcap() -> bool {
    rustix::thread::capabilities(None)
        .map(|c| c.effective.contains(CapabilitySet::SETPCAP))
        .unwrap_or(false)
}

/// Everything a child applies to itself before exec, prepared in the parent. Keep it alive
/// until the child has been spawned: it owns the fds the child uses.
#[derive(Debug)]
pub struct Confinement {
    pub ruleset: Option<OwnedFd>,
    pub cgroup_procs: Option<File>,
    /// RLIMIT_DATA in bytes, when no cgroup limits memory.
    pub data_limit: Option<u64>,
    pub drop_bounding: bool,
}

impl Confinement {
    /// Installs the hook on `cmd`.
    pub fn install(&self, cmd: &mut tokio::process::Command) {
        child::install(
            cmd,
            child::Plan {
                ruleset: self.ruleset.as_ref().map(|f| f.as_raw_fd()),
                cgroup_procs: self.cgroup_procs.as_ref().map(|f| f.as_raw_fd()),
                data_limit: self.data_limit,
                drop_bounding: self.drop_bounding,
            },
        );
    }
}

/// The workspace's only unsafe code: the `pre_exec` hook and the two raw operations it
/// needs that rustix does not wrap (borrowing an inherited fd, `landlock_restrict_self`).
#[allow(unsafe_code)]
mod child {
    use std::os::fd::{BorrowedFd, RawFd};

    use rustix::process::{Resource, Rlimit};
    use rustix::thread::{self as t, CapabilitiesSecureBits, CapabilitySet, CapabilitySets};

    /// Plain values only: the child must not touch the parent's heap.
    #[derive(Clone, Copy)]
    pub struct Plan {
        pub ruleset: Option<RawFd>,
        pub cgroup_procs: Option<RawFd>,
        pub data_limit: Option<u64>,
        pub drop_bounding: bool,
    }

    pub fn install(cmd: &mut tokio::process::Command, plan: Plan) {
        // SAFETY: the closure runs in the forked child of a possibly multi-threaded parent,
        // where only async-signal-safe operations are allowed. It copies `plan` (plain
        // `Copy` data captured by move) and makes raw system calls through rustix (write,
        // setrlimit, prctl, capset) plus one `syscall(2)`; none allocates, takes a lock or
        // reads the parent's heap. The fds in `plan` belong to the caller's `Confinement`,
        // which stays alive until `spawn` returns, so they are open in the child. Errors
        // are `io::Error`s built from an errno (no allocation), which std sends to the
        // parent through its exec-status pipe.
        unsafe {
            cmd.pre_exec(move || apply(plan));
        }
    }

    fn apply(plan: Plan) -> std::io::Result<()> {
        if let Some(fd) = plan.cgroup_procs {
            // SAFETY: `fd` is open for the child's lifetime up to exec (see `install`), and
            // the borrow does not outlive this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            rustix::io::write(fd, b"0")?;
        }
        if let Some(bytes) = plan.data_limit {
            let limit = Rlimit {
                current: Some(bytes),
                maximum: Some(bytes),
            };
            if rustix::process::setrlimit(Resource::Data, limit).is_err() {
                // The hard limit is already lower: lower the soft limit only.
                let old = rustix::process::getrlimit(Resource::Data);
                let soft = old.maximum.map_or(bytes, |h| h.min(bytes));
                rustix::process::setrlimit(
                    Resource::Data,
                    Rlimit {
                        current: Some(soft),
                        maximum: old.maximum,
                    },
                )?;
            }
        }
        if plan.drop_bounding {
            t::set_capabilities_secure_bits(
                CapabilitiesSecureBits::NO_ROOT
                    | CapabilitiesSecureBits::NO_ROOT_LOCKED
                    | CapabilitiesSecureBits::NO_SETUID_FIXUP
                    | CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED
                    | CapabilitiesSecureBits::KEEP_CAPS_LOCKED
                    | CapabilitiesSecureBits::NO_CAP_AMBIENT_RAISE
                    | CapabilitiesSecureBits::NO_CAP_AMBIENT_RAISE_LOCKED,
            )?;
            for cap in CapabilitySet::all().iter() {
                match t::remove_capability_from_bounding_set(cap) {
                    // A capability this kernel does not know.
                    Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        t::clear_ambient_capability_set()?;
        t::set_no_new_privs(true)?;
        if let Some(fd) = plan.ruleset {
            // SAFETY: landlock_restrict_self(2) takes an fd and flags and reads no memory.
            let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        t::set_capabilities(
            None,
            CapabilitySets {
                effective: CapabilitySet::empty(),
                permitted: CapabilitySet::empty(),
                inheritable: CapabilitySet::empty(),
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_probe_has_no_side_effect() {
        let before = rustix::thread::no_new_privs().unwrap_or(false);
        let _ = landlock_abi();
        assert_eq!(rustix::thread::no_new_privs().unwrap_or(false), before);
    }

    #[test]
    fn ruleset_builds_from_existing_and_missing_paths() {
        let policy = FsPolicy {
            read_exec: vec!["/usr".into(), "/does-not-exist".into()],
            read_write: vec![std::env::temp_dir()],
            device_files: vec!["/dev/null".into()],
        };
        let fd = build_ruleset(&policy).expect("ruleset");
        assert_eq!(fd.is_some(), landlock_abi().is_some());
    }
}
