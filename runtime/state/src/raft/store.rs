//! Persistent storage of one group: openraft's storage-v2 log store and state machine, both
//! in one redb database (`<group dir>/raft.redb`).
//!
//! # Tables
//!
//! - `log`: log index -> CBOR-encoded entry.
//! - `meta`: the vote, the committed and last purged log ids, the state machine's last applied
//!   log id, membership, revision and size, the owning peer id and the format version.
//! - `kv`: key -> 8-byte big-endian revision followed by the value.
//! - `snapshot`: the current snapshot's metadata and bytes.
//!
//! # Durability
//!
//! redb commits are either durable (`Immediate`: fsynced before `commit` returns) or not
//! (`None`: visible at once, made durable by the next durable commit, lost by a crash before
//! it). Because everything lives in one database, a crash always leaves a prefix of the commit
//! sequence, which is what keeps the pieces consistent with each other:
//!
//! - `save_vote` commits durably before it returns.
//! - `append` does not touch the database: it puts the entries in the group's unflushed set
//!   (readable at once through the log readers, which overlay it on the `log` table) and hands
//!   the `LogFlushed` callback to the group's flusher task. The flusher writes every unflushed
//!   entry in one durable commit (one fsync for all the appends queued meanwhile: group
//!   commit) and only then calls the callbacks. A callback is never called before its entries
//!   are on disk, and always called (with an error if the commit failed).
//!   Why not a commit per append: redb runs one write transaction at a time, so an append
//!   committed by openraft's core would wait for the flusher's fsync, and the core (which
//!   awaits its appends) would stall on every sync; under load the leader then synced about
//!   once per write instead of once per batch (measured in docs/benchmarks.md).
//! - `save_committed` records the committed log id for the flusher, which writes it with its
//!   next commit, or when the group stops (a hint: openraft recovers without it, re-applying
//!   from the last applied entry).
//! - `truncate` and `purge` drop the affected unflushed entries and commit without a sync, in
//!   one transaction; the flusher picks the unflushed entries inside its own transaction, so
//!   redb's one-writer rule orders the two and a dropped entry is never written afterwards.
//! - `apply` and storing a built snapshot commit without a sync: each is made durable by the
//!   next flush or vote. After a crash the state machine may be older than the log; openraft
//!   re-applies the committed entries (the committed log id is saved). A purge can never
//!   survive a crash that lost the snapshot covering it, because that snapshot was committed
//!   first.
//! - `install_snapshot` commits durably.
//!
//! All writes run on the blocking thread pool: a durable commit waits for the disk and must not
//! stall the async workers other groups share.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::de::DeserializeOwned;
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::mpsc;

use super::error::Error;
use super::types::{
    ApplyResult, ENTRY_OVERHEAD_BYTES, Entry, Item, KvCommand, MAX_STATE_BYTES, NodeId, RaftPeer,
    TypeConfig, Versioned,
};

/// The database file in a group's directory.
pub const DB_FILE: &str = "raft.redb";
/// The on-disk format; a database of another format is refused.
const FORMAT: u64 = 1;
/// Appends waiting for the flusher: openraft keeps few log writes in flight, this only bounds a
/// stuck disk.
const FLUSH_QUEUE: usize = 1024;
/// The largest snapshot accepted from a leader: the state limit plus the encoding's overhead,
/// which the per-key accounting overhead already covers.
pub const MAX_SNAPSHOT_BYTES: u64 = MAX_STATE_BYTES + 1024 * 1024;
/// Most bytes of values in one listing page.
const LIST_PAGE_BYTES: usize = 4 * 1024 * 1024;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const K_FORMAT: &str = "format";
const K_PEER: &str = "peer";
const K_VOTE: &str = "vote";
const K_COMMITTED: &str = "committed";
const K_PURGED: &str = "purged";
const K_APPLIED: &str = "applied";
const K_MEMBERSHIP: &str = "membership";
const K_REVISION: &str = "revision";
const K_SIZE: &str = "size";
const K_BOOTSTRAP: &str = "bootstrap";
const S_META: &str = "meta";
const S_DATA: &str = "data";

