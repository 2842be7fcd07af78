//! Membership as one node sees it: who is live, with which labels and capacity, and where each
//! node sits on the consistent-hashing ring.
//!
//! The view is an immutable, shareable [`MemberTable`] (sorted by ring position, with a label
//! index) plus this node's own changes since it. Lookups merge the two; when the changes grow
//! past a quarter of the table they are folded into a new table. A real node starts from an
//! empty table and pays O(log n) per change; a simulator running thousands of schedulers in
//! one process hands them all the same table, so ten thousand views of a ten-thousand-node
//! mesh cost one table plus each view's own changes.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::hash::DefaultHasher;
use std::sync::Arc;

use crate::hash::{SplitMix, mix, stable_hash};
use crate::types::{NodeInfo, NodeKey};

/// A fixed (not randomly seeded) hasher for lookup-only maps; nothing iterates them in a way
/// that reaches an output.
pub(crate) type Fixed = BuildHasherDefault<DefaultHasher>;

/// Ring position of a node.
pub(crate) fn node_ring<I: NodeKey>(id: &I) -> u64 {
    stable_hash(&id.key_bytes())
}

#[derive(Debug)]
pub(crate) struct TableEntry<I> {
    pub id: I,
    pub ring: u64,
    pub info: Arc<NodeInfo>,
}

/// An immutable snapshot of live members, shareable between schedulers.
#[derive(Debug)]
pub struct MemberTable<I> {
    entries: Vec<TableEntry<I>>,
    index: HashMap<I, u32, Fixed>,
    /// (label key, value) → positions in `entries`, ascending.
    by_label: BTreeMap<(String, String), Vec<u32>>,
}

impl<I: NodeKey> MemberTable<I> {
    /// A table of live nodes (a later duplicate id replaces an earlier one).
    pub fn new(nodes: impl IntoIterator<Item = (I, NodeInfo)>) -> Self {
        let mut map: BTreeMap<I, Arc<NodeInfo>> = BTreeMap::new();
        for (id, info) in nodes {
            map.insert(id, Arc::new(info));
        }
        Self::from_entries(
            map.into_iter()
                .map(|(id, info)| TableEntry {
                    ring: node_ring(&id),
                    id,
                    info,
                })
                .collect(),
        )
    }

    fn from_entries(mut entries: Vec<TableEntry<I>>) -> Self {
        entries.sort_by(|a, b| (a.ring, &a.id).cmp(&(b.ring, &b.id)));
        let mut index = HashMap::with_capacity_and_hasher(entries.len(), Fixed::default());
        let mut by_label: BTreeMap<(String, String), Vec<u32>> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            index.insert(e.id.clone(), i);
            for (k, v) in &e.info.labels {
                by_label.entry((k.clone(), v.clone())).or_default().push(i);
            }
        }
        Self {
            entries,
            index,
            by_label,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, id: &I) -> Option<usize> {
        self.index.get(id).map(|&i| i as usize)
    }
}

#[derive(Debug, Clone)]
enum Change {
    Up { info: Arc<NodeInfo> },
    Down,
}

/// One node's view: a shared table plus its own changes.
#[derive(Debug)]
pub(crate) struct Membership<I> {
    base: Arc<MemberTable<I>>,
    /// Changes to nodes of `base` (new info, or down) and nodes not in `base` (up).
    changes: HashMap<I, Change, Fixed>,
    /// Live nodes not in `base`, sorted by (ring, id).
    extra: Vec<(u64, I)>,
    /// Live nodes of `base` whose info differs from the table's (their labels may have
    /// changed), sorted by (ring, id): label pools of the table do not know them.
    relabelled: Vec<(u64, I)>,
    live: usize,
}

/// What changed for a node, as far as scheduling cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// It was not live and now is.
    Joined,
    /// It was live; only its info changed.
    Updated,
    /// Nothing changed.
    Same,
}

impl<I: NodeKey> Membership<I> {
    pub fn new(base: Arc<MemberTable<I>>) -> Self {
        let live = base.len();
        Self {
            base,
            changes: HashMap::default(),
            extra: Vec::new(),
            relabelled: Vec::new(),
            live,
        }
    }

