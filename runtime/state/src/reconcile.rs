//! Anti-entropy between two hosts of one workload: how a replica that missed deltas, restarted,
//! or sat on the other side of a partition catches up.
//!
//! **Delta reconciliation** (the usual case) is set reconciliation with `negentropy` 0.5 (range
//! based set reconciliation, Meyer 2023) over the items `(timestamp's physical ms, id)` where
//! the id is [`crate::crdt::item_id`] of (key, timestamp, value): one item per key, for the
//! version held. Two hosts holding different versions of a key differ in two items, a key
//! only one holds in one item, so every difference is found. The initiator splits the key
//! space into 16 ranges and sends their fingerprints; ranges that match are dropped, the
//! others are split again, down to id lists below 32 items. With `d` differences in a map of
//! `n` items the exchange takes about `log16(n / 32) + 2` round trips and
//! `O(d * log16(n))` bytes (16 fingerprints of 16 bytes per differing range per level), not
//! `O(n)`: `tests.rs` asserts, for 100,000 keys and a handful of differing items, at most 6
//! round trips and at most 1 KiB + 2 KiB per differing item of negentropy frames (measured:
//! 2 round trips, about 1 KiB per item; identical maps take one round trip of 335 bytes, while
//! the map's ids alone are 3.2 MB), and for two replicas 10 writes apart, the whole protocol
//! (frames, records, envelopes) in 3 round trips and under 10 KB.
//! The records the initiator lacks are asked for by id and the ones the peer lacks are pushed,
//! within the same round trips, every message below [`MESSAGE_LIMIT`].
//!
//! **Full exchange** (a pair of hosts that has not completed a reconciliation within the
//! tombstone horizon, when one of them has collected tombstones since about that last sync,
//! see `Replica::needs_full`): both sides walk the key space in pages and, per key, apply
//! [`resolve_full_range`]: a key only one side holds, with a version no newer than the other
//! side's collection watermark (the latest local time at which it applied a tombstone it has
//! since collected) plus the drift bound, may have been deleted there and the tombstone
//! collected since; the side holding it buries it (a tombstone at the same timestamp, which
//! wins the tie) instead of resurrecting it. Both sides see the same two pages and the same
//! two watermarks, so they decide the same. What that costs: a write older than that
//! watermark that never reached the other side (written on one side of a partition longer
//! than the horizon) is buried too. A host that never collected anything (watermark 0), such
//! as a brand new one, makes nobody bury anything.
//!
//! This module holds the protocol pieces (snapshots, the negentropy driver, messages and their
//! encoding, the full-exchange rule); [`crate::eventual`] runs the sessions.

use std::collections::BTreeSet;
use std::sync::Arc;

use negentropy::{Bound, Id, Item, Negentropy, NegentropyStorageBase, NegentropyStorageVector};
use thiserror::Error;

use crate::crdt::codec::{DecodeError, Reader, Writer};
use crate::crdt::{ItemId, LwwMap, Record};
use crate::hlc::Timestamp;

/// Largest message this protocol sends or accepts (deltas, reconciliation frames): the mesh's
/// 1 MiB message limit less room for its envelope.
pub const MESSAGE_LIMIT: usize = (1 << 20) - 4096;
/// Largest negentropy frame inside a message.
pub const NEG_FRAME_LIMIT: usize = 128 * 1024;
/// Most ids asked for in one message.
pub const MAX_WANT: usize = 1024;
/// Room for records in one message.
pub const RECORD_BUDGET: usize = MESSAGE_LIMIT - NEG_FRAME_LIMIT - MAX_WANT * 32 - 1024;

