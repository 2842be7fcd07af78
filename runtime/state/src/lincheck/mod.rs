//! A linearizability checker for histories of the strong key-value API (DESIGN.md section 5),
//! for the tests that partition links and kill nodes under concurrent clients.
//!
//! # Use
//!
//! Clients record what they do in a [`Recorder`] (or build a [`History`] by hand): the
//! invocation, and the answer if one came. A request that timed out, or whose node died, is
//! left without an answer: its outcome is *unknown* and it may or may not have taken effect,
//! as in Jepsen, Knossos and Porcupine. Then [`check`] judges the history against a
//! [`KvModel`] within a [`Budget`]:
//!
//! ```
//! use beemesh_state::lincheck::{check, Budget, Input, KvModel, Output, Recorder};
//!
//! let rec = Recorder::new();
//! let call = rec.invoke(1, Input::put("k", "a"));
//! // ... send the request, get the answer ...
//! rec.complete(call, Output::written(1)).expect("a pending put");
//! let call = rec.invoke(2, Input::get("k"));
//! rec.complete(call, Output::value("a", 1)).expect("a pending get");
//! let verdict = check(&rec.history(), &KvModel::etcd(), &Budget::default()).expect("valid");
//! assert!(verdict.is_linearizable(), "{verdict}");
//! ```
//!
//! The verdict is [`CheckResult::Linearizable`], [`CheckResult::NotLinearizable`] with the
//! key and an [`Explanation`], or [`CheckResult::Unknown`] when the budget ran out: the
//! problem is NP-complete in general, and the checker gives up rather than run forever.
//! [`check_acknowledged_writes`] separately names acknowledged writes a later read shows were
//! lost, which is what operators ask about.
//!
//! # Model
//!
//! A map of registers with revisions, as in etcd ([`model`](KvModel)): get returns the value
//! (or none) and the key's revision; put and delete return the key's new revision;
//! put-if-revision and delete-if-revision take effect exactly when the key's revision is the
//! one given, and otherwise fail with the current one. How revisions advance is configurable
//! ([`RevisionMode`]): a per-key counter, per-key strictly increasing, or one group-wide
//! strictly increasing counter (etcd's); and so is the revision of an absent key
//! ([`AbsentRevision`]).
//!
//! # Algorithm
//!
//! - P-compositionality (Herlihy and Wing 1990; Horn and Kroening, "Faster linearizability
//!   checking via P-compositionality", FORTE 2015): a history is linearizable if and only if
//!   its restriction to each key is, since every operation touches one key. Keys are checked
//!   one by one, smallest first. With [`RevisionMode::Global`], the cross-key properties of a
//!   group-wide counter (distinct revisions, increasing in real time) are checked besides.
//! - Per key, Wing and Gong's depth-first search for a linearization (J. M. Wing and C. Gong,
//!   "Testing and verifying concurrent objects", JPDC 17(1), 1993), with Lowe's memoisation of
//!   the configurations (set of operations linearized, model state) already explored and his
//!   list of invocation/response events undone with dancing links (G. Lowe, "Testing for
//!   linearizability", Concurrency and Computation: Practice and Experience 29(4), 2017), as
//!   Porcupine does (A. Athalye, <https://github.com/anishathalye/porcupine>). Details in
//!   the search module.
//! - Unknown outcomes: an operation without a response has no response event, so it may be
//!   linearized anywhere after its invocation or not at all (equivalent to linearizing it at
//!   the end), and the model gives only its effect. Gets with unknown outcomes are dropped.
//!   Each is a source of exponential blow-up, so the search cuts down on them, exactly:
//!   values no get returned are merged into one (the model cannot tell them apart);
//!   interchangeable operations (same request) are taken in the order of their invocations;
//!   a configuration is cut off by an explored one with the same known operations, fewer
//!   unknown ones and a state that simulates its state (same value, a revision bound at least
//!   as open); and conditional writes that can no longer take effect (expected revision below
//!   the key's least possible one) are forgotten. Writes with unknown outcomes whose value no
//!   get returned are first left out altogether (sound: if the history is linearizable
//!   without them it is with them); if that fails the key is checked again with all of them.
//! - A violation is explained by the longest linearizable prefix the search found, the
//!   operations pending after it (none of which can come next) and the state it leaves, on a
//!   shrunk witness: the key's history cut short just after the point the search could not
//!   get past (operations still pending then taken as of unknown outcome), then with reads
//!   (gets, failed conditional writes, deletes that found nothing) dropped while it stays
//!   non-linearizable, in halving chunks as in delta debugging. Both only remove
//!   constraints, so the witness is still a proof. Shrinking gets a share of the budget
//!   (a few times what the search took) and reports whether it finished.
//! - The budget counts search steps (one step: one candidate examined) and time, for the
//!   whole check including the shrinking.
//!
//! # Limits
//!
//! Checking linearizability is NP-complete, and what makes the search expensive is the number
//! of operations one key sees while operations of that key with unknown outcomes are pending.
//! Spread a test's operations over many keys (as Jepsen's independent keys do): 10,000
//! operations from 8 clients on 50 keys, 5% of them with unknown outcomes, check in tens of
//! milliseconds in a release build; refuting a history of 1,600 operations on one key with
//! 127 unknown outcomes took seconds. With [`RevisionMode::Global`], only the properties of
//! the group-wide counter listed above are checked across keys, not a joint linearization.

