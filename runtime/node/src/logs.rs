//! Replica logs through any node's API, from whichever node runs the replica.
//!
//! `GET /v1/workloads/{namespace}/{name}/logs?replica=N&tail=N&follow=true&format=json|text`
//! answers with a streamed (chunked) body, one record per line: with `format=json` (the
//! default) `{"container","source","line"}` objects, plus `{"note": ..}` and, when a stream
//! breaks off, a last `{"error": ..}`; with `format=text`, `container | line`.
//!
//! Which replica: `replica=N`, else the lowest index that is running, else the lowest placed
//! one (a failed replica's last output is what an operator wants to see). Its holder comes from
//! the placements ([`placement::statuses`]).
//! - The holder is this node: the lines come straight from the container driver
//!   ([`ContainerDriver::logs`]).
//! - Another node: relayed over the request/response protocol [`LOGS_PROTOCOL`]. Without
//!   `follow`, one request: the last `tail` lines, cut to [`ANSWER_BUDGET`] bytes (the oldest
//!   go first, and the answer says how many). With `follow`, the holder runs one *tap* per
//!   followed replica: a task that follows the driver's stream into a bounded ring of numbered
//!   lines. The relay polls with a cursor (tap id, next line number); the holder answers the
//!   lines after it, at most [`ANSWER_BUDGET`] bytes, and holds an answer with nothing new for
//!   up to [`FOLLOW_WAIT`] (a long poll). A tap is shared by every follower of the replica and
//!   stops when nobody asked for [`TAP_IDLE`]: the holder keeps nothing per client, so a
//!   follower that vanishes leaks nothing.
//!
//! Any admitted peer may read any replica's logs: the mesh is one trust domain.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use beemesh_driver::{ContainerDriver, DriverError, LogLine, LogOptions, LogSource, ReplicaId};
use beemesh_mesh::{MeshError, MeshHandle, PeerId};
use beemesh_scheduler::{PlacementView, ReplicaState, WorkloadId};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::node::Shared;
use crate::placement;

/// Request/response protocol: [`LogsRequest`] → [`LogsAnswer`] (JSON).
pub const LOGS_PROTOCOL: &str = "/beemesh/logs/1";
/// Most lines asked for (per container); also the default.
pub const MAX_TAIL: usize = 10_000;
/// Most bytes of encoded lines in one answer over the mesh (the mesh's limit is 1 MiB).
pub const ANSWER_BUDGET: usize = 512 * 1024;
/// Longer lines are cut to this many bytes (and marked with `…`).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// How long the holder holds a follow answer with nothing new.
pub const FOLLOW_WAIT: Duration = Duration::from_secs(10);
/// A tap nobody asked for this long stops.
pub const TAP_IDLE: Duration = Duration::from_secs(30);
/// Most followed replicas on one holder at a time.
pub const MAX_TAPS: usize = 64;
/// What a tap's ring keeps, in lines and in bytes.
const RING_LINES: usize = MAX_TAIL;
const RING_BYTES: usize = 2 * 1024 * 1024;
/// How long a relay waits for the holder's answer (below the mesh's 30 s request timeout).
const RELAY_TIMEOUT: Duration = Duration::from_secs(25);
/// How long reading a replica's past lines may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why logs cannot be served; each names the workload, replica and node concerned.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no workload {0}")]
    UnknownWorkload(String),
    #[error("workload {workload} was deleted (generation {generation})")]
    Deleted { workload: String, generation: u64 },
    #[error("{workload} has {replicas} replica(s){numbered}: there is no replica {index}")]
    NoSuchReplica {
        workload: String,
        replicas: u32,
        numbered: String,
        index: u32,
    },
    #[error("{}{why}", not_placed(.workload, .index))]
    NotPlaced {
        workload: String,
        index: Option<u32>,
        why: String,
    },
    #[error("replica {index} of {workload} is placed on this node ({node}) but not started yet")]
    NotStarted {
        workload: String,
        index: u32,
        node: String,
    },
    #[error("replica {replica} is not on this node ({node})")]
    NotHere { replica: String, node: String },
    #[error("node {node} holding replica {index} of {workload} is unreachable: {reason}")]
    Unreachable {
        node: String,
        workload: String,
        index: u32,
        reason: String,
    },
    #[error("node {node} holding replica {index} of {workload} cannot serve its logs: {reason}")]
    Holder {
        node: String,
        workload: String,
        index: u32,
        reason: String,
    },
    #[error("too many followed log streams on this node (at most {MAX_TAPS})")]
    Busy,
    #[error("reading the logs of {replica}: {source}")]
    Driver {
        replica: String,
        #[source]
        source: DriverError,
    },
}

