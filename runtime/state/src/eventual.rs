//! The `eventual` consistency mode: one [`Replica`] per workload on every node hosting one of
//! its replicas, as a pure state machine. The node feeds [`Input`]s with an explicit `now`
//! (Unix milliseconds, the wall clock: timestamps are compared across nodes) to
//! [`Replica::handle`] and carries out the [`Output`]s **in order**; nothing here performs I/O,
//! reads a clock or draws random numbers.
//!
//! - Local writes (`PUT`/`DELETE /v1/kv/{key}`) get a hybrid logical clock timestamp
//!   ([`crate::hlc`]), are merged into the LWW map ([`crate::crdt`]) and come out as
//!   [`Output::Persist`] (durable before anything after it is carried out, the reply included),
//!   [`Output::Publish`] (a delta for the workload's gossip topic) and [`Output::Reply`].
//! - Deltas from the topic ([`Input::Delta`]) are merged; timestamps beyond the drift bound
//!   and records over the limits are refused and counted.
//! - Anti-entropy ([`crate::reconcile`]): every `anti_entropy_interval_ms`, and at once when a
//!   host appears in [`Input::Peers`], the replica reconciles with one peer (round robin), one
//!   session at a time; a pair of hosts that has not completed a reconciliation within the
//!   tombstone horizon does a full exchange instead, which keeps a long-partitioned replica
//!   from resurrecting deleted keys.
//! - Tombstones are collected `tombstone_horizon_ms` after they were applied locally.
//! - [`store::Store`] persists what [`Output::Persist`] carries under the workload's directory
//!   and gives it back to [`Replica::restore`] after a restart.
//!
//! Bounds: every message is below [`MESSAGE_LIMIT`]; one initiated session at a time; per peer
//! at most one answered session and [`ReplicaConfig::max_messages_per_peer_per_s`] messages a
//! second; at most [`MAX_PEERS`] peers; the map's own limits ([`Limits`]).

pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use thiserror::Error;

use crate::crdt::codec::{DecodeError, Reader, Writer};
use crate::crdt::{Entry, ItemId, KvError, Limits, LwwMap, Merged, Page, Record};
use crate::hlc::{DEFAULT_MAX_DRIFT_MS, Hlc, HlcError, Timestamp, node_tag};
use crate::reconcile::{
    MAX_WANT, MESSAGE_LIMIT, Message, NegInitiator, RECORD_BUDGET, ReconcileError, Snapshot,
    get_records, page_from, page_range, put_records, records_len, resolve_full_range,
};

/// The libp2p peer id of a node, as a string (base58).
pub type PeerId = String;
/// The node's handle on a pending API request, echoed in [`Output::Reply`].
pub type RequestId = u64;

/// Gossip topic of a workload's deltas.
pub fn delta_topic(namespace: &str, name: &str) -> String {
    format!("/beemesh/kv/{namespace}/{name}/1")
}

/// The request/response protocol carrying one workload's reconciliation [`Message`]s: each
/// message travels as a request whose response is empty (an acknowledgement the replica does
/// not need); the peer's answer comes back as a request of its own, handed to
/// [`Input::Reconcile`]. The workload is in the name, so the node routes by it.
pub fn reconcile_protocol(namespace: &str, name: &str) -> String {
    format!("/beemesh/kv-sync/{namespace}/{name}/1")
}

/// The workload a reconciliation protocol name (from [`reconcile_protocol`]) is for.
pub fn reconcile_workload(protocol: &str) -> Option<(&str, &str)> {
    let rest = protocol.strip_prefix("/beemesh/kv-sync/")?;
    let rest = rest.strip_suffix("/1")?;
    let (ns, name) = rest.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

/// The workload a delta topic (from [`delta_topic`]) is for.
pub fn delta_workload(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("/beemesh/kv/")?;
    let rest = rest.strip_suffix("/1")?;
    let (ns, name) = rest.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

/// Most peer hosts of one workload (the manifest's replica maximum).
pub const MAX_PEERS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    pub limits: Limits,
    /// Remote timestamps further ahead of local time are refused (default 500 ms).
    pub max_drift_ms: u64,
    /// Anti-entropy period: one session with one peer each period (default 30 s).
    pub anti_entropy_interval_ms: u64,
    /// A session without an answer for this long is abandoned (default 10 s).
    pub session_timeout_ms: u64,
    /// Tombstone collection runs this often (default 60 s) ...
    pub gc_interval_ms: u64,
    /// ... and collects at most this many tombstones per run (default 10,000).
    pub gc_batch: usize,
    /// Reconciliation messages accepted per peer per second; more are refused (default 50).
    pub max_messages_per_peer_per_s: u32,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            limits: Limits::default(),
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
            anti_entropy_interval_ms: 30_000,
            session_timeout_ms: 10_000,
            gc_interval_ms: 60_000,
            gc_batch: 10_000,
            max_messages_per_peer_per_s: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error(
        "tombstone horizon {horizon_ms} ms must exceed four times the drift bound {drift_ms} ms"
    )]
    HorizonTooShort { horizon_ms: u64, drift_ms: u64 },
    #[error("{field} must be positive")]
    Zero { field: &'static str },
    #[error(
        "a value of {value} bytes with a key of {key} bytes does not fit in one message ({budget} bytes)"
    )]
    RecordTooLarge {
        value: usize,
        key: usize,
        budget: usize,
    },
}