const MSG_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReconcileError {
    #[error("set reconciliation failed: {0}")]
    Negentropy(String),
    #[error("malformed reconciliation message: {0}")]
    Decode(#[from] DecodeError),
    #[error("reconciliation message of {len} bytes is over the limit {limit}")]
    TooLarge { len: usize, limit: usize },
}

fn neg_err(e: negentropy::Error) -> ReconcileError {
    ReconcileError::Negentropy(e.to_string())
}

/// A sorted, sealed copy of the map's items, shared by the sessions started while the map did
/// not change.
#[derive(Debug, Clone)]
pub struct Snapshot {
    storage: Arc<NegentropyStorageVector>,
    version: u64,
}

impl Snapshot {
    pub fn build(map: &LwwMap) -> Result<Snapshot, ReconcileError> {
        let mut s = NegentropyStorageVector::with_capacity(map.len());
        for (_, e) in map.iter() {
            s.insert(e.ts.physical, Id::from_byte_array(e.id))
                .map_err(neg_err)?;
        }
        s.seal().map_err(neg_err)?;
        Ok(Snapshot {
            storage: Arc::new(s),
            version: map.version(),
        })
    }

    /// The map version it was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.storage.size().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Owned handle on a shared snapshot, so a session can keep its negentropy instance.
#[derive(Debug)]
struct Shared(Arc<NegentropyStorageVector>);

impl NegentropyStorageBase for Shared {
    fn size(&self) -> Result<usize, negentropy::Error> {
        self.0.size()
    }
    fn get_item(&self, i: usize) -> Result<Option<Item>, negentropy::Error> {
        self.0.get_item(i)
    }
    fn iterate(
        &self,
        begin: usize,
        end: usize,
        cb: &mut dyn FnMut(Item, usize) -> Result<bool, negentropy::Error>,
    ) -> Result<(), negentropy::Error> {
        self.0.iterate(begin, end, cb)
    }
    fn find_lower_bound(&self, first: usize, last: usize, value: &Bound) -> usize {
        self.0.find_lower_bound(first, last, value)
    }
}

/// The initiator's side of one negentropy exchange.
#[derive(Debug)]
pub struct NegInitiator {
    neg: Negentropy<'static, Shared>,
}

/// What one step of the initiator learnt.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NegStep {
    /// The next frame to send; `None` when the sets are reconciled.
    pub next: Option<Vec<u8>>,
    /// Items this side holds and the peer lacks.
    pub have: Vec<ItemId>,
    /// Items the peer holds and this side lacks.
    pub need: Vec<ItemId>,
}

impl NegInitiator {
    /// Start an exchange: the first frame to send.
    pub fn start(snapshot: &Snapshot) -> Result<(NegInitiator, Vec<u8>), ReconcileError> {
        let mut neg = Negentropy::owned(
            Shared(Arc::clone(&snapshot.storage)),
            NEG_FRAME_LIMIT as u64,
        )
        .map_err(neg_err)?;
        let first = neg.initiate().map_err(neg_err)?;
        Ok((NegInitiator { neg }, first))
    }

    /// Handle the peer's answer frame.
    pub fn step(&mut self, answer: &[u8]) -> Result<NegStep, ReconcileError> {
        let mut have = Vec::new();
        let mut need = Vec::new();
        let next = self
            .neg
            .reconcile_with_ids(answer, &mut have, &mut need)
            .map_err(neg_err)?;
        Ok(NegStep {
            next,
            have: have.into_iter().map(Id::to_bytes).collect(),
            need: need.into_iter().map(Id::to_bytes).collect(),
        })
    }
}

/// The responder's side: stateless, one answer frame per query frame.
pub fn respond(snapshot: &Snapshot, query: &[u8]) -> Result<Vec<u8>, ReconcileError> {
    let mut neg =
        Negentropy::borrowed(&*snapshot.storage, NEG_FRAME_LIMIT as u64).map_err(neg_err)?;
    neg.reconcile(query).map_err(neg_err)
}

/// A message between two hosts of a workload (request/response or plain sends: every message
/// names its session, and answers may be lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Initiator to responder: its collection watermark, a negentropy frame (absent once the
    /// sets are reconciled), records the responder lacks, ids of records the initiator lacks.
    Query {
        session: u64,
        watermark: u64,
        neg: Option<Vec<u8>>,
        push: Vec<Record>,
        want: Vec<ItemId>,
    },
    /// Responder to initiator: the negentropy answer (absent when the query had none), the
    /// first `served` wanted ids handled (found or gone), and the records found.
    Answer {
        session: u64,
        neg: Option<Vec<u8>>,
        served: u32,
        records: Vec<Record>,
    },
    /// Initiator to responder: the session completed (the responder records the sync).
    Done { session: u64 },
    /// Responder to initiator: this pair must do a full exchange first.
    NeedFull { session: u64 },
    /// Full exchange, initiator to responder: the initiator's records with keys in
    /// `[from, to)` (`to = None`: to the end), and its collection watermark.
    FullPage {
        session: u64,
        from: String,
        to: Option<String>,
        watermark: u64,
        records: Vec<Record>,
    },
    /// Full exchange, responder to initiator: the range `[from, to)` both sides now resolve
    /// (`to` never beyond the page's), the responder's records in it (before resolving), its
    /// watermark.
    FullAnswer {
        session: u64,
        from: String,
        to: Option<String>,
        watermark: u64,
        records: Vec<Record>,
    },
}

const TAG_QUERY: u8 = 1;
const TAG_ANSWER: u8 = 2;
const TAG_DONE: u8 = 3;
const TAG_NEED_FULL: u8 = 4;
const TAG_FULL_PAGE: u8 = 5;
const TAG_FULL_ANSWER: u8 = 6;

