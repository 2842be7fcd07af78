//! Histories: what the clients of a strong key-value store asked, when, and what they were
//! told.
//!
//! An [`Operation`] is one request of one client: its invocation time, its [`Input`], and,
//! when the client got an answer, the [`Response`] (response time and [`Output`]). An
//! operation without a response has an *unknown outcome*: the client timed out or its node
//! died, so the operation may or may not have taken effect, at any time after its invocation
//! (its response time is infinite). Times are monotonic nanoseconds read from one clock by
//! all clients; a [`Recorder`] does that for tests.

use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Which client issued an operation. Only used in reports: the checker does not assume that a
/// client's operations are sequential.
pub type ClientId = u64;

/// An operation's position in its [`History`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub usize);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a client asked for. Every request touches one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Input {
    /// Read the key's value and revision.
    Get { key: String },
    /// Write the key unconditionally.
    Put { key: String, value: Vec<u8> },
    /// Delete the key unconditionally.
    Delete { key: String },
    /// Write the key if its current revision is `revision` (`If-Match`).
    PutIf {
        key: String,
        value: Vec<u8>,
        revision: u64,
    },
    /// Delete the key if its current revision is `revision` (`If-Match`).
    DeleteIf { key: String, revision: u64 },
}

impl Input {
    pub fn get(key: impl Into<String>) -> Self {
        Self::Get { key: key.into() }
    }

    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete { key: key.into() }
    }

    pub fn put_if(key: impl Into<String>, value: impl Into<Vec<u8>>, revision: u64) -> Self {
        Self::PutIf {
            key: key.into(),
            value: value.into(),
            revision,
        }
    }

    pub fn delete_if(key: impl Into<String>, revision: u64) -> Self {
        Self::DeleteIf {
            key: key.into(),
            revision,
        }
    }

    /// The key the operation touches.
    pub fn key(&self) -> &str {
        match self {
            Self::Get { key }
            | Self::Put { key, .. }
            | Self::Delete { key }
            | Self::PutIf { key, .. }
            | Self::DeleteIf { key, .. } => key,
        }
    }

    /// The name of the request, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Get { .. } => "get",
            Self::Put { .. } => "put",
            Self::Delete { .. } => "delete",
            Self::PutIf { .. } => "put-if-revision",
            Self::DeleteIf { .. } => "delete-if-revision",
        }
    }

    /// Whether `output` is an answer this request can get at all.
    pub fn admits(&self, output: &Output) -> bool {
        matches!(
            (self, output),
            (Self::Get { .. }, Output::Value { .. })
                | (Self::Put { .. }, Output::Written { .. })
                | (
                    Self::Delete { .. },
                    Output::Written { .. } | Output::NotFound
                )
                | (
                    Self::PutIf { .. },
                    Output::Written { .. } | Output::PreconditionFailed { .. }
                )
                | (
                    Self::DeleteIf { .. },
                    Output::Written { .. } | Output::NotFound | Output::PreconditionFailed { .. }
                )
        )
    }
}

/// What a client was told.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Output {
    /// Answer to a get: the value (`None` when the key is absent) and the key's revision.
    Value {
        value: Option<Vec<u8>>,
        revision: u64,
    },
    /// A write took effect; `revision` is the key's new revision.
    Written { revision: u64 },
    /// A delete (or a delete-if-revision whose precondition held) found no key: nothing was
    /// written.
    NotFound,
    /// A conditional write did not take effect: the key's revision was `current`, not the
    /// one asked for.
    PreconditionFailed { current: u64 },
}

impl Output {
    /// A get's answer for a present key.
    pub fn value(value: impl Into<Vec<u8>>, revision: u64) -> Self {
        Self::Value {
            value: Some(value.into()),
            revision,
        }
    }

    /// A get's answer for an absent key.
    pub fn absent(revision: u64) -> Self {
        Self::Value {
            value: None,
            revision,
        }
    }

    pub fn written(revision: u64) -> Self {
        Self::Written { revision }
    }

    pub fn failed(current: u64) -> Self {
        Self::PreconditionFailed { current }
    }

    /// The name of the answer, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Value { .. } => "value",
            Self::Written { .. } => "written",
            Self::NotFound => "not-found",
            Self::PreconditionFailed { .. } => "precondition-failed",
        }
    }
}

/// When a client got its answer, and what it was.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Response {
    /// Monotonic nanoseconds, on the clock of [`Operation::call`].
    pub at: u64,
    pub output: Output,
}

/// One request of one client.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    pub client: ClientId,
    /// Invocation time: monotonic nanoseconds, read before the request was sent.
    pub call: u64,
    pub input: Input,
    /// `None` when the outcome is unknown: the operation may or may not have taken effect,
    /// at any time after `call`.
    pub response: Option<Response>,
}

impl Operation {
    /// An operation that was answered at `at` with `output`.
    pub fn completed(client: ClientId, call: u64, at: u64, input: Input, output: Output) -> Self {
        Self {
            client,
            call,
            input,
            response: Some(Response { at, output }),
        }
    }

    /// An operation whose outcome is unknown.
    pub fn unknown(client: ClientId, call: u64, input: Input) -> Self {
        Self {
            client,
            call,
            input,
            response: None,
        }
    }

    pub fn key(&self) -> &str {
        self.input.key()
    }

    pub fn output(&self) -> Option<&Output> {
        self.response.as_ref().map(|r| &r.output)
    }

    /// Response time; `u64::MAX` (infinite) when the outcome is unknown.
    pub fn ret(&self) -> u64 {
        self.response.as_ref().map_or(u64::MAX, |r| r.at)
    }
}

