//! Hand-built libp2p peers that misbehave against a real mesh node: one that never presents a
//! ticket, one that is admitted and then sends garbage on every channel it has, and ones that
//! record what honest nodes show them (a dialed host, an admitted insider) and replay it.

mod common;

use std::time::{Duration, Instant};

use beemesh_manifest::ticket::Presentation;
use beemesh_mesh::{Keypair, PeerId};
use common::*;
use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{StreamProtocol, Swarm, SwarmBuilder, gossipsub, kad, noise, ping, tcp, yamux};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

const WAIT: Duration = Duration::from_secs(15);

fn raw_swarm<B: NetworkBehaviour>(key: Keypair, behaviour: impl FnOnce(&Keypair) -> B) -> Swarm<B> {
    SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|k| behaviour(k))
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Drives `swarm` until `f` returns a value, failing after `timeout`.
async fn drive<B: NetworkBehaviour, T>(
    swarm: &mut Swarm<B>,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut(&mut Swarm<B>, SwarmEvent<B::ToSwarm>) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"));
        if let Some(v) = f(swarm, event) {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_at_the_deadline_and_then_refused_at_once() {
    init_tracing();
    let mut cfg = config(Keypair::generate_ed25519(), fleet_ticket(&admission()));
    cfg.admission_timeout = Duration::from_secs(4);
    let a = TestNode::start(cfg).await;

    // A libp2p peer that speaks nothing BeeMesh: it connects and waits.
    let mut silent = raw_swarm(Keypair::generate_ed25519(), |_| ping::Behaviour::default());
    let silent_peer = *silent.local_peer_id();
    silent.dial(a.addr.clone()).expect("dial");
    let connected = drive(&mut silent, WAIT, "the connection", |_, e| match e {
        SwarmEvent::ConnectionEstablished { .. } => Some(Instant::now()),
        _ => None,
    })
    .await;
    drive(
        &mut silent,
        WAIT,
        "the node to close the connection",
        |_, e| matches!(e, SwarmEvent::ConnectionClosed { .. }).then_some(()),
    )
    .await;
    assert!(
        connected.elapsed() >= Duration::from_millis(3500),
        "closed at the deadline, not before"
    );
    eventually("the rejection", WAIT, || async {
        a.seen(|s| matches!(s, Seen::Rejected(p, r) if *p == silent_peer && r.contains("sent no admission ticket within")))
    })
    .await;

    // Reconnecting is refused at once, not after another admission deadline.
    let again = Instant::now();
    silent.dial(a.addr.clone()).expect("dial");
    drive(&mut silent, WAIT, "the refusal", |_, e| match e {
        SwarmEvent::ConnectionClosed { .. } | SwarmEvent::OutgoingConnectionError { .. } => {
            Some(())
        }
        _ => None,
    })
    .await;
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "refused after {:?}",
        again.elapsed()
    );
    assert_eq!(
        a.count(|s| matches!(s, Seen::Rejected(p, _) if *p == silent_peer)),
        1
    );
    a.shutdown.cancel();
}

/// The admission messages as a *newer* BeeMesh might send them: with a field this version
/// does not know.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Hello {
    #[serde(default)]
    ticket: ByteBuf,
    #[serde(default)]
    proof: ByteBuf,
    #[serde(default)]
    nonce: ByteBuf,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    payload: ByteBuf,
    #[serde(default)]
    addrs: Vec<ByteBuf>,
    #[serde(default)]
    from_the_future: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct HelloReply {
    #[serde(default)]
    hello: Option<Hello>,
    #[serde(default)]
    refused: Option<String>,
}

#[derive(NetworkBehaviour)]
struct Rogue {
    admission: request_response::cbor::Behaviour<Hello, HelloReply>,
    gossipsub: gossipsub::Behaviour,
    /// Sends CBOR byte strings where the node expects its request envelope.
    rpc: request_response::cbor::Behaviour<ByteBuf, ByteBuf>,
}

fn rogue(key: &Keypair) -> Rogue {
    let gossip = gossipsub::ConfigBuilder::default()
        .protocol_id("/beemesh/gossip/1", gossipsub::Version::V1_1)
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_initial_delay(Duration::from_millis(100))
        .max_transmit_size(4 * 1024 * 1024)
        .build()
        .expect("gossipsub config");
    Rogue {
        admission: request_response::cbor::Behaviour::new(
            [(
                StreamProtocol::new("/beemesh/admission/1"),
                ProtocolSupport::Full,
            )],
            Default::default(),
        ),
        gossipsub: gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip,
        )
        .expect("gossipsub"),
        rpc: request_response::cbor::Behaviour::new(
            [(StreamProtocol::new("/beemesh/rpc/1"), ProtocolSupport::Full)],
            Default::default(),
        ),
    }
}

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), v).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_an_admitted_peer_crashes_nothing() {
    init_tracing();
    const LIMIT: usize = 64 * 1024;
    let mut cfg = config(Keypair::generate_ed25519(), fleet_ticket(&admission()));
    cfg.max_message_size = LIMIT;
    let a = TestNode::start(cfg).await;
    let mut b_cfg = config(Keypair::generate_ed25519(), fleet_ticket(&admission()));
    b_cfg.bootstrap = vec![a.addr.clone()];
    let b = TestNode::start(b_cfg).await;
    a.handle.subscribe(TOPIC).await.expect("subscribe");
    b.handle.subscribe(TOPIC).await.expect("subscribe");

    let key = Keypair::generate_ed25519();
    let mut r = raw_swarm(key.clone(), rogue);
    let r_peer: PeerId = *r.local_peer_id();
    for t in ["/beemesh/announce/1", TOPIC] {
        r.behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(t))
            .expect("subscribe");
    }
    r.dial(a.addr.clone()).expect("dial");

    // Admission, speaking a newer dialect: the unknown field is ignored. The rogue holds a
    // fleet ticket and its key, and makes its proofs itself.
    let creds = fleet_ticket(&admission());
    let parsed = creds.parsed();
    let r_b58 = r_peer.to_base58();
    let prove =
        |p: &Presentation<'_>| ByteBuf::from(parsed.prove(creds.key.as_ref(), p).expect("proves"));
    let ticket = ByteBuf::from(creds.ticket.clone());
    let request_proof = prove(&Presentation::request(&r_b58, &a.peer.to_base58()));
    let announce_proof = prove(&Presentation::announcement(&r_b58));
    let reply = drive(&mut r, WAIT, "the admission reply", |s, e| match e {
        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
            let hello = Hello {
                ticket: ticket.clone(),
                proof: request_proof.clone(),
                nonce: ByteBuf::from(vec![1; 32]),
                seq: 1,
                payload: ByteBuf::from(b"rogue".to_vec()),
                addrs: vec![],
                from_the_future: Some("ignored".into()),
            };
            s.behaviour_mut().admission.send_request(&peer_id, hello);
            None
        }
        SwarmEvent::Behaviour(RogueEvent::Admission(request_response::Event::Message {
            message: request_response::Message::Response { response, .. },
            ..
        })) => Some(response),
        _ => None,
    })
    .await;
    assert_eq!(reply.refused, None);
    let a_hello = reply.hello.expect("the node introduces itself");
    assert!(!a_hello.ticket.is_empty() && a_hello.from_the_future.is_none());
    eventually("the rogue to be a member", WAIT, || async {
        a.seen(|s| matches!(s, Seen::Up(p, _) if *p == r_peer))
    })
    .await;

    // Wait until A's subscription to the test topic reached the rogue.
    let topic = gossipsub::IdentTopic::new(TOPIC);
    drive(&mut r, WAIT, "A's subscription", |_, e| match e {
        SwarmEvent::Behaviour(RogueEvent::Gossipsub(gossipsub::Event::Subscribed {
            peer_id,
            topic: t,
            ..
        })) if peer_id == a.peer && t == topic.hash() => Some(()),
        _ => None,
    })
    .await;

    let announce = gossipsub::IdentTopic::new("/beemesh/announce/1");
    let foreign = fleet_ticket(&beemesh_manifest::SecretKey::from_seed([9; 32]));
    let foreign_proof = foreign
        .parsed()
        .prove(foreign.key.as_ref(), &Presentation::announcement(&r_b58))
        .expect("proves");
    let garbage: Vec<(gossipsub::IdentTopic, Vec<u8>)> = vec![
        (announce.clone(), vec![0xff, 0xfe, 0x00, 0x13]),
        (announce.clone(), vec![0xbf; 10_000]),
        (
            announce.clone(),
            cbor(&Hello {
                ticket: ByteBuf::from(foreign.ticket),
                proof: ByteBuf::from(foreign_proof),
                seq: 99,
                payload: ByteBuf::from(b"forged".to_vec()),
                ..Default::default()
            }),
        ),
        (
            announce.clone(),
            cbor(&Hello {
                ticket: ticket.clone(),
                proof: announce_proof.clone(),
                seq: u64::MAX,
                payload: ByteBuf::from(vec![b'x'; 70 * 1024]),
                ..Default::default()
            }),
        ),
        // Over A's message limit but within gossipsub's frame limit: rejected by the loop.
        (topic.clone(), vec![b'o'; LIMIT + 1]),
        // Over gossipsub's frame limit: dropped by the codec.
        (topic.clone(), vec![b'O'; 1024 * 1024]),
    ];
    for (t, data) in garbage {
        r.behaviour_mut()
            .gossipsub
            .publish(t, data)
            .expect("publish");
    }
    // A request that is not a request envelope, and one with a bogus protocol name.
    let garbage_request = r
        .behaviour_mut()
        .rpc
        .send_request(&a.peer, ByteBuf::from(vec![1, 2, 3]));
    drive(
        &mut r,
        WAIT,
        "the garbage request to fail",
        |_, e| match e {
            SwarmEvent::Behaviour(RogueEvent::Rpc(request_response::Event::OutboundFailure {
                request_id,
                ..
            })) if request_id == garbage_request => Some(()),
            SwarmEvent::Behaviour(RogueEvent::Rpc(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            })) if request_id == garbage_request => Some(()),
            _ => None,
        },
    )
    .await;

    // A is alive and well: admitted traffic still flows both ways.
    publish_until_received(&b, &a, "control").await;
    assert!(a.peer_ids().await.contains(&b.peer));
    assert!(!a.seen(|s| matches!(s, Seen::Gossip { data, .. } if data.len() > LIMIT)));
    assert!(!a.seen(
        |s| matches!(s, Seen::Up(_, p) | Seen::Updated(_, p) if p == b"forged" || p.len() > LIMIT)
    ));
    // Nothing it sent was forwarded to B either.
    assert!(!b.seen(|s| matches!(s, Seen::Gossip { source, .. } if *source == r_peer)));
    assert!(!b.seen(
        |s| matches!(s, Seen::Up(_, p) | Seen::Updated(_, p) if p == b"forged" || p.len() > LIMIT)
    ));
    a.shutdown.cancel();
    b.shutdown.cancel();
}