    pub fn live_count(&self) -> usize {
        self.live
    }

    pub fn info(&self, id: &I) -> Option<&Arc<NodeInfo>> {
        match self.changes.get(id) {
            Some(Change::Up { info }) => Some(info),
            Some(Change::Down) => None,
            None => self.base.position(id).map(|p| &self.base.entries[p].info),
        }
    }

    pub fn is_live(&self, id: &I) -> bool {
        self.info(id).is_some()
    }

    /// Marks `id` live with `info`.
    pub fn up(&mut self, id: &I, info: NodeInfo) -> Transition {
        let was = self.info(id).cloned();
        if was.as_deref() == Some(&info) {
            return Transition::Same;
        }
        let info = Arc::new(info);
        match self.base.position(id) {
            Some(p) => {
                let key = (self.base.entries[p].ring, id.clone());
                let at = self.relabelled.binary_search(&key);
                if *self.base.entries[p].info == *info {
                    self.changes.remove(id);
                    if let Ok(at) = at {
                        self.relabelled.remove(at);
                    }
                } else {
                    self.changes
                        .insert(id.clone(), Change::Up { info: info.clone() });
                    if let Err(at) = at {
                        self.relabelled.insert(at, key);
                    }
                }
            }
            None => {
                if was.is_none() {
                    let key = (node_ring(id), id.clone());
                    let at = self.extra.partition_point(|e| *e < key);
                    self.extra.insert(at, key);
                }
                self.changes.insert(id.clone(), Change::Up { info });
            }
        }
        let t = if was.is_some() {
            Transition::Updated
        } else {
            self.live += 1;
            Transition::Joined
        };
        self.maybe_compact();
        t
    }

    /// Marks `id` down; false when it was not live.
    pub fn down(&mut self, id: &I) -> bool {
        if !self.is_live(id) {
            return false;
        }
        if let Some(p) = self.base.position(id) {
            self.changes.insert(id.clone(), Change::Down);
            let key = (self.base.entries[p].ring, id.clone());
            if let Ok(at) = self.relabelled.binary_search(&key) {
                self.relabelled.remove(at);
            }
        } else {
            self.changes.remove(id);
            let key = (node_ring(id), id.clone());
            if let Ok(at) = self.extra.binary_search(&key) {
                self.extra.remove(at);
            }
        }
        self.live -= 1;
        self.maybe_compact();
        true
    }

    fn maybe_compact(&mut self) {
        if self.changes.len() > (self.base.len() / 4).max(64) {
            self.compact();
        }
    }

    /// Folds the changes into a new table (owned by this view alone).
    fn compact(&mut self) {
        let entries: Vec<TableEntry<I>> = self
            .live_nodes()
            .map(|(ring, id, info)| TableEntry {
                id: id.clone(),
                ring,
                info: info.clone(),
            })
            .collect();
        self.base = Arc::new(MemberTable::from_entries(entries));
        self.changes.clear();
        self.extra.clear();
        self.relabelled.clear();
    }

    /// Every live node, in ring order.
    pub fn live_nodes(&self) -> impl Iterator<Item = (u64, &I, &Arc<NodeInfo>)> {
        let base = self.base.entries.iter().filter_map(move |e| {
            let info = match self.changes.get(&e.id) {
                Some(Change::Down) => return None,
                Some(Change::Up { info }) => info,
                None => &e.info,
            };
            Some((e.ring, &e.id, info))
        });
        let extra = self
            .extra
            .iter()
            .filter_map(move |(ring, id)| match self.changes.get(id) {
                Some(Change::Up { info }) => Some((*ring, id, info)),
                _ => None,
            });
        merge_sorted(base, extra)
    }

    fn base_live(&self, p: usize) -> Option<(&I, &Arc<NodeInfo>)> {
        let e = &self.base.entries[p];
        match self.changes.get(&e.id) {
            Some(Change::Down) => None,
            Some(Change::Up { info }) => Some((&e.id, info)),
            None => Some((&e.id, &e.info)),
        }
    }