fn put_opt_bytes(w: &mut Writer, b: &Option<Vec<u8>>) {
    match b {
        Some(b) => {
            w.u8(1);
            w.bytes32(b);
        }
        None => w.u8(0),
    }
}

fn get_opt_bytes(r: &mut Reader<'_>, what: &'static str) -> Result<Option<Vec<u8>>, DecodeError> {
    let at = r.pos();
    match r.u8(what)? {
        0 => Ok(None),
        1 => Ok(Some(r.bytes32(what)?.to_vec())),
        tag => Err(DecodeError::BadTag { what, tag, at }),
    }
}

fn put_opt_str(w: &mut Writer, s: &Option<String>) {
    match s {
        Some(s) => {
            w.u8(1);
            w.str16(s);
        }
        None => w.u8(0),
    }
}

fn get_opt_str(r: &mut Reader<'_>, what: &'static str) -> Result<Option<String>, DecodeError> {
    let at = r.pos();
    match r.u8(what)? {
        0 => Ok(None),
        1 => Ok(Some(r.str16(what)?)),
        tag => Err(DecodeError::BadTag { what, tag, at }),
    }
}

pub(crate) fn put_records(w: &mut Writer, records: &[Record]) {
    w.u32(records.len() as u32);
    for r in records {
        r.encode(w);
    }
}

pub(crate) fn get_records(r: &mut Reader<'_>) -> Result<Vec<Record>, DecodeError> {
    let n = r.count("records", Record::MIN_ENCODED)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Record::decode(r)?);
    }
    Ok(out)
}

/// Encoded size of a record list.
pub(crate) fn records_len(records: &[Record]) -> usize {
    4 + records.iter().map(Record::encoded_len).sum::<usize>()
}