fn not_placed(workload: &str, index: &Option<u32>) -> String {
    match index {
        Some(i) => format!("replica {i} of {workload} is not placed yet"),
        None => format!("no replica of {workload} is placed yet"),
    }
}

impl LogsError {
    pub fn status(&self) -> StatusCode {
        match self {
            LogsError::BadRequest(_) => StatusCode::BAD_REQUEST,
            LogsError::UnknownWorkload(_)
            | LogsError::Deleted { .. }
            | LogsError::NoSuchReplica { .. } => StatusCode::NOT_FOUND,
            LogsError::NotPlaced { .. }
            | LogsError::NotStarted { .. }
            | LogsError::NotHere { .. }
            | LogsError::Holder { .. }
            | LogsError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            LogsError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            LogsError::Driver { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One log line as the API and the mesh carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub container: String,
    /// `stdout`, `stderr` or `output` (both, in order).
    #[serde(default)]
    pub source: String,
    pub line: String,
}

impl Line {
    fn from_driver(l: LogLine) -> Self {
        let source = match l.source {
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
            LogSource::Output => "output",
        };
        Line {
            container: cut(l.container, 253),
            source: source.to_owned(),
            line: cut(l.line, MAX_LINE_BYTES),
        }
    }

    /// Its size in an answer (JSON-encoded, escapes included).
    fn size(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX / 4, |v| v.len() + 1)
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary, marking the cut.
fn cut(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// Where a follower continues: the holder's tap and the number of the next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub tap: u64,
    pub seq: u64,
}

/// A request of [`LOGS_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub index: u32,
    /// Past lines per container (at most [`MAX_TAIL`], the default); for the first request.
    #[serde(default)]
    pub tail: Option<usize>,
    #[serde(default)]
    pub follow: bool,
    /// Absent on the first request of a follow.
    #[serde(default)]
    pub cursor: Option<Cursor>,
    /// How long the holder may hold an answer with nothing new (capped at [`FOLLOW_WAIT`]).
    #[serde(default)]
    pub wait_ms: u64,
}

/// The answer of [`LOGS_PROTOCOL`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsAnswer {
    #[serde(default)]
    pub lines: Vec<Line>,
    /// Where to continue (follow only).
    #[serde(default)]
    pub cursor: Option<Cursor>,
    /// Lines left out before these: older than the ring, or beyond the answer's budget.
    #[serde(default)]
    pub skipped: u64,
    /// More lines are ready: ask again at once.
    #[serde(default)]
    pub more: bool,
    /// Nothing more will come (the replica's stream ended, or no follow).
    #[serde(default)]
    pub end: bool,
    #[serde(default)]
    pub note: Option<String>,
}

/// The bounded, numbered lines of one tap.
#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<(u64, Line, usize)>,
    bytes: usize,
    next: u64,
    ended: bool,
    error: Option<String>,
}

impl Ring {
    fn push(&mut self, line: Line) {
        let size = line.size();
        self.lines.push_back((self.next, line, size));
        self.next += 1;
        self.bytes = self.bytes.saturating_add(size);
        while self.lines.len() > RING_LINES || (self.bytes > RING_BYTES && self.lines.len() > 1) {
            if let Some((_, _, s)) = self.lines.pop_front() {
                self.bytes -= s;
            }
        }
    }

    fn first(&self) -> u64 {
        self.lines.front().map_or(self.next, |l| l.0)
    }