#[derive(NetworkBehaviour)]
struct Snoop {
    gossipsub: gossipsub::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unadmitted_peer_learns_nothing_before_it_is_dropped() {
    init_tracing();
    let a = TestNode::start(config(
        Keypair::generate_ed25519(),
        fleet_ticket(&admission()),
    ))
    .await;
    let mut b_cfg = config(Keypair::generate_ed25519(), fleet_ticket(&admission()));
    b_cfg.bootstrap = vec![a.addr.clone()];
    let b = TestNode::start(b_cfg).await;
    a.handle.subscribe(TOPIC).await.expect("subscribe");
    b.handle.subscribe(TOPIC).await.expect("subscribe");
    let key = b"/beemesh/manifest/default/secret".to_vec();
    a.handle
        .put_record(key.clone(), b"private".to_vec())
        .await
        .expect("put");
    publish_until_received(&a, &b, "warmup").await;

    // A peer that speaks gossipsub and Kademlia, but has no ticket to show.
    let mut snoop = raw_swarm(Keypair::generate_ed25519(), |k| {
        let peer = k.public().to_peer_id();
        let gossip = gossipsub::ConfigBuilder::default()
            .protocol_id("/beemesh/gossip/1", gossipsub::Version::V1_1)
            .heartbeat_interval(Duration::from_millis(200))
            .build()
            .expect("gossipsub config");
        let mut kad_cfg = kad::Config::new(StreamProtocol::new("/beemesh/kad/1"));
        kad_cfg.set_query_timeout(Duration::from_secs(20));
        Snoop {
            gossipsub: gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(k.clone()),
                gossip,
            )
            .expect("gossipsub"),
            kad: kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_cfg),
        }
    });
    let snoop_peer = *snoop.local_peer_id();
    snoop
        .behaviour_mut()
        .gossipsub
        .subscribe(&gossipsub::IdentTopic::new(TOPIC))
        .expect("subscribe");
    let a_addr: libp2p::Multiaddr = a
        .addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    snoop.behaviour_mut().kad.add_address(&a.peer, a_addr);
    let query = snoop
        .behaviour_mut()
        .kad
        .get_record(kad::RecordKey::new(&key));

    // A keeps publishing while the snoop is connected.
    let publisher = a.handle.clone();
    let publishing = tokio::spawn(async move {
        for i in 0.. {
            let _ = publisher
                .publish(TOPIC, format!("news-{i}").into_bytes())
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let (mut messages, mut subscriptions, mut found) = (0, 0, false);
    drive(
        &mut snoop,
        WAIT,
        "the node to drop the snoop",
        |_, e| match e {
            SwarmEvent::Behaviour(SnoopEvent::Gossipsub(gossipsub::Event::Message { .. })) => {
                messages += 1;
                None
            }
            SwarmEvent::Behaviour(SnoopEvent::Gossipsub(gossipsub::Event::Subscribed {
                ..
            })) => {
                subscriptions += 1;
                None
            }
            SwarmEvent::Behaviour(SnoopEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(_))),
                ..
            })) if id == query => {
                found = true;
                None
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == a.peer => Some(()),
            _ => None,
        },
    )
    .await;
    publishing.abort();
    assert_eq!(messages, 0, "gossip reached a peer that was never admitted");
    assert_eq!(
        subscriptions, 0,
        "the node told an unadmitted peer its subscriptions"
    );
    assert!(!found, "the DHT answered an unadmitted peer");
    eventually("the rejection", WAIT, || async {
        a.seen(|s| matches!(s, Seen::Rejected(p, _) if *p == snoop_peer))
    })
    .await;
    a.shutdown.cancel();
    b.shutdown.cancel();
}

