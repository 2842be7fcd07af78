use proptest::prelude::*;

use super::*;

fn ts(physical: u64, logical: u32, node: u64) -> Timestamp {
    Timestamp {
        physical,
        logical,
        node,
    }
}

fn record() -> impl Strategy<Value = Record> {
    (
        prop::sample::select(vec!["a", "b", "c", "d", "e/1", "e/2"]),
        0u64..6,
        0u32..3,
        0u64..3,
        prop::option::weighted(0.7, prop::collection::vec(0u8..4, 0..3)),
    )
        .prop_map(|(k, p, l, n, v)| Record {
            key: k.to_owned(),
            ts: ts(p, l, n),
            value: v,
        })
}

fn map_of(records: &[Record]) -> LwwMap {
    let mut m = LwwMap::new(Limits::default());
    for r in records {
        m.merge(r.clone(), 0).expect("within limits");
    }
    m
}

/// Merge the state of `b` into a copy of `a` (state-based merge).
fn join(a: &LwwMap, b: &LwwMap) -> LwwMap {
    let mut out = a.clone();
    for (k, e) in b.iter() {
        out.merge(e.to_record(k), 0).expect("within limits");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative(a in prop::collection::vec(record(), 0..12), b in prop::collection::vec(record(), 0..12)) {
        let (ma, mb) = (map_of(&a), map_of(&b));
        prop_assert_eq!(join(&ma, &mb), join(&mb, &ma));
    }

    #[test]
    fn merge_is_associative(
        a in prop::collection::vec(record(), 0..10),
        b in prop::collection::vec(record(), 0..10),
        c in prop::collection::vec(record(), 0..10),
    ) {
        let (ma, mb, mc) = (map_of(&a), map_of(&b), map_of(&c));
        prop_assert_eq!(join(&join(&ma, &mb), &mc), join(&ma, &join(&mb, &mc)));
    }

    #[test]
    fn merge_is_idempotent(a in prop::collection::vec(record(), 0..12), b in prop::collection::vec(record(), 0..12)) {
        let ma = map_of(&a);
        prop_assert_eq!(join(&ma, &ma), ma.clone());
        let mab = join(&ma, &map_of(&b));
        prop_assert_eq!(join(&mab, &map_of(&b)), mab);
    }

    #[test]
    fn any_delivery_order_gives_the_same_map(
        (records, shuffled) in prop::collection::vec(record(), 0..20)
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        dup in prop::collection::vec(0usize..20, 0..5),
    ) {
        let reference = map_of(&records);
        // Same records, another order, some delivered twice.
        let mut delivered = shuffled.clone();
        for i in dup {
            if let Some(r) = shuffled.get(i) {
                delivered.push(r.clone());
            }
        }
        let m = map_of(&delivered);
        prop_assert_eq!(&m, &reference);
        prop_assert_eq!(m.tombstones(), reference.tombstones());
        prop_assert_eq!(m.total_bytes(), reference.total_bytes());
        // The winner of each key is the maximum of its versions.
        for (k, e) in m.iter() {
            let best = records.iter().filter(|r| &r.key == k).max_by(|x, y| {
                version_cmp(&x.ts, x.value.as_deref(), &y.ts, y.value.as_deref())
            });
            prop_assert_eq!(best.map(|r| (r.ts, r.value.clone())), Some((e.ts, e.value.clone())));
        }
    }
}

#[test]
fn a_tombstone_wins_a_tie_and_a_newer_value_beats_a_tombstone() {
    let mut m = LwwMap::new(Limits::default());
    m.merge(
        Record {
            key: "k".into(),
            ts: ts(5, 0, 1),
            value: Some(b"v".to_vec()),
        },
        0,
    )
    .expect("ok");
    assert_eq!(
        m.merge(
            Record {
                key: "k".into(),
                ts: ts(5, 0, 1),
                value: None
            },
            0
        ),
        Ok(Merged::Replaced)
    );
    assert_eq!(m.get_value("k"), None);
    assert_eq!(m.tombstones(), 1);
    assert_eq!(
        m.merge(
            Record {
                key: "k".into(),
                ts: ts(4, 0, 1),
                value: Some(b"old".to_vec())
            },
            0
        ),
        Ok(Merged::Unchanged)
    );
    m.merge(
        Record {
            key: "k".into(),
            ts: ts(6, 0, 1),
            value: Some(b"new".to_vec()),
        },
        0,
    )
    .expect("ok");
    assert_eq!(m.get_value("k"), Some((&b"new"[..], ts(6, 0, 1))));
    assert_eq!(m.tombstones(), 0);
}

#[test]
fn limits_are_typed_errors_naming_the_value() {
    let limits = Limits {
        max_key_len: 8,
        max_value_len: 4,
        max_keys: 2,
        max_total_bytes: 2 * ENTRY_OVERHEAD + 20,
        ..Limits::default()
    };
    let mut m = LwwMap::new(limits);
    let rec = |k: &str, v: &[u8], p: u64| Record {
        key: k.into(),
        ts: ts(p, 0, 0),
        value: Some(v.to_vec()),
    };
    assert_eq!(m.merge(rec("", b"", 1), 0), Err(KvError::EmptyKey));
    let e = m.merge(rec("123456789", b"", 1), 0).expect_err("long");
    assert!(e.to_string().contains("9 bytes"), "{e}");
    let e = m.merge(rec("a\nb", b"", 1), 0).expect_err("control");
    assert!(e.to_string().contains("a\\nb"), "{e}");
    let e = m.merge(rec("a", b"12345", 1), 0).expect_err("value");
    assert!(
        e.to_string().contains("5 bytes") && e.to_string().contains("\"a\""),
        "{e}"
    );
    m.merge(rec("a", b"1234", 1), 0).expect("fits");
    m.merge(rec("b", b"1234", 1), 0).expect("fits");
    let e = m.merge(rec("c", b"", 1), 0).expect_err("keys");
    assert!(
        matches!(
            e,
            KvError::TooManyKeys {
                count: 3,
                limit: 2,
                ..
            }
        ),
        "{e}"
    );
    // Replacing an existing key is fine; growing the total past the limit is not.
    m.merge(rec("a", b"", 2), 0).expect("shrinks");
    let mut m2 = LwwMap::new(Limits {
        max_total_bytes: ENTRY_OVERHEAD + 3,
        ..Limits::default()
    });
    let e = m2.merge(rec("k", b"123", 1), 0).expect_err("bytes");
    assert!(matches!(e, KvError::TooManyBytes { .. }), "{e}");
    assert!(m2.is_empty());
}

#[test]
fn list_pages_by_prefix_with_a_continuation_token_and_skips_tombstones() {
    let mut m = LwwMap::new(Limits::default());
    for i in 0..25 {
        let v = if i % 5 == 0 {
            None
        } else {
            Some(vec![i as u8])
        };
        m.merge(
            Record {
                key: format!("p/{i:02}"),
                ts: ts(1, 0, 0),
                value: v,
            },
            0,
        )
        .expect("ok");
    }
    m.merge(
        Record {
            key: "q".into(),
            ts: ts(1, 0, 0),
            value: Some(vec![1]),
        },
        0,
    )
    .expect("ok");
    let mut keys = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = m.list("p/", after.as_deref(), 7).expect("list");
        pages += 1;
        assert!(page.items.len() <= 7);
        keys.extend(page.items.iter().map(|i| i.key.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(keys.len(), 20, "{keys:?}");
    assert_eq!(pages, 3);
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
    assert!(keys.iter().all(|k| k.starts_with("p/")));
    let e = m.list(&"x".repeat(513), None, 10).expect_err("prefix");
    assert!(matches!(e, KvError::PrefixTooLong { len: 513, .. }));
}

#[test]
fn tombstones_are_collected_by_local_application_time() {
    let mut m = LwwMap::new(Limits::default());
    m.merge(
        Record {
            key: "a".into(),
            ts: ts(1, 0, 0),
            value: None,
        },
        100,
    )
    .expect("ok");
    m.merge(
        Record {
            key: "b".into(),
            ts: ts(1, 0, 0),
            value: None,
        },
        200,
    )
    .expect("ok");
    m.merge(
        Record {
            key: "c".into(),
            ts: ts(1, 0, 0),
            value: Some(vec![]),
        },
        0,
    )
    .expect("ok");
    let (keys, newest) = m.collect_tombstones(150, 10);
    assert_eq!(keys, vec!["a".to_owned()]);
    assert_eq!(newest, Some(100));
    assert_eq!(m.len(), 2);
    assert_eq!(m.tombstones(), 1);
}

#[test]
fn records_round_trip_through_the_codec_and_refuse_garbage() {
    let r = Record {
        key: "k/é".into(),
        ts: ts(9, 1, 2),
        value: Some(vec![1, 2, 3]),
    };
    let mut w = codec::Writer::new();
    r.encode(&mut w);
    let bytes = w.finish();
    assert_eq!(bytes.len(), r.encoded_len());
    let mut rd = codec::Reader::new(&bytes);
    assert_eq!(Record::decode(&mut rd).expect("decode"), r);
    for cut in 0..bytes.len() {
        let mut rd = codec::Reader::new(&bytes[..cut]);
        assert!(Record::decode(&mut rd).is_err(), "cut at {cut}");
    }
}