    /// The last `tail` lines of each container within `budget` bytes, and how many of those
    /// did not fit.
    fn last(&self, tail: usize, budget: usize) -> (Vec<Line>, u64) {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        let mut picked = Vec::new();
        let mut used = 0usize;
        let mut left_out = 0u64;
        for (_, line, size) in self.lines.iter().rev() {
            let n = per.entry(line.container.as_str()).or_default();
            if *n >= tail {
                continue;
            }
            *n += 1;
            if left_out > 0 || used + size > budget {
                left_out += 1;
                continue;
            }
            used += size;
            picked.push(line.clone());
        }
        picked.reverse();
        (picked, left_out)
    }

    /// The lines from number `seq` on within `budget` bytes: (lines, skipped because they
    /// left the ring, the number after the last one returned, more remain).
    fn after(&self, seq: u64, budget: usize) -> (Vec<Line>, u64, u64, bool) {
        let first = self.first();
        let skipped = first.saturating_sub(seq);
        let start = seq.max(first);
        let offset = usize::try_from(start - first).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut next = start;
        for (n, line, size) in self.lines.iter().skip(offset) {
            if used + size > budget && !out.is_empty() {
                return (out, skipped, next, true);
            }
            used += size;
            out.push(line.clone());
            next = n + 1;
        }
        (out, skipped, next.max(start), false)
    }
}

struct Tap {
    id: u64,
    ring: Mutex<Ring>,
    notify: Notify,
    touched: Mutex<Instant>,
}

impl Tap {
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn touch(&self) {
        *self.touched.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
    fn idle(&self) -> Duration {
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// The node's log taps (one per followed replica held here) and its shutdown signal, which
/// ends every log stream it serves.
#[derive(Clone)]
pub struct Logs {
    taps: Arc<Mutex<HashMap<ReplicaId, Arc<Tap>>>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logs").finish_non_exhaustive()
    }
}

impl Logs {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            taps: Arc::default(),
            shutdown,
        }
    }

    fn taps(&self) -> MutexGuard<'_, HashMap<ReplicaId, Arc<Tap>>> {
        self.taps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn existing(&self, id: &ReplicaId) -> Option<Arc<Tap>> {
        self.taps().get(id).cloned()
    }