mod acked;
mod history;
mod model;
mod search;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

pub use acked::{AckReport, LostWrite, check_acknowledged_writes};
pub use history::{
    CallId, ClientId, History, HistoryError, Input, OpId, Operation, Output, Recorder, Response,
};
pub use model::{AbsentRevision, KvModel, RevisionMode};

use model::{Interner, KIn, KOp, KeyState};
use search::{Meter, Outcome, SearchOp};

/// How much work [`check`] may do before answering [`CheckResult::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Search steps over the whole check; one step (a candidate examined) takes tens of
    /// nanoseconds in a release build.
    pub max_steps: u64,
    /// Wall time over the whole check.
    pub max_time: Option<Duration>,
}

impl Default for Budget {
    /// 500 million steps or 60 seconds, whichever comes first.
    fn default() -> Self {
        Self {
            max_steps: 500_000_000,
            max_time: Some(Duration::from_secs(60)),
        }
    }
}

impl Budget {
    pub fn steps(max_steps: u64) -> Self {
        Self {
            max_steps,
            max_time: None,
        }
    }

    pub fn time(max_time: Duration) -> Self {
        Self {
            max_steps: u64::MAX,
            max_time: Some(max_time),
        }
    }
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    NotLinearizable {
        key: String,
        explanation: Box<Explanation>,
    },
    Unknown {
        reason: UnknownReason,
    },
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Self::Linearizable)
    }

    pub fn is_violation(&self) -> bool {
        matches!(self, Self::NotLinearizable { .. })
    }
}

/// Why the checker could not decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnknownReason {
    /// The search on `key` spent the budget.
    ExceededBudget {
        key: String,
        steps: u64,
        elapsed: Duration,
    },
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExceededBudget {
                key,
                steps,
                elapsed,
            } => write!(
                f,
                "exceeded budget: {steps} search steps in {elapsed:?}, on key {key:?}"
            ),
        }
    }
}

