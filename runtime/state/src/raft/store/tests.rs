//! Storage tests: openraft's conformance suite, and what survives a restart.

#![allow(clippy::unwrap_used)]

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::*;

const PEER: &str = "12D3KooWTestNodeA";

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let s = open(dir.path(), PEER)
            .await
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, s.log, s.sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn put(key: &str, value: &[u8], if_revision: Option<u64>) -> KvCommand {
    KvCommand::Put {
        key: key.into(),
        value: value.to_vec(),
        if_revision,
    }
}

fn del(key: &str, if_revision: Option<u64>) -> KvCommand {
    KvCommand::Delete {
        key: key.into(),
        if_revision,
    }
}

/// Entries at indexes `from..`, term 1, as a leader would write them.
fn entries(from: u64, cmds: Vec<KvCommand>) -> Vec<Entry> {
    cmds.into_iter()
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: openraft::testing::log_id(1, 0, from + i as u64),
            payload: EntryPayload::Normal(c),
        })
        .collect()
}

fn membership_entry(index: u64, voters: &[&str]) -> Entry {
    let nodes: std::collections::BTreeMap<NodeId, RaftPeer> = voters
        .iter()
        .map(|p| (super::super::types::node_id(p), RaftPeer::new(p).unwrap()))
        .collect();
    let ids = nodes.keys().copied().collect();
    Entry {
        log_id: openraft::testing::log_id(1, 0, index),
        payload: EntryPayload::Membership(openraft::Membership::new(vec![ids], nodes)),
    }
}

async fn wait_released(w: &Weak<Database>) {
    for _ in 0..500 {
        if w.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the database was not released");
}

#[tokio::test]
async fn conditional_writes_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), PEER).await.unwrap();
    let r =
        s.sm.apply(entries(
            1,
            vec![
                put("a", b"1", None),    // rev 1
                put("b", b"2", Some(0)), // create-only: rev 2
                put("b", b"3", Some(0)), // exists: 412
                put("a", b"4", Some(1)), // matches: rev 3
                put("a", b"5", Some(1)), // stale: 412
                del("zz", None),         // absent
                del("b", Some(7)),       // stale: 412
                del("b", Some(2)),       // rev 4
                put("c", b"6", None),    // rev 5
            ],
        ))
        .await
        .unwrap();
    use ApplyResult::*;
    assert_eq!(
        r,
        vec![
            Written { revision: 1 },
            Written { revision: 2 },
            PreconditionFailed {
                key: "b".into(),
                expected: 0,
                current: 2
            },
            Written { revision: 3 },
            PreconditionFailed {
                key: "a".into(),
                expected: 1,
                current: 3
            },
            NotFound { revision: 3 },
            PreconditionFailed {
                key: "b".into(),
                expected: 7,
                current: 2
            },
            Written { revision: 4 },
            Written { revision: 5 },
        ]
    );
    let a = s.reader.get("a").unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.revision), (&b"4"[..], 3));
    assert_eq!(s.reader.get("b").unwrap(), None);
    let (rev, size) = s.reader.revision_and_size().unwrap();
    assert_eq!(rev, 5);
    assert_eq!(size, 2 * (1 + 1 + ENTRY_OVERHEAD_BYTES));
    let (applied, _) = s.sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(9));
}

/// A batch applies its writes in order, exactly as the same writes in separate entries
/// would: the same results, revisions and final state on every replica.
#[tokio::test]
async fn a_batch_applies_like_its_writes_one_by_one() {
    let writes = vec![
        put("a", b"1", None),
        put("b", b"2", Some(0)),
        put("b", b"3", Some(0)), // refused alone: the others still apply
        put("a", b"4", Some(1)),
        del("zz", None),
        del("b", Some(2)),
        put("c", b"6", None),
    ];
    let (one_dir, batch_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = open(one_dir.path(), PEER).await.unwrap();
    let mut batch = open(batch_dir.path(), PEER).await.unwrap();
    let singles = one.sm.apply(entries(1, writes.clone())).await.unwrap();
    let batched = batch
        .sm
        .apply(entries(1, vec![KvCommand::Batch(writes)]))
        .await
        .unwrap();
    assert_eq!(batched, vec![ApplyResult::Batch(singles.clone())]);
    assert_eq!(
        singles[2],
        ApplyResult::PreconditionFailed {
            key: "b".into(),
            expected: 0,
            current: 2,
        }
    );
    assert_eq!(singles[6], ApplyResult::Written { revision: 5 });
    let everything = |s: &Storage| {
        let (items, _, revision) = s.reader.list("", None, 100).unwrap();
        let items: Vec<(String, Vec<u8>, u64)> = items
            .into_iter()
            .map(|i| (i.key, i.value, i.revision))
            .collect();
        (items, revision)
    };
    assert_eq!(everything(&one), everything(&batch));
    assert_eq!(everything(&batch).0.len(), 2, "{:?}", everything(&batch));
    // Nested batches are never proposed; one changes nothing, identically everywhere.
    let nested = batch
        .sm
        .apply(entries(
            2,
            vec![KvCommand::Batch(vec![KvCommand::Batch(vec![put(
                "n", b"x", None,
            )])])],
        ))
        .await
        .unwrap();
    assert_eq!(nested, vec![ApplyResult::Batch(vec![ApplyResult::Nothing])]);
    assert_eq!(everything(&batch).0.len(), 2);
}

#[tokio::test]
async fn listing_pages_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), PEER).await.unwrap();
    let cmds = ["app/1", "app/2", "app/3", "apq", "b"]
        .iter()
        .map(|k| put(k, k.as_bytes(), None))
        .collect();
    s.sm.apply(entries(1, cmds)).await.unwrap();
    let (items, next, rev) = s.reader.list("app/", None, 2).unwrap();
    assert_eq!(rev, 5);
    let keys: Vec<_> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["app/1", "app/2"]);
    assert_eq!(next.as_deref(), Some("app/2"));
    let (items, next, _) = s.reader.list("app/", next.as_deref(), 2).unwrap();
    let keys: Vec<_> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["app/3"]);
    assert_eq!(next, None);
    let (items, _, _) = s.reader.list("", None, 100).unwrap();
    assert_eq!(items.len(), 5);
}