type R<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

pub(crate) fn encode<T: Serialize>(v: &T) -> R<Vec<u8>> {
    cbor4ii::serde::to_vec(Vec::new(), v).map_err(err("encoding"))
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> R<T> {
    cbor4ii::serde::from_slice(b).map_err(err("decoding"))
}

fn u64_bytes(b: &[u8]) -> R<u64> {
    let a: [u8; 8] = b
        .try_into()
        .map_err(|_| format!("expected 8 bytes, found {}", b.len()))?;
    Ok(u64::from_be_bytes(a))
}

/// Runs a write transaction with `durability` on the blocking pool.
async fn write<T, F>(db: &Arc<Database>, durability: Durability, f: F) -> R<T>
where
    T: Send + 'static,
    F: FnOnce(&redb::WriteTransaction) -> R<T> + Send + 'static,
{
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut txn = db.begin_write().map_err(err("begin write"))?;
        txn.set_durability(durability)
            .map_err(err("set durability"))?;
        let out = f(&txn)?;
        txn.commit().map_err(err("commit"))?;
        Ok(out)
    })
    .await
    .map_err(err("storage task"))?
}

fn get_meta<T: DeserializeOwned>(db: &Database, key: &str) -> R<Option<T>> {
    let txn = db.begin_read().map_err(err("begin read"))?;
    let t = txn.open_table(META).map_err(err("open meta"))?;
    let v = t.get(key).map_err(err("read meta"))?;
    v.map(|g| decode(g.value())).transpose()
}

fn put_meta(txn: &redb::WriteTransaction, key: &str, bytes: &[u8]) -> R<()> {
    let mut t = txn.open_table(META).map_err(err("open meta"))?;
    t.insert(key, bytes).map_err(err("write meta"))?;
    Ok(())
}

/// The storage of one group, as opened from its directory.
pub struct Storage {
    pub log: LogStore,
    pub sm: StateMachine,
    pub reader: StateReader,
    /// Dropped once every part above, the flusher and the Raft tasks are gone: the database
    /// file is closed then.
    pub released: Weak<Database>,
}

/// Opens (creating if needed) the storage in `dir` for the node `local_peer`, and starts its
/// flusher task on the current Tokio runtime.
///
/// Refuses a database written by another peer id (a data directory moved between nodes would
/// otherwise answer votes under another node's name) or of another format.
pub async fn open(dir: &Path, local_peer: &str) -> Result<Storage, Error> {
    let path = dir.join(DB_FILE);
    let peer = local_peer.to_string();
    let dir2 = dir.to_path_buf();
    let path2 = path.clone();
    let db = tokio::task::spawn_blocking(move || open_blocking(&dir2, &path2, &peer))
        .await
        .map_err(|e| Error::Storage {
            path: path.display().to_string(),
            reason: format!("storage task: {e}"),
        })??;
    let db = Arc::new(db);
    let unflushed = Arc::new(Unflushed::default());
    let (flush_tx, flush_rx) = mpsc::channel(FLUSH_QUEUE);
    tokio::spawn(flusher(db.clone(), unflushed.clone(), flush_rx));
    Ok(Storage {
        log: LogStore {
            db: db.clone(),
            unflushed,
            flush_tx,
        },
        sm: StateMachine { db: db.clone() },
        reader: StateReader { db: db.clone() },
        released: Arc::downgrade(&db),
    })
}

