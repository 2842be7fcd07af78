//! Confinement of process-driver children, applied between fork and exec.
//!
//! Everything that allocates, opens paths or can fail in interesting ways happens in the
//! parent: the Landlock ruleset is built (its fd is close-on-exec), the cgroup's
//! `cgroup.procs` is opened, the decisions are made. The child then performs only raw
//! system calls through rustix (no allocation, no locks), in this order:
//!
//! 1. join the cgroup (write "0" to the pre-opened `cgroup.procs`), if there is one;
//! 2. lower RLIMIT_DATA to the memory limit when no cgroup enforces it;
//! 3. if the driver hides the node's files ([`super::isolation`]): join the workloads' user
//!    and mount namespaces (`setns` on the driver's namespace fds) and change back into the
//!    working directory there, by path;
//! 4. if the process holds CAP_SETPCAP (the daemon runs as root, or step 3 made it the owner
//!    of the workloads' user namespace): lock the securebits (no root privileges on exec, no
//!    setuid fixups, no ambient raise) and empty the capability bounding set;
//! 5. clear the ambient set, set no_new_privs;
//! 6. `landlock_restrict_self` with the prepared ruleset;
//! 7. clear the effective, permitted and inheritable sets.
//!
//! The `child` module below holds the workspace's only `unsafe` code (see docs/drivers.md
//! for why a `pre_exec` hook was chosen over a re-exec trampoline), including the fork of
//! the short-lived process that builds the workloads' namespaces ([`child::fork_holder`]).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
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
    /// The workloads' namespaces to join, when the driver hides the node's files.
    pub namespace: Option<NamespaceEntry>,
}

/// Joining the workloads' namespaces: the driver's namespace fds (close-on-exec, owned by
/// its [`super::isolation::WorkloadNamespace`], which outlives every spawn) and the working
/// directory to change into there, by path (`setns` to a mount namespace moves the working
/// directory to its root; an fd of the old directory would lead back into the host's view).
#[derive(Debug)]
pub struct NamespaceEntry {
    pub user: RawFd,
    pub mount: RawFd,
    pub cwd: CString,
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
                namespace: self.namespace.as_ref().map(|n| (n.user, n.mount)),
            },
            self.namespace.as_ref().map(|n| n.cwd.clone()),
        );
    }
}

/// The workspace's only unsafe code: the `pre_exec` hook, the fork of the namespace holder,
/// and the raw operations they need that rustix does not wrap (borrowing an inherited fd,
/// `landlock_restrict_self`, `fork`, `_exit`, `close`).
#[allow(unsafe_code)]
pub(crate) mod child {
    use std::ffi::{CStr, CString};
    use std::os::fd::{AsFd, BorrowedFd, RawFd};

    use rustix::fs::{Mode, OFlags, StatVfsMountFlags};
    use rustix::mount::{MountFlags, MountPropagationFlags};
    use rustix::process::{Pid, Resource, Rlimit};
    use rustix::thread::{
        self as t, CapabilitiesSecureBits, CapabilitySet, CapabilitySets, LinkNameSpaceType,
        UnshareFlags,
    };

    /// Plain values only: the child copies them and allocates nothing.
    #[derive(Clone, Copy)]
    pub struct Plan {
        pub ruleset: Option<RawFd>,
        pub cgroup_procs: Option<RawFd>,
        pub data_limit: Option<u64>,
        pub drop_bounding: bool,
        /// The user and mount namespace fds to join.
        pub namespace: Option<(RawFd, RawFd)>,
    }

    pub fn install(cmd: &mut tokio::process::Command, plan: Plan, cwd: Option<CString>) {
        // SAFETY: the closure runs in the forked child of a possibly multi-threaded parent,
        // where only async-signal-safe operations are allowed. It copies `plan` (plain
        // `Copy` data captured by move), borrows `cwd` (a C string the parent allocated
        // before the fork and that nothing mutates; the closure only reads it, dropping
        // happens in the parent with the `Command`), and makes raw system calls through
        // rustix (write, setrlimit, setns, chdir, prctl, capset) plus one `syscall(2)`; none
        // allocates or takes a lock. The fds in `plan` belong to the caller's `Confinement`
        // and to the driver's namespace, both alive until `spawn` returns, so they are open
        // in the child. Errors are `io::Error`s built from an errno (no allocation), which
        // std sends to the parent through its exec-status pipe.
        unsafe {
            cmd.pre_exec(move || apply(plan, cwd.as_deref()));
        }
    }