    /// The first `k` live nodes at or after ring position `pos`, wrapping around.
    pub fn successors(&self, pos: u64, k: usize) -> Vec<I> {
        let mut out = Vec::with_capacity(k);
        if k == 0 || self.live == 0 {
            return out;
        }
        let n = self.base.entries.len();
        let bstart = self.base.entries.partition_point(|e| e.ring < pos);
        let estart = self.extra.partition_point(|e| e.0 < pos);
        let m = self.extra.len();
        let (mut bi, mut ei) = (0usize, 0usize);
        // Keys (wrapped, ring, id) order the two cyclic sequences from `pos`.
        while out.len() < k && (bi < n || ei < m) {
            let b = (bi < n).then(|| {
                let p = (bstart + bi) % n;
                (
                    bstart + bi >= n,
                    self.base.entries[p].ring,
                    &self.base.entries[p].id,
                    p,
                )
            });
            let e = (ei < m).then(|| {
                let p = (estart + ei) % m;
                (estart + ei >= m, self.extra[p].0, &self.extra[p].1)
            });
            let take_base = match (&b, &e) {
                (Some(b), Some(e)) => (b.0, b.1, b.2) < (e.0, e.1, e.2),
                (Some(_), None) => true,
                _ => false,
            };
            if take_base {
                bi += 1;
                if let Some((_, _, _, p)) = b
                    && let Some((id, _)) = self.base_live(p)
                {
                    out.push(id.clone());
                }
            } else {
                ei += 1;
                if let Some((_, _, id)) = e {
                    out.push(id.clone());
                }
            }
        }
        out
    }

    /// Ring position of the nearest live node strictly before `pos` (cyclically) other than
    /// `except`; `None` when there is none.
    pub fn predecessor(&self, pos: u64, except: &I) -> Option<u64> {
        let n = self.base.entries.len();
        let mut best: Option<(bool, u64)> = None; // (wrapped, ring): larger is nearer
        let bend = self.base.entries.partition_point(|e| e.ring < pos);
        for j in 0..n {
            let p = (bend + n - 1 - j) % n;
            let wrapped = j >= bend;
            let e = &self.base.entries[p];
            if &e.id != except && self.base_live(p).is_some() {
                best = Some((!wrapped, e.ring));
                break;
            }
        }
        let m = self.extra.len();
        let eend = self.extra.partition_point(|e| e.0 < pos);
        for j in 0..m {
            let p = (eend + m - 1 - j) % m;
            let wrapped = j >= eend;
            if &self.extra[p].1 != except {
                let cand = (!wrapped, self.extra[p].0);
                if best.is_none_or(|b| cand > b) {
                    best = Some(cand);
                }
                break;
            }
        }
        best.map(|(_, ring)| ring)
    }

