//! The state-based CRDT of the `eventual` mode: a map of last-writer-wins registers.
//!
//! Each key holds one [`Entry`]: a [`Timestamp`] and either a value or a tombstone. A local
//! put or delete makes a [`Record`] (the delta that is gossiped); [`LwwMap::merge`] keeps, per
//! key, the greater record by the total order (timestamp, tombstone over value, value bytes).
//! Because that is the maximum of a total order, merging is commutative, associative and
//! idempotent, and any delivery order of the same records gives the same map (proptests in
//! `crdt/tests.rs`). Ties on the timestamp cannot happen between honest nodes (timestamps carry
//! the node); a forged tie still resolves the same way everywhere.
//!
//! Tombstones record deletes so that an older value arriving late does not come back. They are
//! collected once they have been held locally for the collection horizon
//! ([`Limits::tombstone_horizon_ms`], 24 h by default, see [`LwwMap::collect_tombstones`]);
//! docs/consistency-eventual.md and [`crate::reconcile`] explain what that allows and how a
//! replica out of contact for longer than the horizon is kept from resurrecting deleted keys.
//!
//! Everything keyed by remote input is bounded: key length and characters, value size, number
//! of keys (tombstones included) and total bytes, each refused with a typed [`KvError`].

pub mod codec;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::BTreeMap;
use std::ops::Bound;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::hlc::Timestamp;
use codec::{DecodeError, Reader, Writer};

/// 32-byte identity of one version of one key: SHA-256 over the key, the timestamp and the
/// value (or tombstone). The items of set reconciliation.
pub type ItemId = [u8; 32];

/// Accounting overhead per entry (timestamp, tree node, id), counted in [`LwwMap::total_bytes`]
/// so that many tiny keys are bounded too.
pub const ENTRY_OVERHEAD: usize = 96;
/// Most items [`LwwMap::list`] returns in one page, whatever the caller asks.
pub const MAX_PAGE_ITEMS: usize = 1000;
/// Most value bytes [`LwwMap::list`] returns in one page (at least one item is returned).
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// Per-workload bounds. All replicas of a workload must use the same limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes (default 512).
    pub max_key_len: usize,
    /// Largest value, in bytes (default 64 KiB).
    pub max_value_len: usize,
    /// Most keys, tombstones included (default 100,000).
    pub max_keys: usize,
    /// Most bytes: keys, values and [`ENTRY_OVERHEAD`] per entry, tombstones included
    /// (default 64 MiB).
    pub max_total_bytes: usize,
    /// How long a tombstone is kept after this replica applied it (default 24 h).
    pub tombstone_horizon_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 512,
            max_value_len: 64 * 1024,
            max_keys: 100_000,
            max_total_bytes: 64 << 20,
            tombstone_horizon_ms: 24 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    #[error("empty key")]
    EmptyKey,
    #[error("key of {len} bytes is longer than the limit {limit} (key starts {start:?})")]
    KeyTooLong {
        len: usize,
        limit: usize,
        start: String,
    },
    #[error("key {key:?} holds a control character at byte {at}")]
    KeyNotPrintable { key: String, at: usize },
    #[error("value of {len} bytes for key {key:?} is larger than the limit {limit}")]
    ValueTooLarge {
        key: String,
        len: usize,
        limit: usize,
    },
    #[error("key {key:?} would be key number {count}, over the limit {limit} (tombstones count)")]
    TooManyKeys {
        key: String,
        count: usize,
        limit: usize,
    },
    #[error("writing key {key:?} would make the map {total} bytes, over the limit {limit}")]
    TooManyBytes {
        key: String,
        total: usize,
        limit: usize,
    },
    #[error("prefix of {len} bytes is longer than the key limit {limit}")]
    PrefixTooLong { len: usize, limit: usize },
}

/// One version of one key: what is stored and what is replicated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    pub key: String,
    pub ts: Timestamp,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
}

impl Record {
    /// True when `self` wins over `other` for the same key: the order of the register.
    pub fn beats(&self, other: &Record) -> bool {
        version_cmp(
            &self.ts,
            self.value.as_deref(),
            &other.ts,
            other.value.as_deref(),
        )
        .is_gt()
    }

    pub fn id(&self) -> ItemId {
        item_id(&self.key, &self.ts, self.value.as_deref())
    }

