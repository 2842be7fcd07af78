//! The sequential specification: a map of registers with revisions, as in etcd.
//!
//! Each key holds an optional value and a revision. Every write that takes effect (a put, a
//! delete of a present key, a conditional write whose precondition held) gives the key a new
//! revision, per [`RevisionMode`]. A get returns the value (or none) and the key's *visible*
//! revision, per [`AbsentRevision`]; a conditional write takes effect exactly when its
//! expected revision equals the visible one, and otherwise fails with the visible one.
//!
//! Since every operation touches one key, the checker checks keys one by one, each against
//! a single-register model (P-compositionality). Revision values a history has not shown yet
//! (after a write whose outcome is unknown, when revisions may jump) are kept symbolically as
//! a lower bound, so the model stays deterministic and the search exact.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::history::{Bytes, Input, Operation, Output};
use super::search;

/// How revisions advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RevisionMode {
    /// Each key counts its own writes: a key's first write returns revision 1, each further
    /// write the previous revision plus one. The count survives deletes.
    PerKeyCounter,
    /// A key's revisions strictly increase with each write to it, with gaps allowed: what any
    /// group-wide counter or Raft log index gives when looked at one key at a time. Nothing is
    /// checked across keys.
    PerKeyIncreasing,
    /// etcd's: one group-wide counter that strictly increases with every write to the group.
    /// Checked per key as [`PerKeyIncreasing`](Self::PerKeyIncreasing), plus, across keys, that
    /// no two writes share a revision and that a write invoked after another was acknowledged
    /// has a greater revision. Gaps are allowed (a log index also counts entries that are not
    /// writes).
    Global,
}

/// The revision a get reports, and a conditional write compares against, for an absent key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AbsentRevision {
    /// Always 0, as etcd's `mod_revision` and Consul's `ModifyIndex`: "if revision 0" means
    /// "if absent".
    Zero,
    /// The revision of the delete that removed it (0 for a key never written): a tombstone.
    LastWrite,
}

/// The model a history is checked against. The default is the weakest useful one:
/// revisions of a key strictly increase and absent keys are at revision 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvModel {
    pub revisions: RevisionMode,
    pub absent: AbsentRevision,
}

impl Default for KvModel {
    fn default() -> Self {
        Self {
            revisions: RevisionMode::PerKeyIncreasing,
            absent: AbsentRevision::Zero,
        }
    }
}

impl KvModel {
    /// etcd's semantics: a group-wide revision, absent keys at revision 0.
    pub fn etcd() -> Self {
        Self {
            revisions: RevisionMode::Global,
            absent: AbsentRevision::Zero,
        }
    }

    /// A per-key write counter, absent keys at revision 0.
    pub fn per_key_counter() -> Self {
        Self {
            revisions: RevisionMode::PerKeyCounter,
            absent: AbsentRevision::Zero,
        }
    }
}

/// A key's revision in a model state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Rev {
    Exact(u64),
    /// Some revision at least this, not yet shown by any answer.
    AtLeast(u64),
}

impl Rev {
    fn least(self) -> u64 {
        match self {
            Self::Exact(r) | Self::AtLeast(r) => r,
        }
    }
}

/// The state of one key: its value (interned) and the revision of its last write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyState {
    value: Option<u32>,
    rev: Rev,
}

impl KeyState {
    pub(crate) const INITIAL: Self = Self {
        value: None,
        rev: Rev::Exact(0),
    };
}

/// A request, with values interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum KIn {
    Get,
    Put(u32),
    Delete,
    PutIf(u32, u64),
    DeleteIf(u64),
}

/// An answer, with values interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KOut {
    Value(Option<u32>, u64),
    Written(u64),
    NotFound,
    Failed(u64),
}

/// One operation of one key, ready for the search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KOp {
    pub(crate) input: KIn,
    /// `None`: unknown outcome.
    pub(crate) output: Option<KOut>,
}