    /// The replica's live tap, started (with `tail` past lines) when there is none or the
    /// last one ended.
    async fn tap(
        &self,
        driver: &Arc<dyn ContainerDriver>,
        id: &ReplicaId,
        tail: usize,
        node: &str,
    ) -> Result<Arc<Tap>, LogsError> {
        if let Some(t) = self.existing(id).filter(|t| !t.ring().ended) {
            return Ok(t);
        }
        if self.taps().len() >= MAX_TAPS && self.existing(id).is_none() {
            return Err(LogsError::Busy);
        }
        let stream = driver
            .logs(
                id,
                LogOptions {
                    tail: Some(tail),
                    follow: true,
                },
            )
            .await
            .map_err(|e| driver_error(id, node, e))?;
        let tap = {
            let mut taps = self.taps();
            if let Some(t) = taps.get(id).filter(|t| !t.ring().ended) {
                // Another request started one meanwhile; ours is dropped.
                return Ok(t.clone());
            }
            let tap = Arc::new(Tap {
                id: rand::random(),
                ring: Mutex::default(),
                notify: Notify::new(),
                touched: Mutex::new(Instant::now()),
            });
            taps.insert(id.clone(), tap.clone());
            tap
        };
        tokio::spawn(run_tap(self.clone(), id.clone(), tap.clone(), stream));
        Ok(tap)
    }
}

/// Feeds the driver's stream into the tap until nobody asked for [`TAP_IDLE`] (or shutdown).
async fn run_tap(logs: Logs, id: ReplicaId, tap: Arc<Tap>, mut stream: beemesh_driver::LogStream) {
    let mut check = tokio::time::interval(TAP_IDLE / 6);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    loop {
        tokio::select! {
            _ = logs.shutdown.cancelled() => break,
            item = stream.next(), if open => {
                let mut ring = tap.ring();
                match item {
                    Some(Ok(line)) => ring.push(Line::from_driver(line)),
                    Some(Err(e)) => {
                        ring.ended = true;
                        ring.error = Some(e.to_string());
                        open = false;
                    }
                    None => {
                        ring.ended = true;
                        open = false;
                    }
                }
                drop(ring);
                tap.notify.notify_waiters();
            }
            _ = check.tick() => {
                if tap.idle() > TAP_IDLE {
                    break;
                }
            }
        }
    }
    drop(stream);
    tap.ring().ended = true;
    tap.notify.notify_waiters();
    let mut taps = logs.taps();
    if taps.get(&id).is_some_and(|t| t.id == tap.id) {
        taps.remove(&id);
    }
}

fn driver_error(id: &ReplicaId, node: &str, e: DriverError) -> LogsError {
    match e {
        DriverError::NotFound(_) => LogsError::NotHere {
            replica: id.to_string(),
            node: node.to_owned(),
        },
        source => LogsError::Driver {
            replica: id.to_string(),
            source,
        },
    }
}

/// Reads the last `tail` lines of each container, keeping the newest within `budget` bytes.
async fn read_past(
    driver: &Arc<dyn ContainerDriver>,
    id: &ReplicaId,
    tail: usize,
    budget: usize,
    node: &str,
) -> Result<LogsAnswer, LogsError> {
    let mut stream = driver
        .logs(
            id,
            LogOptions {
                tail: Some(tail),
                follow: false,
            },
        )
        .await
        .map_err(|e| driver_error(id, node, e))?;
    let mut kept: VecDeque<(Line, usize)> = VecDeque::new();
    let mut used = 0usize;
    let mut answer = LogsAnswer {
        end: true,
        ..LogsAnswer::default()
    };
    let read = async {
        while let Some(item) = stream.next().await {
            let line = Line::from_driver(item.map_err(|e| driver_error(id, node, e))?);
            let size = line.size();
            used += size;
            kept.push_back((line, size));
            while used > budget && kept.len() > 1 {
                if let Some((_, s)) = kept.pop_front() {
                    used -= s;
                    answer.skipped += 1;
                }
            }
        }
        Ok::<_, LogsError>(())
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            answer.note = Some(format!(
                "reading {id} took longer than {READ_TIMEOUT:?}: the output may be incomplete"
            ));
        }
    }
    answer.lines = kept.into_iter().map(|(l, _)| l).collect();
    Ok(answer)
}

/// Answers a peer's [`LOGS_PROTOCOL`] request from this node's driver.
pub async fn answer(shared: &Shared, data: &[u8]) -> Result<Vec<u8>, String> {
    let req: LogsRequest =
        serde_json::from_slice(data).map_err(|e| format!("malformed logs request: {e}"))?;
    let answer = answer_request(shared, &req)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::to_vec(&answer).map_err(|e| e.to_string())
}

async fn answer_request(shared: &Shared, req: &LogsRequest) -> Result<LogsAnswer, LogsError> {
    let id = ReplicaId::new(&*req.namespace, &*req.name, req.index);
    id.validate()
        .map_err(|e| LogsError::BadRequest(e.to_string()))?;
    let tail = req.tail.unwrap_or(MAX_TAIL).min(MAX_TAIL);
    let node = &shared.name;
    if !req.follow {
        return read_past(&shared.driver, &id, tail, ANSWER_BUDGET, node).await;
    }
    let Some(cursor) = req.cursor else {
        let tap = shared.logs.tap(&shared.driver, &id, tail, node).await?;
        tap.touch();
        let ring = tap.ring();
        let (lines, skipped) = ring.last(tail, ANSWER_BUDGET);
        return Ok(LogsAnswer {
            lines,
            skipped,
            cursor: Some(Cursor {
                tap: tap.id,
                seq: ring.next,
            }),
            ..LogsAnswer::default()
        });
    };
    let Some(tap) = shared.logs.existing(&id).filter(|t| t.id == cursor.tap) else {
        return Ok(LogsAnswer {
            end: true,
            note: Some(format!(
                "the log stream of {id} on {node} ended or expired; run the command again"
            )),
            ..LogsAnswer::default()
        });
    };
    tap.touch();
    let wait = Duration::from_millis(req.wait_ms).min(FOLLOW_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = tap.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let ring = tap.ring();
            let (lines, skipped, next, more) = ring.after(cursor.seq, ANSWER_BUDGET);
            let done = ring.ended && next >= ring.next;
            if !lines.is_empty() || skipped > 0 || done || tokio::time::Instant::now() >= deadline {
                let note = if done { ring.error.clone() } else { None };
                return Ok(LogsAnswer {
                    lines,
                    cursor: Some(Cursor {
                        tap: tap.id,
                        seq: next,
                    }),
                    skipped,
                    more,
                    end: done,
                    note,
                });
            }
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
        tap.touch();
    }
}