impl ReplicaConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.tombstone_horizon_ms <= 4 * self.max_drift_ms {
            return Err(ConfigError::HorizonTooShort {
                horizon_ms: l.tombstone_horizon_ms,
                drift_ms: self.max_drift_ms,
            });
        }
        for (field, v) in [
            ("anti_entropy_interval_ms", self.anti_entropy_interval_ms),
            ("session_timeout_ms", self.session_timeout_ms),
            ("gc_interval_ms", self.gc_interval_ms),
            ("gc_batch", self.gc_batch as u64),
            (
                "max_messages_per_peer_per_s",
                u64::from(self.max_messages_per_peer_per_s),
            ),
            ("limits.max_keys", l.max_keys as u64),
            ("limits.max_key_len", l.max_key_len as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        // One record must fit in a delta and in a reconciliation message.
        let worst = 2 + l.max_key_len + 20 + 1 + 4 + l.max_value_len + 64;
        if worst > RECORD_BUDGET || l.max_key_len > usize::from(u16::MAX) {
            return Err(ConfigError::RecordTooLarge {
                value: l.max_value_len,
                key: l.max_key_len,
                budget: RECORD_BUDGET,
            });
        }
        Ok(())
    }
}

/// What the node hands to the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// `PUT /v1/kv/{key}`.
    Put {
        req: RequestId,
        key: String,
        value: Vec<u8>,
    },
    /// `DELETE /v1/kv/{key}` (writes a tombstone whether or not the key is held here).
    Delete { req: RequestId, key: String },
    /// `GET /v1/kv/{key}` (also available without an input: [`Replica::get`]).
    Get { req: RequestId, key: String },
    /// `GET /v1/kv?prefix=P` (also [`Replica::list`]); `after` is the continuation token.
    List {
        req: RequestId,
        prefix: String,
        after: Option<String>,
        limit: usize,
    },
    /// A message from the workload's delta topic, with its sender.
    Delta { from: PeerId, bytes: Vec<u8> },
    /// A reconciliation message from a peer (request or answer).
    Reconcile { from: PeerId, bytes: Vec<u8> },
    /// The other nodes hosting a replica of this workload (this node excluded).
    Peers(BTreeSet<PeerId>),
    /// Nothing new: lets timers fire (call at [`Replica::next_deadline`], or every second).
    Tick,
}

/// The answer to a local request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A put or delete is applied (and persisted, if the node honoured [`Output::Persist`]).
    Written { ts: Timestamp, existed: bool },
    /// A get: the value and its timestamp, `None` when absent or deleted.
    Value(Option<(Vec<u8>, Timestamp)>),
    /// A list page.
    Page(Page),
}

/// Why something from a peer was refused (counted in [`Stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The sender does not host this workload in this node's view.
    NotPeer,
    /// The peer sends faster than [`ReplicaConfig::max_messages_per_peer_per_s`].
    RateLimited,
    /// Undecodable or protocol-violating message.
    Malformed(String),
    /// A record's timestamp is beyond the drift bound.
    Drift(HlcError),
    /// A record breaks the limits.
    Limit(KvError),
}

/// What the replica asks of the node. Carry them out in order: an [`Output::Persist`] must be
/// durable before any output after it is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write this to the workload's [`store::Store`] (one transaction, fsynced). Several
    /// batches may be committed together (group commit) as long as nothing that followed them
    /// is carried out before the commit returns.
    Persist(PersistBatch),
    /// Publish these bytes on the workload's delta topic ([`delta_topic`]).
    Publish(Vec<u8>),
    /// Send these bytes to `to` on [`reconcile_protocol`] (fire and forget: the peer's answer
    /// arrives as its own message, for [`Input::Reconcile`]; a lost message needs no report,
    /// sessions time out).
    Send { to: PeerId, bytes: Vec<u8> },
    /// Answer the local request `req`.
    Reply {
        req: RequestId,
        result: Result<Reply, KvError>,
    },
    /// Something from `from` was refused: log it (rate-limited); it is already counted.
    Refused { from: PeerId, reason: Refusal },
}

/// Replica-level state that survives restarts besides the entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// The clock's high-water mark.
    pub clock: Timestamp,
    /// Largest local time at which a tombstone was collected (0: never).
    pub watermark: u64,
    /// Per peer, the local time at which the last completed reconciliation with it started.
    pub synced: BTreeMap<PeerId, u64>,
}

/// One persistence step: entries to write, collected keys to remove, and the new [`Meta`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PersistBatch {
    pub upserts: Vec<(String, Entry)>,
    pub removes: Vec<String>,
    pub meta: Meta,
}

