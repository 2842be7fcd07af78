//! Hiding the node's own files from process-driver workloads.
//!
//! Workloads of the process driver run as the daemon's user. Landlock keeps them from
//! reading the daemon's files, but Landlock before ABI 9 does not mediate connecting to a
//! unix socket by path, so without more a workload could use the node's API socket (mode
//! 0660, the daemon's user) and read every signed manifest with its env, or stream any
//! replica's logs. So the workloads run in a user and mount namespace of their own, where
//! the paths the node names ([`ProcessConfig::hide`](super::ProcessConfig::hide): the API
//! socket's directory, data_dir, the config, ticket and token files) are covered: a
//! directory by an empty read-only tmpfs, a file by `/dev/null` (read-only, no device
//! access). The driver's own root (beneath data_dir) is bound back, so replicas keep their
//! directories.
//!
//! The namespaces are made once, by [`WorkloadNamespace::create`], in a short-lived child
//! process (`unshare(CLONE_NEWUSER | CLONE_NEWNS)`, the uid and gid mapped to themselves,
//! every mount private, then the mounts); the driver keeps their `/proc/PID/ns/{user,mnt}`
//! fds open (close-on-exec), which keeps them alive, and every workload joins them with
//! `setns` before exec ([`super::confine`]). They must be made **before the daemon confines
//! itself with Landlock**: a Landlock-restricted process may not mount anything. Joining
//! later needs no mount, so workloads of a confined daemon can still join.
//!
//! The way around, `/proc/PID/root` of a process of the same user outside the namespace
//! (the daemon, its Podman, its user manager), is closed by the user namespace itself: that
//! link needs ptrace access, and a process in a child user namespace has none to processes
//! outside it (the capability check wants CAP_SYS_PTRACE in their namespace). Landlock, when
//! applied, denies it as well (a domain may not ptrace processes outside it).
//! runtime/driver/tests/process.rs checks both, with and without Landlock.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::confine::{NamespaceEntry, child};

/// What setting up the workloads' namespace needs from the host, for error messages.
const NEEDS: &str = "the process driver hides the node's API socket, data and configuration from its workloads \
    in a user and mount namespace of their own; this needs unprivileged user namespaces (sysctl \
    user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1 where that exists, no AppArmor \
    restriction of unprivileged user namespaces), in a systemd unit RestrictNamespaces= allowing user and mnt \
    and SystemCallFilter= allowing @mount, and it must happen before the daemon confines itself with \
    Landlock; a host that cannot offer this can use the podman driver";

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("cannot hide {} from workloads: not an absolute path", .0.display())]
    NotAbsolute(PathBuf),

    #[error(
        "cannot hide {} from workloads: it holds {}, which workloads need; \
         give the node's API socket and data directory directories of their own",
        hidden.display(), needed.display()
    )]
    HidesNeeded { hidden: PathBuf, needed: PathBuf },

    #[error(
        "cannot hide {} from workloads: it is the process driver's own root {}, where replicas live",
        hidden.display(), root.display()
    )]
    HidesRoot { hidden: PathBuf, root: PathBuf },

    #[error("cannot hide {} from workloads: {source}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot prepare the workloads' namespace: {step}: {source} ({NEEDS})")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

/// A path hidden from workloads, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hidden {
    pub path: PathBuf,
    /// `true`: a directory under an empty read-only tmpfs; `false`: a file under /dev/null.
    pub directory: bool,
}

/// The workloads' user and mount namespaces, kept alive by their fds.
#[derive(Debug)]
pub struct WorkloadNamespace {
    user: OwnedFd,
    mount: OwnedFd,
    hidden: Vec<Hidden>,
    root: PathBuf,
}

/// One planned mount operation, with the C strings the holder borrows.
enum Planned {
    Tmpfs { target: CString, read_only: bool },
    Mkdir(CString),
    BindKeep(CString),
    BindNull(CString),
    Seal { target: CString, nodev: bool },
}

impl Planned {
    fn describe(&self) -> String {
        let p = |c: &CString| String::from_utf8_lossy(c.as_bytes()).into_owned();
        match self {
            Planned::Tmpfs { target, .. } => format!("mounting an empty tmpfs on {}", p(target)),
            Planned::Mkdir(path) => format!("creating {}", p(path)),
            Planned::BindKeep(path) => format!("binding {} back", p(path)),
            Planned::BindNull(path) => format!("covering {} with /dev/null", p(path)),
            Planned::Seal { target, .. } => format!("making {} read-only", p(target)),
        }
    }

    fn as_op(&self) -> child::HolderOp<'_> {
        match self {
            Planned::Tmpfs { target, read_only } => child::HolderOp::Tmpfs {
                target,
                read_only: *read_only,
            },
            Planned::Mkdir(path) => child::HolderOp::Mkdir(path),
            Planned::BindKeep(path) => child::HolderOp::BindKeep(path),
            Planned::BindNull(path) => child::HolderOp::BindNull(path),
            Planned::Seal { target, nodev } => child::HolderOp::Seal {
                target,
                nodev: *nodev,
            },
        }
    }
}