// ---------------------------------------------------------------------------------------
// The API side.

#[derive(Debug, Default, Deserialize)]
pub struct LogsQuery {
    replica: Option<u32>,
    tail: Option<usize>,
    follow: Option<bool>,
    format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Text,
}

enum Record {
    Line(Line),
    Note(String),
    Error(String),
}

fn encode(r: &Record, f: Format) -> Bytes {
    let mut s = match (r, f) {
        (Record::Line(l), Format::Json) => serde_json::to_string(l).unwrap_or_default(),
        (Record::Note(n), Format::Json) => serde_json::json!({ "note": n }).to_string(),
        (Record::Error(e), Format::Json) => serde_json::json!({ "error": e }).to_string(),
        (Record::Line(l), Format::Text) => format!("{} | {}", l.container, l.line),
        (Record::Note(n), Format::Text) => format!("beemesh: note: {n}"),
        (Record::Error(e), Format::Text) => format!("beemesh: error: {e}"),
    };
    s.push('\n');
    Bytes::from(s)
}

/// Sends records to the HTTP body; false once the client went away.
struct Sink {
    tx: mpsc::Sender<Bytes>,
    format: Format,
}

impl Sink {
    async fn send(&self, r: Record) -> bool {
        self.tx.send(encode(&r, self.format)).await.is_ok()
    }

    /// Sends an answer's notes and lines.
    async fn answer(&self, a: LogsAnswer) -> bool {
        if a.skipped > 0
            && !self
                .send(Record::Note(format!(
                    "{} line(s) left out: the stream was ahead of this reader, or the answer \
                     limit of {} KiB was reached",
                    a.skipped,
                    ANSWER_BUDGET / 1024
                )))
                .await
        {
            return false;
        }
        for l in a.lines {
            if !self.send(Record::Line(l)).await {
                return false;
            }
        }
        match a.note {
            Some(n) => self.send(Record::Note(n)).await,
            None => true,
        }
    }
}

