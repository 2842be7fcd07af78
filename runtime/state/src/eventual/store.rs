//! Durable storage of one workload's replica: a redb 5 database at
//! `data_dir/state/<namespace>/<name>/kv.redb` holding the entries (tombstones and their local
//! application times included), the clock's high-water mark, the collection watermark and the
//! per-peer sync times.
//!
//! Durability: [`Store::commit`] writes one or more [`PersistBatch`]es in one redb write
//! transaction with `Durability::Immediate` (redb's two-phase commit with checksummed roots,
//! fsync before it returns). The node commits the batch of a local write before it replies
//! to the request or publishes its delta; it may group the batches of several requests in one
//! commit (group commit), holding every reply until the commit returns, so a crash loses only
//! writes that were never acknowledged. A crash in the middle of a commit leaves the previous
//! commit readable (redb falls back to the last committed root; `tests.rs` cuts writes short
//! at every point of a commit and reopens).
//!
//! Reopening ([`Store::load`]) gives [`Restored`] back for [`super::Replica::restore`]; every
//! entry is checked on the way in and a bad one is a typed error naming it.

use std::path::{Path, PathBuf};

use redb::{
    Database, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition, TableHandle,
};
use thiserror::Error;

use super::{Meta, PersistBatch, Restored};
use crate::crdt::codec::{DecodeError, Reader, Writer};
use crate::crdt::{Entry, item_id};
use crate::hlc::{TIMESTAMP_LEN, Timestamp};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("kv_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("kv_meta");
const SYNCED: TableDefinition<&str, u64> = TableDefinition::new("kv_synced");

/// On-disk format of this module; refused when a newer node wrote the directory.
pub const STORE_FORMAT: u8 = 1;
/// File name of the database under the workload's state directory.
pub const DB_FILE: &str = "kv.redb";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state store {path}: {op}: {source}")]
    Db {
        path: String,
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("state store {path}: cannot create the directory: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state store {path}: entry {key:?} is unreadable: {source}")]
    Entry {
        path: String,
        key: String,
        #[source]
        source: DecodeError,
    },
    #[error("state store {path}: {what} is unreadable: {detail}")]
    Meta {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("state store {path}: written in format {found}, this node reads format {STORE_FORMAT}")]
    Format { path: String, found: u8 },
}

/// The durable state of one workload's replica.
#[derive(Debug)]
pub struct Store {
    db: Database,
    label: String,
}

fn db_err<'a>(label: &'a str, op: &'static str) -> impl FnOnce(redb::Error) -> StoreError + 'a {
    move |e| StoreError::Db {
        path: label.to_owned(),
        op,
        source: Box::new(e),
    }
}

/// The workload's state directory under the node's `data_dir`.
pub fn workload_dir(data_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    data_dir.join("state").join(namespace).join(name)
}