fn c_path(path: &Path) -> Result<CString, IsolationError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| IsolationError::Path {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })
}

/// The existing paths of `paths`, symlinks resolved (missing ones are nothing to hide or
/// to keep reachable).
fn resolve(paths: &[PathBuf]) -> Result<Vec<PathBuf>, IsolationError> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_absolute() {
            return Err(IsolationError::NotAbsolute(p.clone()));
        }
        match std::fs::canonicalize(p) {
            Ok(r) => out.push(r),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IsolationError::Path {
                    path: p.clone(),
                    source,
                });
            }
        }
    }
    out.sort_by_key(|p| (p.components().count(), p.clone()));
    out.dedup();
    Ok(out)
}

/// The mount operations that hide `hide` and keep `root` reachable; `needed` are paths
/// workloads must keep (system paths, device files). Also returns what is hidden and
/// whether `root` is opened first (it lies beneath a covered directory).
fn plan(
    hide: &[PathBuf],
    root: &Path,
    needed: &[PathBuf],
) -> Result<(Vec<Planned>, Vec<Hidden>, bool), IsolationError> {
    let hide = resolve(hide)?;
    let needed = resolve(needed)?;
    let root = std::fs::canonicalize(root).map_err(|source| IsolationError::Path {
        path: root.to_owned(),
        source,
    })?;
    let mut ops = Vec::new();
    let mut hidden: Vec<Hidden> = Vec::new();
    let mut keep = false;
    for h in hide {
        if h == root {
            return Err(IsolationError::HidesRoot { hidden: h, root });
        }
        if let Some(n) = needed.iter().find(|n| n.starts_with(&h)) {
            return Err(IsolationError::HidesNeeded {
                hidden: h,
                needed: n.clone(),
            });
        }
        // Already covered by a directory hidden before (and not back in sight through the
        // driver's root).
        if hidden.iter().any(|d| d.directory && h.starts_with(&d.path)) && !h.starts_with(&root) {
            continue;
        }
        let directory = h.is_dir();
        let target = c_path(&h)?;
        if !directory {
            ops.push(Planned::BindNull(target.clone()));
            ops.push(Planned::Seal {
                target,
                nodev: true,
            });
        } else if root.starts_with(&h) {
            // data_dir holds the driver's root: cover it, then make the way back and bind
            // the root onto it.
            keep = true;
            ops.push(Planned::Tmpfs {
                target: target.clone(),
                read_only: false,
            });
            let mut dir = h.clone();
            let rest: Vec<Component> = root
                .strip_prefix(&h)
                .unwrap_or(&root)
                .components()
                .collect();
            for c in rest {
                dir.push(c);
                ops.push(Planned::Mkdir(c_path(&dir)?));
            }
            ops.push(Planned::BindKeep(c_path(&root)?));
            ops.push(Planned::Seal {
                target,
                nodev: false,
            });
        } else {
            ops.push(Planned::Tmpfs {
                target,
                read_only: true,
            });
        }
        hidden.push(Hidden { path: h, directory });
    }
    Ok((ops, hidden, keep))
}

