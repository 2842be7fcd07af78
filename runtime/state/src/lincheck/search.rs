//! The search: Wing and Gong's depth-first search for a linearization, with Lowe's
//! memoisation of (linearized set, state), on one partition of a history.
//!
//! The invocations and responses of the operations with known outcomes form a doubly linked
//! list sorted by time (at equal times invocations first, so touching intervals count as
//! concurrent). Walking it from the front, the search tries to linearize the next operation
//! whose invocation it meets: when the model accepts that operation in the current state and
//! the configuration reached was not explored before, it removes the operation's two events
//! from the list, pushes it, and starts again from the front. Meeting a response means the
//! operation it belongs to had to be linearized before anything later: the search then tries
//! the operations with unknown outcomes invoked by then, and after them backtracks, restoring
//! the last pushed operation into the list (dancing links) and trying the candidates after
//! it. It succeeds when every operation with a known outcome is linearized.
//!
//! Operations with unknown outcomes have no response: each may be linearized anywhere after
//! its invocation, or not at all (the same as at the very end, where it affects nothing), so
//! the model gives only their effect. The caller sorts them into classes of interchangeable
//! operations (same request), and the search takes the members of a class in the order of
//! their invocations: any linearization using `m` of them can use the `m` invoked first
//! instead (the `j`-th invoked is invoked no later than the `j`-th used one), so the used
//! members of a class are always a prefix of it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::Instant;

/// A sequential specification whose steps are deterministic: nondeterminism, if any, lives
/// in the state (as a set of states, or symbolically).
pub(crate) trait Model {
    type State: Copy + Eq + Hash;
    type Op;
    /// The state after `op` in `state`, or `None` when the sequential object could not have
    /// answered `op` as recorded.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;

    /// Whether `a` simulates `b`: from `a` the model accepts every sequence of operations it
    /// accepts from `b`, ending in states that are related the same way. Equality will do;
    /// a coarser relation lets the search cut off more.
    fn covers(&self, a: &Self::State, b: &Self::State) -> bool {
        a == b
    }

    /// Whether `op` (with an unknown outcome) may still take effect in `state` or in a state
    /// reached from it; `false` only when it never can. The search then no longer tells apart
    /// configurations that differ only in whether `op` was linearized. Must be monotone in
    /// [`covers`](Self::covers): what is live after `b` is live after any `a` covering it.
    fn live(&self, _state: &Self::State, _op: &Self::Op) -> bool {
        true
    }

    /// Hashes what states related by [`covers`](Self::covers) have in common.
    fn coarse<H: Hasher>(&self, state: &Self::State, hasher: &mut H) {
        state.hash(hasher);
    }
}

/// One operation of the partition.
#[derive(Clone, Debug)]
pub(crate) struct SearchOp<O> {
    pub(crate) call: u64,
    /// `None`: unknown outcome (infinite response time).
    pub(crate) ret: Option<u64>,
    pub(crate) op: O,
    /// For an operation with an unknown outcome: operations of the same class are
    /// interchangeable (the model treats them alike). Ignored otherwise.
    pub(crate) class: u32,
}

/// Steps and time left to spend.
#[derive(Debug, Clone)]
pub(crate) struct Meter {
    pub(crate) steps: u64,
    pub(crate) max_steps: u64,
    pub(crate) deadline: Option<Instant>,
}

impl Meter {
    pub(crate) fn new(max_steps: u64, deadline: Option<Instant>) -> Self {
        Self {
            steps: 0,
            max_steps,
            deadline,
        }
    }

    /// Counts a step; `false` once the budget is spent.
    fn tick(&mut self) -> bool {
        self.steps += 1;
        if self.steps > self.max_steps {
            return false;
        }
        if self.steps.is_multiple_of(4096)
            && let Some(d) = self.deadline
            && Instant::now() >= d
        {
            return false;
        }
        true
    }

    pub(crate) fn spent(&self) -> bool {
        self.steps >= self.max_steps || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Linearizable,
    /// No linearization: the longest linearizable prefix met (indices into the partition, in
    /// linearization order).
    NotLinearizable {
        prefix: Vec<usize>,
    },
    OutOfBudget,
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    op: u32,
    call: bool,
    /// For an invocation, its response's node.
    partner: u32,
    prev: u32,
    next: u32,
}

struct List {
    nodes: Vec<Node>,
    /// For each operation with a known outcome, its invocation's node.
    call_node: Vec<u32>,
}

impl List {
    const HEAD: u32 = 0;

