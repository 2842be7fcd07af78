//! Per-workload state on real in-process nodes (process driver, loopback): what one replica
//! writes through its state endpoint, another replica of the workload reads through its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{Fleet, get};

const DEADLINE: Duration = Duration::from_secs(60);

/// A replica's endpoint as its node wrote it down: (address, token).
fn endpoint(replica_dir: &Path) -> Option<(String, String)> {
    let port = std::fs::read_to_string(replica_dir.join("port")).ok()?;
    let token = std::fs::read_to_string(replica_dir.join("token")).ok()?;
    Some((
        format!("127.0.0.1:{}", port.trim()),
        token.trim().to_owned(),
    ))
}

/// One HTTP request to a state endpoint: (status, body).
async fn call(addr: &str, token: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    call_with(addr, token, method, path, "", body).await
}

/// [`call`] with extra header lines (each ending in `\r\n`).
async fn call_with(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("answered")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let status = String::from_utf8_lossy(&raw[..split.min(12)])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw.get(split + 4..).unwrap_or_default().to_vec())
}

/// A workload of `replicas` replicas, one per node, in consistency `mode`.
fn manifest(name: &str, replicas: u32, mode: &str) -> String {
    format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"{name}\"\ngeneration = 1\n\
         [placement]\nreplicas = {replicas}\nspread = \"node\"\n\
         [consistency]\nmode = \"{mode}\"\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"600\"]\n\
         resources = {{ cpu = \"10m\", memory = \"8Mi\" }}\n"
    )
}

