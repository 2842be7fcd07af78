//! The node's libp2p identity: an Ed25519 key persisted in `data_dir/node.key`.
//!
//! The file is the same PKCS#8 PEM form as operator keys (`beemesh key gen`), so `openssl pkey`
//! can read it. It is created with mode 0600 inside a 0700 directory, and a key file that group
//! or others can read is refused rather than used: a leaked node key lets anyone impersonate
//! the node (and use its peer ticket).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use beemesh_manifest::SecretKey;
use beemesh_manifest::keys::KeyError;
use libp2p::identity::Keypair;

use crate::MeshError;

/// File name of the node key inside the data directory.
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: cannot create the data directory: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a regular file; the node key must be a plain file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "{}: the node key is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {}` or remove it to create a new identity",
        path.display(), path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: cannot use the node key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
}

/// Loads the node's identity from `data_dir/node.key`, creating the key (0600) and the
/// directory (0700) when missing. The PeerId is therefore stable across restarts.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, MeshError> {
    Ok(load_or_create(data_dir)?)
}

fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    if !data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| IdentityError::CreateDir {
                path: data_dir.to_owned(),
                source,
            })?;
    }
    let path = data_dir.join(NODE_KEY_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate().map_err(|e| bad_key(&path, e))?;
            match key.save_new(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "created a new node identity"),
                // Another process created it in the meantime: use theirs.
                Err(KeyError::Exists { .. }) => {}
                Err(e) => return Err(bad_key(&path, e)),
            }
        }
        Err(source) => return Err(IdentityError::Io { path, source }),
    }
    let meta = std::fs::symlink_metadata(&path).map_err(|source| IdentityError::Io {
        path: path.clone(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(IdentityError::NotAFile { path });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path, mode });
    }
    let key = SecretKey::load(&path).map_err(|e| bad_key(&path, e))?;
    Keypair::ed25519_from_bytes(key.seed()).map_err(|e| IdentityError::BadKey {
        path,
        reason: e.to_string(),
    })
}

fn bad_key(path: &Path, e: KeyError) -> IdentityError {
    IdentityError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn identity_is_created_private_and_survives_reload() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data/beemesh");
        let first = load_or_create_identity(&dir).expect("created");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(NODE_KEY_FILE)), 0o600);
        let second = load_or_create_identity(&dir).expect("loaded");
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        // The file is an ordinary PKCS#8 key that the manifest crate reads too.
        let pem = std::fs::read_to_string(dir.join(NODE_KEY_FILE)).expect("read");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    }

    #[test]
    fn readable_key_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        load_or_create_identity(tmp.path()).expect("created");
        let path = tmp.path().join(NODE_KEY_FILE);
        for loose in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).expect("chmod");
            let err = load_or_create_identity(tmp.path()).expect_err("loose mode must be refused");
            let text = err.to_string();
            assert!(
                matches!(err, MeshError::Identity(IdentityError::Permissions { .. })),
                "{text}"
            );
            assert!(
                text.contains("chmod 600") && text.contains(&format!("{loose:04o}")),
                "{text}"
            );
        }
    }

    #[test]
    fn garbage_key_file_is_an_error_not_a_new_identity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(NODE_KEY_FILE);
        std::fs::write(&path, "not a key").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = load_or_create_identity(tmp.path()).expect_err("garbage");
        assert!(err.to_string().contains("node.key"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("untouched"),
            "not a key"
        );
    }
}
