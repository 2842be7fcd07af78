//! Operators' signed requests to a workload's store (`POST /v1/kv`) on real in-process nodes
//! (process driver, loopback): sent to a node without a replica, forwarded to the host the
//! request names, checked again there; refused when untrusted, replayed or stale.

use std::path::Path;
use std::time::Duration;

use beemesh_manifest::SecretKey;
use beemesh_manifest::operator::{KvOp, KvRequest, SignedKvRequest};
use beemesh_node::RunningNode;
use beemesh_node::operator_kv::{Answer, PROTOCOL};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{Fleet, get};

const DEADLINE: Duration = Duration::from_secs(60);

/// POSTs `body` to a node's API over its unix socket: (status, JSON body).
async fn post(sock: &Path, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(40), s.read_to_string(&mut raw))
        .await
        .expect("the answer completes")
        .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {raw}"));
    (code, json)
}

fn unix_now() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).expect("after 1970")
}

/// A request for `node` issued `skew` seconds from now, signed by `key`: its JSON envelope.
fn signed(key: &SecretKey, node: &str, workload: &str, op: KvOp, skew: i64) -> String {
    let issued = unix_now().saturating_add_signed(skew);
    let req = KvRequest::new("default", workload, node, op, issued).expect("valid request");
    SignedKvRequest::sign(&req, key).to_json()
}

fn put(key: &str, value: &str, if_revision: Option<u64>) -> KvOp {
    KvOp::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        if_revision,
    }
}

fn get_op(key: &str) -> KvOp {
    KvOp::Get { key: key.into() }
}

/// A replica's state endpoint as its node wrote it down: (address, token).
fn endpoint(fleet: &Fleet, node: &str, workload: &str, index: u64) -> Option<(String, String)> {
    let dir = fleet
        .dir
        .path()
        .join(node)
        .join("data/replicas")
        .join(format!("bm_default_{workload}_{index}"));
    let port = std::fs::read_to_string(dir.join("port")).ok()?;
    let token = std::fs::read_to_string(dir.join("token")).ok()?;
    Some((
        format!("127.0.0.1:{}", port.trim()),
        token.trim().to_owned(),
    ))
}

/// GET through a replica's endpoint: (status, ETag revision, body).
async fn replica_get(addr: &str, token: &str, key: &str) -> (u16, Option<u64>, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "GET /v1/kv/{key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("answered")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let etag = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("etag:")
            .and_then(|v| v.trim().trim_matches('"').parse().ok())
    });
    (
        status,
        etag,
        raw.get(split + 4..).unwrap_or_default().to_vec(),
    )
}

/// A running replica: (node name, peer id, index).
type Host = (String, String, u64);

