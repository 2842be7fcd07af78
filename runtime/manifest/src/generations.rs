//! Rollback protection (TUF's rule): a node remembers the highest generation it accepted for
//! each `namespace/name` and the content id of that manifest. A different manifest whose
//! generation is not higher is refused; the same content id arriving again is a no-op.
//!
//! [`MemoryStore`] serves tests; [`FileStore`] is what a node uses: one JSON file, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory) on every change, so
//! a crash leaves either the old or the new state and never a torn file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::signed::ContentId;
use crate::trust::Verified;

/// What a node accepted last for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub generation: u64,
    pub content_id: ContentId,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("generation store {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("generation store {} is corrupt ({reason}); refusing to start without rollback protection: restore it from backup or remove it deliberately", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(
        "{id}: generation {offered} ({offered_id}) is not higher than the accepted generation {stored} ({stored_id}); refusing a rollback"
    )]
    Rollback {
        id: String,
        offered: u64,
        offered_id: ContentId,
        stored: u64,
        stored_id: ContentId,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The outcome of admitting a verified manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new generation: recorded, to be acted on.
    New { previous: Option<Accepted> },
    /// The very manifest already accepted: nothing to do.
    AlreadyAccepted,
}

pub trait GenerationStore {
    fn get(&self, namespace: &str, name: &str) -> Option<Accepted>;
    fn put(&mut self, namespace: &str, name: &str, accepted: Accepted) -> Result<(), StoreError>;

    /// Applies the rollback rule without recording anything: `Ok(true)` for a new generation,
    /// `Ok(false)` for the manifest already accepted.
    fn check(&self, v: &Verified) -> Result<bool, AdmitError> {
        let m = &v.manifest;
        match self.get(&m.namespace, &m.name) {
            Some(prev) if prev.content_id == v.content_id => Ok(false),
            Some(prev) if m.generation <= prev.generation => Err(AdmitError::Rollback {
                id: m.id(),
                offered: m.generation,
                offered_id: v.content_id,
                stored: prev.generation,
                stored_id: prev.content_id,
            }),
            _ => Ok(true),
        }
    }

