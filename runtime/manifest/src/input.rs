//! Bounded reads of operator files, and atomic writes.
//!
//! Everything the runtime reads from outside the process goes through here with a size limit,
//! so a 100 MiB (or endless) file is refused after reading at most `limit + 1` bytes.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest workload manifest accepted (bytes).
pub const MAX_MANIFEST_BYTES: u64 = 256 * 1024;
/// Largest signed manifest accepted: the manifest (escaped) plus signatures.
pub const MAX_SIGNED_BYTES: u64 = 2 * MAX_MANIFEST_BYTES + 64 * 1024;
/// Largest host config accepted.
pub const MAX_HOST_CONFIG_BYTES: u64 = 256 * 1024;
/// Largest Kubernetes YAML file accepted.
pub const MAX_KUBE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest key file accepted.
pub const MAX_KEY_BYTES: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: larger than the limit of {limit} bytes for {what}", path.display())]
    TooLarge {
        path: PathBuf,
        limit: u64,
        what: &'static str,
    },
    #[error("{}: not valid UTF-8 (first bad byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
}

/// Reads at most `limit` bytes from `reader`; more is an error, never an allocation.
pub fn read_bounded(
    mut reader: impl Read,
    limit: u64,
    path: &Path,
    what: &'static str,
) -> Result<String, ReadError> {
    let mut buf = Vec::new();
    reader
        .by_ref()
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|cause| ReadError::Io {
            path: path.to_owned(),
            cause,
        })?;
    if buf.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            limit,
            what,
        });
    }
    String::from_utf8(buf).map_err(|e| ReadError::NotUtf8 {
        path: path.to_owned(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Reads a text file of at most `limit` bytes. `-` reads standard input.
pub fn read_file(path: &Path, limit: u64, what: &'static str) -> Result<String, ReadError> {
    if path == Path::new("-") {
        return read_bounded(std::io::stdin().lock(), limit, path, what);
    }
    let io = |cause| ReadError::Io {
        path: path.to_owned(),
        cause,
    };
    let file = File::open(path).map_err(io)?;
    // Refuse early when the size is known; the bounded read still guards files that grow or
    // lie about their length (pipes, /proc).
    if let Ok(meta) = file.metadata()
        && meta.is_file()
        && meta.len() > limit
    {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            limit,
            what,
        });
    }
    read_bounded(file, limit, path, what)
}

/// Replaces `path` with `bytes` so that a crash at any point leaves the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` holding `bytes`, with permission bits `mode` from the moment the file
/// exists, and never replaces an existing file (`ErrorKind::AlreadyExists`). A crash or power
/// loss at any point leaves either no `path` or the complete, durable one:
///
/// 1. the bytes go to a new temporary file in the same directory, `.<name>.tmp.<random>`,
///    created exclusively (`O_EXCL`) with `mode`;
/// 2. it is fsynced;
/// 3. it is hard-linked to `path` (`link(2)` fails when `path` exists, so two writers never
///    overwrite each other) and the temporary name is removed;
/// 4. the directory is fsynced, so the new name survives a power cut.
///
/// A crash can leave a temporary file behind; nothing reads it, and the next call does not
/// stop at it. File systems without hard links (FAT) get step 3 as "fail if `path` exists,
/// else rename", which is atomic for crashes but not against a concurrent writer.
pub fn write_new_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::ErrorKind;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    // A fresh name on every call: a temporary file left by a crash (perhaps by a process of
    // the same pid, before a reboot) is never reused or truncated.
    let (tmp, mut f) = {
        let mut attempt = 0;
        loop {
            let mut suffix = [0u8; 8];
            getrandom::fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(".tmp.");
            for b in suffix {
                tmp_name.push(format!("{b:02x}"));
            }
            let tmp = dir.join(tmp_name);
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    };
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        match fs::hard_link(&tmp, path) {
            Ok(()) => fs::remove_file(&tmp)?,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(e),
            // No hard links on this file system (FAT answers EPERM).
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::Unsupported
                ) =>
            {
                if fs::symlink_metadata(path).is_ok() {
                    return Err(std::io::Error::new(
                        ErrorKind::AlreadyExists,
                        format!("{} already exists", path.display()),
                    ));
                }
                fs::rename(&tmp, path)?;
            }
            Err(e) => return Err(e),
        }
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn new_file_is_complete_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        write_new_atomically(&path, b"first", 0o600).expect("created");
        assert_eq!(fs::read(&path).expect("read"), b"first");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = write_new_atomically(&path, b"second", 0o600).expect_err("exists");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(fs::read(&path).expect("read"), b"first", "not replaced");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn temporary_files_left_by_a_crash_do_not_stop_the_next_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What a power cut during an earlier write leaves: an empty and a partial temporary
        // file, and no `secret`.
        let empty = dir.path().join(".secret.tmp.0000000000000000");
        let partial = dir.path().join(".secret.tmp.ffffffffffffffff");
        fs::write(&empty, b"").expect("write");
        fs::write(&partial, b"-----BEGIN PRIV").expect("write");
        let path = dir.path().join("secret");
        write_new_atomically(&path, b"complete", 0o600).expect("created despite leftovers");
        assert_eq!(fs::read(&path).expect("read"), b"complete");
        // The leftovers are neither used nor touched.
        assert_eq!(fs::read(&partial).expect("read"), b"-----BEGIN PRIV");
        assert_eq!(leftovers(dir.path()).len(), 2);
    }

    #[test]
    fn endless_reader_is_cut_at_the_limit() {
        let endless = std::io::repeat(b'a');
        let err =
            read_bounded(endless, 1024, Path::new("<zero>"), "test").expect_err("must refuse");
        assert!(
            matches!(err, ReadError::TooLarge { limit: 1024, .. }),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let err = read_bounded(&b"ab\xffcd"[..], 1024, Path::new("x"), "test").expect_err("bad");
        assert_eq!(
            err.to_string(),
            "x: not valid UTF-8 (first bad byte at offset 2)"
        );
    }
}