    fn apply(plan: Plan, cwd: Option<&CStr>) -> std::io::Result<()> {
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
        if let Some((user, mount)) = plan.namespace {
            // SAFETY: both fds are open in the child (see `install`); the borrows end here.
            let (user, mount) =
                unsafe { (BorrowedFd::borrow_raw(user), BorrowedFd::borrow_raw(mount)) };
            // The owner of the user namespace (same uid, parent namespace) may join it, and
            // then holds every capability there, which the mount namespace's join needs.
            t::move_into_link_name_space(user, Some(LinkNameSpaceType::User))?;
            t::move_into_link_name_space(mount, Some(LinkNameSpaceType::Mount))?;
            if let Some(dir) = cwd {
                rustix::process::chdir(dir)?;
            }
        }
        // Joining the user namespace gave the child every capability in it: empty the
        // bounding set and lock the securebits then too, so exec can grant none.
        if plan.drop_bounding || plan.namespace.is_some() {
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

    /// One mount operation of the namespace holder, on paths prepared by the parent.
    pub enum HolderOp<'a> {
        /// Cover a directory with an empty tmpfs (read-only unless something is to be made
        /// in it first).
        Tmpfs {
            target: &'a CStr,
            read_only: bool,
        },
        Mkdir(&'a CStr),
        /// Bind the directory opened before anything was covered back onto its own path.
        BindKeep(&'a CStr),
        /// Cover a file with `/dev/null`.
        BindNull(&'a CStr),
        /// Make the mount at `target` read-only (and no-device when `nodev`), keeping the
        /// flags it has.
        Seal {
            target: &'a CStr,
            nodev: bool,
        },
    }

    /// What the holder does, all prepared by the parent before the fork.
    pub struct HolderPlan<'a> {
        /// `"<uid> <uid> 1\n"` and `"<gid> <gid> 1\n"`: the ids map to themselves.
        pub uid_map: &'a [u8],
        pub gid_map: &'a [u8],
        /// The directory to keep visible (the driver's root) when it lies beneath a covered
        /// one: opened before any mount, bound back by [`HolderOp::BindKeep`].
        pub keep: Option<&'a CStr>,
        pub ops: &'a [HolderOp<'a>],
    }

    /// Holder status: the step that failed (`u32::MAX`: none) and its errno, 8 bytes.
    pub const STEP_DONE: u32 = u32::MAX;
    /// Steps before the ops (the ops are numbered from [`STEP_OPS`]).
    pub const STEP_NAMES: [&str; 6] = [
        "unshare(CLONE_NEWUSER | CLONE_NEWNS)",
        "writing /proc/self/setgroups",
        "writing /proc/self/uid_map",
        "writing /proc/self/gid_map",
        "making every mount private",
        "opening the driver's root",
    ];
    pub const STEP_OPS: u32 = STEP_NAMES.len() as u32;

    /// Forks the process that builds the workloads' user and mount namespaces as `plan`
    /// says, reports on `status` and then blocks reading `hold` until the parent, having
    /// opened its `/proc/PID/ns/*` files, kills it (it also dies with the parent). End of
    /// file on `hold` cannot be relied on: another thread's fork may hold a copy of the
    /// write end. `close_in_child` are the parent's pipe ends, which the child must not keep
    /// open. Returns the child's pid; the child never returns.
    pub fn fork_holder(
        plan: &HolderPlan<'_>,
        status: BorrowedFd<'_>,
        hold: BorrowedFd<'_>,
        close_in_child: [RawFd; 2],
    ) -> std::io::Result<Pid> {
        let parent = rustix::process::getpid();
        // SAFETY: fork(2) in a possibly multi-threaded process. The child only makes raw
        // system calls through rustix and libc (close, unshare, open, write, mount, mkdir,
        // statvfs, read, _exit) on data prepared before the fork and never mutated after it
        // (`plan` borrows the parent's strings; the child reads them and allocates
        // nothing), takes no lock, never returns from this function and never unwinds:
        // it ends in `_exit`, so no destructor or atexit handler of the parent's runs
        // twice.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                // Never outlive the parent (checked after the prctl: it may already be gone).
                if rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .is_err()
                    || rustix::process::getppid() != Some(parent)
                {
                    // SAFETY: as below.
                    unsafe { libc::_exit(1) }
                }
                for fd in close_in_child {
                    // SAFETY: `fd` is one of the parent's pipe ends, inherited by the child;
                    // nothing in the child uses it.
                    unsafe { libc::close(fd) };
                }
                let (step, errno) = match holder(plan) {
                    Ok(()) => (STEP_DONE, 0),
                    Err((step, e)) => (step, e.raw_os_error()),
                };
                let mut report = [0u8; 8];
                let (a, b) = report.split_at_mut(4);
                a.copy_from_slice(&step.to_le_bytes());
                b.copy_from_slice(&errno.to_le_bytes());
                let _ = rustix::io::write(status, &report);
                if step == STEP_DONE {
                    let mut byte = [0u8; 1];
                    // Until the parent kills this process (or closes every copy of its end).
                    while let Ok(n) = rustix::io::read(hold, &mut byte) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(i32::from(step != STEP_DONE)) }
            }
            pid => Pid::from_raw(pid)
                .ok_or_else(|| std::io::Error::other(format!("fork returned pid {pid}"))),
        }
    }