/// Why a key's history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// In a sentence.
    pub reason: String,
    /// A non-linearizable part of the key's history: its writes and the reads that were
    /// needed to keep it non-linearizable.
    pub witness: Vec<OpId>,
    /// Whether every read that could be dropped from `witness` was (false when the budget
    /// ran out first).
    pub minimised: bool,
    /// The longest linearizable prefix of `witness` found, in linearization order.
    pub prefix: Vec<OpId>,
    /// The operations pending after `prefix`, by invocation: each has to come next or later,
    /// the first to have responded among them has to come by its response, and none of them
    /// can come next.
    pub stuck: Vec<OpId>,
    /// The key's state after `prefix`.
    pub state: String,
    /// Every operation named above.
    pub operations: BTreeMap<OpId, Operation>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const TAIL: usize = 8;
        let show = |f: &mut fmt::Formatter<'_>, id: &OpId| match self.operations.get(id) {
            Some(op) => writeln!(f, "    {id} {op}"),
            None => writeln!(f, "    {id}"),
        };
        writeln!(f, "{}", self.reason)?;
        writeln!(
            f,
            "  witness: {} operations{}",
            self.witness.len(),
            if self.minimised {
                " (reads minimised)"
            } else {
                ""
            }
        )?;
        let skip = self.prefix.len().saturating_sub(TAIL);
        writeln!(
            f,
            "  longest linearizable prefix: {} operations{}",
            self.prefix.len(),
            if skip > 0 { ", the last ones:" } else { ":" }
        )?;
        for id in &self.prefix[skip..] {
            show(f, id)?;
        }
        writeln!(f, "  leaving the key {}", self.state)?;
        writeln!(f, "  pending, none of which can come next:")?;
        for id in &self.stuck {
            show(f, id)?;
        }
        Ok(())
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Linearizable => f.write_str("linearizable"),
            Self::NotLinearizable { key, explanation } => {
                write!(f, "not linearizable on key {key:?}: {explanation}")
            }
            Self::Unknown { reason } => write!(f, "unknown: {reason}"),
        }
    }
}

/// Checks `history` for linearizability against `model`, within `budget`.
///
/// Errors only on a malformed history (a response before its invocation, an answer that does
/// not fit its request).
pub fn check(
    history: &History,
    model: &KvModel,
    budget: &Budget,
) -> Result<CheckResult, HistoryError> {
    history.validate()?;
    let start = Instant::now();
    let deadline = budget.max_time.and_then(|t| start.checked_add(t));
    let mut meter = Meter::new(budget.max_steps, deadline);

    let mut keys: BTreeMap<&str, Vec<OpId>> = BTreeMap::new();
    for (i, op) in history.ops().iter().enumerate() {
        keys.entry(op.key()).or_default().push(OpId(i));
    }
    let mut order: Vec<(&str, Vec<OpId>)> = keys.into_iter().collect();
    order.sort_by_key(|(key, ids)| (ids.len(), *key));

    let mut unknown = None;
    for (key, ids) in &order {
        let part = Partition::new(history, ids);
        match check_key(model, &part, &mut meter) {
            KeyVerdict::Linearizable => {}
            KeyVerdict::NotLinearizable(explanation) => {
                return Ok(CheckResult::NotLinearizable {
                    key: (*key).to_owned(),
                    explanation,
                });
            }
            KeyVerdict::OutOfBudget => {
                unknown = Some(UnknownReason::ExceededBudget {
                    key: (*key).to_owned(),
                    steps: meter.steps,
                    elapsed: start.elapsed(),
                });
                break;
            }
        }
    }
    if model.revisions == RevisionMode::Global
        && let Some((key, explanation)) = check_global_revisions(history)
    {
        return Ok(CheckResult::NotLinearizable { key, explanation });
    }
    Ok(match unknown {
        Some(reason) => CheckResult::Unknown { reason },
        None => CheckResult::Linearizable,
    })
}

/// One key's operations, ready for the search.
struct Partition<'a> {
    history: &'a History,
    /// The history's id of each operation below.
    ids: Vec<OpId>,
    ops: Vec<SearchOp<KOp>>,
    interner: Interner,
}

/// A part of a key's history: the operations at `which`, and, with a `cut` at time `t`, the
/// ones still pending at `t` taken as of unknown outcome.
#[derive(Clone, Debug)]
struct Part {
    cut: Option<u64>,
    which: Vec<usize>,
}

