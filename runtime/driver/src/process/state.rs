//! The process driver's record of a replica, kept in its directory so that a restarted
//! daemon finds (by its labels) and adopts the processes it started.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::DriverError;
use crate::labels::ReplicaLabels;

pub const FILE: &str = "replica.json";
const VERSION: u32 = 1;
const MAX_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// The same labels the Podman driver puts on containers.
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<ProcRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub name: String,
    pub pid: u32,
    /// From `/proc/PID/stat`: with the pid, identifies the process across pid reuse.
    pub start_time: u64,
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

impl Record {
    pub fn new(labels: &ReplicaLabels) -> Self {
        Self {
            version: VERSION,
            labels: labels.to_map(),
            containers: Vec::new(),
        }
    }

    pub fn labels(&self, path: &Path) -> Result<ReplicaLabels, DriverError> {
        let map: HashMap<String, String> = self.labels.clone().into_iter().collect();
        ReplicaLabels::parse(&path.display().to_string(), &map)?.ok_or_else(|| {
            DriverError::CorruptState {
                path: path.to_path_buf(),
                reason: "it is not labelled as managed by beemesh".into(),
            }
        })
    }

    pub fn container(&self, name: &str) -> Option<&ProcRecord> {
        self.containers.iter().find(|c| c.name == name)
    }

    pub fn upsert(&mut self, rec: ProcRecord) {
        match self.containers.iter_mut().find(|c| c.name == rec.name) {
            Some(slot) => *slot = rec,
            None => self.containers.push(rec),
        }
    }
}

/// Reads `dir/replica.json`; `Ok(None)` if there is none.
pub fn load(dir: &Path) -> Result<Option<Record>, DriverError> {
    let path = dir.join(FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DriverError::io("reading", &path, e)),
    };
    if meta.len() > MAX_SIZE {
        return Err(DriverError::CorruptState {
            path,
            reason: format!("{} bytes is more than the {MAX_SIZE} allowed", meta.len()),
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| DriverError::io("reading", &path, e))?;
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| DriverError::CorruptState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if record.version != VERSION {
        return Err(DriverError::CorruptState {
            path,
            reason: format!("version {} is not the supported {VERSION}", record.version),
        });
    }
    Ok(Some(record))
}

/// Writes `dir/replica.json` atomically (temporary file, fsync, rename).
pub fn store(dir: &Path, record: &Record) -> Result<(), DriverError> {
    use std::io::Write;
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| DriverError::CorruptState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| DriverError::io("creating", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| DriverError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| DriverError::io("renaming", &tmp, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ReplicaId;

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).ok().flatten(), None);
        let labels = ReplicaLabels {
            id: ReplicaId::new("default", "hello", 0),
            content_id: "sha256:ab".into(),
            node: "n1".into(),
        };
        let mut r = Record::new(&labels);
        r.upsert(ProcRecord {
            name: "web".into(),
            pid: 42,
            start_time: 7,
            command: vec!["sleep".into(), "1".into()],
            cgroup: None,
        });
        store(dir.path(), &r).expect("store");
        let back = load(dir.path()).expect("load").expect("present");
        assert_eq!(back, r);
        assert_eq!(back.labels(dir.path()).expect("labels"), labels);
        std::fs::write(dir.path().join(FILE), b"{not json").expect("write");
        let err = load(dir.path()).expect_err("must fail").to_string();
        assert!(err.contains("replica.json"), "{err}");
    }
}