/// Waits until `replicas` replicas of `name` run (as `api` reports) and their endpoints are
/// written down on `nodes`; returns the endpoints.
async fn running_endpoints(
    fleet: &Fleet,
    api: &beemesh_node::RunningNode,
    nodes: &[&str],
    name: &str,
    replicas: u32,
) -> Vec<(String, String)> {
    let root = fleet.dir.path().to_owned();
    let dirs: Vec<PathBuf> = nodes
        .iter()
        .flat_map(|n| {
            let root = root.clone();
            (0..replicas).map(move |i| {
                root.join(n)
                    .join("data/replicas")
                    .join(format!("bm_default_{name}_{i}"))
            })
        })
        .collect();
    let start = tokio::time::Instant::now();
    loop {
        let found: Vec<(String, String)> = dirs.iter().filter_map(|d| endpoint(d)).collect();
        let (code, json) = get(&api.api_socket, &format!("/v1/workloads/default/{name}")).await;
        let running = code == 200
            && serde_json::from_str::<serde_json::Value>(&json)
                .is_ok_and(|v| v["running"] == replicas);
        if found.len() == replicas as usize && running {
            eprintln!(
                "{replicas} replicas of {name} ran after {:?}",
                start.elapsed()
            );
            return found;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{replicas} replicas never ran: {json}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_writes_another_reads_eventually() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let (b, b_stop) = fleet.start("b", Some(&a)).await;
    let (c, c_stop) = fleet.start("c", Some(&a)).await;
    a.shared
        .apply(&fleet.signed_text(&manifest("notes", 2, "eventual")))
        .await
        .expect("accepted");
    // The two replicas' endpoints, wherever they were placed.
    let endpoints = running_endpoints(&fleet, &c, &["a", "b", "c"], "notes", 2).await;
    let (one, two) = (&endpoints[0], &endpoints[1]);

    // No token, no state.
    let (status, _) = call(&one.0, "wrong", "GET", "/v1/kv/x", b"").await;
    assert_eq!(status, 401);
    // Conditional writes are a strong workload's: refused here with the reason.
    let (status, body) = call_with(
        &one.0,
        &one.1,
        "PUT",
        "/v1/kv/x",
        "If-Match: \"0\"\r\n",
        b"1",
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("strong"));
    let (status, body) = call(&one.0, &one.1, "PUT", "/v1/kv/x", b"1").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // Written through one replica, read through the other (the hosts learn of each other
    // from the coordinator's placements, then deltas and reconciliation carry the write).
    let written = tokio::time::Instant::now();
    call(&one.0, &one.1, "PUT", "/v1/kv/greeting", b"hello").await;
    loop {
        let (status, body) = call(&two.0, &two.1, "GET", "/v1/kv/greeting", b"").await;
        if status == 200 && body == b"hello" {
            break;
        }
        assert!(
            written.elapsed() < DEADLINE,
            "the other replica never read the write: {status} {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "a write reached the other replica after {:?}",
        written.elapsed()
    );
    // A delete travels the same way; listings agree.
    call(&two.0, &two.1, "DELETE", "/v1/kv/x", b"").await;
    loop {
        let (_, body) = call(&one.0, &one.1, "GET", "/v1/kv?prefix=", b"").await;
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let keys: Vec<&str> = page["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["key"].as_str())
            .collect();
        if keys == ["greeting"] {
            break;
        }
        assert!(written.elapsed() < DEADLINE, "listing: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each host's store shows in its metrics.
    let mut hosts = 0;
    for n in [&a, &b, &c] {
        let (_, metrics) = get(&n.api_socket, "/metrics").await;
        if metrics.contains("beemesh_state_keys{workload=\"default/notes\"} 1")
            && metrics.contains("beemesh_state_tombstones{workload=\"default/notes\"} 1")
        {
            hosts += 1;
            assert!(
                metrics.contains("beemesh_state_deltas_sent_total{workload=\"default/notes\"}"),
                "{metrics}"
            );
        }
    }
    let (_, sample) = get(&a.api_socket, "/metrics").await;
    assert_eq!(
        hosts,
        2,
        "two hosts, each with 1 key (greeting) and 1 tombstone (x): {}",
        sample
            .lines()
            .filter(|l| l.contains("state_"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    for s in [a_stop, b_stop, c_stop] {
        s.cancel();
    }
    for n in [a, b, c] {
        let _ = tokio::time::timeout(Duration::from_secs(15), n.join()).await;
    }
}

/// The `ETag` of a response head (the revision).
fn etag(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("etag:")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().trim_matches('"').parse().ok())
}

/// One HTTP request with its head: (status, head, body).
async fn call_head(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
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
    (
        status,
        head,
        raw.get(split + 4..).unwrap_or_default().to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_workloads_replicas_read_every_acknowledged_write() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let (b, b_stop) = fleet.start("b", Some(&a)).await;
    let (c, c_stop) = fleet.start("c", Some(&a)).await;
    b.shared
        .apply(&fleet.signed_text(&manifest("ledger", 3, "strong")))
        .await
        .expect("accepted");
    // Running only once every host is a voter of the group.
    let endpoints = running_endpoints(&fleet, &a, &["a", "b", "c"], "ledger", 3).await;
    for (i, (addr, token)) in endpoints.iter().enumerate() {
        // Create-only: the key is absent.
        let key = format!("/v1/kv/entry-{i}");
        let (status, head, body) =
            call_head(addr, token, "PUT", &key, "If-Match: \"0\"\r\n", b"v1").await;
        assert_eq!(status, 200, "{head} {}", String::from_utf8_lossy(&body));
        let revision = etag(&head).expect("a revision");
        // Every other replica reads it at once (linearizable reads), at that revision.
        for (other, (addr2, token2)) in endpoints.iter().enumerate() {
            let (status, head, body) = call_head(addr2, token2, "GET", &key, "", b"").await;
            assert_eq!(
                (status, body.as_slice()),
                (200, &b"v1"[..]),
                "replica {other}"
            );
            assert_eq!(etag(&head), Some(revision), "replica {other}: {head}");
        }
        // A write expecting a stale revision is refused; the current one succeeds.
        let stale = format!("If-Match: \"{}\"\r\n", revision + 100);
        let (status, _, _) = call_head(addr, token, "PUT", &key, &stale, b"v2").await;
        assert_eq!(status, 412);
        let fresh = format!("If-Match: \"{revision}\"\r\n");
        let (status, head, _) = call_head(addr, token, "PUT", &key, &fresh, b"v2").await;
        assert_eq!(status, 200, "{head}");
        assert!(etag(&head).expect("revision") > revision);
    }
    // Each host shows the group in its metrics: three voters, one leader among them.
    let metrics_from = tokio::time::Instant::now();
    loop {
        let mut voters = 0;
        let mut leaders = 0;
        for n in [&a, &b, &c] {
            let (_, m) = get(&n.api_socket, "/metrics").await;
            voters += usize::from(m.contains("beemesh_raft_voters{workload=\"default/ledger\"} 3"));
            leaders +=
                usize::from(m.contains("beemesh_raft_is_leader{workload=\"default/ledger\"} 1"));
        }
        if voters == 3 && leaders == 1 {
            break;
        }
        assert!(
            metrics_from.elapsed() < DEADLINE,
            "{voters} hosts show 3 voters, {leaders} lead"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for s in [a_stop, b_stop, c_stop] {
        s.cancel();
    }
    for n in [a, b, c] {
        let _ = tokio::time::timeout(Duration::from_secs(15), n.join()).await;
    }
}

/// The workload's status from a node's API.
async fn status(node: &beemesh_node::RunningNode, path: &str) -> serde_json::Value {
    let (code, json) = get(&node.api_socket, path).await;
    assert_eq!(code, 200, "{json}");
    serde_json::from_str(&json).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_group_follows_its_replicas_when_a_host_leaves() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let mut others = Vec::new();
    for n in ["b", "c", "d"] {
        others.push((n, fleet.start(n, Some(&a)).await));
    }
    let manifest = manifest("ledger", 3, "strong");
    a.shared
        .apply(&fleet.signed_text(&manifest))
        .await
        .expect("accepted");
    let root = fleet.dir.path().to_owned();
    let endpoint_of = |node: &str, index: u64| {
        endpoint(
            &root
                .join(node)
                .join("data/replicas")
                .join(format!("bm_default_ledger_{index}")),
        )
    };
    // (node, index) of each running replica, once 3 run and the group has 3 voters.
    let path = "/v1/workloads/default/ledger";
    let settled = |v: &serde_json::Value| -> Option<Vec<(String, u64)>> {
        let placed: Vec<(String, u64)> = v["placements"]
            .as_array()?
            .iter()
            .filter(|p| p["state"] == "running")
            .filter_map(|p| Some((p["node"].as_str()?.to_owned(), p["index"].as_u64()?)))
            .collect();
        let mut voters: Vec<String> = v["group"]["voters"]
            .as_array()?
            .iter()
            .filter_map(|n| Some(n.as_str()?.to_owned()))
            .collect();
        voters.sort();
        let mut hosts: Vec<String> = placed.iter().map(|p| p.0.clone()).collect();
        hosts.sort();
        (placed.len() == 3 && voters == hosts && v["group"]["leader"].is_string()).then_some(placed)
    };
    let start = tokio::time::Instant::now();
    let first = loop {
        let v = status(&a, path).await;
        if let Some(p) = settled(&v) {
            break p;
        }
        assert!(start.elapsed() < DEADLINE, "never settled: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Acknowledged before the move.
    let (node, index) = &first[0];
    let (addr, token) = endpoint_of(node, *index).expect("endpoint");
    let (code, _) = call(&addr, &token, "PUT", "/v1/kv/before", b"kept").await;
    assert_eq!(code, 200);

    // A host other than `a` (whose API the test reads) leaves the mesh.
    let victim = first
        .iter()
        .map(|p| p.0.clone())
        .find(|n| n != "a")
        .expect("a host besides a");
    let pos = others
        .iter()
        .position(|(n, _)| *n == victim)
        .expect("victim");
    let (_, (node, stop)) = others.remove(pos);
    let victim_id = node.shared.peer_id.to_base58();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), node.join()).await;
    let left = tokio::time::Instant::now();

    // Its replica is placed on the fourth node, which joins the group; the voters follow.
    let moved = loop {
        let v = status(&a, path).await;
        // (A node that left shows by its peer id once its name is forgotten.)
        if let Some(p) = settled(&v)
            && p.iter().all(|(n, _)| *n != victim && *n != victim_id)
        {
            break p;
        }
        assert!(left.elapsed() < 2 * DEADLINE, "the group never moved: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!(
        "replica moved off {victim} and the voters followed after {:?}",
        left.elapsed()
    );
    let newcomer = moved
        .iter()
        .find(|(n, _)| !first.iter().any(|(f, _)| f == n))
        .expect("a new host");
    let (addr, token) = endpoint_of(&newcomer.0, newcomer.1)
        .unwrap_or_else(|| panic!("no endpoint of {newcomer:?} (first {first:?}, now {moved:?})"));
    let (code, body) = call(&addr, &token, "GET", "/v1/kv/before", b"").await;
    assert_eq!(
        (code, body.as_slice()),
        (200, &b"kept"[..]),
        "the new host lost an acknowledged write"
    );
    let (code, _) = call(&addr, &token, "PUT", "/v1/kv/after", b"new").await;
    assert_eq!(code, 200);

    a_stop.cancel();
    for (_, (_, s)) in &others {
        s.cancel();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), a.join()).await;
    for (_, (n, _)) in others {
        let _ = tokio::time::timeout(Duration::from_secs(15), n.join()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_group_that_lost_its_quorum_is_reported_and_never_formed_again() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let mut nodes = Vec::new();
    for n in ["b", "c", "d"] {
        nodes.push(fleet.start(n, Some(&a)).await);
    }
    nodes.insert(0, (a, a_stop));
    let manifest = manifest("ledger", 3, "strong");
    nodes[0]
        .0
        .shared
        .apply(&fleet.signed_text(&manifest))
        .await
        .expect("accepted");
    let path = "/v1/workloads/default/ledger";
    let start = tokio::time::Instant::now();
    let voters: Vec<String> = loop {
        let v = status(&nodes[0].0, path).await;
        let voters: Vec<String> = v["group"]["voters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        if v["running"] == 3 && voters.len() == 3 {
            break voters;
        }
        assert!(start.elapsed() < DEADLINE, "never ran: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Two of the three voters' nodes leave for good.
    let keep = voters[0].clone();
    let spare = nodes
        .iter()
        .map(|(n, _)| n.shared.name.clone())
        .find(|n| !voters.contains(n))
        .expect("a node without a replica");
    let mut survivors = Vec::new();
    for (node, stop) in nodes {
        if node.shared.name == keep || node.shared.name == spare {
            survivors.push((node, stop));
        } else {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(15), node.join()).await;
        }
    }
    let left = tokio::time::Instant::now();
    let host = survivors
        .iter()
        .find(|(n, _)| n.shared.name == keep)
        .map(|(n, _)| n)
        .expect("the remaining voter");
    let v = loop {
        let v = status(host, path).await;
        if v["failed"] == "quorum lost: 2 of 3 voters gone" {
            break v;
        }
        assert!(left.elapsed() < DEADLINE, "quorum loss never reported: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("reported after {:?}: {}", left.elapsed(), v["failed"]);
    // The spare node may be given a replica, but no group is formed anew there: the state
    // the lost voters hold is not replaced by an empty one.
    let spare_node = survivors
        .iter()
        .find(|(n, _)| n.shared.name == spare)
        .map(|(n, _)| n)
        .expect("spare");
    // Once the coordinator has noticed the lost hosts, only the remaining voter's replica
    // runs; the spare's (if it was given one) cannot join and does not run.
    loop {
        let v = status(spare_node, path).await;
        if v["running"] == 1 {
            break;
        }
        assert!(left.elapsed() < 2 * DEADLINE, "{v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let watch = tokio::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(10) {
        let v = status(spare_node, path).await;
        // Every node reports the failure, and the group (as any member sees it) is the old
        // one: its three voters, one of them the voter that remains.
        assert_eq!(v["failed"], "quorum lost: 2 of 3 voters gone", "{v}");
        let g = &v["group"]["voters"];
        assert!(
            g.as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().any(|n| n == keep.as_str())),
            "a new group: {v}"
        );
        assert_eq!(v["running"], 1, "{v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (node, stop) in survivors {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), node.join()).await;
    }
}