/// Bytes shown as text when they are printable UTF-8, as hex otherwise.
pub(crate) struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => write!(f, "{s:?}"),
            _ => {
                f.write_str("0x")?;
                for b in self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Get { key } => write!(f, "get {key:?}"),
            Self::Put { key, value } => write!(f, "put {key:?} = {}", Bytes(value)),
            Self::Delete { key } => write!(f, "delete {key:?}"),
            Self::PutIf {
                key,
                value,
                revision,
            } => write!(f, "put {key:?} = {} if revision {revision}", Bytes(value)),
            Self::DeleteIf { key, revision } => {
                write!(f, "delete {key:?} if revision {revision}")
            }
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value {
                value: Some(v),
                revision,
            } => write!(f, "{} at revision {revision}", Bytes(v)),
            Self::Value {
                value: None,
                revision,
            } => write!(f, "absent at revision {revision}"),
            Self::Written { revision } => write!(f, "written, revision {revision}"),
            Self::NotFound => f.write_str("not found"),
            Self::PreconditionFailed { current } => {
                write!(f, "precondition failed, revision is {current}")
            }
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.response {
            Some(r) => write!(
                f,
                "client {} [{}, {}] {} -> {}",
                self.client, self.call, r.at, self.input, r.output
            ),
            None => write!(
                f,
                "client {} [{}, ?] {} -> unknown",
                self.client, self.call, self.input
            ),
        }
    }
}

/// A history is malformed: the checker cannot judge it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("operation {op}: response at {response} before its invocation at {call}")]
    ResponseBeforeCall { op: OpId, call: u64, response: u64 },
    #[error("operation {op}: a {input} cannot be answered with {output}")]
    OutputMismatch {
        op: OpId,
        input: &'static str,
        output: &'static str,
    },
    #[error("operation {op}: no such pending call in this recorder")]
    NoSuchCall { op: OpId },
}

/// A finished history: the operations of all clients, in any order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    ops: Vec<Operation>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an operation and returns its id.
    pub fn push(&mut self, op: Operation) -> OpId {
        self.ops.push(op);
        OpId(self.ops.len() - 1)
    }

    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    pub fn get(&self, id: OpId) -> Option<&Operation> {
        self.ops.get(id.0)
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Mutable access, for tests that doctor a history.
    pub fn ops_mut(&mut self) -> &mut [Operation] {
        &mut self.ops
    }

    /// Checks that every response comes after its invocation and fits its request.
    pub fn validate(&self) -> Result<(), HistoryError> {
        for (i, op) in self.ops.iter().enumerate() {
            if let Some(r) = &op.response {
                if r.at < op.call {
                    return Err(HistoryError::ResponseBeforeCall {
                        op: OpId(i),
                        call: op.call,
                        response: r.at,
                    });
                }
                if !op.input.admits(&r.output) {
                    return Err(HistoryError::OutputMismatch {
                        op: OpId(i),
                        input: op.input.kind(),
                        output: r.output.kind(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl From<Vec<Operation>> for History {
    fn from(ops: Vec<Operation>) -> Self {
        Self { ops }
    }
}

impl FromIterator<Operation> for History {
    fn from_iter<I: IntoIterator<Item = Operation>>(iter: I) -> Self {
        Self {
            ops: iter.into_iter().collect(),
        }
    }
}

/// A pending operation in a [`Recorder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CallId(usize);

/// Records a history from concurrent clients on one monotonic clock.
///
/// Call [`invoke`](Self::invoke) just before sending a request and
/// [`complete`](Self::complete) just after its answer arrived. A request whose client timed
/// out, or whose node died, is simply never completed: it ends in the history with an unknown
/// outcome. Only a request the server provably never executed (refused before it was
/// proposed to the group) may be [`discard`](Self::discard)ed; when in doubt, leave it
/// unknown. A `Recorder` is `Sync`: share it through an `Arc`.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Slot>>,
}

#[derive(Debug)]
struct Slot {
    op: Operation,
    discarded: bool,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the recorder was made.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        // A client that panicked while holding the lock left the vector whole: go on.
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the invocation of `input` by `client`, now.
    pub fn invoke(&self, client: ClientId, input: Input) -> CallId {
        let call = self.now();
        let mut slots = self.slots();
        slots.push(Slot {
            op: Operation::unknown(client, call, input),
            discarded: false,
        });
        CallId(slots.len() - 1)
    }

    /// Records the answer to `call`, now.
    pub fn complete(&self, call: CallId, output: Output) -> Result<(), HistoryError> {
        let mut slots = self.slots();
        let at = self.now();
        let slot = match slots.get_mut(call.0) {
            Some(s) if s.op.response.is_none() && !s.discarded => s,
            _ => return Err(HistoryError::NoSuchCall { op: OpId(call.0) }),
        };
        if !slot.op.input.admits(&output) {
            return Err(HistoryError::OutputMismatch {
                op: OpId(call.0),
                input: slot.op.input.kind(),
                output: output.kind(),
            });
        }
        slot.op.response = Some(Response { at, output });
        Ok(())
    }

    /// Drops `call` from the history: only for a request that provably had no effect.
    pub fn discard(&self, call: CallId) -> Result<(), HistoryError> {
        let mut slots = self.slots();
        match slots.get_mut(call.0) {
            Some(s) if s.op.response.is_none() && !s.discarded => {
                s.discarded = true;
                Ok(())
            }
            _ => Err(HistoryError::NoSuchCall { op: OpId(call.0) }),
        }
    }

    /// The history so far; operations not yet completed have unknown outcomes.
    pub fn history(&self) -> History {
        self.slots()
            .iter()
            .filter(|s| !s.discarded)
            .map(|s| s.op.clone())
            .collect()
    }
}