    /// The events of the operations with known outcomes.
    fn build<O>(ops: &[SearchOp<O>]) -> Self {
        // (time, invocations first, op) for every event.
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            if let Some(r) = op.ret {
                let i = i as u32;
                events.push((op.call, false, i));
                events.push((r, true, i));
            }
        }
        events.sort_unstable();
        let mut nodes = Vec::with_capacity(events.len() + 1);
        nodes.push(Node {
            op: NIL,
            call: false,
            partner: NIL,
            prev: NIL,
            next: NIL,
        });
        let mut call_node = vec![NIL; ops.len()];
        for (k, &(_, is_ret, op)) in events.iter().enumerate() {
            let idx = (k + 1) as u32;
            nodes.push(Node {
                op,
                call: !is_ret,
                partner: NIL,
                prev: idx - 1,
                next: if k + 1 < events.len() { idx + 1 } else { NIL },
            });
            if is_ret {
                let c = call_node[op as usize];
                nodes[c as usize].partner = idx;
            } else {
                call_node[op as usize] = idx;
            }
        }
        if nodes.len() > 1 {
            nodes[0].next = 1;
        }
        Self { nodes, call_node }
    }

    /// The invocation node of operation `op`.
    fn call_node(&self, op: usize) -> u32 {
        self.call_node[op]
    }

    fn node(&self, i: u32) -> Node {
        self.nodes[i as usize]
    }

    fn first(&self) -> u32 {
        self.nodes[Self::HEAD as usize].next
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.node(i);
        self.nodes[prev as usize].next = next;
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn relink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.node(i);
        self.nodes[prev as usize].next = i;
        if next != NIL {
            self.nodes[next as usize].prev = i;
        }
    }

    /// Removes an invocation and its response.
    fn lift(&mut self, call: u32) {
        self.unlink(call);
        self.unlink(self.node(call).partner);
    }

    /// Undoes the last [`lift`](Self::lift) of `call`.
    fn unlift(&mut self, call: u32) {
        self.relink(self.node(call).partner);
        self.relink(call);
    }
}

/// A multiply-rotate hasher for the memo's keys (which are already well mixed words).
#[derive(Default)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type Mix = BuildHasherDefault<MixHasher>;

/// The configurations already explored: the known operations linearized, the unknown ones
/// linearized, and the state.
///
/// A configuration is cut off when an explored one has the same known operations, a subset
/// of its unknown ones and a state that [covers](Model::covers) its state: any completion of
/// the new one completes the old one too (the extra unknown operations can stay out). This is
/// sound even when the old one is still being explored: at the end of a failed search, a
/// visited configuration with a shortest completion would have a child on that completion
/// that was visited or cut off by one with a completion as short, a contradiction. Since the
/// search tries unknown operations after known ones, the configuration with the fewest
/// unknown operations tends to come first, and the rest are cut off. Unknown operations that
/// can no longer take effect ([`Model::live`]) are left out of the sets: whether they were
/// linearized makes no difference to any completion.
struct Memo<S> {
    buckets: HashMap<u64, Vec<Group<S>>, Mix>,
}

struct Group<S> {
    known: Box<[u64]>,
    /// An antichain of the (state, unknown set) explored.
    seen: Vec<(S, Box<[u64]>)>,
}

fn subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x & !y == 0)
}

impl<S: Copy + Eq + Hash> Memo<S> {
    fn new() -> Self {
        Self {
            buckets: HashMap::default(),
        }
    }

    /// Records the configuration; `false` if an explored one covers it.
    fn insert<M: Model<State = S>>(
        &mut self,
        model: &M,
        known: &[u64],
        state: &S,
        unknown: &[u64],
    ) -> bool {
        let mut h = MixHasher::default();
        for &w in known {
            h.write_u64(w);
        }
        model.coarse(state, &mut h);
        let bucket = self.buckets.entry(h.finish()).or_default();
        let Some(group) = bucket.iter_mut().find(|g| *g.known == *known) else {
            bucket.push(Group {
                known: known.into(),
                seen: vec![(*state, unknown.into())],
            });
            return true;
        };
        if group
            .seen
            .iter()
            .any(|(s, u)| subset(u, unknown) && model.covers(s, state))
        {
            return false;
        }
        group
            .seen
            .retain(|(s, u)| !(subset(unknown, u) && model.covers(state, s)));
        group.seen.push((*state, unknown.into()));
        true
    }
}