fn open_blocking(dir: &Path, path: &PathBuf, peer: &str) -> Result<Database, Error> {
    let fail = |reason: String| Error::Storage {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating the directory: {e}")))?;
    let db = Database::create(path).map_err(|e| fail(format!("opening: {e}")))?;
    let peer = peer.to_string();
    let setup = || -> R<()> {
        let txn = db.begin_write().map_err(err("begin write"))?;
        {
            txn.open_table(LOG).map_err(err("open log"))?;
            txn.open_table(KV).map_err(err("open kv"))?;
            txn.open_table(SNAPSHOT).map_err(err("open snapshot"))?;
            let mut meta = txn.open_table(META).map_err(err("open meta"))?;
            let format = meta.get(K_FORMAT).map_err(err("read format"))?;
            match format.map(|g| u64_bytes(g.value())).transpose()? {
                Some(f) if f != FORMAT => {
                    return Err(format!(
                        "the database is of format {f}; this build reads format {FORMAT}"
                    ));
                }
                _ => {}
            }
            let owner = meta.get(K_PEER).map_err(err("read owner"))?;
            match owner.map(|g| String::from_utf8_lossy(g.value()).into_owned()) {
                Some(owner) if owner != peer => {
                    return Err(format!(
                        "the database belongs to peer {owner}, not to this node ({peer}); \
                         a group's data must not move between nodes"
                    ));
                }
                Some(_) => {}
                None => {
                    meta.insert(K_PEER, peer.as_bytes())
                        .map_err(err("write owner"))?;
                    meta.insert(K_FORMAT, &FORMAT.to_be_bytes()[..])
                        .map_err(err("write format"))?;
                }
            }
        }
        txn.commit().map_err(err("commit"))
    };
    setup().map_err(fail)?;
    Ok(db)
}

/// Log writes not yet committed to the database (see the module docs).
#[derive(Default)]
struct Unflushed(Mutex<UnflushedState>);

#[derive(Default)]
struct UnflushedState {
    /// Appended entries by index, with their encoding.
    entries: BTreeMap<u64, (Entry, Arc<Vec<u8>>)>,
    /// The committed log id last saved, until the flusher writes it.
    committed: Option<Vec<u8>>,
}

impl Unflushed {
    fn lock(&self) -> MutexGuard<'_, UnflushedState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unflushed entries within `bounds`.
    fn range(&self, bounds: (Bound<u64>, Bound<u64>)) -> Vec<Entry> {
        self.lock()
            .entries
            .range(bounds)
            .map(|(_, (e, _))| e.clone())
            .collect()
    }
}

/// Writes the unflushed entries in batches, durably, then reports them flushed.
async fn flusher(
    db: Arc<Database>,
    unflushed: Arc<Unflushed>,
    mut rx: mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    while let Some(first) = rx.recv().await {
        let mut callbacks = vec![first];
        while let Ok(cb) = rx.try_recv() {
            callbacks.push(cb);
        }
        let pending = unflushed.clone();
        // Picked inside the transaction: a truncate or purge (a write transaction of its own)
        // runs wholly before or after this one.
        let res = write(&db, Durability::Immediate, move |txn| {
            let (rows, committed) = {
                let mut u = pending.lock();
                let rows: Vec<(u64, LogId<NodeId>, Arc<Vec<u8>>)> = u
                    .entries
                    .iter()
                    .map(|(i, (e, b))| (*i, e.log_id, b.clone()))
                    .collect();
                (rows, u.committed.take())
            };
            {
                let mut t = txn.open_table(LOG).map_err(err("open log"))?;
                for (index, _, bytes) in &rows {
                    t.insert(*index, bytes.as_slice()).map_err(err("append"))?;
                }
            }
            if let Some(c) = committed {
                put_meta(txn, K_COMMITTED, &c)?;
            }
            Ok(rows)
        })
        .await;
        if let Ok(rows) = &res {
            // Now readable from the table. An entry replaced meanwhile (truncated, then
            // appended again at its index) stays until the next flush.
            let mut u = unflushed.lock();
            for (index, log_id, _) in rows {
                if u.entries
                    .get(index)
                    .is_some_and(|(e, _)| e.log_id == *log_id)
                {
                    u.entries.remove(index);
                }
            }
        }
        let res = res.map(|_| ());
        for cb in callbacks {
            cb.log_io_completed(res.clone().map_err(io::Error::other));
        }
    }
    // The log store is gone (the group stopped): a committed log id saved since the last
    // flush is written now, so that a clean stop keeps it.
    let committed = unflushed.lock().committed.take();
    if let Some(c) = committed
        && let Err(e) = write(&db, Durability::Immediate, move |txn| {
            put_meta(txn, K_COMMITTED, &c)
        })
        .await
    {
        tracing::warn!("saving the committed log id at stop: {e}");
    }
}

fn read_entries(db: &Database, bounds: (Bound<u64>, Bound<u64>)) -> R<Vec<Entry>> {
    let txn = db.begin_read().map_err(err("begin read"))?;
    let t = txn.open_table(LOG).map_err(err("open log"))?;
    let mut out = Vec::new();
    for item in t.range(bounds).map_err(err("read log"))? {
        let (_, v) = item.map_err(err("read log"))?;
        out.push(decode(v.value())?);
    }
    Ok(out)
}

/// The log's entries within `bounds`: the table's, overlaid with the unflushed ones.
fn read_log(
    db: &Database,
    unflushed: &Unflushed,
    bounds: (Bound<u64>, Bound<u64>),
) -> R<Vec<Entry>> {
    // The unflushed set first: an entry the flusher commits between the two reads is then
    // found in one of them (it leaves the set only after its commit).
    let pending = unflushed.range(bounds);
    let stored = read_entries(db, bounds)?;
    if pending.is_empty() {
        return Ok(stored);
    }
    let mut all: BTreeMap<u64, Entry> = stored.into_iter().map(|e| (e.log_id.index, e)).collect();
    for e in pending {
        all.insert(e.log_id.index, e);
    }
    Ok(all.into_values().collect())
}

fn read_logs_error(e: String) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::error(e)).into()
}

