//! The external tools the builder drives, and one way to run them with clear errors.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

/// (program, Debian package) for `beemesh image build`.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("systemd-repart", "systemd"),
    ("systemctl", "systemd"),
    ("qemu-img", "qemu-utils"),
    ("strip", "binutils"),
    ("tar", "tar"),
    ("chroot", "coreutils"),
];

/// (program, Debian package) for `beemesh image configure`.
pub const CONFIGURE_TOOLS: &[(&str, &str)] = &[("mcopy", "mtools"), ("mdel", "mtools")];

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(
        "missing tool(s) {tools}; install them with: apt-get install {packages} \
         (Debian 12; on other distributions the packages of the same names)"
    )]
    Missing { tools: String, packages: String },
    #[error(
        "{what} must run as root (it creates device files and file ownership in the image); run it with sudo"
    )]
    NotRoot { what: String },
    #[error("cannot run {program}: {cause}")]
    Spawn {
        program: String,
        cause: std::io::Error,
    },
    #[error("{program} failed ({status}): {detail}")]
    Failed {
        program: String,
        status: String,
        detail: String,
    },
}

/// Finds a program on PATH (plus the sbin directories, which a non-root PATH may lack).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Every missing tool at once, with the packages that provide them.
pub fn check_tools(tools: &[(&str, &str)]) -> Result<(), ToolError> {
    let missing: Vec<(&str, &str)> = tools
        .iter()
        .filter(|(prog, _)| which(prog).is_none())
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.sort_unstable();
    packages.dedup();
    Err(ToolError::Missing {
        tools: missing
            .iter()
            .map(|(t, _)| *t)
            .collect::<Vec<_>>()
            .join(", "),
        packages: packages.join(" "),
    })
}

pub fn check_root(what: &str) -> Result<(), ToolError> {
    // The effective uid, as the kernel reports it (no libc call needed).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u32>().ok());
    if euid == Some(0) {
        Ok(())
    } else {
        Err(ToolError::NotRoot {
            what: what.to_owned(),
        })
    }
}

/// Runs a command to completion; on failure the error carries the last lines of its output.
/// Output is captured (the progress display owns the terminal).
pub fn run(cmd: &mut Command) -> Result<String, ToolError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|cause| ToolError::Spawn {
            program: program.clone(),
            cause,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(12)..].join("\n  ");
    Err(ToolError::Failed {
        program: describe(cmd),
        status: out.status.to_string(),
        detail: format!("last output:\n  {tail}"),
    })
}

/// `program arg arg ...`, shortened for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args().take(8) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if cmd.get_args().count() > 8 {
        s.push_str(" ...");
    }
    s
}

/// A `Command` with the reproducibility environment every step shares.
pub fn command(program: impl AsRef<OsStr>, epoch: u64) -> Command {
    let mut c = Command::new(program);
    c.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// The version line of a tool (recorded in the manifest and in cache keys).
pub fn version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            t.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_default()
}

pub fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_their_packages_once() {
        let e = check_tools(&[
            ("beemesh-no-such-tool-a", "pkg-a"),
            ("beemesh-no-such-tool-b", "pkg-a"),
            ("sh", "dash"),
        ])
        .expect_err("missing");
        let msg = e.to_string();
        assert!(
            msg.contains("beemesh-no-such-tool-a, beemesh-no-such-tool-b"),
            "{msg}"
        );
        assert!(msg.contains("apt-get install pkg-a "), "{msg}");
        assert!(!msg.contains("dash"), "{msg}");
    }

    #[test]
    fn failures_carry_the_output_tail() {
        let e = run(Command::new("sh").args(["-c", "echo one; echo two >&2; exit 3"]))
            .expect_err("fails");
        let msg = e.to_string();
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("two") && msg.contains("one"), "{msg}");
    }
}