    /// Applies the rollback rule to a verified manifest and records it when it is new.
    fn admit(&mut self, v: &Verified) -> Result<Admission, AdmitError> {
        let m = &v.manifest;
        let previous = self.get(&m.namespace, &m.name);
        if !self.check(v)? {
            return Ok(Admission::AlreadyAccepted);
        }
        self.put(
            &m.namespace,
            &m.name,
            Accepted {
                generation: m.generation,
                content_id: v.content_id,
            },
        )?;
        Ok(Admission::New { previous })
    }
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[derive(Debug, Default)]
pub struct MemoryStore(BTreeMap<String, Accepted>);

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl GenerationStore for MemoryStore {
    fn get(&self, namespace: &str, name: &str) -> Option<Accepted> {
        self.0.get(&key(namespace, name)).copied()
    }
    fn put(&mut self, namespace: &str, name: &str, accepted: Accepted) -> Result<(), StoreError> {
        self.0.insert(key(namespace, name), accepted);
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    workloads: BTreeMap<String, Accepted>,
}

const FORMAT_VERSION: u32 = 1;

/// A generation store persisted in one JSON file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    entries: BTreeMap<String, Accepted>,
}

impl FileStore {
    /// Opens the store at `path`, creating an empty one if the file does not exist yet.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let entries = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if disk.version != FORMAT_VERSION {
                    return Err(StoreError::Corrupt {
                        path,
                        reason: format!("format version {} is not {FORMAT_VERSION}", disk.version),
                    });
                }
                disk.workloads
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(cause) => return Err(StoreError::Io { path, cause }),
        };
        Ok(Self { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn persist(&self, entries: &BTreeMap<String, Accepted>) -> Result<(), StoreError> {
        let io = |cause| StoreError::Io {
            path: self.path.clone(),
            cause,
        };
        let disk = OnDisk {
            version: FORMAT_VERSION,
            workloads: entries.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&disk).map_err(|e| io(std::io::Error::other(e)))?;
        crate::input::write_atomically(&self.path, &bytes).map_err(io)
    }
}

impl GenerationStore for FileStore {
    fn get(&self, namespace: &str, name: &str) -> Option<Accepted> {
        self.entries.get(&key(namespace, name)).copied()
    }

    /// Persists first, then updates memory: a failed write leaves both unchanged.
    fn put(&mut self, namespace: &str, name: &str, accepted: Accepted) -> Result<(), StoreError> {
        let mut next = self.entries.clone();
        next.insert(key(namespace, name), accepted);
        self.persist(&next)?;
        self.entries = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Manifest;

    fn verified(generation: u64, image: &str) -> Verified {
        let text = format!(
            "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = {generation}\n[[container]]\nname = \"web\"\nimage = \"{image}\"\n"
        );
        Verified {
            manifest: Manifest::from_toml("m", &text).expect("valid"),
            content_id: ContentId::of(text.as_bytes()),
            signed_by: Vec::new(),
        }
    }

    fn rollback_rules(store: &mut dyn GenerationStore) {
        let v3 = verified(3, "a");
        assert!(matches!(
            store.admit(&v3),
            Ok(Admission::New { previous: None })
        ));
        assert!(matches!(store.admit(&v3), Ok(Admission::AlreadyAccepted)));
        assert!(matches!(
            store.admit(&verified(3, "b")),
            Err(AdmitError::Rollback {
                offered: 3,
                stored: 3,
                ..
            })
        ));
        assert!(matches!(
            store.admit(&verified(2, "a")),
            Err(AdmitError::Rollback {
                offered: 2,
                stored: 3,
                ..
            })
        ));
        let v4 = verified(4, "b");
        assert!(matches!(
            store.admit(&v4),
            Ok(Admission::New {
                previous: Some(Accepted { generation: 3, .. })
            })
        ));
        // The old generation 3 is now a rollback too, even though it was once accepted.
        assert!(matches!(store.admit(&v3), Err(AdmitError::Rollback { .. })));
    }

    #[test]
    fn memory_store_applies_the_rule() {
        rollback_rules(&mut MemoryStore::new());
    }

    #[test]
    fn file_store_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("generations.json");
        rollback_rules(&mut FileStore::open(&path).expect("open"));
        let mut reopened = FileStore::open(&path).expect("reopen");
        assert_eq!(
            reopened.get("default", "hello").map(|a| a.generation),
            Some(4)
        );
        assert!(matches!(
            reopened.admit(&verified(4, "c")),
            Err(AdmitError::Rollback { .. })
        ));
        assert!(matches!(
            reopened.admit(&verified(3, "a")),
            Err(AdmitError::Rollback { .. })
        ));
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("generations.json")]);
    }

    #[test]
    fn a_torn_temporary_file_does_not_matter_and_a_corrupt_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("generations.json");
        FileStore::open(&path)
            .expect("open")
            .admit(&verified(5, "a"))
            .expect("admit");
        // A crash mid-write leaves at most a partial temporary file beside the store.
        fs::write(
            dir.path().join(".generations.json.tmp.999"),
            b"{\"version\":1,\"work",
        )
        .expect("write");
        assert_eq!(
            FileStore::open(&path)
                .expect("reopen")
                .get("default", "hello")
                .map(|a| a.generation),
            Some(5)
        );
        fs::write(&path, b"{\"version\":1,\"workloads\":{\"default/he").expect("corrupt");
        let e = FileStore::open(&path).expect_err("corrupt store");
        assert!(
            e.to_string()
                .contains("refusing to start without rollback protection"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("generations.json");
        let mut s = FileStore::open(&path).expect("opens: the file need not exist");
        assert!(
            s.admit(&verified(1, "a")).is_err(),
            "directory does not exist"
        );
        assert!(s.get("default", "hello").is_none());
    }
}