fn write_logs_error(e: String) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e)).into()
}

fn sm_read_error(e: String) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::error(e)).into()
}

fn sm_write_error(e: String) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e)).into()
}

fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

/// Reads log entries for replication tasks.
#[derive(Clone)]
pub struct LogReader {
    db: Arc<Database>,
    unflushed: Arc<Unflushed>,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        read_log(&self.db, &self.unflushed, bounds(&range)).map_err(read_logs_error)
    }
}

/// The log and the vote (openraft's `RaftLogStorage`).
pub struct LogStore {
    db: Arc<Database>,
    unflushed: Arc<Unflushed>,
    flush_tx: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        read_log(&self.db, &self.unflushed, bounds(&range)).map_err(read_logs_error)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let read = || -> R<LogState<TypeConfig>> {
            let purged: Option<LogId<NodeId>> = get_meta(&self.db, K_PURGED)?;
            let txn = self.db.begin_read().map_err(err("begin read"))?;
            let t = txn.open_table(LOG).map_err(err("open log"))?;
            let last = t.last().map_err(err("read log"))?;
            let mut last = match last {
                Some((_, v)) => Some(decode::<Entry>(v.value())?.log_id),
                None => None,
            };
            if let Some((_, (e, _))) = self.unflushed.lock().entries.last_key_value()
                && last.is_none_or(|l| l.index < e.log_id.index)
            {
                last = Some(e.log_id);
            }
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last.or(purged),
            })
        };
        read().map_err(read_logs_error)
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            db: self.db.clone(),
            unflushed: self.unflushed.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(AnyError::error(e)))?;
        write(&self.db, Durability::Immediate, move |txn| {
            put_meta(txn, K_VOTE, &bytes)
        })
        .await
        .map_err(|e| StorageIOError::write_vote(AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        get_meta(&self.db, K_VOTE).map_err(|e| StorageIOError::read_vote(AnyError::error(e)).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = encode(&committed).map_err(write_logs_error)?;
        // Written with the next flush of the log: a commit of its own would cost a write
        // transaction per write on the leader, and without a sync it would become durable no
        // sooner than with that flush anyway.
        self.unflushed.lock().committed = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let pending = self.unflushed.lock().committed.clone();
        let committed = match pending {
            Some(b) => decode::<Option<LogId<NodeId>>>(&b).map_err(read_logs_error)?,
            None => get_meta::<Option<LogId<NodeId>>>(&self.db, K_COMMITTED)
                .map_err(read_logs_error)?
                .flatten(),
        };
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let bytes = Arc::new(encode(&e).map_err(write_logs_error)?);
            rows.push((e, bytes));
        }
        {
            let mut u = self.unflushed.lock();
            for (e, bytes) in rows {
                u.entries.insert(e.log_id.index, (e, bytes));
            }
        }
        // Durable only after the flusher's next synced commit: the callback goes with it.
        self.flush_tx
            .send(callback)
            .await
            .map_err(|_| write_logs_error("the log flusher has stopped".into()))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let unflushed = self.unflushed.clone();
        write(&self.db, Durability::None, move |txn| {
            // Inside the transaction, so that the flusher cannot write them afterwards.
            unflushed.lock().entries.retain(|i, _| *i < log_id.index);
            let mut t = txn.open_table(LOG).map_err(err("open log"))?;
            t.retain_in(log_id.index.., |_, _| false)
                .map_err(err("truncate"))
        })
        .await
        .map_err(write_logs_error)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = encode(&Some(log_id)).map_err(write_logs_error)?;
        let unflushed = self.unflushed.clone();
        write(&self.db, Durability::None, move |txn| {
            unflushed.lock().entries.retain(|i, _| *i > log_id.index);
            put_meta(txn, K_PURGED, &bytes)?;
            let mut t = txn.open_table(LOG).map_err(err("open log"))?;
            t.retain_in(..=log_id.index, |_, _| false)
                .map_err(err("purge"))
        })
        .await
        .map_err(write_logs_error)
    }
}