    type StepResult = Result<(), (u32, rustix::io::Errno)>;

    fn holder(plan: &HolderPlan<'_>) -> StepResult {
        let at = |step: u32| move |e: rustix::io::Errno| (step, e);
        // SAFETY: unshare(2) of the user and mount namespaces in this single-threaded child;
        // it shares neither files nor fs attributes with another process (a fresh fork).
        unsafe { t::unshare_unsafe(UnshareFlags::NEWUSER | UnshareFlags::NEWNS) }.map_err(at(0))?;
        write_file(c"/proc/self/setgroups", b"deny\n").map_err(at(1))?;
        write_file(c"/proc/self/uid_map", plan.uid_map).map_err(at(2))?;
        write_file(c"/proc/self/gid_map", plan.gid_map).map_err(at(3))?;
        // Nothing done here may reach the host's mount namespace.
        rustix::mount::mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(at(4))?;
        let keep = match plan.keep {
            Some(path) => Some(
                rustix::fs::open(
                    path,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(at(5))?,
            ),
            None => None,
        };
        // "/proc/self/fd/N" of the kept directory, formatted without allocating.
        let mut fd_path = [0u8; 40];
        let keep_path = keep
            .as_ref()
            .map(|fd| proc_fd_path(&mut fd_path, fd.as_fd()));
        let hidden = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        for (i, op) in plan.ops.iter().enumerate() {
            let step = STEP_OPS.saturating_add(u32::try_from(i).unwrap_or(u32::MAX - 1));
            match op {
                HolderOp::Tmpfs { target, read_only } => {
                    let flags = if *read_only {
                        hidden | MountFlags::RDONLY
                    } else {
                        hidden
                    };
                    rustix::mount::mount(
                        c"tmpfs",
                        *target,
                        c"tmpfs",
                        flags,
                        Some(c"mode=0755,size=64k,nr_inodes=64"),
                    )
                    .map_err(at(step))?;
                }
                HolderOp::Mkdir(path) => {
                    rustix::fs::mkdir(*path, Mode::from_raw_mode(0o755)).map_err(at(step))?
                }
                HolderOp::BindKeep(target) => {
                    let Some(Some(source)) = keep_path else {
                        return Err((step, rustix::io::Errno::BADF));
                    };
                    rustix::mount::mount_bind_recursive(source, *target).map_err(at(step))?;
                }
                HolderOp::BindNull(target) => {
                    rustix::mount::mount_bind(c"/dev/null", *target).map_err(at(step))?
                }
                HolderOp::Seal { target, nodev } => {
                    // A remount must keep the flags a mount from a more privileged namespace
                    // has locked (atime, nosuid, noexec, nodev): read them and add to them.
                    let current = rustix::fs::statvfs(*target).map_err(at(step))?.f_flag;
                    let mut flags = MountFlags::BIND | MountFlags::RDONLY;
                    for (st, ms) in [
                        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
                        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
                        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
                        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
                        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
                        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
                    ] {
                        if current.contains(st) {
                            flags |= ms;
                        }
                    }
                    if *nodev {
                        flags |= MountFlags::NODEV;
                    }
                    rustix::mount::mount_remount(*target, flags, c"").map_err(at(step))?;
                }
            }
        }
        drop(keep);
        Ok(())
    }

    fn write_file(path: &CStr, bytes: &[u8]) -> Result<(), rustix::io::Errno> {
        let fd = rustix::fs::open(path, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
        let n = rustix::io::write(&fd, bytes)?;
        if n != bytes.len() {
            return Err(rustix::io::Errno::IO);
        }
        Ok(())
    }

    /// Writes `/proc/self/fd/<fd>\0` into `buf` and returns it as a C string (`None` if it
    /// does not fit, which a 40-byte buffer rules out).
    fn proc_fd_path<'b>(buf: &'b mut [u8; 40], fd: BorrowedFd<'_>) -> Option<&'b CStr> {
        use std::os::fd::AsRawFd;
        const PREFIX: &[u8] = b"/proc/self/fd/";
        let mut digits = [0u8; 12];
        let mut n = u32::try_from(fd.as_raw_fd()).ok()?;
        let mut len = 0;
        loop {
            *digits.get_mut(len)? = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        buf.get_mut(..PREFIX.len())?.copy_from_slice(PREFIX);
        for i in 0..len {
            *buf.get_mut(PREFIX.len() + i)? = *digits.get(len - 1 - i)?;
        }
        *buf.get_mut(PREFIX.len() + len)? = 0;
        CStr::from_bytes_until_nul(buf).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn proc_fd_paths_are_formatted_without_allocating() {
            let file = std::fs::File::open("/dev/null").expect("open");
            let mut buf = [0u8; 40];
            let path = proc_fd_path(&mut buf, file.as_fd()).expect("fits");
            assert_eq!(
                path.to_str().expect("utf8"),
                format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file))
            );
        }
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