fn error_response(e: &LogsError) -> Response {
    (
        e.status(),
        axum::Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

/// The replica whose logs are served, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub index: u32,
    /// The holder's peer id.
    pub node: String,
    pub state: ReplicaState,
}

/// Picks the replica: `wanted`, else the lowest running index, else the lowest placed one.
/// For one index, a running placement beats another, then the newer generation.
pub fn choose(
    workload: &str,
    placements: &[PlacementView<String>],
    replicas: u32,
    wanted: Option<u32>,
    unschedulable: Option<&str>,
) -> Result<Target, LogsError> {
    if let Some(index) = wanted
        && index >= replicas
    {
        return Err(LogsError::NoSuchReplica {
            workload: workload.to_owned(),
            replicas,
            numbered: match replicas {
                0 => String::new(),
                1 => " (index 0)".to_owned(),
                n => format!(" (indexes 0 to {})", n - 1),
            },
            index,
        });
    }
    let mut best: BTreeMap<u32, &PlacementView<String>> = BTreeMap::new();
    for p in placements {
        if p.index >= replicas || wanted.is_some_and(|w| w != p.index) {
            continue;
        }
        let rank = |p: &PlacementView<String>| (p.state == ReplicaState::Running, p.generation);
        match best.get(&p.index) {
            Some(b) if rank(b) >= rank(p) => {}
            _ => {
                best.insert(p.index, p);
            }
        }
    }
    let pick = best
        .values()
        .find(|p| p.state == ReplicaState::Running)
        .or_else(|| best.values().next());
    match pick {
        Some(p) => Ok(Target {
            index: p.index,
            node: p.node.clone(),
            state: p.state,
        }),
        None => Err(LogsError::NotPlaced {
            workload: workload.to_owned(),
            index: wanted,
            why: unschedulable
                .map(|u| format!(" (unschedulable: {u})"))
                .unwrap_or_default(),
        }),
    }
}

/// `"name (peer id)"` for a peer, from the membership.
async fn describe_node(s: &Shared, peer: &str) -> String {
    if peer == s.peer_id.to_base58() {
        return s.name.clone();
    }
    let name = s
        .peers()
        .await
        .into_iter()
        .find(|p| p.peer_id == peer)
        .map(|p| p.name)
        .filter(|n| !n.is_empty());
    match name {
        Some(n) => format!("{n} ({peer})"),
        None => peer.to_owned(),
    }
}

/// `GET /v1/workloads/{namespace}/{name}/logs`.
pub async fn http(
    State(s): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error_response(&LogsError::BadRequest(e.body_text())),
    };
    match serve(s, namespace, name, q).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn serve(
    s: Arc<Shared>,
    namespace: String,
    name: String,
    q: LogsQuery,
) -> Result<Response, LogsError> {
    let format = match q.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("text") => Format::Text,
        Some(other) => {
            return Err(LogsError::BadRequest(format!(
                "format={other}: expected json or text"
            )));
        }
    };
    if let Some(t) = q.tail
        && t > MAX_TAIL
    {
        return Err(LogsError::BadRequest(format!(
            "tail={t}: at most {MAX_TAIL} lines"
        )));
    }
    let tail = q.tail.unwrap_or(MAX_TAIL);
    let follow = q.follow.unwrap_or(false);
    let workload = format!("{namespace}/{name}");
    let (replicas, generation, deleted) = {
        let store = s.store();
        let e = store
            .get(&namespace, &name)
            .ok_or_else(|| LogsError::UnknownWorkload(workload.clone()))?;
        (
            e.manifest.placement.replicas,
            e.manifest.generation,
            e.manifest.deleted,
        )
    };
    if deleted {
        return Err(LogsError::Deleted {
            workload,
            generation,
        });
    }
    let wid = WorkloadId::new(&namespace, &name);
    let local = s.peer_id.to_base58();
    let statuses = placement::statuses(&s.placement, &s.mesh, &local, vec![wid.clone()]).await;
    let (placements, unschedulable) = statuses
        .get(&wid)
        .map(|(st, _)| (st.placements.clone(), st.unschedulable.clone()))
        .unwrap_or_default();
    let target = choose(
        &workload,
        &placements,
        replicas,
        q.replica,
        unschedulable.as_deref(),
    )?;
    let id = ReplicaId::new(&*namespace, &*name, target.index);
    let node = describe_node(&s, &target.node).await;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let sink = Sink { tx, format };
    if target.node == local {
        let stream = s
            .driver
            .logs(
                &id,
                LogOptions {
                    tail: Some(tail),
                    follow,
                },
            )
            .await
            .map_err(|e| match e {
                DriverError::NotFound(_) => LogsError::NotStarted {
                    workload: workload.clone(),
                    index: target.index,
                    node: s.name.clone(),
                },
                source => LogsError::Driver {
                    replica: id.to_string(),
                    source,
                },
            })?;
        tokio::spawn(forward_local(stream, sink, s.logs.shutdown.clone()));
    } else {
        let peer: PeerId = target.node.parse().map_err(|_| LogsError::Unreachable {
            node: node.clone(),
            workload: workload.clone(),
            index: target.index,
            reason: "not a peer id".into(),
        })?;
        let relay = Relay {
            mesh: s.mesh.clone(),
            peer,
            node,
            workload,
            base: LogsRequest {
                namespace,
                name,
                index: target.index,
                tail: Some(tail),
                follow,
                cursor: None,
                wait_ms: 0,
            },
        };
        let first = relay.ask(None).await?;
        let cursor = first.cursor;
        let end = first.end || !follow;
        let shutdown = s.logs.shutdown.clone();
        tokio::spawn(async move {
            if !sink.answer(first).await || end {
                return;
            }
            relay.follow(cursor, sink, shutdown).await;
        });
    }
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let content_type = match format {
        Format::Json => "application/x-ndjson",
        Format::Text => "text/plain; charset=utf-8",
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&target.index.to_string()) {
        h.insert("x-beemesh-replica", v);
    }
    if let Ok(v) = HeaderValue::from_str(&target.node) {
        h.insert("x-beemesh-node", v);
    }
    Ok(resp)
}