/// The key-value state machine (openraft's `RaftStateMachine`).
pub struct StateMachine {
    db: Arc<Database>,
}

fn read_u64_meta(meta: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> R<u64> {
    match meta.get(key).map_err(err("read meta"))? {
        Some(g) => u64_bytes(g.value()),
        None => Ok(0),
    }
}

fn kv_value(bytes: &[u8]) -> R<(u64, &[u8])> {
    if bytes.len() < 8 {
        return Err(format!("a stored value is {} bytes, under 8", bytes.len()));
    }
    let (rev, value) = bytes.split_at(8);
    Ok((u64_bytes(rev)?, value))
}

fn kv_bytes(revision: u64, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + value.len());
    b.extend_from_slice(&revision.to_be_bytes());
    b.extend_from_slice(value);
    b
}

fn cost(key: &str, value_len: usize) -> u64 {
    key.len() as u64 + value_len as u64 + ENTRY_OVERHEAD_BYTES
}

/// Applies entries in one transaction; the same entries give the same results everywhere.
fn apply_blocking(txn: &redb::WriteTransaction, entries: Vec<Entry>) -> R<Vec<ApplyResult>> {
    let mut kv = txn.open_table(KV).map_err(err("open kv"))?;
    let mut meta = txn.open_table(META).map_err(err("open meta"))?;
    let mut revision = read_u64_meta(&meta, K_REVISION)?;
    let mut size = read_u64_meta(&meta, K_SIZE)?;
    let mut results = Vec::with_capacity(entries.len());
    let mut last = None;
    for entry in entries {
        last = Some(entry.log_id);
        let result = match entry.payload {
            EntryPayload::Blank => ApplyResult::Nothing,
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(entry.log_id), m);
                meta.insert(K_MEMBERSHIP, encode(&stored)?.as_slice())
                    .map_err(err("write membership"))?;
                ApplyResult::Nothing
            }
            EntryPayload::Normal(KvCommand::Batch(commands)) => ApplyResult::Batch(
                commands
                    .into_iter()
                    .map(|cmd| apply_command(&mut kv, &mut revision, &mut size, cmd))
                    .collect::<R<Vec<_>>>()?,
            ),
            EntryPayload::Normal(cmd) => apply_command(&mut kv, &mut revision, &mut size, cmd)?,
        };
        results.push(result);
    }
    if let Some(last) = last {
        meta.insert(K_APPLIED, encode(&Some(last))?.as_slice())
            .map_err(err("write applied"))?;
    }
    meta.insert(K_REVISION, &revision.to_be_bytes()[..])
        .map_err(err("write revision"))?;
    meta.insert(K_SIZE, &size.to_be_bytes()[..])
        .map_err(err("write size"))?;
    Ok(results)
}