    /// Up to `want` distinct live nodes accepted by `accept`, drawn pseudo-randomly from `rng`.
    /// With `pool` (a label key and value), draws only among nodes of the table carrying that
    /// label (plus the view's own additions); `accept` must then require that label. Probes a
    /// bounded number of times; when that finds too few and `exhaustive` is set, scans the
    /// pool (or every live node) and keeps the `want` with the smallest pseudo-random weights,
    /// so a sparse eligible set is still found.
    pub fn sample(
        &self,
        rng: &mut SplitMix,
        want: usize,
        pool: Option<&(String, String)>,
        exhaustive: bool,
        mut accept: impl FnMut(&I, &NodeInfo) -> bool,
        out: &mut Vec<I>,
    ) {
        let start = out.len();
        if want == 0 {
            return;
        }
        let empty = Vec::new();
        let positions: Option<&Vec<u32>> =
            pool.map(|k| self.base.by_label.get(k).unwrap_or(&empty));
        let base_n = positions.map_or(self.base.entries.len(), Vec::len);
        // A pool of the table misses the nodes that joined or changed their info since it
        // was built: draw among them too (`accept` checks their current labels).
        let relabelled: &[(u64, I)] = if pool.is_some() {
            &self.relabelled
        } else {
            &[]
        };
        let extra_n = self.extra.len();
        let population = base_n + extra_n + relabelled.len();
        if population == 0 {
            return;
        }
        let probes = want * 16 + 32;
        for _ in 0..probes {
            if out.len() - start >= want {
                return;
            }
            let r = rng.below(population);
            let cand = if r < base_n {
                let p = positions.map_or(r, |v| v[r] as usize);
                self.base_live(p).map(|(id, info)| (id, &**info))
            } else if r < base_n + extra_n {
                let id = &self.extra[r - base_n].1;
                self.info(id).map(|info| (id, &**info))
            } else {
                let id = &relabelled[r - base_n - extra_n].1;
                self.info(id).map(|info| (id, &**info))
            };
            if let Some((id, info)) = cand
                && !out.contains(id)
                && accept(id, info)
            {
                out.push(id.clone());
            }
        }
        if !exhaustive {
            return;
        }
        // Sparse: scan the pool, ordered by a pseudo-random weight.
        let seed = rng.next_u64();
        let mut all: Vec<(u64, &I)> = Vec::new();
        match positions {
            Some(v) => {
                for &p in v {
                    let p = p as usize;
                    if let Some((id, info)) = self.base_live(p)
                        && !out.contains(id)
                        && accept(id, info)
                    {
                        all.push((mix(seed, self.base.entries[p].ring), id));
                    }
                }
                for (ring, id) in self.extra.iter().chain(relabelled) {
                    if let Some(info) = self.info(id)
                        && !out.contains(id)
                        && !all.iter().any(|(_, a)| *a == id)
                        && accept(id, info)
                    {
                        all.push((mix(seed, *ring), id));
                    }
                }
            }
            None => {
                for (ring, id, info) in self.live_nodes() {
                    if !out.contains(id) && accept(id, info) {
                        all.push((mix(seed, ring), id));
                    }
                }
            }
        }
        let need = want - (out.len() - start);
        if all.len() > need {
            all.select_nth_unstable_by(need, |a, b| a.cmp(b));
            all.truncate(need);
        }
        all.sort();
        out.extend(all.into_iter().map(|(_, id)| id.clone()));
    }

    /// The rarest of these label pairs among live nodes (the best pool to sample from), with
    /// about how many nodes carry it: the table's count (nodes gone down included) plus the
    /// joined and changed nodes that carry it now.
    pub fn rarest<'a>(
        &self,
        labels: impl Iterator<Item = (&'a String, &'a String)>,
    ) -> Option<((String, String), usize)> {
        labels
            .map(|(k, v)| {
                let key = (k.clone(), v.clone());
                let fresh = self
                    .extra
                    .iter()
                    .chain(&self.relabelled)
                    .filter(|(_, id)| self.info(id).is_some_and(|i| i.labels.get(k) == Some(v)))
                    .count();
                let n = self.base.by_label.get(&key).map_or(0, Vec::len) + fresh;
                (key, n)
            })
            .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
    }
}

