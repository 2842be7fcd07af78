//! In-process meshes on loopback TCP: commands, discovery, admission, validation, membership.

mod common;

use std::time::{Duration, Instant};

use beemesh_manifest::SecretKey;
use beemesh_mesh::{Keypair, MeshError, PeerId, Validation, load_or_create_identity};
use common::*;
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(15);

fn node_config(announcement: &[u8]) -> beemesh_mesh::MeshConfig {
    let mut cfg = config(Keypair::generate_ed25519(), fleet_ticket(&admission()));
    cfg.announcement = announcement.to_vec();
    cfg
}

fn joining(announcement: &[u8], bootstrap: &TestNode) -> beemesh_mesh::MeshConfig {
    let mut cfg = node_config(announcement);
    cfg.bootstrap = vec![bootstrap.addr.clone()];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_commands_work_between_two_nodes() {
    init_tracing();
    let mut cfg = node_config(b"node-a");
    cfg.listen
        .push("/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr"));
    let a = TestNode::start(cfg).await;
    let b = TestNode::start(joining(b"node-b", &a)).await;

    // Both transports are bound before spawn returns.
    let addrs = a.handle.listen_addrs().await.expect("addrs");
    assert!(
        addrs.iter().any(|x| x.to_string().contains("/tcp/")),
        "{addrs:?}"
    );
    assert!(
        addrs.iter().any(|x| x.to_string().contains("/quic-v1")),
        "{addrs:?}"
    );

    // Membership: each lists the other with its announcement.
    until_full_mesh(&[&a, &b], WAIT).await;
    let peers = a.handle.peers().await.expect("peers");
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].peer_id, b.peer);
    assert_eq!(peers[0].announcement, b"node-b");
    assert!(peers[0].connected);
    assert!(peers[0].last_seen.elapsed() < Duration::from_secs(5));
    // (Events reach the log through the consumer task, a moment after the state changed.)
    eventually("PeerUp", WAIT, || async {
        a.seen(|s| *s == Seen::Up(b.peer, b"node-b".to_vec()))
    })
    .await;
    assert!(
        a.handle
            .connected_peers()
            .await
            .expect("connected")
            .contains(&b.peer)
    );

    // A new announcement reaches the other side.
    a.handle
        .set_announcement(b"node-a v2".to_vec())
        .await
        .expect("set");
    eventually("the new announcement", WAIT, || async {
        b.handle
            .peers()
            .await
            .expect("peers")
            .iter()
            .any(|p| p.announcement == b"node-a v2")
    })
    .await;
    eventually("PeerUpdated", WAIT, || async {
        b.seen(|s| *s == Seen::Updated(a.peer, b"node-a v2".to_vec()))
    })
    .await;

    // Publish / subscribe.
    a.handle.subscribe(TOPIC).await.expect("subscribe");
    b.handle.subscribe(TOPIC).await.expect("subscribe");
    publish_until_received(&a, &b, "hello").await;
    assert!(
        b.seen(|s| matches!(s, Seen::Gossip { topic, source, via, .. }
        if topic == TOPIC && *source == a.peer && *via == a.peer))
    );

    // Records.
    let key = b"/beemesh/manifest/default/web".to_vec();
    a.handle
        .put_record(key.clone(), b"signed manifest".to_vec())
        .await
        .expect("put");
    assert_eq!(
        a.handle.get_record(key.clone()).await.expect("get"),
        Some(b"signed manifest".to_vec())
    );
    assert_eq!(
        b.handle.get_record(key).await.expect("get"),
        Some(b"signed manifest".to_vec())
    );
    assert_eq!(
        b.handle
            .get_record(b"/beemesh/manifest/none/x".to_vec())
            .await
            .expect("get"),
        None
    );

    // Request / response.
    let answer = a
        .handle
        .request(b.peer, ECHO, b"ping".to_vec())
        .await
        .expect("echo");
    assert_eq!(answer, b"ping");
    match a.handle.request(b.peer, "/beemesh/nope/1", vec![]).await {
        Err(MeshError::Remote { peer, reason, .. }) => {
            assert_eq!(peer, b.peer);
            assert!(
                reason.contains("unknown protocol /beemesh/nope/1"),
                "{reason}"
            );
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let stranger = PeerId::random();
    assert!(matches!(
        a.handle.request(stranger, ECHO, vec![]).await,
        Err(MeshError::NotAdmitted { peer }) if peer == stranger
    ));

    // Input is checked before it reaches the network.
    assert!(matches!(
        a.handle
            .publish(TOPIC, vec![0; beemesh_mesh::DEFAULT_MAX_MESSAGE_SIZE + 1])
            .await,
        Err(MeshError::TooLarge { .. })
    ));
    assert!(matches!(
        a.handle.subscribe("/beemesh/announce/1").await,
        Err(MeshError::Reserved { .. })
    ));
    assert!(matches!(
        a.handle.subscribe("chat").await,
        Err(MeshError::BadName { .. })
    ));
    assert!(matches!(
        a.handle.request(b.peer, "/beemesh/sync", vec![]).await,
        Err(MeshError::BadName { .. })
    ));
    assert!(matches!(
        a.handle.publish("/beemesh/unheard/1", b"x".to_vec()).await,
        Err(MeshError::NoPeers { .. })
    ));

    // Shutdown stops the loop; the handle then reports it.
    a.shutdown.cancel();
    tokio::time::timeout(WAIT, a.handle.stopped())
        .await
        .expect("the loop stops");
    assert!(matches!(a.handle.peers().await, Err(MeshError::Stopped)));
    b.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_through_one_bootstrap_peer_over_tcp_and_quic() {
    init_tracing();
    let mut a_cfg = node_config(b"a");
    a_cfg
        .listen
        .push("/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr"));
    let a = TestNode::start(a_cfg).await;
    let b = TestNode::start(joining(b"b", &a)).await;
    // C reaches A over QUIC.
    let quic = a
        .handle
        .listen_addrs()
        .await
        .expect("addrs")
        .into_iter()
        .find(|x| x.to_string().contains("quic-v1"))
        .expect("a QUIC address")
        .with(libp2p::multiaddr::Protocol::P2p(a.peer));
    let mut c_cfg = node_config(b"c");
    c_cfg.bootstrap = vec![quic];
    let c = TestNode::start(c_cfg).await;
    until_full_mesh(&[&a, &b, &c], WAIT).await;
    let seen_by_b = b.handle.peers().await.expect("peers");
    let c_info = seen_by_b
        .iter()
        .find(|p| p.peer_id == c.peer)
        .expect("b knows c");
    assert_eq!(c_info.announcement, b"c");
    assert!(!c_info.addrs.is_empty(), "announcements carry addresses");
    for n in [&a, &b, &c] {
        n.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_valid_ticket_are_refused() {
    init_tracing();
    let adm = admission();
    let a = TestNode::start(node_config(b"a")).await;
    let b = TestNode::start(joining(b"b", &a)).await;
    a.handle.subscribe(TOPIC).await.expect("subscribe");
    b.handle.subscribe(TOPIC).await.expect("subscribe");

    let foreign = SecretKey::from_seed([7; 32]);
    let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let mut rogues = Vec::new();
    for (kind, expect) in [
        ("none", "presented no admission ticket"),
        ("expired", "expired"),
        ("other-peer", "is bound to peer"),
        ("foreign-key", "not by the admission key"),
        // The admission key's own fleet ticket, but without its ticket key (copied from a
        // host, say): it cannot prove anything.
        ("fleet-without-key", "without a proof"),
        // A fleet ticket of the old format, a bearer credential.
        ("bearer", "reissue it with `beemesh ticket issue`"),
    ] {
        let kp = Keypair::generate_ed25519();
        let ticket = match kind {
            "none" => Creds::none(),
            "expired" => ticket_for(&adm, kp.public().to_peer_id(), Some(past)),
            "other-peer" => ticket_for(&adm, PeerId::random(), None),
            "fleet-without-key" => Creds {
                key: None,
                ..fleet_ticket(&adm)
            },
            "bearer" => bearer_ticket(&adm),
            _ => fleet_ticket(&foreign),
        };
        let mut cfg = config(kp, ticket);
        cfg.bootstrap = vec![a.addr.clone()];
        let rogue = TestNode::start(cfg).await;
        rogue.handle.subscribe(TOPIC).await.expect("subscribe");
        // It tries to talk the whole time, from before its rejection on.
        let h = rogue.handle.clone();
        tokio::spawn(async move {
            for i in 0.. {
                if matches!(
                    h.publish(TOPIC, format!("rogue-{i}").into_bytes()).await,
                    Err(MeshError::Stopped)
                ) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        rogues.push((kind, expect, rogue));
    }

    for (kind, expect, rogue) in &rogues {
        eventually(&format!("the {kind} rogue to be rejected"), WAIT, || async {
            a.seen(|s| matches!(s, Seen::Rejected(p, reason) if *p == rogue.peer && reason.contains(expect)))
        })
        .await;
        // It is told why.
        eventually(&format!("the {kind} rogue to learn why"), WAIT, || async {
            rogue.seen(|s| matches!(s, Seen::Refused(p, _) if *p == a.peer))
        })
        .await;
    }

    // The admitted peer's messages still flow; the rogues' never arrived.
    publish_until_received(&b, &a, "control").await;
    eventually("the rogues to be disconnected", WAIT, || async {
        let connected = a.handle.connected_peers().await.expect("connected");
        rogues.iter().all(|(_, _, r)| !connected.contains(&r.peer))
    })
    .await;
    for (kind, _, rogue) in &rogues {
        assert_eq!(
            a.count(|s| matches!(s, Seen::Rejected(p, _) if *p == rogue.peer)),
            1,
            "{kind} rogue rejected once"
        );
    }
    assert!(
        !a.got_gossip(b"rogue"),
        "a rogue's message reached an admitted node"
    );
    assert!(
        !b.got_gossip(b"rogue"),
        "a rogue's message reached an admitted node"
    );
    assert_eq!(a.peer_ids().await, vec![b.peer]);
    assert_eq!(b.peer_ids().await, vec![a.peer]);
    for (_, _, r) in &rogues {
        r.shutdown.cancel();
    }
    a.shutdown.cancel();
    b.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_not_forwarded() {
    init_tracing();
    // Line topology A - B - C: A and C refuse each other, so everything between them goes
    // through B.
    let a = TestNode::start(node_config(b"a")).await;
    let b = TestNode::start(joining(b"b", &a)).await;
    let mut c_cfg = joining(b"c", &b);
    c_cfg.bootstrap = vec![b.addr.clone()];
    let c_peer = c_cfg.keypair.public().to_peer_id();
    a.handle.block_peer(c_peer).await.expect("block");
    let c = TestNode::start(c_cfg).await;
    c.handle.block_peer(a.peer).await.expect("block");
    for n in [&a, &b, &c] {
        n.handle.subscribe(TOPIC).await.expect("subscribe");
    }
    // C learns about A only through announcements relayed by B.
    until_full_mesh(&[&a, &b, &c], WAIT).await;
    assert!(
        !c.handle
            .connected_peers()
            .await
            .expect("connected")
            .contains(&a.peer)
    );

    // B accepts: A's message reaches C through B.
    publish_until_received(&a, &c, "warmup").await;
    assert!(c.seen(
        |s| matches!(s, Seen::Gossip { source, via, .. } if *source == a.peer && *via == b.peer)
    ));

    // B rejects: C never gets it.
    b.set_verdict(Validation::Reject);
    a.handle
        .publish(TOPIC, b"rejected".to_vec())
        .await
        .expect("publish");
    eventually("B to judge the message", WAIT, || async {
        b.got_gossip(b"rejected")
    })
    .await;
    b.set_verdict(Validation::Accept);
    // Anything B accepts afterwards still flows; by the time it arrived, the rejected one
    // would have too.
    publish_until_received(&a, &c, "after").await;
    assert!(
        !c.got_gossip(b"rejected"),
        "B forwarded a message it rejected"
    );
    for n in [&a, &b, &c] {
        n.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_goes_down_and_comes_back_with_its_identity() {
    init_tracing();
    let data = tempfile::tempdir().expect("tempdir");
    let a = TestNode::start(node_config(b"a")).await;
    let b = TestNode::start(joining(b"b", &a)).await;
    let c_key = load_or_create_identity(data.path()).expect("identity");
    let mut c_cfg = joining(b"c", &a);
    c_cfg.keypair = c_key;
    let c = TestNode::start(c_cfg.clone()).await;
    until_full_mesh(&[&a, &b, &c], WAIT).await;
    let c_peer = c.peer;

    c.shutdown.cancel();
    let stopped = Instant::now();
    let timeout = c_cfg.peer_timeout;
    eventually(
        "A and B to declare C down",
        timeout + Duration::from_secs(5),
        || async { a.seen(|s| *s == Seen::Down(c_peer)) && b.seen(|s| *s == Seen::Down(c_peer)) },
    )
    .await;
    assert!(stopped.elapsed() < timeout + Duration::from_secs(5));
    assert!(!a.peer_ids().await.contains(&c_peer));
    assert!(!b.peer_ids().await.contains(&c_peer));

    // Restarted from the same data dir: same PeerId, and its announcement brings it back.
    c_cfg.keypair = load_or_create_identity(data.path()).expect("identity");
    assert_eq!(c_cfg.keypair.public().to_peer_id(), c_peer);
    c_cfg.announcement = b"c again".to_vec();
    let c2 = TestNode::start(c_cfg).await;
    assert_eq!(c2.peer, c_peer);
    eventually("C to be up again", WAIT, || async {
        a.peer_ids().await.contains(&c_peer) && b.peer_ids().await.contains(&c_peer)
    })
    .await;
    eventually("a second PeerUp for C", WAIT, || async {
        a.count(|s| matches!(s, Seen::Up(p, _) if *p == c_peer)) == 2
    })
    .await;
    for n in [&a, &b, &c2] {
        n.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_are_reported() {
    init_tracing();
    let mut cfg = node_config(b"");
    cfg.listen = vec!["/ip4/192.0.2.1/tcp/0".parse().expect("addr")];
    let e = beemesh_mesh::spawn(cfg, Default::default())
        .await
        .expect_err("not a local address");
    assert!(
        matches!(&e, MeshError::Listen { .. }) && e.to_string().contains("192.0.2.1"),
        "{e}"
    );

    let mut cfg = node_config(b"");
    cfg.peer_timeout = cfg.announce_interval;
    let e = beemesh_mesh::spawn(cfg, Default::default())
        .await
        .expect_err("flapping");
    assert!(e.to_string().contains("peer_timeout"), "{e}");

    let host = beemesh_manifest::host::MeshSection {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        bootstrap: vec!["not-an-addr".into()],
        ..Default::default()
    };
    let e = beemesh_mesh::MeshConfig::from_host(
        Keypair::generate_ed25519(),
        &host,
        admission().public(),
        vec![],
        None,
    )
    .expect_err("bad bootstrap");
    assert!(e.to_string().contains("not-an-addr"), "{e}");
}