/// What a store gives back to [`Replica::restore`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restored {
    pub entries: Vec<(String, Entry)>,
    pub meta: Meta,
}

/// Counters and gauges for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub keys: usize,
    pub tombstones: usize,
    pub bytes: usize,
    pub deltas_sent: u64,
    pub deltas_received: u64,
    pub records_applied: u64,
    pub reconciliations: u64,
    pub full_exchanges: u64,
    pub reconcile_failures: u64,
    pub refused_timestamps: u64,
    pub refused_limits: u64,
    pub refused_messages: u64,
    pub buried: u64,
    pub collected: u64,
    pub bytes_sent: u64,
}

const DELTA_VERSION: u8 = 1;

/// Encode a delta (records for the gossip topic).
pub fn encode_delta(records: &[Record]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(DELTA_VERSION);
    put_records(&mut w, records);
    w.finish()
}

/// Decode a delta; bytes after the records are ignored (newer minor versions).
pub fn decode_delta(bytes: &[u8]) -> Result<Vec<Record>, ReconcileError> {
    if bytes.len() > MESSAGE_LIMIT {
        return Err(ReconcileError::TooLarge {
            len: bytes.len(),
            limit: MESSAGE_LIMIT,
        });
    }
    let mut r = Reader::new(bytes);
    let version = r.u8("delta version")?;
    if version != DELTA_VERSION {
        return Err(DecodeError::Version {
            what: "delta",
            version,
            supported: DELTA_VERSION,
        }
        .into());
    }
    Ok(get_records(&mut r)?)
}

#[derive(Debug)]
enum SessionKind {
    Delta {
        neg: NegInitiator,
        /// Negentropy finished.
        neg_done: bool,
        /// Keys whose records the peer lacks, to push.
        push: VecDeque<String>,
        /// Ids the peer holds and this side lacks, to ask for.
        need: VecDeque<ItemId>,
        /// Ids asked for in the message in flight.
        asked: Vec<ItemId>,
    },
    Full {
        from: String,
        sent: Vec<Record>,
        watermark: u64,
    },
}

#[derive(Debug)]
struct Session {
    id: u64,
    peer: PeerId,
    started_at: u64,
    deadline: u64,
    kind: SessionKind,
}

#[derive(Debug, Clone, Copy)]
struct Responding {
    session: u64,
    started_at: u64,
    last_at: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    window: u64,
    count: u32,
}

/// The replica of one workload's CRDT map on this node.
#[derive(Debug)]
pub struct Replica {
    me: PeerId,
    config: ReplicaConfig,
    hlc: Hlc,
    map: LwwMap,
    watermark: u64,
    synced: BTreeMap<PeerId, u64>,
    peers: BTreeSet<PeerId>,
    urgent: BTreeSet<PeerId>,
    last_peer: Option<PeerId>,
    snapshot: Option<Snapshot>,
    session: Option<Session>,
    responding: BTreeMap<PeerId, Responding>,
    rates: BTreeMap<PeerId, Rate>,
    session_counter: u64,
    next_anti_entropy: u64,
    next_gc: u64,
    last_now: u64,
    stats: Stats,
    // Per-handle buffers.
    batch: PersistBatch,
    dirty: bool,
    out: Vec<Output>,
}

impl Replica {
    /// A new, empty replica for the node `me`.
    pub fn new(me: PeerId, config: ReplicaConfig) -> Result<Replica, ConfigError> {
        Self::restore(me, config, Restored::default())
    }

    /// A replica from what its store held (see [`store::Store::load`]).
    pub fn restore(
        me: PeerId,
        config: ReplicaConfig,
        restored: Restored,
    ) -> Result<Replica, ConfigError> {
        config.validate()?;
        let mut map = LwwMap::new(config.limits.clone());
        for (k, e) in restored.entries {
            map.load(k, e);
        }
        let high_water = restored.meta.clock.max(map.max_timestamp());
        let hlc = Hlc::restore(node_tag(&me), high_water, config.max_drift_ms);
        let mut r = Replica {
            me,
            hlc,
            map,
            watermark: restored.meta.watermark,
            synced: restored.meta.synced,
            peers: BTreeSet::new(),
            urgent: BTreeSet::new(),
            last_peer: None,
            snapshot: None,
            session: None,
            responding: BTreeMap::new(),
            rates: BTreeMap::new(),
            session_counter: 0,
            next_anti_entropy: 0,
            next_gc: 0,
            last_now: 0,
            stats: Stats::default(),
            batch: PersistBatch::default(),
            dirty: false,
            out: Vec::new(),
            config,
        };
        r.refresh_gauges();
        Ok(r)
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    pub fn map(&self) -> &LwwMap {
        &self.map
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.refused_timestamps = self.hlc.refused();
        s
    }

    /// The clock's high-water mark (what [`Meta::clock`] persists).
    pub fn clock(&self) -> Timestamp {
        self.hlc.high_water()
    }

    pub fn meta(&self) -> Meta {
        Meta {
            clock: self.hlc.high_water(),
            watermark: self.watermark,
            synced: self.synced.clone(),
        }
    }

    pub fn peers(&self) -> &BTreeSet<PeerId> {
        &self.peers
    }

    /// Whether a session this replica started is running.
    pub fn in_session(&self) -> bool {
        self.session.is_some()
    }

    /// When the replica next needs a [`Input::Tick`].
    pub fn next_deadline(&self) -> u64 {
        let mut d = self.next_anti_entropy.min(self.next_gc);
        if let Some(s) = &self.session {
            d = d.min(s.deadline);
        }
        if !self.urgent.is_empty() && self.session.is_none() {
            d = self.last_now;
        }
        d
    }

    /// The live value of `key` with its timestamp.
    pub fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Timestamp)>, KvError> {
        self.map.check_key(key)?;
        Ok(self.map.get_value(key).map(|(v, t)| (v.to_vec(), t)))
    }