/// A set of operations, by their index among the known or the unknown ones.
struct Bits {
    /// For each operation: its index among the known or among the unknown ones.
    slot: Vec<usize>,
    known: Vec<u64>,
    unknown: Vec<u64>,
    /// Unknown operations by their index among the unknown ones.
    unknown_ops: Vec<u32>,
    /// The linearized unknown operations that may still take effect ([`Bits::mask`]).
    masked: Vec<u64>,
}

impl Bits {
    fn new<O>(ops: &[SearchOp<O>]) -> Self {
        let (mut k, mut u) = (0, 0);
        let slot = ops
            .iter()
            .map(|o| {
                let counter = if o.ret.is_some() { &mut k } else { &mut u };
                *counter += 1;
                *counter - 1
            })
            .collect();
        let unknown_ops = (0..ops.len())
            .filter(|&i| ops[i].ret.is_none())
            .map(|i| i as u32)
            .collect();
        Self {
            slot,
            known: vec![0; k.div_ceil(64)],
            unknown: vec![0; u.div_ceil(64)],
            unknown_ops,
            masked: vec![0; u.div_ceil(64)],
        }
    }

    /// Sets `masked` to the unknown operations linearized that may still take effect after
    /// `state`.
    fn mask<M: Model>(&mut self, model: &M, ops: &[SearchOp<M::Op>], state: &M::State) {
        for (w, &word) in self.unknown.iter().enumerate() {
            let mut live = word;
            let mut rest = word;
            while rest != 0 {
                let b = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let op = self.unknown_ops[w * 64 + b] as usize;
                if !model.live(state, &ops[op].op) {
                    live &= !(1 << b);
                }
            }
            self.masked[w] = live;
        }
    }

    fn flip<O>(&mut self, ops: &[SearchOp<O>], i: usize) {
        let j = self.slot[i];
        let set = if ops[i].ret.is_some() {
            &mut self.known
        } else {
            &mut self.unknown
        };
        set[j / 64] ^= 1 << (j % 64);
    }
}

/// Where the search looks next at the current depth.
#[derive(Clone, Copy, Debug)]
enum Cursor {
    /// A node of the list of known operations' events.
    Known(u32),
    /// A class of unknown operations; those invoked after `due` (the first response still in
    /// the list) are not candidates yet.
    Unknown { class: u32, due: u64 },
}

/// A linearized operation, with what undoes it.
struct Frame<S> {
    op: u32,
    /// Where the search goes on at this depth after undoing it.
    at: Cursor,
    prev: S,
}

