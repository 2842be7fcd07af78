//! Helpers for in-process mesh tests on loopback TCP.
#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beemesh_manifest::SecretKey;
use beemesh_manifest::ticket::{Binding, Ticket};
use beemesh_mesh::{Keypair, MeshConfig, MeshEvent, MeshHandle, Multiaddr, PeerId, Validation};
use libp2p::multiaddr::Protocol;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub const TOPIC: &str = "/beemesh/test/1";
pub const ECHO: &str = "/beemesh/echo/1";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The operator's admission key of the test mesh.
pub fn admission() -> SecretKey {
    SecretKey::from_seed([42; 32])
}

/// A node's admission credentials: its ticket file's bytes and, for a fleet ticket, the
/// ticket secret key.
pub struct Creds {
    pub ticket: Vec<u8>,
    pub key: Option<SecretKey>,
}

impl Creds {
    /// No ticket at all.
    pub fn none() -> Self {
        Creds {
            ticket: Vec::new(),
            key: None,
        }
    }

    pub fn parsed(&self) -> Ticket {
        Ticket::parse(
            "test ticket",
            std::str::from_utf8(&self.ticket).expect("utf-8"),
        )
        .expect("a ticket")
    }
}

/// A fleet ticket (admits whoever holds its ticket key) valid for a day, with its key.
pub fn fleet_ticket(adm: &SecretKey) -> Creds {
    let now = OffsetDateTime::now_utc();
    let (ticket, key) = Ticket::issue_fleet(
        adm,
        now - time::Duration::hours(1),
        Some(now + time::Duration::days(1)),
    )
    .expect("randomness");
    Creds {
        ticket: ticket.to_toml().into_bytes(),
        key: Some(key),
    }
}

pub fn ticket_for(adm: &SecretKey, peer: PeerId, expires: Option<OffsetDateTime>) -> Creds {
    let issued = OffsetDateTime::now_utc() - time::Duration::days(2);
    Creds {
        ticket: Ticket::issue(adm, Binding::Peer(peer.to_base58()), issued, expires)
            .to_toml()
            .into_bytes(),
        key: None,
    }
}

/// A fleet ticket of format version 1 (no ticket key: a bearer credential), as releases
/// before the ticket key wrote it. Built by hand from that format's signing rule.
pub fn bearer_ticket(adm: &SecretKey) -> Creds {
    let issued = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let mut msg = b"beemesh/v1/admission-ticket\0".to_vec();
    for field in [
        &b""[..],
        &issued.unix_timestamp().to_be_bytes()[..],
        &b""[..],
    ] {
        msg.extend_from_slice(&(field.len() as u32).to_be_bytes());
        msg.extend_from_slice(field);
    }
    let text = format!(
        "version = 1\nissued = \"{}\"\nkey = \"{}\"\nsig = \"{}\"\n",
        issued
            .replace_nanosecond(0)
            .expect("time")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format"),
        adm.public(),
        beemesh_manifest::keys::encode_signature(&adm.sign(&msg)),
    );
    Creds {
        ticket: text.into_bytes(),
        key: None,
    }
}

/// Test timing: fast announcements, with room for a loaded 2-core machine running the tests in
/// parallel (a peer is declared down after ten missed announcements).
pub fn config(keypair: Keypair, creds: Creds) -> MeshConfig {
    let mut cfg = MeshConfig::new(keypair, admission().public(), creds.ticket, creds.key);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.announce_interval = Duration::from_millis(300);
    cfg.peer_timeout = Duration::from_secs(3);
    cfg.admission_timeout = Duration::from_secs(3);
    cfg.gossip_heartbeat = Duration::from_millis(200);
    cfg.reject_ban = Duration::from_secs(60);
    cfg.request_timeout = Duration::from_secs(5);
    cfg
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Up(PeerId, Vec<u8>),
    Updated(PeerId, Vec<u8>),
    Down(PeerId),
    Rejected(PeerId, String),
    Refused(PeerId, String),
    Full(PeerId),
    Gossip {
        topic: String,
        source: PeerId,
        via: PeerId,
        data: Vec<u8>,
    },
}