    /// A page of live keys under `prefix` after the continuation token `after`.
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, KvError> {
        self.map.list(prefix, after, limit)
    }

    /// Handle one input at wall-clock time `now` (Unix ms).
    pub fn handle(&mut self, input: Input, now: u64) -> Vec<Output> {
        if now < self.last_now {
            // The wall clock went back: keep timers from stalling for the jump.
            self.next_anti_entropy = self
                .next_anti_entropy
                .min(now + self.config.anti_entropy_interval_ms);
            self.next_gc = self.next_gc.min(now + self.config.gc_interval_ms);
            if let Some(s) = &mut self.session {
                s.deadline = s.deadline.min(now + self.config.session_timeout_ms);
            }
        }
        self.last_now = now;
        match input {
            Input::Put { req, key, value } => self.local_write(req, key, Some(value), now),
            Input::Delete { req, key } => self.local_write(req, key, None, now),
            Input::Get { req, key } => {
                let result = self.get(&key).map(Reply::Value);
                self.out.push(Output::Reply { req, result });
            }
            Input::List {
                req,
                prefix,
                after,
                limit,
            } => {
                let result = self.list(&prefix, after.as_deref(), limit).map(Reply::Page);
                self.out.push(Output::Reply { req, result });
            }
            Input::Delta { from, bytes } => self.on_delta(from, &bytes, now),
            Input::Reconcile { from, bytes } => self.on_reconcile(from, &bytes, now),
            Input::Peers(peers) => self.on_peers(peers, now),
            Input::Tick => {}
        }
        self.timers(now);
        self.finish()
    }

    fn finish(&mut self) -> Vec<Output> {
        let mut out = Vec::with_capacity(self.out.len() + 1);
        if self.dirty {
            let mut batch = std::mem::take(&mut self.batch);
            batch.meta = self.meta();
            out.push(Output::Persist(batch));
            self.dirty = false;
        }
        out.append(&mut self.out);
        self.refresh_gauges();
        out
    }

    fn refresh_gauges(&mut self) {
        self.stats.keys = self.map.live_keys();
        self.stats.tombstones = self.map.tombstones();
        self.stats.bytes = self.map.total_bytes();
    }

    fn persist_key(&mut self, key: &str) {
        if let Some(e) = self.map.get(key) {
            self.batch.upserts.push((key.to_owned(), e.clone()));
        }
        self.dirty = true;
    }

    fn local_write(&mut self, req: RequestId, key: String, value: Option<Vec<u8>>, now: u64) {
        if let Err(e) = self.map.check_write(&key, value.as_deref()) {
            self.out.push(Output::Reply {
                req,
                result: Err(e),
            });
            return;
        }
        let existed = self.map.get_value(&key).is_some();
        let ts = self.hlc.issue(now);
        let rec = Record { key, ts, value };
        let delta = encode_delta(std::slice::from_ref(&rec));
        let key = rec.key.clone();
        match self.map.merge(rec, now) {
            Ok(_) => {
                self.persist_key(&key);
                self.stats.deltas_sent += 1;
                self.stats.bytes_sent += delta.len() as u64;
                self.out.push(Output::Publish(delta));
                self.out.push(Output::Reply {
                    req,
                    result: Ok(Reply::Written { ts, existed }),
                });
            }
            Err(e) => self.out.push(Output::Reply {
                req,
                result: Err(e),
            }),
        }
    }

    fn refuse(&mut self, from: &str, reason: Refusal) {
        match &reason {
            Refusal::Drift(_) => {} // counted by the clock
            Refusal::Limit(_) => self.stats.refused_limits += 1,
            Refusal::NotPeer | Refusal::RateLimited | Refusal::Malformed(_) => {
                self.stats.refused_messages += 1
            }
        }
        self.out.push(Output::Refused {
            from: from.to_owned(),
            reason,
        });
    }

