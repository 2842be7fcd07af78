//! cgroup v2 limits for the process driver, where a cgroup subtree is delegated to the
//! daemon (systemd `Delegate=yes`, or an operator-prepared directory).
//!
//! A delegated parent must have `memory` and `cpu` in its `cgroup.subtree_control` and be
//! writable by the daemon. Each container process gets a child cgroup with `memory.max`,
//! `memory.swap.max = 0` and `cpu.max`; the child moves itself in before exec by writing
//! "0" to the pre-opened `cgroup.procs` (see `confine.rs`), so no process of the workload
//! ever runs outside its cgroup.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CPU_PERIOD_US: u64 = 100_000;

/// Finds a usable delegated parent: `configured` if given, else the daemon's own cgroup.
/// `Err` says why cgroup limits are unavailable.
pub fn detect(configured: Option<&Path>) -> Result<PathBuf, String> {
    let parent = match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
            let rel = own_v2_path(&own).ok_or_else(|| {
                "the host uses cgroup v1 (or hybrid) for resource controllers".to_owned()
            })?;
            Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'))
        }
    };
    let fs = rustix::fs::statfs(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    if fs.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(format!("{} is not a cgroup v2 hierarchy", parent.display()));
    }
    let control = std::fs::read_to_string(parent.join("cgroup.subtree_control"))
        .map_err(|e| format!("{}/cgroup.subtree_control: {e}", parent.display()))?;
    let missing: Vec<&str> = ["memory", "cpu"]
        .into_iter()
        .filter(|c| !control.split_whitespace().any(|x| x == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} does not delegate the {} controller(s) to its children",
            parent.display(),
            missing.join(" and ")
        ));
    }
    if rustix::fs::access(&parent, rustix::fs::Access::WRITE_OK).is_err() {
        return Err(format!(
            "{} is not writable by the daemon",
            parent.display()
        ));
    }
    Ok(parent)
}

/// The cgroup v2 path from `/proc/self/cgroup` (`0::/path`), if the unified hierarchy is
/// the only one (a hybrid host also lists v1 controllers, which then own memory and cpu).
pub fn own_v2_path(text: &str) -> Option<&str> {
    let mut v2 = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("0::") {
            v2 = Some(p);
        } else if !line.trim().is_empty() {
            return None;
        }
    }
    v2
}

/// Creates `parent/name` with the limits; returns its path and an open `cgroup.procs`.
pub fn create(
    parent: &Path,
    name: &str,
    memory_bytes: u64,
    cpu_millis: u64,
) -> std::io::Result<(PathBuf, File)> {
    let dir = parent.join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    write(&dir.join("memory.max"), &memory_bytes.to_string())?;
    // Not every kernel has swap accounting; the limit above is what matters.
    let _ = write(&dir.join("memory.swap.max"), "0");
    let quota = (cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000);
    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    Ok((dir, procs))
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// Removes a cgroup directory once its processes are gone.
pub fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_only_hosts_have_a_v2_path() {
        assert_eq!(
            own_v2_path("0::/system.slice/beemesh.service\n"),
            Some("/system.slice/beemesh.service")
        );
        assert_eq!(own_v2_path("4:memory:/x\n0::/\n"), None);
        assert_eq!(own_v2_path(""), None);
    }

    #[test]
    fn detection_explains_why_not() {
        // /tmp is never a cgroup v2 hierarchy.
        let err = detect(Some(Path::new("/tmp"))).expect_err("must fail");
        assert!(err.contains("not a cgroup v2 hierarchy"), "{err}");
    }
}