    /// Exact encoded size on the wire.
    pub fn encoded_len(&self) -> usize {
        2 + self.key.len()
            + crate::hlc::TIMESTAMP_LEN
            + 1
            + self.value.as_ref().map_or(0, |v| 4 + v.len())
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.str16(&self.key);
        w.ts(&self.ts);
        match &self.value {
            Some(v) => {
                w.u8(0);
                w.bytes32(v);
            }
            None => w.u8(1),
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Record, DecodeError> {
        let key = r.str16("key")?;
        let ts = r.ts("timestamp")?;
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
        Ok(Record { key, ts, value })
    }

    /// Smallest encoding of a record (empty key, tombstone), for bounding announced counts.
    pub(crate) const MIN_ENCODED: usize = 2 + crate::hlc::TIMESTAMP_LEN + 1;
}

/// Compare two versions of one key: timestamp, then a tombstone above a value, then the value
/// bytes. A total order, so the maximum is a CRDT merge.
pub fn version_cmp(
    ta: &Timestamp,
    va: Option<&[u8]>,
    tb: &Timestamp,
    vb: Option<&[u8]>,
) -> std::cmp::Ordering {
    ta.cmp(tb)
        .then_with(|| va.is_none().cmp(&vb.is_none()))
        .then_with(|| va.cmp(&vb))
}

pub fn item_id(key: &str, ts: &Timestamp, value: Option<&[u8]>) -> ItemId {
    let mut h = Sha256::new();
    h.update(b"beemesh-kv-item/1\0");
    h.update((key.len() as u64).to_be_bytes());
    h.update(key.as_bytes());
    h.update(ts.to_bytes());
    match value {
        Some(v) => {
            h.update([0u8]);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
        None => h.update([1u8]),
    }
    h.finalize().into()
}

/// What the map holds for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ts: Timestamp,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// Local Unix milliseconds when this replica applied the entry: tombstones are collected
    /// [`Limits::tombstone_horizon_ms`] after it. Not replicated.
    pub applied_at: u64,
    pub id: ItemId,
}

impl Entry {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
    fn cost(key: &str, value: Option<&[u8]>) -> usize {
        key.len() + value.map_or(0, <[u8]>::len) + ENTRY_OVERHEAD
    }
    pub fn to_record(&self, key: &str) -> Record {
        Record {
            key: key.to_owned(),
            ts: self.ts,
            value: self.value.clone(),
        }
    }
}

/// What [`LwwMap::merge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// The key was absent.
    Inserted,
    /// The record beat the entry held.
    Replaced,
    /// The entry held is the same version or newer: nothing changed.
    Unchanged,
}

impl Merged {
    pub fn changed(self) -> bool {
        self != Merged::Unchanged
    }
}

/// One item of a [`Page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageItem {
    pub key: String,
    pub value: Vec<u8>,
    pub ts: Timestamp,
}

/// A page of a prefix listing. `next` is the continuation token: pass it as `after` to get the
/// following page; `None` when the listing is complete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub items: Vec<PageItem>,
    pub next: Option<String>,
}

/// The last-writer-wins map of one workload on one node.
#[derive(Debug, Clone)]
pub struct LwwMap {
    limits: Limits,
    entries: BTreeMap<String, Entry>,
    tombstones: usize,
    total_bytes: usize,
    /// Bumped by every change: caches of derived structures (reconciliation snapshots) key on it.
    version: u64,
}

impl PartialEq for LwwMap {
    /// Same content (keys, timestamps, values); local bookkeeping is ignored.
    fn eq(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(other.entries.iter())
                .all(|((ka, a), (kb, b))| ka == kb && a.ts == b.ts && a.value == b.value)
    }
}

impl LwwMap {
    pub fn new(limits: Limits) -> Self {
        LwwMap {
            limits,
            entries: BTreeMap::new(),
            tombstones: 0,
            total_bytes: 0,
            version: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Entries held, tombstones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    pub fn live_keys(&self) -> usize {
        self.entries.len() - self.tombstones
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Check a key against the limits.
    pub fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::EmptyKey);
        }
        if key.len() > self.limits.max_key_len {
            return Err(KvError::KeyTooLong {
                len: key.len(),
                limit: self.limits.max_key_len,
                start: key.chars().take(32).collect(),
            });
        }
        if let Some((at, _)) = key.char_indices().find(|(_, c)| c.is_control()) {
            return Err(KvError::KeyNotPrintable {
                key: key.to_owned(),
                at,
            });
        }
        Ok(())
    }

    /// Check that `key` may take `value` (`None`: a tombstone) within the limits.
    pub fn check_write(&self, key: &str, value: Option<&[u8]>) -> Result<(), KvError> {
        self.check_key(key)?;
        if let Some(v) = value
            && v.len() > self.limits.max_value_len
        {
            return Err(KvError::ValueTooLarge {
                key: key.to_owned(),
                len: v.len(),
                limit: self.limits.max_value_len,
            });
        }
        let old = self.entries.get(key);
        if old.is_none() && self.entries.len() >= self.limits.max_keys {
            return Err(KvError::TooManyKeys {
                key: key.to_owned(),
                count: self.entries.len() + 1,
                limit: self.limits.max_keys,
            });
        }
        let old_cost = old.map_or(0, |e| Entry::cost(key, e.value.as_deref()));
        let total = self.total_bytes - old_cost + Entry::cost(key, value);
        if total > self.limits.max_total_bytes && total > self.total_bytes {
            return Err(KvError::TooManyBytes {
                key: key.to_owned(),
                total,
                limit: self.limits.max_total_bytes,
            });
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The live value of `key` (`None` when absent or deleted).
    pub fn get_value(&self, key: &str) -> Option<(&[u8], Timestamp)> {
        self.entries
            .get(key)
            .and_then(|e| e.value.as_deref().map(|v| (v, e.ts)))
    }

    /// Entries in key order, tombstones included.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// Entries with keys in `[from, to)` (`to = None`: to the end), tombstones included.
    pub fn range<'a>(
        &'a self,
        from: &str,
        to: Option<&str>,
    ) -> impl Iterator<Item = (&'a String, &'a Entry)> + 'a {
        let upper = match to {
            Some(t) => Bound::Excluded(t.to_owned()),
            None => Bound::Unbounded,
        };
        // An empty range (to <= from) would panic in BTreeMap::range: guard it.
        let empty = matches!(&upper, Bound::Excluded(t) if t.as_str() <= from);
        let lower = Bound::Included(from.to_owned());
        let it = if empty {
            None
        } else {
            Some(self.entries.range((lower, upper)))
        };
        it.into_iter().flatten()
    }