    /// Merge a record from a peer (drift bound, limits). True when the map changed.
    fn apply_remote(&mut self, from: &str, rec: Record, now: u64) -> bool {
        if let Err(e) = self.hlc.observe(rec.ts, now) {
            self.refuse(from, Refusal::Drift(e));
            return false;
        }
        let key = rec.key.clone();
        match self.map.merge(rec, now) {
            Ok(Merged::Unchanged) => false,
            Ok(_) => {
                self.stats.records_applied += 1;
                self.persist_key(&key);
                true
            }
            Err(e) => {
                self.refuse(from, Refusal::Limit(e));
                false
            }
        }
    }

    fn on_delta(&mut self, from: PeerId, bytes: &[u8], now: u64) {
        if !self.peers.contains(&from) {
            self.refuse(&from, Refusal::NotPeer);
            return;
        }
        let records = match decode_delta(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.refuse(&from, Refusal::Malformed(e.to_string()));
                return;
            }
        };
        self.stats.deltas_received += 1;
        for rec in records {
            self.apply_remote(&from, rec, now);
        }
    }

    fn on_peers(&mut self, peers: BTreeSet<PeerId>, now: u64) {
        let mut peers = peers;
        peers.remove(&self.me);
        while peers.len() > MAX_PEERS {
            peers.pop_last();
        }
        for p in peers.difference(&self.peers) {
            self.urgent.insert(p.clone());
        }
        self.urgent.retain(|p| peers.contains(p));
        self.responding.retain(|p, _| peers.contains(p));
        self.rates.retain(|p, _| peers.contains(p));
        if let Some(s) = &self.session
            && !peers.contains(&s.peer)
        {
            self.session = None;
        }
        self.peers = peers;
        let _ = now;
    }

    fn timers(&mut self, now: u64) {
        if let Some(s) = &self.session
            && now >= s.deadline
        {
            self.session = None;
            self.stats.reconcile_failures += 1;
        }
        let stale_resp = 2 * self.config.session_timeout_ms;
        self.responding
            .retain(|_, r| now.saturating_sub(r.last_at) < stale_resp);
        if now >= self.next_gc {
            self.next_gc = now + self.config.gc_interval_ms;
            self.collect(now);
        }
        if self.session.is_none() && !self.peers.is_empty() {
            let peer = if let Some(p) = self.urgent.pop_first() {
                Some(p)
            } else if now >= self.next_anti_entropy {
                self.next_anti_entropy = now + self.config.anti_entropy_interval_ms;
                self.next_round_robin()
            } else {
                None
            };
            if let Some(peer) = peer {
                self.start_session(peer, now);
            }
        }
        if self.peers.is_empty() {
            self.next_anti_entropy = now + self.config.anti_entropy_interval_ms;
        }
    }

    fn next_round_robin(&mut self) -> Option<PeerId> {
        use std::ops::Bound::{Excluded, Unbounded};
        let next = match &self.last_peer {
            Some(last) => self
                .peers
                .range::<PeerId, _>((Excluded(last), Unbounded))
                .next()
                .or_else(|| self.peers.iter().next()),
            None => self.peers.iter().next(),
        }
        .cloned();
        self.last_peer = next.clone();
        next
    }

    fn collect(&mut self, now: u64) {
        let cutoff = now.saturating_sub(self.config.limits.tombstone_horizon_ms);
        if cutoff == 0 {
            return;
        }
        let (keys, newest) = self.map.collect_tombstones(cutoff, self.config.gc_batch);
        if keys.is_empty() {
            return;
        }
        self.stats.collected += keys.len() as u64;
        if let Some(n) = newest {
            self.watermark = self.watermark.max(n);
        }
        self.batch.removes.extend(keys);
        self.dirty = true;
        // Forget syncs too old to matter, so the table is bounded by the peers of one horizon.
        let horizon = self.config.limits.tombstone_horizon_ms;
        self.synced.retain(|_, t| now.saturating_sub(*t) <= horizon);
    }

    /// Whether the pair (this node, `peer`) must do a full exchange rather than a delta
    /// reconciliation: it has not completed a reconciliation within the horizon (less twice
    /// the drift, for the two clocks), and one side collected tombstones that were applied
    /// after (or not long before) that reconciliation started, so it may lack keys whose
    /// deletion the other side never saw. A pair that synced within the horizon is safe: a
    /// tombstone collected since was applied more than a horizon ago, before that sync, which
    /// carried it. `their_wm` is the peer's watermark when known (0 otherwise; the peer then
    /// checks with its own).
    fn needs_full(&self, peer: &str, now: u64, their_wm: u64) -> bool {
        let margin = 2 * self.config.max_drift_ms;
        let window = self
            .config
            .limits
            .tombstone_horizon_ms
            .saturating_sub(margin);
        let since = self.synced.get(peer).copied().unwrap_or(0);
        let stale = now.saturating_sub(since) > window;
        let collected = self.watermark.max(their_wm);
        stale && collected > 0 && collected.saturating_add(margin) >= since
    }

    fn snapshot(&mut self) -> Result<Snapshot, ReconcileError> {
        if let Some(s) = &self.snapshot
            && s.version() == self.map.version()
        {
            return Ok(s.clone());
        }
        let s = Snapshot::build(&self.map)?;
        self.snapshot = Some(s.clone());
        Ok(s)
    }

    fn send(&mut self, to: &str, msg: &Message) {
        let bytes = msg.encode();
        debug_assert!(bytes.len() <= MESSAGE_LIMIT, "{} bytes", bytes.len());
        self.stats.bytes_sent += bytes.len() as u64;
        self.out.push(Output::Send {
            to: to.to_owned(),
            bytes,
        });
    }

    fn new_session_id(&mut self, now: u64) -> u64 {
        self.session_counter = self.session_counter.wrapping_add(1);
        (now << 16) | (self.session_counter & 0xffff)
    }

    fn start_session(&mut self, peer: PeerId, now: u64) {
        let id = self.new_session_id(now);
        if self.needs_full(&peer, now, 0) {
            self.start_full(id, peer, now);
            return;
        }
        let snapshot = match self.snapshot() {
            Ok(s) => s,
            Err(_) => {
                self.stats.reconcile_failures += 1;
                return;
            }
        };
        let (neg, first) = match NegInitiator::start(&snapshot) {
            Ok(x) => x,
            Err(_) => {
                self.stats.reconcile_failures += 1;
                return;
            }
        };
        self.session = Some(Session {
            id,
            peer: peer.clone(),
            started_at: now,
            deadline: now + self.config.session_timeout_ms,
            kind: SessionKind::Delta {
                neg,
                neg_done: false,
                push: VecDeque::new(),
                need: VecDeque::new(),
                asked: Vec::new(),
            },
        });
        self.send(
            &peer,
            &Message::Query {
                session: id,
                watermark: self.watermark,
                neg: Some(first),
                push: Vec::new(),
                want: Vec::new(),
            },
        );
    }

    fn start_full(&mut self, id: u64, peer: PeerId, now: u64) {
        let (records, to) = page_from(&self.map, "", RECORD_BUDGET);
        let watermark = self.watermark;
        self.session = Some(Session {
            id,
            peer: peer.clone(),
            started_at: now,
            deadline: now + self.config.session_timeout_ms,
            kind: SessionKind::Full {
                from: String::new(),
                sent: records.clone(),
                watermark,
            },
        });
        self.send(
            &peer,
            &Message::FullPage {
                session: id,
                from: String::new(),
                to,
                watermark,
                records,
            },
        );
    }

    fn rate_ok(&mut self, from: &str, now: u64) -> bool {
        let limit = self.config.max_messages_per_peer_per_s;
        let rate = self.rates.entry(from.to_owned()).or_default();
        let window = now / 1000;
        if rate.window != window {
            *rate = Rate { window, count: 0 };
        }
        rate.count += 1;
        rate.count <= limit
    }

    fn on_reconcile(&mut self, from: PeerId, bytes: &[u8], now: u64) {
        if !self.peers.contains(&from) {
            self.refuse(&from, Refusal::NotPeer);
            return;
        }
        if !self.rate_ok(&from, now) {
            self.refuse(&from, Refusal::RateLimited);
            return;
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.refuse(&from, Refusal::Malformed(e.to_string()));
                return;
            }
        };
        match msg {
            Message::Query {
                session,
                watermark,
                neg,
                push,
                want,
            } => self.answer_query(from, session, watermark, neg, push, want, now),
            Message::Done { session } => {
                if let Some(r) = self.responding.get(&from).copied()
                    && r.session == session
                {
                    self.responding.remove(&from);
                    self.synced_with(&from, r.started_at);
                    self.stats.reconciliations += 1;
                }
            }
            Message::FullPage {
                session,
                from: start,
                to,
                watermark,
                records,
            } => self.answer_full(from, session, start, to, watermark, records, now),
            Message::Answer {
                session,
                neg,
                served,
                records,
            } => self.on_answer(from, session, neg, served, records, now),
            Message::NeedFull { session } => {
                if self.is_my_session(&from, session) {
                    let id = self.new_session_id(now);
                    self.session = None;
                    self.start_full(id, from, now);
                }
            }
            Message::FullAnswer {
                session,
                from: start,
                to,
                watermark,
                records,
            } => self.on_full_answer(from, session, start, to, watermark, records, now),
        }
    }

    fn is_my_session(&self, from: &str, session: u64) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.id == session && s.peer == from)
    }

    fn synced_with(&mut self, peer: &str, started_at: u64) {
        let t = self.synced.entry(peer.to_owned()).or_insert(0);
        *t = (*t).max(started_at);
        if self.synced.len() > MAX_PEERS {
            // Forget the oldest sync: that pair will do a full exchange next time.
            if let Some(oldest) = self
                .synced
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(p, _)| p.clone())
            {
                self.synced.remove(&oldest);
            }
        }
        self.dirty = true;
    }

    fn track_responding(&mut self, from: &str, session: u64, now: u64) {
        let r = self
            .responding
            .entry(from.to_owned())
            .or_insert(Responding {
                session,
                started_at: now,
                last_at: now,
            });
        if r.session != session {
            *r = Responding {
                session,
                started_at: now,
                last_at: now,
            };
        }
        r.last_at = now;
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_query(
        &mut self,
        from: PeerId,
        session: u64,
        their_wm: u64,
        neg: Option<Vec<u8>>,
        push: Vec<Record>,
        want: Vec<ItemId>,
        now: u64,
    ) {
        if self.needs_full(&from, now, their_wm) {
            self.send(&from, &Message::NeedFull { session });
            return;
        }
        if want.len() > MAX_WANT {
            self.refuse(
                &from,
                Refusal::Malformed(format!("{} ids wanted, limit {MAX_WANT}", want.len())),
            );
            return;
        }
        self.track_responding(&from, session, now);
        for rec in push {
            self.apply_remote(&from, rec, now);
        }
        let answer = match neg {
            Some(q) => {
                let reply = self
                    .snapshot()
                    .and_then(|s| crate::reconcile::respond(&s, &q));
                match reply {
                    Ok(a) => Some(a),
                    Err(e) => {
                        self.refuse(&from, Refusal::Malformed(e.to_string()));
                        return;
                    }
                }
            }
            None => None,
        };
        let budget = MESSAGE_LIMIT - 64 - answer.as_ref().map_or(0, Vec::len);
        let (records, served) = self.records_for(&want, budget);
        self.send(
            &from,
            &Message::Answer {
                session,
                neg: answer,
                served,
                records,
            },
        );
    }

    /// The records whose ids are in `want`, in order, within `budget` bytes: how many ids were
    /// handled (found or gone) and the records.
    fn records_for(&self, want: &[ItemId], budget: usize) -> (Vec<Record>, u32) {
        if want.is_empty() {
            return (Vec::new(), 0);
        }
        let set: BTreeSet<&ItemId> = want.iter().collect();
        let found: BTreeMap<&ItemId, (&String, &Entry)> = self
            .map
            .iter()
            .filter(|(_, e)| set.contains(&e.id))
            .map(|(k, e)| (&e.id, (k, e)))
            .collect();
        let mut used = 4;
        let mut out = Vec::new();
        let mut served = 0u32;
        for id in want {
            if let Some((k, e)) = found.get(id) {
                let rec = e.to_record(k);
                if used + rec.encoded_len() > budget {
                    break;
                }
                used += rec.encoded_len();
                out.push(rec);
            }
            served += 1;
        }
        (out, served)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_answer(
        &mut self,
        from: PeerId,
        session: u64,
        neg: Option<Vec<u8>>,
        served: u32,
        records: Vec<Record>,
        now: u64,
    ) {
        if !self.is_my_session(&from, session) {
            return; // late answer of an abandoned session
        }
        for rec in records {
            self.apply_remote(&from, rec, now);
        }
        let Some(mut s) = self.session.take() else {
            return;
        };
        let SessionKind::Delta {
            neg: ref mut initiator,
            ref mut neg_done,
            ref mut push,
            ref mut need,
            ref mut asked,
        } = s.kind
        else {
            self.refuse(
                &from,
                Refusal::Malformed("delta answer in a full exchange".into()),
            );
            self.stats.reconcile_failures += 1;
            return;
        };
        // Wanted ids the peer did not get to go back to the front of the queue.
        let served = (served as usize).min(asked.len());
        for id in asked.drain(..).skip(served).rev() {
            need.push_front(id);
        }
        let mut next_frame = None;
        if !*neg_done {
            let Some(answer) = neg else {
                self.refuse(&from, Refusal::Malformed("answer without a frame".into()));
                self.stats.reconcile_failures += 1;
                return;
            };
            match initiator.step(&answer) {
                Ok(step) => {
                    if !step.have.is_empty() {
                        let have: BTreeSet<ItemId> = step.have.into_iter().collect();
                        push.extend(
                            self.map
                                .iter()
                                .filter(|(_, e)| have.contains(&e.id))
                                .map(|(k, _)| k.clone()),
                        );
                    }
                    need.extend(step.need);
                    // The peer cannot hold more than the key limit: a longer list is a lie.
                    if need.len() + push.len() > 2 * self.config.limits.max_keys {
                        self.refuse(
                            &from,
                            Refusal::Malformed(format!(
                                "{} differing items claimed, more than two maps can hold",
                                need.len() + push.len()
                            )),
                        );
                        self.stats.reconcile_failures += 1;
                        return;
                    }
                    match step.next {
                        Some(f) => next_frame = Some(f),
                        None => *neg_done = true,
                    }
                }
                Err(e) => {
                    self.refuse(&from, Refusal::Malformed(e.to_string()));
                    self.stats.reconcile_failures += 1;
                    return;
                }
            }
        }
        // Next query: the frame, records to push, ids to ask for.
        let mut budget = RECORD_BUDGET;
        let mut out_records = Vec::new();
        while let Some(k) = push.front() {
            // A key gone since (collected) is skipped.
            if let Some(e) = self.map.get(k) {
                let rec = e.to_record(k);
                let len = rec.encoded_len();
                if !out_records.is_empty() && len > budget {
                    break;
                }
                budget = budget.saturating_sub(len);
                out_records.push(rec);
            }
            push.pop_front();
        }
        let n = need.len().min(MAX_WANT);
        *asked = need.drain(..n).collect();
        if *neg_done && out_records.is_empty() && asked.is_empty() {
            self.send(&from, &Message::Done { session });
            self.synced_with(&from, s.started_at);
            self.stats.reconciliations += 1;
            return;
        }
        let query = Message::Query {
            session,
            watermark: self.watermark,
            neg: next_frame,
            push: out_records,
            want: asked.clone(),
        };
        s.deadline = now + self.config.session_timeout_ms;
        self.session = Some(s);
        self.send(&from, &query);
    }

    /// Apply one resolved range of a full exchange.
    fn apply_resolution(
        &mut self,
        from: &str,
        mine: &[Record],
        theirs: Vec<Record>,
        my_wm: u64,
        their_wm: u64,
        now: u64,
    ) {
        let res = resolve_full_range(mine, &theirs, my_wm, their_wm, self.config.max_drift_ms);
        for rec in res.accept {
            self.apply_remote(from, rec, now);
        }
        for tomb in res.bury {
            let key = tomb.key.clone();
            if let Ok(Merged::Replaced | Merged::Inserted) = self.map.merge(tomb, now) {
                self.stats.buried += 1;
                self.persist_key(&key);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_full(
        &mut self,
        from: PeerId,
        session: u64,
        start: String,
        to: Option<String>,
        their_wm: u64,
        theirs: Vec<Record>,
        now: u64,
    ) {
        if theirs
            .iter()
            .any(|r| r.key < start || to.as_ref().is_some_and(|t| &r.key >= t))
            || theirs.windows(2).any(|w| w[0].key >= w[1].key)
        {
            self.refuse(
                &from,
                Refusal::Malformed("full page out of its range or order".into()),
            );
            return;
        }
        self.track_responding(&from, session, now);
        let (mine, covered) = page_range(&self.map, &start, to.as_deref(), RECORD_BUDGET);
        let theirs: Vec<Record> = theirs
            .into_iter()
            .filter(|r| covered.as_ref().is_none_or(|c| &r.key < c))
            .collect();
        let my_wm = self.watermark;
        self.apply_resolution(&from, &mine, theirs, my_wm, their_wm, now);
        let done = covered.is_none();
        self.send(
            &from,
            &Message::FullAnswer {
                session,
                from: start,
                to: covered,
                watermark: my_wm,
                records: mine,
            },
        );
        if done && let Some(r) = self.responding.remove(&from) {
            self.synced_with(&from, r.started_at);
            self.stats.full_exchanges += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_full_answer(
        &mut self,
        from: PeerId,
        session: u64,
        start: String,
        to: Option<String>,
        their_wm: u64,
        theirs: Vec<Record>,
        now: u64,
    ) {
        if !self.is_my_session(&from, session) {
            return;
        }
        let Some(mut s) = self.session.take() else {
            return;
        };
        let SessionKind::Full {
            from: ref sent_from,
            ref sent,
            watermark: my_wm,
        } = s.kind
        else {
            self.refuse(
                &from,
                Refusal::Malformed("full answer in a delta session".into()),
            );
            self.stats.reconcile_failures += 1;
            return;
        };
        if &start != sent_from
            || theirs
                .iter()
                .any(|r| r.key < start || to.as_ref().is_some_and(|t| &r.key >= t))
            || theirs.windows(2).any(|w| w[0].key >= w[1].key)
        {
            self.refuse(
                &from,
                Refusal::Malformed("full answer out of its range".into()),
            );
            self.stats.reconcile_failures += 1;
            return;
        }
        let mine: Vec<Record> = sent
            .iter()
            .filter(|r| to.as_ref().is_none_or(|t| &r.key < t))
            .cloned()
            .collect();
        self.apply_resolution(&from, &mine, theirs, my_wm, their_wm, now);
        match to {
            None => {
                self.synced_with(&from, s.started_at);
                self.stats.full_exchanges += 1;
                self.stats.reconciliations += 1;
            }
            Some(next) => {
                let (records, page_to) = page_from(&self.map, &next, RECORD_BUDGET);
                let watermark = self.watermark;
                let msg = Message::FullPage {
                    session,
                    from: next.clone(),
                    to: page_to,
                    watermark,
                    records: records.clone(),
                };
                s.kind = SessionKind::Full {
                    from: next,
                    sent: records,
                    watermark,
                };
                s.deadline = now + self.config.session_timeout_ms;
                self.session = Some(s);
                self.send(&from, &msg);
            }
        }
    }
}

/// Encoded size of a delta holding `records` (for callers batching several writes).
pub fn delta_len(records: &[Record]) -> usize {
    1 + records_len(records)
}