impl<'a> Partition<'a> {
    fn new(history: &'a History, ids: &[OpId]) -> Self {
        let mut interner = Interner::default();
        let mut kept = Vec::with_capacity(ids.len());
        let mut ops = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(op) = history.get(id) else { continue };
            // A get with an unknown outcome constrains nothing.
            if op.response.is_none() && matches!(op.input, Input::Get { .. }) {
                continue;
            }
            kept.push(id);
            ops.push(SearchOp {
                call: op.call,
                ret: op.response.as_ref().map(|r| r.at),
                op: interner.op(op),
                class: 0,
            });
        }
        let mut kops: Vec<KOp> = ops.iter().map(|o| o.op).collect();
        Interner::merge_unread(&mut kops);
        for (o, k) in ops.iter_mut().zip(kops) {
            o.op = k;
        }
        Self {
            history,
            ids: kept,
            ops,
            interner,
        }
    }

    fn whole(&self) -> Part {
        Part {
            cut: None,
            which: (0..self.ops.len()).collect(),
        }
    }

    /// The history up to `t`: the operations invoked by then, the ones still pending taken as
    /// of unknown outcome (gets among them dropped).
    ///
    /// If the whole history is linearizable, so is this: cut a linearization after the last
    /// operation completed by `t`; everything invoked later comes after it, and the pending
    /// operations in it took effect, those after it did not.
    fn until(&self, t: u64) -> Part {
        let which = (0..self.ops.len())
            .filter(|&i| {
                let o = &self.ops[i];
                o.call <= t && !(o.op.input == KIn::Get && o.ret.is_none_or(|r| r > t))
            })
            .collect();
        Part {
            cut: Some(t),
            which,
        }
    }

    /// The operations of `part`, for a search. Operations with unknown outcomes and the same
    /// request (after [`Interner::merge_unread`]) are interchangeable: they share a class.
    fn ops(&self, part: &Part) -> Vec<SearchOp<KOp>> {
        let mut classes: HashMap<KIn, u32> = HashMap::new();
        part.which
            .iter()
            .map(|&i| {
                let mut o = self.ops[i].clone();
                if let (Some(t), Some(r)) = (part.cut, o.ret)
                    && r > t
                {
                    o.ret = None;
                    o.op.output = None;
                }
                if o.ret.is_none() {
                    let next = classes.len() as u32;
                    o.class = *classes.entry(o.op.input).or_insert(next);
                }
                o
            })
            .collect()
    }

    /// Searches `part`; a prefix comes back as indices into the partition.
    fn run(&self, model: &KvModel, part: &Part, meter: &mut Meter) -> Outcome {
        match search::search(model, KeyState::INITIAL, &self.ops(part), meter) {
            Outcome::NotLinearizable { prefix } => Outcome::NotLinearizable {
                prefix: prefix.into_iter().map(|k| part.which[k]).collect(),
            },
            other => other,
        }
    }

    /// When the first operation left out of `prefix` responded, in `part`.
    fn due(&self, part: &Part, prefix: &[usize]) -> Option<(u64, usize)> {
        let done: HashSet<usize> = prefix.iter().copied().collect();
        part.which
            .iter()
            .filter(|i| !done.contains(i))
            .filter_map(|&i| {
                let r = self.ops[i].ret?;
                part.cut.is_none_or(|t| r <= t).then_some((r, i))
            })
            .min()
    }
}

enum KeyVerdict {
    Linearizable,
    NotLinearizable(Box<Explanation>),
    OutOfBudget,
}

fn check_key(model: &KvModel, part: &Partition<'_>, meter: &mut Meter) -> KeyVerdict {
    // First without the writes of unknown outcome that no get shows.
    let read: HashSet<Option<u32>> = part.ops.iter().filter_map(|o| o.op.read_value()).collect();
    let whole = part.whole();
    let pruned = Part {
        cut: None,
        which: whole
            .which
            .iter()
            .copied()
            .filter(|&i| {
                part.ops[i]
                    .op
                    .unknown_write()
                    .is_none_or(|v| read.contains(&v))
            })
            .collect(),
    };
    if pruned.which.len() < whole.which.len() {
        match part.run(model, &pruned, meter) {
            Outcome::Linearizable => return KeyVerdict::Linearizable,
            Outcome::OutOfBudget => return KeyVerdict::OutOfBudget,
            Outcome::NotLinearizable { .. } => {}
        }
    }
    let (before, started) = (meter.steps, Instant::now());
    match part.run(model, &whole, meter) {
        Outcome::Linearizable => KeyVerdict::Linearizable,
        Outcome::OutOfBudget => KeyVerdict::OutOfBudget,
        Outcome::NotLinearizable { prefix } => {
            let (spent, took) = (meter.steps - before, started.elapsed());
            KeyVerdict::NotLinearizable(Box::new(explain(model, part, prefix, spent, took, meter)))
        }
    }
}