impl WorkloadNamespace {
    /// Makes the workloads' namespaces with `hide` covered and `root` (the driver's root,
    /// which must exist) reachable. `needed` are paths workloads must keep: hiding a
    /// directory that holds one is an error. Missing paths in `hide` are skipped.
    pub fn create(
        hide: &[PathBuf],
        root: &Path,
        needed: &[PathBuf],
    ) -> Result<Self, IsolationError> {
        let (planned, hidden, keep) = plan(hide, root, needed)?;
        let root_c = c_path(root)?;
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let uid_map = format!("{uid} {uid} 1\n");
        let gid_map = format!("{gid} {gid} 1\n");
        let ops: Vec<child::HolderOp<'_>> = planned.iter().map(Planned::as_op).collect();
        let holder = child::HolderPlan {
            uid_map: uid_map.as_bytes(),
            gid_map: gid_map.as_bytes(),
            keep: keep.then_some(root_c.as_c_str()),
            ops: &ops,
        };
        let setup = |step: &str, source: std::io::Error| IsolationError::Setup {
            step: step.to_owned(),
            source,
        };
        let (status_r, status_w) = std::io::pipe().map_err(|e| setup("creating a pipe", e))?;
        let (hold_r, hold_w) = std::io::pipe().map_err(|e| setup("creating a pipe", e))?;
        let pid = child::fork_holder(
            &holder,
            status_w.as_fd(),
            hold_r.as_fd(),
            [status_r.as_raw_fd(), hold_w.as_raw_fd()],
        )
        .map_err(|e| setup("fork", e))?;
        drop(status_w);
        drop(hold_r);
        let result = (|| {
            let mut report = [0u8; 8];
            let mut got = 0;
            while got < report.len() {
                let chunk = report.get_mut(got..).unwrap_or_default();
                match rustix::io::read(&status_r, chunk) {
                    Ok(0) => {
                        return Err(setup(
                            "the namespace process ended without a report",
                            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        ));
                    }
                    Ok(n) => got += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        return Err(setup("reading the namespace process's report", e.into()));
                    }
                }
            }
            let (a, b) = report.split_at(4);
            let step = u32::from_le_bytes(a.try_into().unwrap_or_default());
            let errno = i32::from_le_bytes(b.try_into().unwrap_or_default());
            if step != child::STEP_DONE {
                let what = match step.checked_sub(child::STEP_OPS) {
                    Some(i) => planned
                        .get(i as usize)
                        .map_or_else(|| format!("step {step}"), Planned::describe),
                    None => child::STEP_NAMES
                        .get(step as usize)
                        .map_or_else(|| format!("step {step}"), |s| (*s).to_owned()),
                };
                return Err(setup(&what, std::io::Error::from_raw_os_error(errno)));
            }
            let open = |kind: &str| {
                let path = format!("/proc/{}/ns/{kind}", pid.as_raw_nonzero());
                std::fs::File::open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| setup(&format!("opening {path}"), e))
            };
            Ok((open("user")?, open("mnt")?))
        })();
        // Done with the holder, whatever happened: its namespaces live on in the fds. It is
        // our unreaped child, so the pid cannot have been reused.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        drop(hold_w);
        let (user, mount) = result?;
        Ok(Self {
            user,
            mount,
            hidden,
            root: root.to_owned(),
        })
    }

    /// What is hidden.
    pub fn hidden(&self) -> &[Hidden] {
        &self.hidden
    }

    /// How a workload joins, changing into `cwd` there.
    pub fn entry(&self, cwd: &Path) -> Result<NamespaceEntry, String> {
        Ok(NamespaceEntry {
            user: self.user.as_raw_fd(),
            mount: self.mount.as_raw_fd(),
            cwd: CString::new(cwd.as_os_str().as_bytes())
                .map_err(|_| format!("{} contains a NUL byte", cwd.display()))?,
        })
    }

    /// The driver's root, reachable in the namespace.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(ops: &[Planned]) -> Vec<String> {
        ops.iter().map(Planned::describe).collect()
    }

    #[test]
    fn data_dir_is_covered_and_the_driver_root_bound_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = std::fs::canonicalize(tmp.path()).expect("canonical");
        let (data, run, etc) = (t.join("data"), t.join("run"), t.join("etc"));
        for d in [data.join("process"), run.clone(), etc.clone()] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(etc.join("host.toml"), "").expect("write");
        std::fs::write(run.join("in-run.toml"), "").expect("write");
        let hide = [
            run.clone(),
            data.clone(),
            etc.join("host.toml"),
            run.join("in-run.toml"),
            t.join("missing"),
        ];
        let (ops, hidden, keep) =
            plan(&hide, &data.join("process"), &[PathBuf::from("/usr")]).expect("plan");
        assert!(keep);
        let d = |p: &Path| p.display().to_string();
        assert_eq!(
            describe(&ops),
            [
                format!("mounting an empty tmpfs on {}", d(&data)),
                format!("creating {}", d(&data.join("process"))),
                format!("binding {} back", d(&data.join("process"))),
                format!("making {} read-only", d(&data)),
                format!("mounting an empty tmpfs on {}", d(&run)),
                format!("covering {} with /dev/null", d(&etc.join("host.toml"))),
                format!("making {} read-only", d(&etc.join("host.toml"))),
            ]
        );
        // The file beneath the covered run directory is hidden with it; the missing path
        // is nothing to hide.
        assert_eq!(
            hidden.iter().map(|h| h.path.clone()).collect::<Vec<_>>(),
            [data, run, etc.join("host.toml")]
        );
    }

    #[test]
    fn hiding_what_workloads_need_or_their_own_root_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = std::fs::canonicalize(tmp.path()).expect("canonical");
        let root = t.join("data/process");
        std::fs::create_dir_all(&root).expect("mkdir");
        let needed = [t.join("data"), PathBuf::from("/usr")];
        match plan(std::slice::from_ref(&t), &root, &needed) {
            Err(IsolationError::HidesNeeded { hidden, needed }) => {
                assert_eq!((hidden, needed), (t.clone(), t.join("data")));
            }
            other => panic!("expected a refusal, got {:?}", other.map(|p| p.1)),
        }
        match plan(std::slice::from_ref(&root), &root, &[]) {
            Err(e @ IsolationError::HidesRoot { .. }) => {
                assert!(e.to_string().contains(&root.display().to_string()), "{e}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|p| p.1)),
        }
        assert!(matches!(
            plan(&[PathBuf::from("run")], &root, &[]),
            Err(IsolationError::NotAbsolute(_))
        ));
    }
}