#[tokio::test]
async fn state_is_bounded_identically_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), PEER).await.unwrap();
    let value = vec![7u8; crate::raft::types::MAX_VALUE_BYTES];
    let per_key = cost("k000", value.len());
    let fit = (MAX_STATE_BYTES / per_key) as usize;
    let cmds = (0..=fit)
        .map(|i| put(&format!("k{i:03}"), &value, None))
        .collect();
    let r = s.sm.apply(entries(1, cmds)).await.unwrap();
    assert!(
        r[..fit]
            .iter()
            .all(|r| matches!(r, ApplyResult::Written { .. }))
    );
    assert!(
        matches!(&r[fit], ApplyResult::StateFull { limit, .. } if *limit == MAX_STATE_BYTES),
        "{:?}",
        r[fit]
    );
    // Overwriting with a smaller value, or deleting, is still allowed when full.
    let r =
        s.sm.apply(entries(
            fit as u64 + 2,
            vec![put("k000", b"x", None), del("k001", None)],
        ))
        .await
        .unwrap();
    assert!(
        r.iter().all(|r| matches!(r, ApplyResult::Written { .. })),
        "{r:?}"
    );
}

#[tokio::test]
async fn snapshots_carry_the_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), PEER).await.unwrap();
    let mut all = vec![membership_entry(1, &[PEER, "12D3KooWTestNodeB"])];
    all.extend(entries(
        2,
        vec![
            put("x", b"1", None),
            put("y", &[0u8, 255, 3], None),
            del("x", None),
        ],
    ));
    s.sm.apply(all).await.unwrap();
    let snap =
        s.sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(4));

    let dir2 = tempfile::tempdir().unwrap();
    let mut f = open(dir2.path(), "12D3KooWTestNodeB").await.unwrap();
    let mut rx = f.sm.begin_receiving_snapshot().await.unwrap();
    *rx = *snap.snapshot;
    f.sm.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(f.reader.get("x").unwrap(), None);
    let y = f.reader.get("y").unwrap().unwrap();
    assert_eq!((y.value, y.revision), (vec![0u8, 255, 3], 2));
    assert_eq!(
        f.reader.revision_and_size().unwrap(),
        s.reader.revision_and_size().unwrap()
    );
    let (applied, m) = f.sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(4));
    assert_eq!(m.membership().voter_ids().count(), 2);
    let cur = f.sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(cur.meta, snap.meta);

    // Garbage is refused, not half-installed.
    let mut rx = f.sm.begin_receiving_snapshot().await.unwrap();
    *rx = Cursor::new(vec![0xff; 10]);
    assert!(f.sm.install_snapshot(&snap.meta, rx).await.is_err());
    assert!(f.reader.get("y").unwrap().is_some());
}

#[tokio::test]
async fn state_vote_and_snapshot_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path(), PEER).await.unwrap();
        s.log.save_vote(&Vote::new(3, 42)).await.unwrap();
        s.log
            .save_committed(Some(openraft::testing::log_id(1, 0, 2)))
            .await
            .unwrap();
        s.sm.apply(entries(1, vec![put("k", b"v", None), put("k", b"w", None)]))
            .await
            .unwrap();
        s.sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let released = s.released.clone();
        drop(s);
        wait_released(&released).await;
    }
    let mut s = open(dir.path(), PEER).await.unwrap();
    assert_eq!(s.log.read_vote().await.unwrap(), Some(Vote::new(3, 42)));
    assert_eq!(
        s.log.read_committed().await.unwrap().map(|l| l.index),
        Some(2)
    );
    let k = s.reader.get("k").unwrap().unwrap();
    assert_eq!((k.value.as_slice(), k.revision), (&b"w"[..], 2));
    let snap = s.sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
}

#[tokio::test]
async fn data_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), PEER).await.unwrap();
    let released = s.released.clone();
    drop(s);
    wait_released(&released).await;
    let e = open(dir.path(), "12D3KooWTestNodeB").await.err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains(PEER) && msg.contains("12D3KooWTestNodeB") && msg.contains(DB_FILE),
        "{msg}"
    );
}