    /// Live keys starting with `prefix`, after the key `after` (exclusive), at most `limit`
    /// items (capped at [`MAX_PAGE_ITEMS`]) and about [`MAX_PAGE_BYTES`] of values.
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, KvError> {
        if prefix.len() > self.limits.max_key_len {
            return Err(KvError::PrefixTooLong {
                len: prefix.len(),
                limit: self.limits.max_key_len,
            });
        }
        let limit = limit.clamp(1, MAX_PAGE_ITEMS);
        let lower = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        let mut page = Page::default();
        let mut bytes = 0usize;
        for (k, e) in self
            .entries
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            let Some(v) = &e.value else { continue };
            if page.items.len() == limit
                || (!page.items.is_empty() && bytes + v.len() > MAX_PAGE_BYTES)
            {
                page.next = page.items.last().map(|i| i.key.clone());
                break;
            }
            bytes += v.len();
            page.items.push(PageItem {
                key: k.clone(),
                value: v.clone(),
                ts: e.ts,
            });
        }
        Ok(page)
    }

    /// Merge one record: keep the greater version. `applied_at` is local wall time. A record
    /// that would change the map is checked against the limits first (nothing changes on
    /// error).
    pub fn merge(&mut self, rec: Record, applied_at: u64) -> Result<Merged, KvError> {
        let id = rec.id();
        self.merge_with_id(rec, id, applied_at)
    }

    pub(crate) fn merge_with_id(
        &mut self,
        rec: Record,
        id: ItemId,
        applied_at: u64,
    ) -> Result<Merged, KvError> {
        if let Some(old) = self.entries.get(&rec.key)
            && version_cmp(&rec.ts, rec.value.as_deref(), &old.ts, old.value.as_deref()).is_le()
        {
            return Ok(Merged::Unchanged);
        }
        self.check_write(&rec.key, rec.value.as_deref())?;
        let entry = Entry {
            ts: rec.ts,
            value: rec.value,
            applied_at,
            id,
        };
        let merged = match self.entries.remove(&rec.key) {
            Some(old) => {
                self.account_remove(&rec.key, &old);
                Merged::Replaced
            }
            None => Merged::Inserted,
        };
        self.account_add(&rec.key, &entry);
        self.entries.insert(rec.key, entry);
        self.version += 1;
        Ok(merged)
    }

    /// Load an entry as persisted (restart): no limit checks beyond consistency, keeps
    /// `applied_at`.
    pub(crate) fn load(&mut self, key: String, entry: Entry) {
        if let Some(old) = self.entries.get(&key)
            && version_cmp(
                &entry.ts,
                entry.value.as_deref(),
                &old.ts,
                old.value.as_deref(),
            )
            .is_le()
        {
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.account_remove(&key, &old);
        }
        self.account_add(&key, &entry);
        self.entries.insert(key, entry);
        self.version += 1;
    }

    fn account_add(&mut self, key: &str, e: &Entry) {
        self.total_bytes += Entry::cost(key, e.value.as_deref());
        if e.value.is_none() {
            self.tombstones += 1;
        }
    }

    fn account_remove(&mut self, key: &str, e: &Entry) {
        self.total_bytes -= Entry::cost(key, e.value.as_deref());
        if e.value.is_none() {
            self.tombstones -= 1;
        }
    }

    /// Remove tombstones applied before `cutoff` (local Unix ms), at most `max` of them (so a
    /// tick's work and its persist batch stay bounded). Returns the removed keys and the
    /// largest `applied_at` among them.
    pub fn collect_tombstones(&mut self, cutoff: u64, max: usize) -> (Vec<String>, Option<u64>) {
        let keys: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.value.is_none() && e.applied_at < cutoff)
            .take(max)
            .map(|(k, _)| k.clone())
            .collect();
        let mut newest = None;
        for k in &keys {
            if let Some(e) = self.entries.remove(k) {
                newest = newest.max(Some(e.applied_at));
                self.account_remove(k, &e);
            }
        }
        if !keys.is_empty() {
            self.version += 1;
        }
        (keys, newest)
    }

    /// The largest timestamp held (for restoring the clock).
    pub fn max_timestamp(&self) -> Timestamp {
        self.entries
            .values()
            .map(|e| e.ts)
            .max()
            .unwrap_or(Timestamp::ZERO)
    }
}