/// Starts `swarm` listening on loopback; returns its address with `/p2p/`.
async fn listening<B: NetworkBehaviour>(swarm: &mut Swarm<B>) -> libp2p::Multiaddr {
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
        .expect("listen");
    let peer = *swarm.local_peer_id();
    drive(swarm, WAIT, "a listen address", |_, e| match e {
        SwarmEvent::NewListenAddr { address, .. } => {
            Some(address.with(libp2p::multiaddr::Protocol::P2p(peer)))
        }
        _ => None,
    })
    .await
}

/// Dials `to` and presents `hello` as an admission request; returns the answer.
async fn present(swarm: &mut Swarm<Rogue>, to: &TestNode, hello: Hello) -> HelloReply {
    swarm.dial(to.addr.clone()).expect("dial");
    let mut hello = Some(hello);
    drive(swarm, WAIT, "the admission reply", |s, e| match e {
        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == to.peer => {
            if let Some(h) = hello.take() {
                s.behaviour_mut().admission.send_request(&peer_id, h);
            }
            None
        }
        SwarmEvent::Behaviour(RogueEvent::Admission(request_response::Event::Message {
            message: request_response::Message::Response { response, .. },
            ..
        })) => Some(response),
        _ => None,
    })
    .await
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The mDNS case: an honest node dials a host it found, which records everything it is sent.
/// That host learns nothing on the mesh's protocols, and what it recorded (a real admission
/// request: ticket, proof, nonce) admits nobody: not itself, not another host, not even the
/// honest node's own PeerId at another node, and not as a reply either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialed_host_records_nothing_that_admits_anyone() {
    init_tracing();
    let adm = admission();
    let a = TestNode::start(config(Keypair::generate_ed25519(), fleet_ticket(&adm))).await;
    let h_key = Keypair::generate_ed25519();
    let h_creds = fleet_ticket(&adm);
    let h_holder = h_creds.parsed().holder.expect("a fleet ticket");
    let h_seed = h_creds.key.as_ref().expect("its key").seed();
    let h = TestNode::start(config(h_key.clone(), h_creds)).await;
    h.handle.subscribe(TOPIC).await.expect("subscribe");

    // The recorder listens, as a host announced by mDNS, and speaks every mesh protocol.
    let mut rec = raw_swarm(Keypair::generate_ed25519(), rogue);
    let rec_peer = *rec.local_peer_id();
    for t in ["/beemesh/announce/1", TOPIC] {
        rec.behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(t))
            .expect("subscribe");
    }
    let rec_addr = listening(&mut rec).await;
    h.handle.dial(rec_addr).await.expect("dial");
    // H keeps publishing all the while.
    let publisher = h.handle.clone();
    let publishing = tokio::spawn(async move {
        for i in 0.. {
            let _ = publisher
                .publish(TOPIC, format!("news-{i}").into_bytes())
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // It records H's request and never answers, so H waits out its whole admission deadline.
    let (mut recorded, mut held) = (None, Vec::new());
    let (mut messages, mut subscriptions, mut requests) = (0, 0, 0);
    drive(
        &mut rec,
        WAIT,
        "H to give up on the recorder",
        |_, e| match e {
            SwarmEvent::Behaviour(RogueEvent::Admission(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) if peer == h.peer => {
                recorded = Some(request);
                held.push(channel);
                None
            }
            SwarmEvent::Behaviour(RogueEvent::Gossipsub(gossipsub::Event::Message { .. })) => {
                messages += 1;
                None
            }
            SwarmEvent::Behaviour(RogueEvent::Gossipsub(gossipsub::Event::Subscribed {
                ..
            })) => {
                subscriptions += 1;
                None
            }
            SwarmEvent::Behaviour(RogueEvent::Rpc(request_response::Event::Message { .. })) => {
                requests += 1;
                None
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == h.peer => Some(()),
            _ => None,
        },
    )
    .await;
    publishing.abort();
    drop(held);
    assert_eq!(
        messages, 0,
        "the dialer sent gossip to a peer that proved nothing"
    );
    assert_eq!(
        subscriptions, 0,
        "the dialer told an unproven peer its topics"
    );
    assert_eq!(requests, 0, "the dialer sent a request to an unproven peer");
    eventually("H to reject the recorder", WAIT, || async {
        h.seen(|s| matches!(s, Seen::Rejected(p, _) if *p == rec_peer))
    })
    .await;

    // What it got: the ticket's public parts, a proof and a nonce; never the ticket key.
    let recorded = recorded.expect("H presented itself");
    let ticket = beemesh_manifest::ticket::Ticket::parse(
        "recorded",
        std::str::from_utf8(&recorded.ticket).expect("text"),
    )
    .expect("a ticket");
    assert_eq!(ticket.holder, Some(h_holder));
    assert_eq!((recorded.proof.len(), recorded.nonce.len()), (64, 32));
    assert!(
        !contains(&cbor(&recorded), &h_seed),
        "the ticket key left H"
    );
    h.shutdown.cancel();

    // 1. Replayed by the recorder (another PeerId) to another node.
    let mut replayer = raw_swarm(Keypair::generate_ed25519(), rogue);
    let replayer_peer = *replayer.local_peer_id();
    let reply = present(&mut replayer, &a, recorded.clone()).await;
    let reason = reply.refused.expect("refused");
    assert!(reply.hello.is_none(), "A introduced itself to a replayer");
    assert!(
        reason.contains("does not verify") && reason.contains(&replayer_peer.to_base58()),
        "{reason}"
    );

    // 2. Used as a reply: A dials a host (mDNS again) that answers with the recording.
    let mut reflector = raw_swarm(Keypair::generate_ed25519(), rogue);
    let reflector_peer = *reflector.local_peer_id();
    let reflector_addr = listening(&mut reflector).await;
    a.handle.dial(reflector_addr).await.expect("dial");
    let answer = HelloReply {
        hello: Some(recorded.clone()),
        refused: None,
    };
    drive(
        &mut reflector,
        WAIT,
        "A to drop the reflector",
        |s, e| match e {
            SwarmEvent::Behaviour(RogueEvent::Admission(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                let _ = s
                    .behaviour_mut()
                    .admission
                    .send_response(channel, answer.clone());
                None
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == a.peer => Some(()),
            _ => None,
        },
    )
    .await;
    eventually("A to reject the reflector", WAIT, || async {
        a.seen(|s| {
            matches!(s, Seen::Rejected(p, r) if *p == reflector_peer
            && r.contains("does not verify for an admission reply"))
        })
    })
    .await;

    // 3. Relayed under H's own PeerId (the test holds H's identity key, an attacker would
    // not): the proof was made for the recorder, not for A.
    let mut relay = raw_swarm(h_key, rogue);
    let reply = present(&mut relay, &a, recorded).await;
    let reason = reply.refused.expect("refused");
    assert!(
        reason.contains("does not verify for an admission request"),
        "{reason}"
    );

    for p in [replayer_peer, reflector_peer, h.peer] {
        assert!(
            !a.seen(|s| matches!(s, Seen::Up(q, _) | Seen::Updated(q, _) if *q == p)),
            "{p} became a member"
        );
    }
    assert!(a.peer_ids().await.is_empty());
    a.shutdown.cancel();
}

/// A gossip announcement carries its author's ticket and a proof bound to that author. An
/// admitted insider that copies another node's announcement into one of its own, signed as a
/// third PeerId that never connected to anybody, makes nobody accept that PeerId: its
/// announcement is refused and its messages are ignored. The control: the same path with a
/// ticket of its own works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_proof_replayed_under_another_peer_id_is_ignored() {
    init_tracing();
    let adm = admission();
    let a = TestNode::start(config(Keypair::generate_ed25519(), fleet_ticket(&adm))).await;
    let mut b_cfg = config(Keypair::generate_ed25519(), fleet_ticket(&adm));
    b_cfg.bootstrap = vec![a.addr.clone()];
    let b = TestNode::start(b_cfg).await;
    a.handle.subscribe(TOPIC).await.expect("subscribe");
    b.handle.subscribe(TOPIC).await.expect("subscribe");
    until_full_mesh(&[&a, &b], WAIT).await;

    // The insider is admitted with a peer ticket of its own; its gossip is signed as X.
    let x_key = Keypair::generate_ed25519();
    let x = x_key.public().to_peer_id();
    let i_key = Keypair::generate_ed25519();
    let i_peer = i_key.public().to_peer_id();
    let mut i = raw_swarm(i_key, |_| rogue(&x_key));
    let announce = gossipsub::IdentTopic::new("/beemesh/announce/1");
    let topic = gossipsub::IdentTopic::new(TOPIC);
    for t in [&announce, &topic] {
        i.behaviour_mut().gossipsub.subscribe(t).expect("subscribe");
    }
    let hello = Hello {
        ticket: ByteBuf::from(ticket_for(&adm, i_peer, None).ticket),
        seq: 1,
        payload: ByteBuf::from(b"insider".to_vec()),
        ..Default::default()
    };
    let reply = present(&mut i, &a, hello).await;
    assert_eq!(reply.refused, None);

    // It waits for A's subscriptions and for one of B's announcements, relayed by A.
    let (mut subscribed, mut b_hello) = (0, None);
    drive(&mut i, WAIT, "B's announcement", |_, e| {
        match e {
            SwarmEvent::Behaviour(RogueEvent::Gossipsub(gossipsub::Event::Subscribed {
                peer_id,
                topic: t,
            })) if peer_id == a.peer && (t == announce.hash() || t == topic.hash()) => {
                subscribed += 1;
            }
            SwarmEvent::Behaviour(RogueEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) if message.source == Some(b.peer) && message.topic == announce.hash() => {
                b_hello = cbor4ii::serde::from_slice::<Hello>(&message.data).ok();
            }
            _ => {}
        }
        (subscribed >= 2 && b_hello.is_some()).then_some(())
    })
    .await;
    let b_hello = b_hello.expect("B's announcement");
    assert_eq!(b_hello.proof.len(), 64, "B proves its fleet ticket");

    let seq = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).expect("time") * 1000;
    let impostor = Hello {
        ticket: b_hello.ticket.clone(),
        proof: b_hello.proof.clone(),
        seq,
        payload: ByteBuf::from(b"impostor".to_vec()),
        ..Default::default()
    };
    let own = Hello {
        ticket: ByteBuf::from(ticket_for(&adm, x, None).ticket),
        seq: seq + 1,
        payload: ByteBuf::from(b"x-valid".to_vec()),
        ..Default::default()
    };
    let gossip = &mut i.behaviour_mut().gossipsub;
    gossip
        .publish(announce.clone(), cbor(&impostor))
        .expect("publish");
    gossip
        .publish(topic.clone(), b"x-early".to_vec())
        .expect("publish");
    gossip
        .publish(announce.clone(), cbor(&own))
        .expect("publish");
    // X's later messages: A takes them once X's own announcement is in (messages from the
    // insider arrive in order, so everything before has been judged by then).
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 0.. {
        let _ = i
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), format!("x-late-{n}").into_bytes());
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            loop {
                i.select_next_some().await;
            }
        })
        .await;
        if a.got_gossip(b"x-late") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for X's messages after its own announcement"
        );
    }
    assert!(a.seen(|s| matches!(s, Seen::Up(p, d) if *p == x && d == b"x-valid")));
    for n in [&a, &b] {
        assert!(
            !n.seen(|s| matches!(s, Seen::Up(_, d) | Seen::Updated(_, d) if d == b"impostor")),
            "B's proof made X a member"
        );
    }
    assert!(
        !a.got_gossip(b"x-early"),
        "a message by X was taken before X proved a ticket of its own"
    );
    a.shutdown.cancel();
    b.shutdown.cancel();
}
