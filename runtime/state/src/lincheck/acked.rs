//! "No acknowledged write lost": what operators care about, checked on its own.
//!
//! A write is *acknowledged* when its client was told it took effect (a put, a delete that
//! wrote, a conditional write that succeeded). Since the revisions of a key strictly increase
//! with its writes (in every [`RevisionMode`](super::RevisionMode)), a read can be matched
//! to the write it observed: the acknowledged write of that key with the revision it
//! returned, or else a write with an unknown outcome that wrote the value it returned (or, for
//! an absent key at revision 0, any delete, or the initial state).
//!
//! An acknowledged write `w` is **lost** when a read invoked after `w` was acknowledged
//! observed only writes that must come before `w`: the initial state, or writes that either
//! returned a lower revision than `w` or were acknowledged before `w` was invoked. A write
//! that no read observed and no other write can have overwritten is reported as
//! **unobserved**: the history cannot tell whether it survived (end a test with a read of
//! every key to rule that out).
//!
//! This is weaker than linearizability (which [`check`](super::check) decides) and does
//! not depend on the revision mode; it names the writes an operator would have lost.

use std::collections::BTreeMap;
use std::fmt;

use super::history::{History, HistoryError, Input, OpId, Operation, Output};

/// One acknowledged write and a read that shows it was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostWrite {
    pub write: OpId,
    pub read: OpId,
}

/// What [`check_acknowledged_writes`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckReport {
    /// Acknowledged writes that a later read shows were lost (one read per write).
    pub lost: Vec<LostWrite>,
    /// Acknowledged writes that no read observed and nothing can have overwritten.
    pub unobserved: Vec<OpId>,
}

impl AckReport {
    /// Whether no acknowledged write was shown lost.
    pub fn no_write_lost(&self) -> bool {
        self.lost.is_empty()
    }

    /// A report for people, with the operations from `history`.
    pub fn describe(&self, history: &History) -> String {
        let mut s = String::new();
        let show = |id: OpId| {
            history
                .get(id)
                .map_or_else(|| "?".to_owned(), Operation::to_string)
        };
        for l in &self.lost {
            s += &format!(
                "lost: {} {}\n  then {} {}\n",
                l.write,
                show(l.write),
                l.read,
                show(l.read)
            );
        }
        if !self.unobserved.is_empty() {
            s += &format!(
                "{} acknowledged writes never observed (end the test with a read of every key)\n",
                self.unobserved.len()
            );
        }
        s
    }
}

impl fmt::Display for LostWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "write {} lost, as read {} shows", self.write, self.read)
    }
}

/// A write of one key, acknowledged or of unknown outcome.
#[derive(Clone, Copy, Debug)]
struct Write<'a> {
    id: OpId,
    call: u64,
    /// `u64::MAX` when unknown.
    ret: u64,
    /// `None` when the outcome is unknown.
    revision: Option<u64>,
    value: Option<&'a [u8]>,
}

impl Write<'_> {
    /// Whether `self` must be linearized before `later`.
    fn precedes(&self, later: &Write<'_>) -> bool {
        if self.ret < later.call {
            return true;
        }
        matches!((self.revision, later.revision), (Some(a), Some(b)) if a < b)
    }
}

/// What a read observed: the writes that can have produced it, or the initial state.
struct Observed<'a> {
    writes: Vec<Write<'a>>,
    initial: bool,
}

fn write_of(id: OpId, op: &Operation) -> Option<Write<'_>> {
    let value = match &op.input {
        Input::Put { value, .. } | Input::PutIf { value, .. } => Some(value.as_slice()),
        Input::Delete { .. } | Input::DeleteIf { .. } => None,
        Input::Get { .. } => return None,
    };
    let revision = match op.output() {
        None => None,
        Some(Output::Written { revision }) => Some(*revision),
        Some(_) => return None,
    };
    Some(Write {
        id,
        call: op.call,
        ret: op.ret(),
        revision,
        value,
    })
}

/// Checks that no acknowledged write was lost (see the module's documentation).
pub fn check_acknowledged_writes(history: &History) -> Result<AckReport, HistoryError> {
    history.validate()?;
    let mut keys: BTreeMap<&str, (Vec<Write<'_>>, Vec<OpId>)> = BTreeMap::new();
    for (i, op) in history.ops().iter().enumerate() {
        let entry = keys.entry(op.key()).or_default();
        if let Some(w) = write_of(OpId(i), op) {
            entry.0.push(w);
        } else if matches!(op.output(), Some(Output::Value { .. })) {
            entry.1.push(OpId(i));
        }
    }
    let mut report = AckReport::default();
    let mut lost = vec![false; history.len()];
    for (writes, reads) in keys.values() {
        check_key(history, writes, reads, &mut lost, &mut report);
    }
    report.lost.sort_by_key(|l| l.write);
    report.unobserved.sort();
    Ok(report)
}

fn check_key(
    history: &History,
    writes: &[Write<'_>],
    reads: &[OpId],
    lost: &mut [bool],
    report: &mut AckReport,
) {
    let acked: Vec<&Write<'_>> = writes.iter().filter(|w| w.revision.is_some()).collect();
    let mut observed_ids = vec![false; history.len()];
    for &r in reads {
        let Some(read) = history.get(r) else { continue };
        let Some(Output::Value { value, revision }) = read.output() else {
            continue;
        };
        let obs = observed(writes, read, value.as_deref(), *revision);
        for w in &obs.writes {
            observed_ids[w.id.0] = true;
        }
        if obs.writes.is_empty() && !obs.initial {
            // A read nothing explains: not evidence about any one write; `check` rejects it.
            continue;
        }
        for w in &acked {
            if w.ret >= read.call || lost[w.id.0] {
                continue;
            }
            if obs.writes.iter().all(|x| x.id != w.id && x.precedes(w)) {
                lost[w.id.0] = true;
                report.lost.push(LostWrite {
                    write: w.id,
                    read: r,
                });
            }
        }
    }
    for w in &acked {
        let overwritable = writes.iter().any(|x| x.id != w.id && !x.precedes(w));
        if !observed_ids[w.id.0] && !overwritable && !lost[w.id.0] {
            report.unobserved.push(w.id);
        }
    }
}

/// The writes a read of (`value`, `revision`) can have observed.
fn observed<'a>(
    writes: &[Write<'a>],
    read: &Operation,
    value: Option<&[u8]>,
    revision: u64,
) -> Observed<'a> {
    let by_revision: Vec<Write<'a>> = writes
        .iter()
        .filter(|w| w.revision == Some(revision) && w.value == value)
        .copied()
        .collect();
    if !by_revision.is_empty() {
        return Observed {
            writes: by_revision,
            initial: false,
        };
    }
    let absent_at_zero = value.is_none() && revision == 0;
    let writes = writes
        .iter()
        .filter(|w| {
            w.call <= read.ret()
                && w.value == value
                && (w.revision.is_none() || (absent_at_zero && w.value.is_none()))
        })
        .copied()
        .collect();
    Observed {
        writes,
        initial: absent_at_zero,
    }
}