impl Message {
    pub fn session(&self) -> u64 {
        match self {
            Message::Query { session, .. }
            | Message::Answer { session, .. }
            | Message::Done { session }
            | Message::NeedFull { session }
            | Message::FullPage { session, .. }
            | Message::FullAnswer { session, .. } => *session,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Message::Query { .. } => "query",
            Message::Answer { .. } => "answer",
            Message::Done { .. } => "done",
            Message::NeedFull { .. } => "need-full",
            Message::FullPage { .. } => "full-page",
            Message::FullAnswer { .. } => "full-answer",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(MSG_VERSION);
        match self {
            Message::Query {
                session,
                watermark,
                neg,
                push,
                want,
            } => {
                w.u8(TAG_QUERY);
                w.u64(*session);
                w.u64(*watermark);
                put_opt_bytes(&mut w, neg);
                put_records(&mut w, push);
                w.u32(want.len() as u32);
                for id in want {
                    w.raw(id);
                }
            }
            Message::Answer {
                session,
                neg,
                served,
                records,
            } => {
                w.u8(TAG_ANSWER);
                w.u64(*session);
                put_opt_bytes(&mut w, neg);
                w.u32(*served);
                put_records(&mut w, records);
            }
            Message::Done { session } => {
                w.u8(TAG_DONE);
                w.u64(*session);
            }
            Message::NeedFull { session } => {
                w.u8(TAG_NEED_FULL);
                w.u64(*session);
            }
            Message::FullPage {
                session,
                from,
                to,
                watermark,
                records,
            }
            | Message::FullAnswer {
                session,
                from,
                to,
                watermark,
                records,
            } => {
                w.u8(if matches!(self, Message::FullPage { .. }) {
                    TAG_FULL_PAGE
                } else {
                    TAG_FULL_ANSWER
                });
                w.u64(*session);
                w.str16(from);
                put_opt_str(&mut w, to);
                w.u64(*watermark);
                put_records(&mut w, records);
            }
        }
        w.finish()
    }

    /// Decode a message. Bytes after the known fields are ignored (a newer minor version may
    /// append fields).
    pub fn decode(bytes: &[u8]) -> Result<Message, ReconcileError> {
        if bytes.len() > MESSAGE_LIMIT {
            return Err(ReconcileError::TooLarge {
                len: bytes.len(),
                limit: MESSAGE_LIMIT,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != MSG_VERSION {
            return Err(DecodeError::Version {
                what: "reconciliation message",
                version,
                supported: MSG_VERSION,
            }
            .into());
        }
        let at = r.pos();
        let tag = r.u8("message tag")?;
        let session = r.u64("session")?;
        let msg = match tag {
            TAG_QUERY => {
                let watermark = r.u64("watermark")?;
                let neg = get_opt_bytes(&mut r, "negentropy frame")?;
                let push = get_records(&mut r)?;
                let n = r.count("wanted ids", 32)?;
                let mut want = Vec::with_capacity(n);
                for _ in 0..n {
                    want.push(r.id("wanted id")?);
                }
                Message::Query {
                    session,
                    watermark,
                    neg,
                    push,
                    want,
                }
            }
            TAG_ANSWER => Message::Answer {
                session,
                neg: get_opt_bytes(&mut r, "negentropy frame")?,
                served: r.u32("served")?,
                records: get_records(&mut r)?,
            },
            TAG_DONE => Message::Done { session },
            TAG_NEED_FULL => Message::NeedFull { session },
            TAG_FULL_PAGE | TAG_FULL_ANSWER => {
                let from = r.str16("range start")?;
                let to = get_opt_str(&mut r, "range end")?;
                let watermark = r.u64("watermark")?;
                let records = get_records(&mut r)?;
                if tag == TAG_FULL_PAGE {
                    Message::FullPage {
                        session,
                        from,
                        to,
                        watermark,
                        records,
                    }
                } else {
                    Message::FullAnswer {
                        session,
                        from,
                        to,
                        watermark,
                        records,
                    }
                }
            }
            tag => {
                return Err(DecodeError::BadTag {
                    what: "reconciliation message",
                    tag,
                    at,
                }
                .into());
            }
        };
        Ok(msg)
    }
}

/// Records of `map` with keys from `from` on, in key order, within `budget` encoded bytes
/// (at least one record when any remains). Returns them and the end of the range they cover
/// (`None`: to the end of the key space).
pub fn page_from(map: &LwwMap, from: &str, budget: usize) -> (Vec<Record>, Option<String>) {
    page_range(map, from, None, budget)
}

/// Like [`page_from`] within `[from, to)`: the covered end never exceeds `to`.
pub fn page_range(
    map: &LwwMap,
    from: &str,
    to: Option<&str>,
    budget: usize,
) -> (Vec<Record>, Option<String>) {
    let mut out = Vec::new();
    let mut used = 4;
    for (k, e) in map.range(from, to) {
        let rec = e.to_record(k);
        let len = rec.encoded_len();
        if !out.is_empty() && used + len > budget {
            return (out, Some(k.clone()));
        }
        used += len;
        out.push(rec);
    }
    (out, to.map(str::to_owned))
}

/// What one side does with one resolved range of a full exchange.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The other side's records to merge (the usual LWW merge decides).
    pub accept: Vec<Record>,
    /// Own live entries to bury: tombstones at the entries' own timestamps.
    pub bury: Vec<Record>,
    /// The other side's records ignored as possibly deleted here (the other side buries them).
    pub ignored: usize,
}

/// The full-exchange rule for one range, from one side's point of view. `mine` are this side's
/// records in the range (as sent to the other side), `theirs` the other side's records in it,
/// both in key order. A key only one side holds, whose timestamp is at most the other side's
/// watermark plus `max_drift_ms`, is buried by the side holding it and ignored by the other:
/// it may have been deleted there, and the tombstone collected (tombstones are collected by
/// local time of application, and no timestamp is accepted more than the drift bound ahead of
/// local time, so every version a collected tombstone superseded is at most watermark + drift).
/// A watermark of 0 means nothing was ever collected. Every other record is merged as usual.
/// Both sides evaluate this on the same two lists and watermarks, so they decide the same.
pub fn resolve_full_range(
    mine: &[Record],
    theirs: &[Record],
    my_watermark: u64,
    their_watermark: u64,
    max_drift_ms: u64,
) -> Resolution {
    let their_keys: BTreeSet<&str> = theirs.iter().map(|r| r.key.as_str()).collect();
    let my_keys: BTreeSet<&str> = mine.iter().map(|r| r.key.as_str()).collect();
    let may_be_collected = |ts: &Timestamp, watermark: u64| {
        watermark > 0 && ts.physical <= watermark.saturating_add(max_drift_ms)
    };
    let mut res = Resolution::default();
    for r in mine {
        if r.value.is_some()
            && !their_keys.contains(r.key.as_str())
            && may_be_collected(&r.ts, their_watermark)
        {
            res.bury.push(Record {
                key: r.key.clone(),
                ts: r.ts,
                value: None,
            });
        }
    }
    for r in theirs {
        if !my_keys.contains(r.key.as_str()) && may_be_collected(&r.ts, my_watermark) {
            res.ignored += 1;
        } else {
            res.accept.push(r.clone());
        }
    }
    res
}

#[cfg(test)]
mod tests;