/// Applies one write to the key-value table, advancing the group's revision and size.
fn apply_command(
    kv: &mut redb::Table<'_, &'static str, &'static [u8]>,
    revision: &mut u64,
    size: &mut u64,
    cmd: KvCommand,
) -> R<ApplyResult> {
    let key = cmd.key().to_string();
    let current = match kv.get(key.as_str()).map_err(err("read kv"))? {
        Some(g) => {
            let (rev, value) = kv_value(g.value())?;
            Some((rev, value.len()))
        }
        None => None,
    };
    let current_rev = current.map(|c| c.0).unwrap_or(0);
    Ok(match (cmd, current) {
        // Built only by a leader, flat; one nested in another (which no BeeMesh leader
        // proposes) changes nothing, the same way on every replica.
        (KvCommand::Batch(_), _) => ApplyResult::Nothing,
        (cmd, _) if cmd.if_revision().is_some_and(|e| e != current_rev) => {
            ApplyResult::PreconditionFailed {
                key,
                expected: cmd.if_revision().unwrap_or_default(),
                current: current_rev,
            }
        }
        (KvCommand::Put { value, .. }, current) => {
            let old = current.map(|(_, len)| cost(&key, len)).unwrap_or(0);
            let new = cost(&key, value.len());
            let next = *size - old.min(*size) + new;
            if next > MAX_STATE_BYTES && new > old {
                ApplyResult::StateFull {
                    key,
                    size: *size,
                    limit: MAX_STATE_BYTES,
                }
            } else {
                *revision += 1;
                kv.insert(key.as_str(), kv_bytes(*revision, &value).as_slice())
                    .map_err(err("write kv"))?;
                *size = next;
                ApplyResult::Written {
                    revision: *revision,
                }
            }
        }
        (KvCommand::Delete { .. }, None) => ApplyResult::NotFound {
            revision: *revision,
        },
        (KvCommand::Delete { .. }, Some((_, len))) => {
            *revision += 1;
            kv.remove(key.as_str()).map_err(err("delete kv"))?;
            *size -= cost(&key, len).min(*size);
            ApplyResult::Written {
                revision: *revision,
            }
        }
    })
}

/// A state machine as serialized into a snapshot.
#[derive(Deserialize)]
struct SnapshotPayload {
    format: u64,
    revision: u64,
    items: Vec<Item>,
}

/// Serializes a snapshot payload straight from a table, without a copy of the state.
struct PayloadWriter<'a> {
    revision: u64,
    kv: &'a redb::ReadOnlyTable<&'static str, &'static [u8]>,
}

struct ItemsWriter<'a>(&'a redb::ReadOnlyTable<&'static str, &'static [u8]>);

impl Serialize for PayloadWriter<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("SnapshotPayload", 3)?;
        st.serialize_field("format", &FORMAT)?;
        st.serialize_field("revision", &self.revision)?;
        st.serialize_field("items", &ItemsWriter(self.kv))?;
        st.end()
    }
}