/// A running mesh node whose events are consumed by a task that records them, validates
/// gossip with `verdict` and answers `/beemesh/echo/1` requests.
pub struct TestNode {
    pub handle: MeshHandle,
    pub peer: PeerId,
    /// First listen address, with `/p2p/<peer>`.
    pub addr: Multiaddr,
    pub log: Arc<Mutex<Vec<Seen>>>,
    pub verdict: Arc<Mutex<Validation>>,
    pub shutdown: CancellationToken,
}

impl TestNode {
    pub async fn start(cfg: MeshConfig) -> TestNode {
        let shutdown = CancellationToken::new();
        let (handle, mut events) = beemesh_mesh::spawn(cfg, shutdown.clone())
            .await
            .expect("mesh starts");
        let peer = handle.local_peer_id();
        let addr = handle
            .listen_addrs()
            .await
            .expect("addrs")
            .into_iter()
            .next()
            .expect("listening")
            .with(Protocol::P2p(peer));
        let log = Arc::new(Mutex::new(Vec::new()));
        let verdict = Arc::new(Mutex::new(Validation::Accept));
        let (l, v, h) = (log.clone(), verdict.clone(), handle.clone());
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let seen = match event {
                    MeshEvent::Gossip {
                        topic,
                        source,
                        propagation_source,
                        message_id,
                        data,
                    } => {
                        let verdict = *v.lock().expect("lock");
                        let _ = h.validate(message_id, propagation_source, verdict).await;
                        Seen::Gossip {
                            topic,
                            source,
                            via: propagation_source,
                            data,
                        }
                    }
                    MeshEvent::Request {
                        protocol,
                        data,
                        reply,
                        ..
                    } => {
                        if protocol == ECHO {
                            reply.respond(data);
                        } else {
                            reply.refuse(format!("unknown protocol {protocol}"));
                        }
                        continue;
                    }
                    MeshEvent::PeerUp { peer, announcement } => Seen::Up(peer, announcement),
                    MeshEvent::PeerUpdated { peer, announcement } => {
                        Seen::Updated(peer, announcement)
                    }
                    MeshEvent::PeerDown { peer } => Seen::Down(peer),
                    MeshEvent::PeerRejected { peer, reason } => Seen::Rejected(peer, reason),
                    MeshEvent::RefusedByPeer { peer, reason } => Seen::Refused(peer, reason),
                    MeshEvent::MembershipFull { peer } => Seen::Full(peer),
                    MeshEvent::Listening { .. } => continue,
                };
                l.lock().expect("lock").push(seen);
            }
        });
        TestNode {
            handle,
            peer,
            addr,
            log,
            verdict,
            shutdown,
        }
    }

    pub fn seen(&self, f: impl Fn(&Seen) -> bool) -> bool {
        self.log.lock().expect("lock").iter().any(f)
    }

    pub fn count(&self, f: impl Fn(&Seen) -> bool) -> usize {
        self.log
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| f(s))
            .count()
    }

    pub fn set_verdict(&self, v: Validation) {
        *self.verdict.lock().expect("lock") = v;
    }

    pub async fn peer_ids(&self) -> Vec<PeerId> {
        self.handle
            .peers()
            .await
            .expect("peers")
            .into_iter()
            .map(|p| p.peer_id)
            .collect()
    }

    pub fn got_gossip(&self, prefix: &[u8]) -> bool {
        self.seen(|s| matches!(s, Seen::Gossip { data, .. } if data.starts_with(prefix)))
    }
}

/// Publishes numbered messages `prefix-N` until `receiver` got one.
pub async fn publish_until_received(from: &TestNode, receiver: &TestNode, prefix: &str) {
    let mut n = 0;
    eventually(
        &format!("{prefix} to arrive"),
        Duration::from_secs(15),
        || {
            n += 1;
            let data = format!("{prefix}-{n}").into_bytes();
            async move {
                let _ = from.handle.publish(TOPIC, data).await;
                receiver.got_gossip(prefix.as_bytes())
            }
        },
    )
    .await;
}

/// Polls `cond` until it holds, failing the test after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node lists every other one in `peers()`.
pub async fn until_full_mesh(nodes: &[&TestNode], timeout: Duration) {
    eventually("every node to list every other one", timeout, || async {
        for n in nodes {
            let ids = n.peer_ids().await;
            if !nodes
                .iter()
                .all(|m| m.peer == n.peer || ids.contains(&m.peer))
            {
                return false;
            }
        }
        true
    })
    .await;
}