/// Merges two iterators sorted by (ring, id).
fn merge_sorted<'a, I: Ord + 'a, T: 'a>(
    a: impl Iterator<Item = (u64, &'a I, T)>,
    b: impl Iterator<Item = (u64, &'a I, T)>,
) -> impl Iterator<Item = (u64, &'a I, T)> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => (x.0, x.1) <= (y.0, y.1),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        if take_a { a.next() } else { b.next() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(zone: &str) -> NodeInfo {
        NodeInfo {
            name: String::new(),
            labels: [("zone".to_owned(), zone.to_owned())].into(),
            allocatable: crate::types::Resources {
                cpu: 1000,
                memory: 1000,
            },
        }
    }

    fn reference_successors(live: &[(u64, u32)], pos: u64, k: usize) -> Vec<u32> {
        let mut v: Vec<(u64, u32)> = live.to_vec();
        v.sort();
        let start = v.partition_point(|e| e.0 < pos);
        (0..v.len().min(k))
            .map(|j| v[(start + j) % v.len()].1)
            .collect()
    }

    #[test]
    fn overlay_matches_a_plain_ring() {
        let table = Arc::new(MemberTable::new((0u32..50).map(|i| (i, info("a")))));
        let mut m = Membership::new(table);
        let mut live: BTreeMap<u32, ()> = (0u32..50).map(|i| (i, ())).collect();
        let mut rng = SplitMix::new(3);
        for step in 0..400 {
            let id = rng.below(80) as u32;
            if rng.below(2) == 0 {
                m.up(&id, info(if step % 3 == 0 { "a" } else { "b" }));
                live.insert(id, ());
            } else {
                m.down(&id);
                live.remove(&id);
            }
            assert_eq!(m.live_count(), live.len());
            let ring: Vec<(u64, u32)> = live.keys().map(|&i| (node_ring(&i), i)).collect();
            let pos = rng.next_u64();
            assert_eq!(m.successors(pos, 5), reference_successors(&ring, pos, 5));
            let listed: Vec<u32> = m.live_nodes().map(|(_, id, _)| *id).collect();
            let mut sorted = ring.clone();
            sorted.sort();
            assert_eq!(listed, sorted.iter().map(|e| e.1).collect::<Vec<_>>());
            // Predecessor of a live node's position, excluding it.
            if let Some(&(p, id)) = sorted.first() {
                let expect = sorted
                    .iter()
                    .rev()
                    .find(|e| e.1 != id && e.0 < p)
                    .or_else(|| sorted.iter().rev().find(|e| e.1 != id))
                    .map(|e| e.0);
                assert_eq!(m.predecessor(p, &id), expect);
            }
        }
    }

    #[test]
    fn label_pools_include_joined_and_relabelled_nodes() {
        // A node's view starts from an empty table: everyone joins through `up`, which is how
        // a real node learns its mesh. Pools must still find them.
        let mut m = Membership::new(Arc::new(MemberTable::new(std::iter::empty())));
        for i in 0u32..5 {
            m.up(&i, info(if i == 3 { "fast" } else { "plain" }));
        }
        let key = ("zone".to_owned(), "fast".to_owned());
        let fast = [(&key.0, &key.1)];
        assert_eq!(m.rarest(fast.into_iter()), Some((key.clone(), 1)));
        let mut out = Vec::new();
        m.sample(
            &mut SplitMix::new(1),
            1,
            Some(&key),
            false,
            |_, i| i.labels["zone"] == "fast",
            &mut out,
        );
        assert_eq!(out, vec![3]);

        // A node of the table that changes its labels is found in its new pool, and no longer
        // counted once it goes down.
        let table = Arc::new(MemberTable::new((0u32..50).map(|i| (i, info("plain")))));
        let mut m = Membership::new(table);
        m.up(&7, info("fast"));
        assert_eq!(m.rarest(fast.into_iter()), Some((key.clone(), 1)));
        let mut out = Vec::new();
        m.sample(
            &mut SplitMix::new(2),
            1,
            Some(&key),
            true,
            |_, i| i.labels["zone"] == "fast",
            &mut out,
        );
        assert_eq!(out, vec![7]);
        m.down(&7);
        assert_eq!(m.rarest(fast.into_iter()), Some((key.clone(), 0)));
        m.up(&7, info("plain"));
        assert!(m.relabelled.is_empty(), "back to the table's info");
    }

    #[test]
    fn sampling_finds_sparse_nodes_and_respects_the_filter() {
        let table =
            Arc::new(MemberTable::new((0u32..1000).map(|i| {
                (i, info(if i % 100 == 0 { "rare" } else { "common" }))
            })));
        let m = Membership::new(table);
        let mut rng = SplitMix::new(9);
        let mut out = Vec::new();
        m.sample(
            &mut rng,
            20,
            None,
            true,
            |_, i| i.labels["zone"] == "rare",
            &mut out,
        );
        assert_eq!(
            out.len(),
            10,
            "all ten rare nodes, found by the fallback scan"
        );
        assert!(out.iter().all(|i| i % 100 == 0));
        let mut out = Vec::new();
        let pool = m
            .rarest([(&"zone".to_owned(), &"rare".to_owned())].into_iter())
            .map(|p| p.0);
        m.sample(
            &mut rng,
            3,
            pool.as_ref(),
            true,
            |_, i| i.labels["zone"] == "rare",
            &mut out,
        );
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|i| i % 100 == 0));
    }
}
