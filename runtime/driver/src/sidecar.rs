//! The sidecar's root file system: a program and the shared libraries it links, in a
//! directory Podman can run a container from (libpod's `rootfs`), so the sidecar needs no
//! image and no registry.
//!
//! The libraries are the ones `ldd` names for the program (on Debian and NixOS alike, the
//! glibc loader resolves them); each is copied to the same absolute path under the root, the
//! program to `/bin/<name>`. The directory is built beside its final place and renamed into
//! it, so a reader never sees half of it; its name carries a hash of the program, so a new
//! build of the program gets a new root and running sidecars keep theirs.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::types::SIDECAR_SOCKET_DIR;

/// Why a sidecar root file system could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read the sidecar program {}: {cause}", path.display())]
    Program {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot run ldd on {} to find its libraries: {cause} (install libc-bin)", path.display())]
    Ldd {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("ldd cannot resolve a library of {}: {line:?}", path.display())]
    Unresolved { path: PathBuf, line: String },
    #[error("cannot write the sidecar root file system at {}: {cause}", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The libraries `ldd` names in its output, as absolute paths (the vDSO has none and is
/// left out; a static program has none). Lines ldd cannot resolve are errors.
pub fn parse_ldd(program: &Path, output: &str) -> Result<Vec<PathBuf>, RootfsError> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            return Err(RootfsError::Unresolved {
                path: program.to_owned(),
                line: line.to_owned(),
            });
        }
        // Otherwise a library without a file (linux-vdso.so.1): nothing to copy.
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// Assembles (or finds, when it exists already) the root file system for `program` under
/// `parent`, and returns its directory. The program is at `/bin/<file name>` inside it.
pub fn assemble(program: &Path, parent: &Path) -> Result<PathBuf, RootfsError> {
    let program_err = |cause| RootfsError::Program {
        path: program.to_owned(),
        cause,
    };
    let mut bytes = Vec::new();
    fs::File::open(program)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(program_err)?;
    let digest = Sha256::digest(&bytes);
    let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dest = parent.join(format!("rootfs-{short}"));
    if dest.join("bin").is_dir() {
        return Ok(dest);
    }
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|cause| RootfsError::Ldd {
            path: program.to_owned(),
            cause,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let libs = parse_ldd(program, &text)?;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |cause| RootfsError::Write { path, cause }
    };
    fs::create_dir_all(parent).map_err(write_err(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".rootfs-")
        .tempdir_in(parent)
        .map_err(write_err(parent))?;
    let root = tmp.path();
    // Mount points and files Podman mounts over: made here, so that Podman never has to
    // write into the root (the root may belong to another user than the one Podman runs as).
    for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "run", "var/tmp"] {
        fs::create_dir_all(root.join(dir)).map_err(write_err(root))?;
    }
    for file in [
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
        "run/.containerenv",
    ] {
        fs::write(root.join(file), b"").map_err(write_err(&root.join(file)))?;
    }
    std::os::unix::fs::symlink("/proc/mounts", root.join("etc/mtab"))
        .map_err(write_err(&root.join("etc/mtab")))?;
    let inside = relative(Path::new(SIDECAR_SOCKET_DIR));
    fs::create_dir_all(root.join(&inside)).map_err(write_err(root))?;
    let name = program
        .file_name()
        .map_or_else(|| "program".into(), |n| n.to_owned());
    let bin = root.join("bin").join(name);
    fs::write(&bin, &bytes).map_err(write_err(&bin))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).map_err(write_err(&bin))?;
    for lib in libs {
        let target = root.join(relative(&lib));
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).map_err(write_err(dir))?;
        }
        // Follows symlinks: the loader's name (/lib64/ld-linux-x86-64.so.2) gets the file.
        fs::copy(&lib, &target).map_err(write_err(&lib))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
            .map_err(write_err(&target))?;
    }
    // Readable by the user rootless Podman runs as (the node's, or in tests another's).
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(write_err(root))?;
    let kept = tmp.keep();
    match fs::rename(&kept, &dest) {
        Ok(()) => Ok(dest),
        // Another call finished first: use its root, drop ours.
        Err(_) if dest.join("bin").is_dir() => {
            let _ = fs::remove_dir_all(&kept);
            Ok(dest)
        }
        Err(cause) => {
            let _ = fs::remove_dir_all(&kept);
            Err(RootfsError::Write { path: dest, cause })
        }
    }
}

/// `/a/b` as `a/b` (only normal components: `..` and the like are dropped).
fn relative(p: &Path) -> PathBuf {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed_into_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        let libs = parse_ldd(Path::new("/bin/x"), out).expect("parses");
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(
            parse_ldd(Path::new("/bin/x"), "\tnot a dynamic executable\n")
                .expect("static")
                .is_empty()
        );
        let e = parse_ldd(Path::new("/bin/x"), "\tlibfoo.so.1 => not found\n")
            .expect_err("an unresolved library is an error");
        assert!(e.to_string().contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn a_dynamic_program_gets_its_libraries_and_runs_from_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = Path::new("/bin/cat");
        let root = assemble(program, dir.path()).expect("assemble");
        assert!(root.join("bin/cat").is_file());
        assert!(root.join("run/beemesh").is_dir());
        let again = assemble(program, dir.path()).expect("again");
        assert_eq!(root, again, "the same program gives the same root");
        // The root holds everything the program needs: chroot would show it, but needs
        // privileges; ldd's list is all copied instead.
        let out = Command::new("ldd").arg(program).output().expect("ldd");
        for lib in parse_ldd(program, &String::from_utf8_lossy(&out.stdout)).expect("libs") {
            assert!(
                root.join(relative(&lib)).is_file(),
                "{} copied",
                lib.display()
            );
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("read")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".rootfs-"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary directory left behind");
    }
}