impl KOp {
    /// Whether the operation can only observe, never change, the state: removing it from a
    /// history only removes constraints.
    pub(crate) fn is_read_only(&self) -> bool {
        matches!(
            (self.input, self.output),
            (KIn::Get, _)
                | (_, Some(KOut::Failed(_)))
                | (KIn::Delete | KIn::DeleteIf(_), Some(KOut::NotFound))
        )
    }

    /// The value this operation writes, if it is a write whose outcome is unknown.
    pub(crate) fn unknown_write(&self) -> Option<Option<u32>> {
        match (self.input, self.output) {
            (KIn::Put(v) | KIn::PutIf(v, _), None) => Some(Some(v)),
            (KIn::Delete | KIn::DeleteIf(_), None) => Some(None),
            _ => None,
        }
    }

    /// The value a get returned.
    pub(crate) fn read_value(&self) -> Option<Option<u32>> {
        match self.output {
            Some(KOut::Value(v, _)) => Some(v),
            _ => None,
        }
    }
}

/// Interns the values of one key's operations.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    ids: HashMap<Vec<u8>, u32>,
    values: Vec<Vec<u8>>,
}

/// The value of every write whose value no get returned: the model cannot tell such values
/// apart, and merging them lets more configurations of the search coincide.
pub(crate) const UNREAD: u32 = u32::MAX;

impl Interner {
    fn id(&mut self, v: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.values.push(v.to_vec());
        self.ids.insert(v.to_vec(), id);
        id
    }

    /// Maps the values no get returned to [`UNREAD`] in `ops`.
    pub(crate) fn merge_unread(ops: &mut [KOp]) {
        let read: std::collections::HashSet<u32> = ops
            .iter()
            .filter_map(|o| o.read_value().flatten())
            .collect();
        for o in ops {
            if let KIn::Put(v) | KIn::PutIf(v, _) = &mut o.input
                && !read.contains(v)
            {
                *v = UNREAD;
            }
        }
    }

    /// Translates one (validated) operation.
    pub(crate) fn op(&mut self, op: &Operation) -> KOp {
        let input = match &op.input {
            Input::Get { .. } => KIn::Get,
            Input::Put { value, .. } => KIn::Put(self.id(value)),
            Input::Delete { .. } => KIn::Delete,
            Input::PutIf {
                value, revision, ..
            } => KIn::PutIf(self.id(value), *revision),
            Input::DeleteIf { revision, .. } => KIn::DeleteIf(*revision),
        };
        let output = op.output().map(|o| match o {
            Output::Value { value, revision } => {
                KOut::Value(value.as_deref().map(|v| self.id(v)), *revision)
            }
            Output::Written { revision } => KOut::Written(*revision),
            Output::NotFound => KOut::NotFound,
            Output::PreconditionFailed { current } => KOut::Failed(*current),
        });
        KOp { input, output }
    }

    /// A state, for people.
    pub(crate) fn describe(&self, model: &KvModel, s: &KeyState) -> String {
        let rev = match s.rev {
            Rev::Exact(r) => format!("revision {r}"),
            Rev::AtLeast(r) => format!("revision at least {r} (not yet observed)"),
        };
        match s.value {
            Some(UNREAD) => format!("a value no get returned, at {rev}"),
            Some(v) => match self.values.get(v as usize) {
                Some(bytes) => format!("{} at {rev}", Bytes(bytes)),
                None => format!("value {v} at {rev}"),
            },
            None if model.absent == AbsentRevision::Zero => {
                format!("absent (visible revision 0, last write at {rev})")
            }
            None => format!("absent at {rev}"),
        }
    }
}

impl KvModel {
    /// The state in which the visible revision is `r`, if there is one.
    fn observe(&self, s: KeyState, r: u64) -> Option<KeyState> {
        if s.value.is_none() && self.absent == AbsentRevision::Zero {
            return (r == 0).then_some(s);
        }
        match s.rev {
            Rev::Exact(x) => (x == r).then_some(s),
            Rev::AtLeast(n) => (r >= n).then_some(KeyState {
                rev: Rev::Exact(r),
                ..s
            }),
        }
    }