/// Shrinks a non-linearizable key history and explains it: first cut it short after the
/// point where the search got stuck, then drop reads while it stays non-linearizable.
fn explain(
    model: &KvModel,
    part: &Partition<'_>,
    prefix: Vec<usize>,
    spent: u64,
    took: Duration,
    meter: &mut Meter,
) -> Explanation {
    // Shrinking may spend a few times what the search did (at least 20 million steps and two
    // seconds), within what is left of the budget.
    let share = spent.saturating_mul(4).max(20_000_000);
    let deadline = Instant::now().checked_add(took.saturating_mul(2).max(Duration::from_secs(2)));
    let mut shrink = Meter::new(
        meter.steps.saturating_add(share).min(meter.max_steps),
        match (deadline, meter.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    );
    shrink.steps = meter.steps;

    let mut witness = part.whole();
    let mut witness_prefix = prefix;
    let mut minimised = true;

    // Cut at the response the search could not get past, or a little later.
    if let Some((due, _)) = part.due(&witness, &witness_prefix) {
        let mut times: Vec<u64> = part
            .ops
            .iter()
            .filter_map(|o| o.ret)
            .filter(|&r| r >= due)
            .collect();
        times.sort_unstable();
        times.dedup();
        let mut k = 0;
        while k < times.len() {
            let trial = part.until(times[k]);
            if trial.which.len() == witness.which.len() {
                break;
            }
            match part.run(model, &trial, &mut shrink) {
                Outcome::NotLinearizable { prefix } => {
                    witness = trial;
                    witness_prefix = prefix;
                    break;
                }
                Outcome::Linearizable => k = 2 * k + 1,
                Outcome::OutOfBudget => {
                    minimised = false;
                    break;
                }
            }
        }
    }

    // Drop reads, in halving chunks.
    let mut candidates: Vec<usize> = witness
        .which
        .iter()
        .copied()
        .filter(|&i| {
            let o = &part.ops[i];
            o.op.is_read_only() && witness.cut.is_none_or(|t| o.ret.is_some_and(|r| r <= t))
        })
        .collect();
    let mut chunk = candidates.len().div_ceil(2).max(1);
    'shrink: while minimised && !candidates.is_empty() {
        let mut i = 0;
        while i < candidates.len() {
            if shrink.spent() {
                minimised = false;
                break 'shrink;
            }
            let end = (i + chunk).min(candidates.len());
            let drop: HashSet<usize> = candidates[i..end].iter().copied().collect();
            let trial = Part {
                cut: witness.cut,
                which: witness
                    .which
                    .iter()
                    .copied()
                    .filter(|j| !drop.contains(j))
                    .collect(),
            };
            match part.run(model, &trial, &mut shrink) {
                Outcome::NotLinearizable { prefix } => {
                    witness = trial;
                    witness_prefix = prefix;
                    candidates.drain(i..end);
                }
                Outcome::Linearizable => i = end,
                Outcome::OutOfBudget => {
                    minimised = false;
                    break 'shrink;
                }
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    meter.steps = shrink.steps.max(meter.steps);
    describe(model, part, &witness, witness_prefix, minimised)
}

fn describe(
    model: &KvModel,
    part: &Partition<'_>,
    witness: &Part,
    prefix: Vec<usize>,
    minimised: bool,
) -> Explanation {
    let mut state = KeyState::INITIAL;
    let ops = part.ops(&Part {
        cut: witness.cut,
        which: prefix.clone(),
    });
    for o in &ops {
        if let Some(next) = search::Model::step(model, &state, &o.op) {
            state = next;
        }
    }
    let due = part.due(witness, &prefix);
    let in_prefix: HashSet<usize> = prefix.iter().copied().collect();
    let mut stuck: Vec<usize> = match due {
        Some((by, _)) => witness
            .which
            .iter()
            .copied()
            .filter(|&i| !in_prefix.contains(&i) && part.ops[i].call <= by)
            .collect(),
        None => Vec::new(),
    };
    stuck.sort_by_key(|&i| (part.ops[i].call, i));

    let id = |i: usize| part.ids[i];
    let state = part.interner.describe(model, &state);
    let mut reason = match due {
        Some((_, i)) => format!(
            "{} ({}) must take effect by its response, but after the longest linearizable \
             prefix the key is {state} and no pending operation can come next",
            id(i),
            part.history
                .get(id(i))
                .map_or_else(String::new, |op| op.to_string()),
        ),
        None => "no linearization".to_owned(),
    };
    if let Some(t) = witness.cut {
        reason += &format!(
            " (history cut at time {t}: operations pending then are taken as of unknown outcome)"
        );
    }
    let witness: Vec<OpId> = witness.which.iter().map(|&i| id(i)).collect();
    let operations = witness
        .iter()
        .filter_map(|&i| part.history.get(i).map(|op| (i, op.clone())))
        .collect();
    Explanation {
        reason,
        witness,
        minimised,
        prefix: prefix.into_iter().map(id).collect(),
        stuck: stuck.into_iter().map(id).collect(),
        state,
        operations,
    }
}

/// With a group-wide revision: acknowledged writes have distinct revisions, and a write
/// invoked after another was acknowledged has a greater one.
fn check_global_revisions(history: &History) -> Option<(String, Box<Explanation>)> {
    let writes: Vec<(OpId, &Operation, u64, u64)> = history
        .ops()
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match &op.response {
            Some(r) => match r.output {
                Output::Written { revision } => Some((OpId(i), op, r.at, revision)),
                _ => None,
            },
            None => None,
        })
        .collect();
    let global = |a: OpId, b: OpId, reason: String| {
        let operations = [a, b]
            .iter()
            .filter_map(|&i| history.get(i).map(|op| (i, op.clone())))
            .collect();
        let key = history
            .get(b)
            .map_or_else(String::new, |op| op.key().to_owned());
        Some((
            key,
            Box::new(Explanation {
                reason,
                witness: vec![a, b],
                minimised: true,
                prefix: vec![a],
                stuck: vec![b],
                state: "(group-wide revision)".to_owned(),
                operations,
            }),
        ))
    };

    let mut by_revision: Vec<&(OpId, &Operation, u64, u64)> = writes.iter().collect();
    by_revision.sort_by_key(|w| (w.3, w.0));
    for pair in by_revision.windows(2) {
        if let [a, b] = pair
            && a.3 == b.3
        {
            return global(
                a.0,
                b.0,
                format!(
                    "writes {} and {} both got revision {}, but a group-wide revision \
                     increases with every write",
                    a.0, b.0, a.3
                ),
            );
        }
    }

    let mut by_ret: Vec<&(OpId, &Operation, u64, u64)> = writes.iter().collect();
    by_ret.sort_by_key(|w| (w.2, w.0));
    let mut by_call: Vec<&(OpId, &Operation, u64, u64)> = writes.iter().collect();
    by_call.sort_by_key(|w| (w.1.call, w.0));
    let mut done = 0;
    let mut highest: Option<&(OpId, &Operation, u64, u64)> = None;
    for b in by_call {
        while done < by_ret.len() && by_ret[done].2 < b.1.call {
            if highest.is_none_or(|h| by_ret[done].3 > h.3) {
                highest = Some(by_ret[done]);
            }
            done += 1;
        }
        if let Some(a) = highest
            && a.3 >= b.3
        {
            return global(
                a.0,
                b.0,
                format!(
                    "write {} was invoked after write {} was acknowledged with revision {}, \
                     yet got revision {}: the group-wide revision went backwards",
                    b.0, a.0, a.3, b.3
                ),
            );
        }
    }
    None
}