/// Searches for a linearization of `ops` from `init`.
pub(crate) fn search<M: Model>(
    model: &M,
    init: M::State,
    ops: &[SearchOp<M::Op>],
    meter: &mut Meter,
) -> Outcome {
    let mut list = List::build(ops);
    let mut classes: Vec<Vec<u32>> = Vec::new();
    {
        let mut index: HashMap<u32, usize, Mix> = HashMap::default();
        for (i, o) in ops.iter().enumerate() {
            if o.ret.is_none() {
                let c = *index.entry(o.class).or_insert_with(|| {
                    classes.push(Vec::new());
                    classes.len() - 1
                });
                classes[c].push(i as u32);
            }
        }
        for members in &mut classes {
            members.sort_by_key(|&i| (ops[i as usize].call, i));
        }
    }
    let mut used = vec![0usize; classes.len()];
    let mut remaining = ops.iter().filter(|o| o.ret.is_some()).count();
    let mut bits = Bits::new(ops);
    let mut memo = Memo::new();
    let mut stack: Vec<Frame<M::State>> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    let mut state = init;
    let mut cursor = Cursor::Known(list.first());
    loop {
        if remaining == 0 {
            return Outcome::Linearizable;
        }
        if !meter.tick() {
            return Outcome::OutOfBudget;
        }
        // The candidate under the cursor, and where the cursor goes if it is not taken.
        let (candidate, next) = match cursor {
            Cursor::Known(entry) if entry != NIL && list.node(entry).call => {
                let n = list.node(entry);
                (Some(n.op), Cursor::Known(n.next))
            }
            Cursor::Known(entry) => {
                // The first response: on to the unknown operations invoked by then.
                let due = if entry == NIL {
                    u64::MAX
                } else {
                    ops[list.node(entry).op as usize].ret.unwrap_or(u64::MAX)
                };
                cursor = Cursor::Unknown { class: 0, due };
                continue;
            }
            Cursor::Unknown { class, due } if (class as usize) < classes.len() => {
                let c = class as usize;
                let member = classes[c]
                    .get(used[c])
                    .copied()
                    .filter(|&m| ops[m as usize].call <= due);
                (
                    member,
                    Cursor::Unknown {
                        class: class + 1,
                        due,
                    },
                )
            }
            Cursor::Unknown { .. } => {
                // Every candidate at this depth is tried: backtrack.
                let Some(frame) = stack.pop() else {
                    return Outcome::NotLinearizable { prefix: best };
                };
                let i = frame.op as usize;
                bits.flip(ops, i);
                state = frame.prev;
                match frame.at {
                    Cursor::Known(_) => {
                        list.unlift(list.call_node(i));
                        remaining += 1;
                    }
                    Cursor::Unknown { class, .. } => used[class as usize - 1] -= 1,
                }
                cursor = frame.at;
                continue;
            }
        };
        let Some(i) = candidate else {
            cursor = next;
            continue;
        };
        let i = i as usize;
        if let Some(after) = model.step(&state, &ops[i].op) {
            bits.flip(ops, i);
            bits.mask(model, ops, &after);
            if memo.insert(model, &bits.known, &after, &bits.masked) {
                stack.push(Frame {
                    op: i as u32,
                    at: next,
                    prev: state,
                });
                state = after;
                match cursor {
                    Cursor::Known(entry) => {
                        list.lift(entry);
                        remaining -= 1;
                    }
                    Cursor::Unknown { class, .. } => used[class as usize] += 1,
                }
                if stack.len() > best.len() {
                    best.clear();
                    best.extend(stack.iter().map(|f| f.op as usize));
                }
                cursor = Cursor::Known(list.first());
                continue;
            }
            bits.flip(ops, i);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register of small integers: write(v) or read() -> v.
    struct Register;

    #[derive(Clone, Copy)]
    enum Op {
        Write(u8),
        Read(u8),
    }

    impl Model for Register {
        type State = u8;
        type Op = Op;
        fn step(&self, s: &u8, op: &Op) -> Option<u8> {
            match *op {
                Op::Write(v) => Some(v),
                Op::Read(v) => (v == *s).then_some(*s),
            }
        }
    }

    fn op(call: u64, ret: Option<u64>, op: Op) -> SearchOp<Op> {
        SearchOp {
            call,
            ret,
            op,
            class: call as u32,
        }
    }

    fn run(ops: &[SearchOp<Op>]) -> Outcome {
        search(&Register, 0, ops, &mut Meter::new(1_000_000, None))
    }

    #[test]
    fn lincheck_search_register_basics() {
        // Sequential write then read.
        let h = [op(0, Some(1), Op::Write(1)), op(2, Some(3), Op::Read(1))];
        assert_eq!(run(&h), Outcome::Linearizable);
        // A read concurrent with the write may see either value; a later one must see it.
        let h = [
            op(0, Some(10), Op::Write(1)),
            op(1, Some(2), Op::Read(0)),
            op(3, Some(4), Op::Read(1)),
        ];
        assert_eq!(run(&h), Outcome::Linearizable);
        let h = [
            op(0, Some(10), Op::Write(1)),
            op(1, Some(2), Op::Read(1)),
            op(3, Some(4), Op::Read(0)),
        ];
        assert!(matches!(run(&h), Outcome::NotLinearizable { .. }));
        // An unknown write may be taken or not.
        let h = [op(0, None, Op::Write(1)), op(5, Some(6), Op::Read(0))];
        assert_eq!(run(&h), Outcome::Linearizable);
        let h = [op(0, None, Op::Write(1)), op(5, Some(6), Op::Read(1))];
        assert_eq!(run(&h), Outcome::Linearizable);
        // Touching intervals count as concurrent.
        let h = [op(0, Some(5), Op::Read(1)), op(5, Some(6), Op::Write(1))];
        assert_eq!(run(&h), Outcome::Linearizable);
        assert_eq!(run(&[]), Outcome::Linearizable);
    }

    #[test]
    fn lincheck_search_reports_the_longest_prefix() {
        let h = [
            op(0, Some(1), Op::Write(1)),
            op(2, Some(3), Op::Write(2)),
            op(4, Some(5), Op::Read(1)),
        ];
        assert_eq!(run(&h), Outcome::NotLinearizable { prefix: vec![0, 1] });
    }

    #[test]
    fn lincheck_search_stops_at_its_budget() {
        let mut h: Vec<_> = (0..40).map(|i| op(i, None, Op::Write(i as u8))).collect();
        h.push(op(100, Some(101), Op::Read(200)));
        let out = search(&Register, 0, &h, &mut Meter::new(10_000, None));
        assert_eq!(out, Outcome::OutOfBudget);
    }
}