/// Streams lines from this node's driver until the stream ends, the client goes or the node
/// stops.
async fn forward_local(
    mut stream: beemesh_driver::LogStream,
    sink: Sink,
    shutdown: CancellationToken,
) {
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sink.tx.closed() => return,
            item = stream.next() => item,
        };
        let ok = match item {
            Some(Ok(line)) => sink.send(Record::Line(Line::from_driver(line))).await,
            Some(Err(e)) => {
                sink.send(Record::Error(e.to_string())).await;
                return;
            }
            None => return,
        };
        if !ok {
            return;
        }
    }
}

/// Asks the holder of a replica over the mesh.
struct Relay {
    mesh: MeshHandle,
    peer: PeerId,
    /// The holder, as "name (peer id)".
    node: String,
    workload: String,
    base: LogsRequest,
}

impl Relay {
    async fn ask(&self, cursor: Option<Cursor>) -> Result<LogsAnswer, LogsError> {
        let req = LogsRequest {
            cursor,
            wait_ms: if cursor.is_some() {
                FOLLOW_WAIT.as_millis() as u64
            } else {
                0
            },
            ..self.base.clone()
        };
        let bytes = serde_json::to_vec(&req).map_err(|e| LogsError::BadRequest(e.to_string()))?;
        let unreachable = |reason: String| LogsError::Unreachable {
            node: self.node.clone(),
            workload: self.workload.clone(),
            index: self.base.index,
            reason,
        };
        let answer = tokio::time::timeout(
            RELAY_TIMEOUT,
            self.mesh.request(self.peer, LOGS_PROTOCOL, bytes),
        )
        .await
        .map_err(|_| unreachable(format!("no answer within {RELAY_TIMEOUT:?}")))?;
        match answer {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| unreachable(format!("malformed answer: {e}"))),
            Err(MeshError::Remote { reason, .. }) => Err(LogsError::Holder {
                node: self.node.clone(),
                workload: self.workload.clone(),
                index: self.base.index,
                reason,
            }),
            Err(e) => Err(unreachable(e.to_string())),
        }
    }

    /// Polls the holder with the cursor until the stream ends, the client goes or the node
    /// stops.
    async fn follow(&self, mut cursor: Option<Cursor>, sink: Sink, shutdown: CancellationToken) {
        loop {
            let Some(c) = cursor else {
                sink.send(Record::Error(format!(
                    "node {} answered without a cursor",
                    self.node
                )))
                .await;
                return;
            };
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sink.tx.closed() => return,
                a = self.ask(Some(c)) => a,
            };
            match answer {
                Ok(a) => {
                    let end = a.end;
                    cursor = a.cursor.or(cursor);
                    if !sink.answer(a).await || end {
                        return;
                    }
                }
                Err(e) => {
                    sink.send(Record::Error(e.to_string())).await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(c: &str, text: &str) -> Line {
        Line {
            container: c.into(),
            source: "output".into(),
            line: text.into(),
        }
    }

    fn texts(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|l| l.line.as_str()).collect()
    }

    #[test]
    fn the_ring_numbers_lines_and_forgets_the_oldest() {
        let mut r = Ring::default();
        for i in 0..(RING_LINES + 5) {
            r.push(line("a", &i.to_string()));
        }
        assert_eq!(r.next, RING_LINES as u64 + 5);
        assert_eq!(r.first(), 5);
        let (lines, skipped, next, more) = r.after(2, ANSWER_BUDGET);
        assert_eq!(skipped, 3, "lines 2 to 4 left the ring");
        assert_eq!(lines.first().map(|l| l.line.as_str()), Some("5"));
        assert!(!more);
        assert_eq!(next, r.next);
        let (lines, skipped, next, _) = r.after(r.next, ANSWER_BUDGET);
        assert!(lines.is_empty());
        assert_eq!((skipped, next), (0, r.next));
    }

    #[test]
    fn answers_stay_within_the_budget_and_continue_where_they_stopped() {
        let mut r = Ring::default();
        let big = "x".repeat(1000);
        for _ in 0..100 {
            r.push(line("a", &big));
        }
        let (lines, _, next, more) = r.after(0, 10_000);
        assert!(more);
        assert_eq!(lines.len() as u64, next);
        assert!(lines.iter().map(Line::size).sum::<usize>() <= 10_000);
        let (rest, skipped, next2, more2) = r.after(next, usize::MAX);
        assert_eq!(skipped, 0);
        assert!(!more2);
        assert_eq!(lines.len() + rest.len(), 100);
        assert_eq!(next2, 100);
        // The tail keeps the newest lines and says how many did not fit.
        let (tail, left_out) = r.last(50, 10_000);
        assert_eq!(tail.len() as u64 + left_out, 50);
        assert!(left_out > 0);
    }

    #[test]
    fn tail_counts_per_container() {
        let mut r = Ring::default();
        for i in 0..5 {
            r.push(line("a", &format!("a{i}")));
            r.push(line("b", &format!("b{i}")));
        }
        let (lines, left_out) = r.last(2, ANSWER_BUDGET);
        assert_eq!(texts(&lines), ["a3", "b3", "a4", "b4"]);
        assert_eq!(left_out, 0);
        assert!(r.last(0, ANSWER_BUDGET).0.is_empty());
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        let s = cut("é".repeat(20), 9);
        assert!(s.len() <= 9, "{s}");
        assert!(s.ends_with('…'));
        assert_eq!(cut("short".into(), 9), "short");
    }

    fn p(node: &str, index: u32, generation: u64, state: ReplicaState) -> PlacementView<String> {
        PlacementView {
            node: node.into(),
            index,
            generation,
            state,
        }
    }

    #[test]
    fn the_default_replica_is_the_lowest_running_one() {
        use ReplicaState::*;
        let ps = [
            p("n0", 0, 1, Starting),
            p("n2", 2, 1, Running),
            p("n1", 1, 1, Running),
        ];
        let t = choose("d/w", &ps, 3, None, None).expect("placed");
        assert_eq!((t.index, t.node.as_str()), (1, "n1"));
        // Nothing runs: the lowest placed one (its last output explains why).
        let ps = [p("n1", 1, 1, Failed), p("n0", 0, 1, Pending)];
        assert_eq!(
            choose("d/w", &ps, 3, None, None).map(|t| t.index).ok(),
            Some(0)
        );
        // One index held twice during a rollout: the running, newer one.
        let ps = [
            p("old", 0, 1, Running),
            p("new", 0, 2, Starting),
            p("new2", 0, 2, Running),
        ];
        assert_eq!(
            choose("d/w", &ps, 1, Some(0), None).map(|t| t.node).ok(),
            Some("new2".to_owned())
        );
    }

    #[test]
    fn missing_replicas_are_named() {
        let e = choose("d/w", &[], 2, Some(5), None).expect_err("no replica 5");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "d/w has 2 replica(s) (indexes 0 to 1): there is no replica 5"
        );
        let e = choose("d/w", &[], 2, Some(1), Some("no node matches zone=mars"))
            .expect_err("not placed");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.to_string(),
            "replica 1 of d/w is not placed yet (unschedulable: no node matches zone=mars)"
        );
        let e = choose("d/w", &[], 2, None, None).expect_err("nothing placed");
        assert_eq!(e.to_string(), "no replica of d/w is placed yet");
    }
}