/// The running replicas of `default/{workload}` once `ready` holds for the workload's status.
async fn running_hosts(
    node: &RunningNode,
    workload: &str,
    replicas: usize,
    ready: impl Fn(&Value) -> bool,
) -> Vec<Host> {
    let start = tokio::time::Instant::now();
    loop {
        let (code, json) = get(
            &node.api_socket,
            &format!("/v1/workloads/default/{workload}"),
        )
        .await;
        let v: Value = serde_json::from_str(&json).unwrap_or_default();
        let hosts: Vec<Host> = v["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] == "running")
            .filter_map(|p| {
                Some((
                    p["node"].as_str()?.to_owned(),
                    p["peer_id"].as_str()?.to_owned(),
                    p["index"].as_u64()?,
                ))
            })
            .collect();
        if code == 200 && hosts.len() == replicas && ready(&v) {
            return hosts;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{replicas} replicas never ran: {json}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(nodes: Vec<(RunningNode, tokio_util::sync::CancellationToken)>) {
    for (_, s) in &nodes {
        s.cancel();
    }
    for (n, _) in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(15), n.join()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_writes_a_strong_workload_through_a_node_without_a_replica() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let mut nodes = vec![(a, a_stop)];
    for n in ["b", "c", "d"] {
        let started = fleet.start(n, Some(&nodes[0].0)).await;
        nodes.push(started);
    }
    let manifest = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"ledger\"\ngeneration = 1\n\
        [placement]\nreplicas = 3\nspread = \"node\"\n\
        [consistency]\nmode = \"strong\"\n\
        [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"600\"]\n\
        resources = { cpu = \"10m\", memory = \"8Mi\" }\n";
    nodes[0]
        .0
        .shared
        .apply(&fleet.signed_text(manifest))
        .await
        .expect("accepted");
    // Three running replicas, every host a voter of the group.
    let hosts = running_hosts(&nodes[0].0, "ledger", 3, |v| {
        v["group"]["voters"]
            .as_array()
            .is_some_and(|a| a.len() == 3)
            && v["group"]["leader"].is_string()
    })
    .await;
    let node = |name: &str| {
        &nodes
            .iter()
            .find(|(n, _)| n.shared.name == name)
            .expect("a node of the fleet")
            .0
    };
    let outsider = nodes
        .iter()
        .map(|(n, _)| n)
        .find(|n| !hosts.iter().any(|h| h.0 == n.shared.name))
        .expect("a node without a replica");
    let x = &outsider.api_socket;
    let (h, h_peer, _) = &hosts[0];
    let (other, other_peer, other_index) = &hosts[1];
    let op = &fleet.operator;

    // Written through the node without a replica: forwarded to the host the request names.
    let first = signed(op, h_peer, "ledger", put("greeting", "hello", None), 0);
    let (code, v) = post(x, "/v1/kv", first.as_bytes()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["node_name"], &v["mode"]),
        (&Value::from(h.as_str()), &Value::from("strong")),
        "{v}"
    );
    let revision = v["revision"].as_u64().expect("a revision");

    // Read back through another host's replica endpoint (linearizable: at once).
    let (addr, token) = endpoint(&fleet, other, "ledger", *other_index).expect("endpoint");
    let (code, etag, body) = replica_get(&addr, &token, "greeting").await;
    assert_eq!(
        (code, etag, body.as_slice()),
        (200, Some(revision), &b"hello"[..])
    );
    // And through the operator path, from another host.
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, other_peer, "ledger", get_op("greeting"), 0).as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["value"], v["revision"].as_u64()),
        (&Value::from("hello"), Some(revision))
    );

    // A conditional write: the stale revision is refused, the current one accepted; on the
    // host itself, without forwarding.
    let stale = put("greeting", "bye", Some(revision + 100));
    let (code, v) = post(
        &node(h).api_socket,
        "/v1/kv",
        signed(op, h_peer, "ledger", stale, 0).as_bytes(),
    )
    .await;
    assert_eq!(
        (code, &v["reason"]),
        (412, &Value::from("precondition")),
        "{v}"
    );
    assert_eq!(v["current_revision"].as_u64(), Some(revision), "{v}");
    let fresh = put("greeting", "bye", Some(revision));
    let (code, v) = post(
        &node(h).api_socket,
        "/v1/kv",
        signed(op, h_peer, "ledger", fresh, 0).as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert!(v["revision"].as_u64().is_some_and(|r| r > revision), "{v}");
    // A listing, and a key that is absent.
    let list = KvOp::List {
        prefix: "gr".into(),
        after: None,
        limit: None,
    };
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, other_peer, "ledger", list, 0).as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"][0]["key"], "greeting", "{v}");
    assert_eq!(v["items"][0]["value"], "bye", "{v}");
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, h_peer, "ledger", get_op("absent"), 0).as_bytes(),
    )
    .await;
    assert_eq!(
        (code, &v["reason"]),
        (404, &Value::from("not_found")),
        "{v}"
    );

    // Refused: an untrusted key, a replay, a stale request and one from the future.
    let stranger = SecretKey::from_seed([99; 32]);
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(
            &stranger,
            h_peer,
            "ledger",
            put("greeting", "evil", None),
            0,
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(
        (code, &v["reason"]),
        (403, &Value::from("untrusted")),
        "{v}"
    );
    let (code, v) = post(x, "/v1/kv", first.as_bytes()).await;
    assert_eq!((code, &v["reason"]), (403, &Value::from("replay")), "{v}");
    // The same request through a node that never saw it: the host refuses it itself.
    let (code, v) = post(&node(other).api_socket, "/v1/kv", first.as_bytes()).await;
    assert_eq!((code, &v["reason"]), (403, &Value::from("replay")), "{v}");
    assert_eq!(v["node_name"], h.as_str(), "the host refused it: {v}");
    for skew in [-400, 400] {
        let (code, v) = post(
            x,
            "/v1/kv",
            signed(op, h_peer, "ledger", put("greeting", "late", None), skew).as_bytes(),
        )
        .await;
        assert_eq!(
            (code, &v["reason"]),
            (403, &Value::from("stale")),
            "{skew}: {v}"
        );
    }

    // A peer's message carries a request; it never makes one: straight over the mesh, the
    // host checks the signer itself, and refuses a request that names another node.
    let peer = h_peer.parse().expect("peer id");
    let ask = |bytes: String, to| {
        let mesh = outsider.shared.mesh.clone();
        async move {
            let raw = mesh
                .request(to, PROTOCOL, bytes.into_bytes())
                .await
                .expect("answered");
            serde_json::from_slice::<Answer>(&raw).expect("an answer")
        }
    };
    let a = ask(
        signed(
            &stranger,
            h_peer,
            "ledger",
            put("greeting", "evil", None),
            0,
        ),
        peer,
    )
    .await;
    assert_eq!(
        (a.status, &a.body["reason"]),
        (403, &Value::from("untrusted")),
        "{a:?}"
    );
    let to_other = other_peer.parse().expect("peer id");
    let a = ask(
        signed(op, h_peer, "ledger", put("greeting", "moved", None), 0),
        to_other,
    )
    .await;
    assert_eq!(
        (a.status, &a.body["reason"]),
        (403, &Value::from("wrong_node")),
        "{a:?}"
    );
    // None of the refused writes happened.
    let (code, _, body) = replica_get(&addr, &token, "greeting").await;
    assert_eq!((code, body.as_slice()), (200, &b"bye"[..]));

    // A request naming the node without a replica: it has no store to carry it out.
    let own = outsider.shared.peer_id.to_base58();
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, &own, "ledger", get_op("greeting"), 0).as_bytes(),
    )
    .await;
    assert_eq!((code, &v["reason"]), (503, &Value::from("no_store")), "{v}");
    // Deleted, then absent.
    let del = KvOp::Delete {
        key: "greeting".into(),
        if_revision: None,
    };
    let (code, v) = post(x, "/v1/kv", signed(op, h_peer, "ledger", del, 0).as_bytes()).await;
    assert_eq!(code, 200, "{v}");
    let (code, _, _) = replica_get(&addr, &token, "greeting").await;
    assert_eq!(code, 404);

    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_writes_an_eventual_workload_through_a_node_without_a_replica() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let (b, b_stop) = fleet.start("b", Some(&a)).await;
    let (c, c_stop) = fleet.start("c", Some(&a)).await;
    let nodes = vec![(a, a_stop), (b, b_stop), (c, c_stop)];
    let manifest = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"notes\"\ngeneration = 1\n\
        [placement]\nreplicas = 2\nspread = \"node\"\n\
        [consistency]\nmode = \"eventual\"\n\
        [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"600\"]\n\
        resources = { cpu = \"10m\", memory = \"8Mi\" }\n";
    nodes[0]
        .0
        .shared
        .apply(&fleet.signed_text(manifest))
        .await
        .expect("accepted");
    let hosts = running_hosts(&nodes[0].0, "notes", 2, |_| true).await;
    let outsider = nodes
        .iter()
        .map(|(n, _)| n)
        .find(|n| !hosts.iter().any(|h| h.0 == n.shared.name))
        .expect("a node without a replica");
    let x = &outsider.api_socket;
    let (h, h_peer, h_index) = &hosts[0];
    let (other, _, other_index) = &hosts[1];
    let op = &fleet.operator;

    let written = signed(op, h_peer, "notes", put("motd", "hello", None), 0);
    let (code, v) = post(x, "/v1/kv", written.as_bytes()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["node_name"], &v["mode"]),
        (&Value::from(h.as_str()), &Value::from("eventual")),
        "{v}"
    );
    let revision = v["revision"].as_u64().expect("a revision");
    // Read back from the same host through the operator path and its replica, at once.
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, h_peer, "notes", get_op("motd"), 0).as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["value"], v["revision"].as_u64()),
        (&Value::from("hello"), Some(revision))
    );
    let (addr, token) = endpoint(&fleet, h, "notes", *h_index).expect("endpoint");
    let (code, _, body) = replica_get(&addr, &token, "motd").await;
    assert_eq!((code, body.as_slice()), (200, &b"hello"[..]));
    // The other replica reads it once the hosts exchanged it.
    let (addr, token) = endpoint(&fleet, other, "notes", *other_index).expect("endpoint");
    let start = tokio::time::Instant::now();
    loop {
        let (code, _, body) = replica_get(&addr, &token, "motd").await;
        if code == 200 && body == b"hello" {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the other replica never read it: {code}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Conditional writes are a strong workload's; a replay and an untrusted key are refused.
    let conditional = put("motd", "x", Some(revision));
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, h_peer, "notes", conditional, 0).as_bytes(),
    )
    .await;
    assert_eq!(
        (code, &v["reason"]),
        (400, &Value::from("unsupported")),
        "{v}"
    );
    let (code, v) = post(x, "/v1/kv", written.as_bytes()).await;
    assert_eq!((code, &v["reason"]), (403, &Value::from("replay")), "{v}");
    let stranger = SecretKey::from_seed([99; 32]);
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(&stranger, h_peer, "notes", get_op("motd"), 0).as_bytes(),
    )
    .await;
    assert_eq!(
        (code, &v["reason"]),
        (403, &Value::from("untrusted")),
        "{v}"
    );
    // A workload nobody applied.
    let (code, v) = post(
        x,
        "/v1/kv",
        signed(op, h_peer, "nobody", get_op("motd"), 0).as_bytes(),
    )
    .await;
    assert_eq!(
        (code, &v["reason"]),
        (404, &Value::from("no_workload")),
        "{v}"
    );

    stop(nodes).await;
}