impl Serialize for ItemsWriter<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let len = self.0.len().map_err(S::Error::custom)?;
        let mut seq = s.serialize_seq(usize::try_from(len).ok())?;
        for item in self.0.range(..).map_err(S::Error::custom)? {
            let (k, v) = item.map_err(S::Error::custom)?;
            let (revision, value) = kv_value(v.value()).map_err(S::Error::custom)?;
            seq.serialize_element(&ItemRef {
                key: k.value(),
                value,
                revision,
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ItemRef<'a> {
    key: &'a str,
    #[serde(with = "serde_bytes")]
    value: &'a [u8],
    revision: u64,
}

/// Builds a snapshot of the state machine as of the moment it runs.
pub struct SnapshotBuilder {
    db: Arc<Database>,
}

fn build_blocking(db: &Database) -> R<(SnapshotMeta<NodeId, RaftPeer>, Vec<u8>)> {
    let txn = db.begin_read().map_err(err("begin read"))?;
    let meta_t = txn.open_table(META).map_err(err("open meta"))?;
    let kv = txn.open_table(KV).map_err(err("open kv"))?;
    let get = |key: &str| -> R<Option<Vec<u8>>> {
        Ok(meta_t
            .get(key)
            .map_err(err("read meta"))?
            .map(|g| g.value().to_vec()))
    };
    let applied: Option<LogId<NodeId>> = get(K_APPLIED)?
        .map(|b| decode::<Option<LogId<NodeId>>>(&b))
        .transpose()?
        .flatten();
    let membership: StoredMembership<NodeId, RaftPeer> = get(K_MEMBERSHIP)?
        .map(|b| decode(&b))
        .transpose()?
        .unwrap_or_default();
    let revision = read_u64_meta(&meta_t, K_REVISION)?;
    let data = encode(&PayloadWriter { revision, kv: &kv })?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let snapshot_id = match &applied {
        Some(l) => format!(
            "{}-{}-{}-{nanos}",
            l.leader_id.term, l.leader_id.node_id, l.index
        ),
        None => format!("none-{nanos}"),
    };
    Ok((
        SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        },
        data,
    ))
}

/// Stores `meta` and `data` as the current snapshot unless a newer one is stored already.
fn store_snapshot(
    txn: &redb::WriteTransaction,
    meta: &SnapshotMeta<NodeId, RaftPeer>,
    data: &[u8],
) -> R<()> {
    let mut t = txn.open_table(SNAPSHOT).map_err(err("open snapshot"))?;
    let current = match t.get(S_META).map_err(err("read snapshot"))? {
        Some(g) => Some(decode::<SnapshotMeta<NodeId, RaftPeer>>(g.value())?),
        None => None,
    };
    if let Some(c) = current
        && c.last_log_id > meta.last_log_id
    {
        return Ok(());
    }
    t.insert(S_META, encode(meta)?.as_slice())
        .map_err(err("write snapshot"))?;
    t.insert(S_DATA, data).map_err(err("write snapshot"))?;
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let db = self.db.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || build_blocking(&db))
            .await
            .map_err(|e| format!("storage task: {e}"))
            .and_then(|r| r)
            .map_err(|e| StorageIOError::read_state_machine(AnyError::error(e)))?;
        let (m2, d2) = (meta.clone(), data.clone());
        write(&self.db, Durability::None, move |txn| {
            store_snapshot(txn, &m2, &d2)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::error(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, RaftPeer>), StorageError<NodeId>>
    {
        let applied = get_meta::<Option<LogId<NodeId>>>(&self.db, K_APPLIED)
            .map_err(sm_read_error)?
            .flatten();
        let membership = get_meta(&self.db, K_MEMBERSHIP)
            .map_err(sm_read_error)?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        write(&self.db, Durability::None, move |txn| {
            apply_blocking(txn, entries)
        })
        .await
        .map_err(sm_write_error)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftPeer>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let fail = |e: String| -> StorageError<NodeId> {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::error(e)).into()
        };
        if data.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(fail(format!(
                "the snapshot is {} bytes; at most {MAX_SNAPSHOT_BYTES} are accepted",
                data.len()
            )));
        }
        let payload: SnapshotPayload = decode(&data).map_err(fail)?;
        if payload.format != FORMAT {
            return Err(fail(format!(
                "the snapshot is of format {}; this build reads format {FORMAT}",
                payload.format
            )));
        }
        let meta = meta.clone();
        write(&self.db, Durability::Immediate, move |txn| {
            txn.delete_table(KV).map_err(err("clear kv"))?;
            let mut size = 0u64;
            {
                let mut kv = txn.open_table(KV).map_err(err("open kv"))?;
                for item in &payload.items {
                    kv.insert(
                        item.key.as_str(),
                        kv_bytes(item.revision, &item.value).as_slice(),
                    )
                    .map_err(err("write kv"))?;
                    size += cost(&item.key, item.value.len());
                }
            }
            put_meta(txn, K_APPLIED, &encode(&meta.last_log_id)?)?;
            put_meta(txn, K_MEMBERSHIP, &encode(&meta.last_membership)?)?;
            put_meta(txn, K_REVISION, &payload.revision.to_be_bytes())?;
            put_meta(txn, K_SIZE, &size.to_be_bytes())?;
            store_snapshot(txn, &meta, &data)
        })
        .await
        .map_err(fail)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let read = || -> R<Option<Snapshot<TypeConfig>>> {
            let txn = self.db.begin_read().map_err(err("begin read"))?;
            let t = txn.open_table(SNAPSHOT).map_err(err("open snapshot"))?;
            let meta = t.get(S_META).map_err(err("read snapshot"))?;
            let data = t.get(S_DATA).map_err(err("read snapshot"))?;
            match (meta, data) {
                (Some(m), Some(d)) => Ok(Some(Snapshot {
                    meta: decode(m.value())?,
                    snapshot: Box::new(Cursor::new(d.value().to_vec())),
                })),
                _ => Ok(None),
            }
        };
        read().map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)).into())
    }
}

