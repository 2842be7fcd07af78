//! Replica logs through the API of a node that does not run the replica: three real nodes
//! (store, mesh, scheduler, process driver, API) on loopback.

use std::path::PathBuf;
use std::time::Duration;

use beemesh_node::RunningNode;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

mod common;
use common::{Fleet, get, open};

const DEADLINE: Duration = Duration::from_secs(60);

/// Reads from a streaming answer until `needle` appears in what was read so far.
async fn read_until(s: &mut tokio::net::UnixStream, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{needle:?} never arrived; got {seen:?}"))
            .expect("read");
        assert!(n > 0, "the stream ended before {needle:?}; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

fn sock(n: &RunningNode) -> PathBuf {
    n.api_socket.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_come_from_the_node_that_runs_the_replica_through_any_node() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let (b, b_stop) = fleet.start("b", Some(&a)).await;
    let (c, c_stop) = fleet.start("c", Some(&a)).await;
    let start = Instant::now();
    while a.shared.peers().await.len() < 2
        || b.shared.peers().await.len() < 2
        || c.shared.peers().await.len() < 2
    {
        assert!(start.elapsed() < DEADLINE, "3 nodes never saw each other");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The replica prints a line, then a second one once the test creates the trigger file.
    let trigger = fleet.dir.path().join("trigger");
    let manifest = format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"talker\"\ngeneration = 1\n\
         [placement]\nreplicas = 1\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\n\
         command = [\"sh\", \"-c\", \"echo hello-from-replica; while [ ! -e {t} ]; do sleep 0.1; done; echo written-later; exec sleep 3600\"]\n\
         resources = {{ cpu = \"10m\", memory = \"16Mi\" }}\n",
        t = trigger.display()
    );
    a.shared
        .apply(&fleet.signed_text(&manifest))
        .await
        .expect("accepted");

    // Wait until the replica runs somewhere, and note where.
    let deadline = Instant::now() + DEADLINE;
    let holder = loop {
        let (_, body) = get(&sock(&a), "/v1/workloads/default/talker").await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let running = v["placements"].as_array().and_then(|ps| {
            ps.iter()
                .find(|p| p["state"] == "running")
                .and_then(|p| p["node"].as_str().map(str::to_owned))
        });
        if let Some(node) = running {
            break node;
        }
        assert!(Instant::now() < deadline, "the replica never ran: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut nodes = vec![(a, a_stop), (b, b_stop), (c, c_stop)];
    let holder_at = nodes
        .iter()
        .position(|(n, _)| n.shared.name == holder)
        .expect("the holder");
    let other_at = nodes
        .iter()
        .position(|(n, _)| n.shared.name != holder)
        .expect("a node without the replica");
    let other = &nodes[other_at].0;
    let local = &nodes[holder_at].0;
    assert!(
        other.shared.driver.list().await.expect("list").is_empty(),
        "{} runs no replica",
        other.shared.name
    );

    // Past lines through a node that does not hold the replica (relayed over the mesh).
    let deadline = Instant::now() + DEADLINE;
    let body = loop {
        let (code, body) = get(&sock(other), "/v1/workloads/default/talker/logs").await;
        if code == 200 && body.contains("hello-from-replica") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the replica's line never arrived through {}: {code} {body}",
            other.shared.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first: Value = serde_json::from_str(body.lines().next().unwrap_or("")).expect("JSON line");
    assert_eq!(first["container"], "main", "{body}");
    assert_eq!(first["line"], "hello-from-replica", "{body}");
    let (code, text) = get(
        &sock(other),
        "/v1/workloads/default/talker/logs?format=text&tail=5&replica=0",
    )
    .await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("main | hello-from-replica"), "{text}");
    // The holder serves it from its own driver.
    let (code, text) = get(
        &sock(local),
        "/v1/workloads/default/talker/logs?format=text",
    )
    .await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("main | hello-from-replica"), "{text}");

    // Follow through the other node: the past line, then one written later.
    let mut stream = open(
        &sock(other),
        "/v1/workloads/default/talker/logs?follow=true&format=text",
    )
    .await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "main | hello-from-replica").await;
    assert!(
        seen.starts_with("HTTP/1.0 200") || seen.starts_with("HTTP/1.1 200"),
        "{seen}"
    );
    assert!(!seen.contains("written-later"), "{seen}");
    std::fs::write(&trigger, b"go").expect("trigger");
    read_until(&mut stream, &mut seen, "main | written-later").await;

    // Clear errors.
    let (code, body) = get(&sock(other), "/v1/workloads/default/nobody/logs").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no workload default/nobody"), "{body}");
    let (code, body) = get(&sock(other), "/v1/workloads/default/talker/logs?replica=3").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("there is no replica 3"), "{body}");
    let (code, body) = get(&sock(other), "/v1/workloads/default/talker/logs?tail=x").await;
    assert_eq!(code, 400, "{body}");
    let nowhere = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"nowhere\"\ngeneration = 1\n\
         [placement]\nreplicas = 1\nselector = { zone = \"mars\" }\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"600\"]\n";
    other
        .shared
        .apply(&fleet.signed_text(nowhere))
        .await
        .expect("accepted");
    let (code, body) = get(&sock(other), "/v1/workloads/default/nowhere/logs").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no replica of default/nowhere is placed yet"),
        "{body}"
    );

    // A node stops promptly even while a follower is attached to it.
    let mut local_follow = open(
        &sock(local),
        "/v1/workloads/default/talker/logs?follow=true&format=text",
    )
    .await;
    let mut local_seen = String::new();
    read_until(&mut local_follow, &mut local_seen, "main | written-later").await;
    let holder_driver = local.shared.driver.clone();
    let (other, other_stop) = nodes.remove(other_at);
    other_stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), other.join())
        .await
        .expect("the relaying node stops within 15 s of shutdown");
    drop(stream);

    // Deleting the workload stops the replica, which ends a follower's stream.
    let local = nodes
        .iter()
        .map(|(n, _)| n)
        .find(|n| n.shared.name == holder)
        .expect("the holder");
    local
        .shared
        .apply(&fleet.signed_text(
            "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"talker\"\ngeneration = 2\ndeleted = true\n",
        ))
        .await
        .expect("tombstone accepted");
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, local_follow.read_to_end(&mut rest))
        .await
        .expect("the follow stream ends when the replica stops")
        .expect("read");
    let start = Instant::now();
    while !holder_driver.list().await.expect("list").is_empty() {
        assert!(start.elapsed() < DEADLINE, "the replica never stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (_, s) in &nodes {
        s.cancel();
    }
    for (n, _) in nodes {
        tokio::time::timeout(Duration::from_secs(15), n.join())
            .await
            .expect("node stops within 15 s of shutdown");
    }
}