    /// The state after a write of `value` that returned `out` (`None`: unknown).
    fn write(&self, s: KeyState, value: Option<u32>, out: Option<u64>) -> Option<KeyState> {
        let least = s.rev.least();
        let rev = match (self.revisions, s.rev, out) {
            (RevisionMode::PerKeyCounter, Rev::Exact(x), Some(r)) => {
                if r != x.checked_add(1)? {
                    return None;
                }
                Rev::Exact(r)
            }
            (RevisionMode::PerKeyCounter, Rev::Exact(x), None) => Rev::Exact(x.checked_add(1)?),
            (_, _, Some(r)) => {
                if r <= least {
                    return None;
                }
                Rev::Exact(r)
            }
            (_, _, None) => Rev::AtLeast(least.checked_add(1)?),
        };
        Some(KeyState { value, rev })
    }
}

impl search::Model for KvModel {
    type State = KeyState;
    type Op = KOp;

    /// Same value, and a revision at least as open: `AtLeast(m)` covers `AtLeast(n)` and
    /// `Exact(n)` for `m <= n`, since every answer it accepts from the latter it accepts from
    /// the former, and leads to the same state (or, after an unknown write, to `AtLeast(m+1)`
    /// against `AtLeast(n+1)`).
    fn covers(&self, a: &KeyState, b: &KeyState) -> bool {
        a.value == b.value
            && match (a.rev, b.rev) {
                (Rev::Exact(x), Rev::Exact(y)) => x == y,
                (Rev::AtLeast(m), Rev::Exact(n) | Rev::AtLeast(n)) => m <= n,
                (Rev::Exact(_), Rev::AtLeast(_)) => false,
            }
    }

    /// A conditional write expecting a revision below the key's least possible one can never
    /// take effect again, since that only grows (except, when absent keys are at revision 0,
    /// one expecting 0).
    fn live(&self, s: &KeyState, op: &KOp) -> bool {
        match op.input {
            KIn::PutIf(_, e) | KIn::DeleteIf(e) => {
                e >= s.rev.least() || (e == 0 && self.absent == AbsentRevision::Zero)
            }
            _ => true,
        }
    }

    fn coarse<H: std::hash::Hasher>(&self, s: &KeyState, hasher: &mut H) {
        std::hash::Hash::hash(&s.value, hasher);
    }

    fn step(&self, s: &KeyState, op: &KOp) -> Option<KeyState> {
        let s = *s;
        match (op.input, op.output) {
            (KIn::Get, Some(KOut::Value(v, r))) => {
                if s.value != v {
                    return None;
                }
                self.observe(s, r)
            }
            (KIn::Get, None) => Some(s),
            (KIn::Put(v), Some(KOut::Written(r))) => self.write(s, Some(v), Some(r)),
            (KIn::Put(v), None) => self.write(s, Some(v), None),
            (KIn::Delete, Some(KOut::NotFound)) => s.value.is_none().then_some(s),
            (KIn::Delete, Some(KOut::Written(r))) => self.write(s, None, Some(r)),
            (KIn::Delete, None) => self.write(s, None, None),
            (KIn::PutIf(_, e) | KIn::DeleteIf(e), Some(KOut::Failed(c))) => {
                if c == e {
                    return None;
                }
                self.observe(s, c)
            }
            (KIn::PutIf(v, e), Some(KOut::Written(r))) => {
                self.write(self.observe(s, e)?, Some(v), Some(r))
            }
            (KIn::PutIf(v, e), None) => self.write(self.observe(s, e)?, Some(v), None),
            (KIn::DeleteIf(e), Some(KOut::NotFound)) => {
                let s = self.observe(s, e)?;
                s.value.is_none().then_some(s)
            }
            (KIn::DeleteIf(e), Some(KOut::Written(r))) => {
                self.write(self.observe(s, e)?, None, Some(r))
            }
            (KIn::DeleteIf(e), None) => self.write(self.observe(s, e)?, None, None),
            // Validated histories never get here.
            _ => None,
        }
    }
}