impl Store {
    /// Open (or create) the store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let label = dir.join(DB_FILE).display().to_string();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::builder()
            .create(dir.join(DB_FILE))
            .map_err(|e| db_err(&label, "open")(e.into()))?;
        Self::init(db, label)
    }

    /// Open a store over any redb backend (tests use it to simulate crashes).
    pub fn open_with_backend(
        backend: impl StorageBackend,
        label: &str,
    ) -> Result<Store, StoreError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| db_err(label, "open")(e.into()))?;
        Self::init(db, label.to_owned())
    }

    fn init(db: Database, label: String) -> Result<Store, StoreError> {
        let store = Store { db, label };
        let txn = store
            .db
            .begin_write()
            .map_err(|e| db_err(&store.label, "begin")(e.into()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| db_err(&store.label, "open meta")(e.into()))?;
            let format = meta
                .get("format")
                .map_err(|e| db_err(&store.label, "read format")(e.into()))?
                .map(|g| g.value().first().copied().unwrap_or(0));
            match format {
                None => {
                    meta.insert("format", [STORE_FORMAT].as_slice())
                        .map_err(|e| db_err(&store.label, "write format")(e.into()))?;
                }
                Some(STORE_FORMAT) => {}
                Some(found) => {
                    return Err(StoreError::Format {
                        path: store.label.clone(),
                        found,
                    });
                }
            }
            txn.open_table(ENTRIES)
                .map_err(|e| db_err(&store.label, "open entries")(e.into()))?;
            txn.open_table(SYNCED)
                .map_err(|e| db_err(&store.label, "open synced")(e.into()))?;
        }
        txn.commit()
            .map_err(|e| db_err(&store.label, "commit")(e.into()))?;
        Ok(store)
    }

    /// Write the batches in one durable transaction (returns once fsynced).
    pub fn commit(&self, batches: &[PersistBatch]) -> Result<(), StoreError> {
        let Some(last) = batches.last() else {
            return Ok(());
        };
        let l = self.label.as_str();
        let txn = self
            .db
            .begin_write()
            .map_err(|e| db_err(l, "begin")(e.into()))?;
        {
            let mut entries = txn
                .open_table(ENTRIES)
                .map_err(|e| db_err(l, "open entries")(e.into()))?;
            for b in batches {
                for (k, e) in &b.upserts {
                    entries
                        .insert(k.as_str(), encode_entry(e).as_slice())
                        .map_err(|e| db_err(l, "write entry")(e.into()))?;
                }
                for k in &b.removes {
                    entries
                        .remove(k.as_str())
                        .map_err(|e| db_err(l, "remove entry")(e.into()))?;
                }
            }
            let mut meta = txn
                .open_table(META)
                .map_err(|e| db_err(l, "open meta")(e.into()))?;
            // The meta of the last batch is the newest; the clock is monotonic anyway.
            let clock = batches
                .iter()
                .map(|b| b.meta.clock)
                .max()
                .unwrap_or(last.meta.clock);
            meta.insert("clock", clock.to_bytes().as_slice())
                .map_err(|e| db_err(l, "write clock")(e.into()))?;
            meta.insert("watermark", last.meta.watermark.to_be_bytes().as_slice())
                .map_err(|e| db_err(l, "write watermark")(e.into()))?;
            let mut synced = txn
                .open_table(SYNCED)
                .map_err(|e| db_err(l, "open synced")(e.into()))?;
            let stored: Vec<(String, u64)> = synced
                .iter()
                .map_err(|e| db_err(l, "read synced")(e.into()))?
                .filter_map(Result::ok)
                .map(|(k, v)| (k.value().to_owned(), v.value()))
                .collect();
            for (p, _) in &stored {
                if !last.meta.synced.contains_key(p) {
                    synced
                        .remove(p.as_str())
                        .map_err(|e| db_err(l, "remove sync")(e.into()))?;
                }
            }
            for (p, t) in &last.meta.synced {
                if stored.iter().all(|(sp, st)| sp != p || st != t) {
                    synced
                        .insert(p.as_str(), *t)
                        .map_err(|e| db_err(l, "write sync")(e.into()))?;
                }
            }
        }
        txn.commit().map_err(|e| db_err(l, "commit")(e.into()))
    }

    /// Read everything back.
    pub fn load(&self) -> Result<Restored, StoreError> {
        let l = self.label.as_str();
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err(l, "begin read")(e.into()))?;
        let entries_t = txn
            .open_table(ENTRIES)
            .map_err(|e| db_err(l, "open entries")(e.into()))?;
        let mut entries = Vec::new();
        for row in entries_t
            .iter()
            .map_err(|e| db_err(l, "read entries")(e.into()))?
        {
            let (k, v) = row.map_err(|e| db_err(l, "read entry")(e.into()))?;
            let key = k.value().to_owned();
            let entry = decode_entry(&key, v.value()).map_err(|source| StoreError::Entry {
                path: l.to_owned(),
                key: key.clone(),
                source,
            })?;
            entries.push((key, entry));
        }
        let meta_t = txn
            .open_table(META)
            .map_err(|e| db_err(l, "open meta")(e.into()))?;
        let get = |name: &'static str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta_t
                .get(name)
                .map_err(|e| db_err(l, "read meta")(e.into()))?
                .map(|g| g.value().to_vec()))
        };
        let bad = |what: &'static str, len: usize| StoreError::Meta {
            path: l.to_owned(),
            what,
            detail: format!("{len} bytes"),
        };
        let clock = match get("clock")? {
            None => Timestamp::ZERO,
            Some(b) => {
                let arr: [u8; TIMESTAMP_LEN] =
                    b.as_slice().try_into().map_err(|_| bad("clock", b.len()))?;
                Timestamp::from_bytes(&arr)
            }
        };
        let watermark = match get("watermark")? {
            None => 0,
            Some(b) => {
                let arr: [u8; 8] = b
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad("watermark", b.len()))?;
                u64::from_be_bytes(arr)
            }
        };
        let synced_t = txn
            .open_table(SYNCED)
            .map_err(|e| db_err(l, "open synced")(e.into()))?;
        let mut synced = std::collections::BTreeMap::new();
        for row in synced_t
            .iter()
            .map_err(|e| db_err(l, "read synced")(e.into()))?
        {
            let (k, v) = row.map_err(|e| db_err(l, "read sync")(e.into()))?;
            synced.insert(k.value().to_owned(), v.value());
        }
        Ok(Restored {
            entries,
            meta: Meta {
                clock,
                watermark,
                synced,
            },
        })
    }

    /// Names of the tables (for `beemesh status` and tests).
    pub fn tables(&self) -> Vec<String> {
        let Ok(txn) = self.db.begin_read() else {
            return Vec::new();
        };
        txn.list_tables()
            .map(|it| it.map(|t| t.name().to_owned()).collect())
            .unwrap_or_default()
    }
}

const ENTRY_VERSION: u8 = 1;

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(ENTRY_VERSION);
    w.ts(&e.ts);
    w.u64(e.applied_at);
    match &e.value {
        Some(v) => {
            w.u8(0);
            w.bytes32(v);
        }
        None => w.u8(1),
    }
    w.finish()
}

fn decode_entry(key: &str, b: &[u8]) -> Result<Entry, DecodeError> {
    let mut r = Reader::new(b);
    let version = r.u8("entry version")?;
    if version != ENTRY_VERSION {
        return Err(DecodeError::Version {
            what: "entry",
            version,
            supported: ENTRY_VERSION,
        });
    }
    let ts = r.ts("timestamp")?;
    let applied_at = r.u64("applied_at")?;
    let at = r.pos();
    let value = match r.u8("value tag")? {
        0 => Some(r.bytes32("value")?.to_vec()),
        1 => None,
        tag => {
            return Err(DecodeError::BadTag {
                what: "value",
                tag,
                at,
            });
        }
    };
    r.end("entry")?;
    let id = item_id(key, &ts, value.as_deref());
    Ok(Entry {
        ts,
        value,
        applied_at,
        id,
    })
}