/// Local reads of the state machine, for the KV API (after a read index makes them
/// linearizable).
#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
}

impl StateReader {
    /// The value and revision of `key`.
    pub fn get(&self, key: &str) -> R<Option<Versioned>> {
        let txn = self.db.begin_read().map_err(err("begin read"))?;
        let t = txn.open_table(KV).map_err(err("open kv"))?;
        match t.get(key).map_err(err("read kv"))? {
            Some(g) => {
                let (revision, value) = kv_value(g.value())?;
                Ok(Some(Versioned {
                    value: value.to_vec(),
                    revision,
                }))
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` keys starting with `prefix`, after `after`; and the group revision.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> R<(Vec<Item>, Option<String>, u64)> {
        let txn = self.db.begin_read().map_err(err("begin read"))?;
        let meta = txn.open_table(META).map_err(err("open meta"))?;
        let revision = read_u64_meta(&meta, K_REVISION)?;
        let t = txn.open_table(KV).map_err(err("open kv"))?;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        for item in t.range((start, Bound::Unbounded)).map_err(err("read kv"))? {
            let (k, v) = item.map_err(err("read kv"))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if items.len() >= limit || bytes >= LIST_PAGE_BYTES {
                next = items.last().map(|i: &Item| i.key.clone());
                break;
            }
            let (rev, value) = kv_value(v.value())?;
            bytes += key.len() + value.len();
            items.push(Item {
                key: key.to_string(),
                value: value.to_vec(),
                revision: rev,
            });
        }
        Ok((items, next, revision))
    }

    /// Records the first voters a group was created with, durably, so that a first voter
    /// restarting before the group formed still initialises it.
    pub async fn save_bootstrap(&self, voters: &BTreeMap<NodeId, RaftPeer>) -> R<()> {
        let bytes = encode(voters)?;
        write(&self.db, Durability::Immediate, move |txn| {
            put_meta(txn, K_BOOTSTRAP, &bytes)
        })
        .await
    }

    /// The first voters recorded by [`Self::save_bootstrap`].
    pub fn bootstrap(&self) -> R<Option<BTreeMap<NodeId, RaftPeer>>> {
        get_meta(&self.db, K_BOOTSTRAP)
    }

    /// The group's revision and the state's accounted size in bytes.
    pub fn revision_and_size(&self) -> R<(u64, u64)> {
        let txn = self.db.begin_read().map_err(err("begin read"))?;
        let meta = txn.open_table(META).map_err(err("open meta"))?;
        Ok((
            read_u64_meta(&meta, K_REVISION)?,
            read_u64_meta(&meta, K_SIZE)?,
        ))
    }
}

#[cfg(test)]
mod tests;
