//! In-process desired-state convergence: real nodes (store, mesh, API) on loopback.

use std::sync::Arc;
use std::time::Duration;

use beemesh_node::Shared;

mod common;
use common::{Fleet, get};

const DEADLINE: Duration = Duration::from_secs(30);

fn signed(fleet: &Fleet, generation: u64, deleted: bool) -> String {
    let body = if deleted {
        "deleted = true\n".to_owned()
    } else {
        "[[container]]\nname = \"web\"\nimage = \"localhost/busybox:latest\"\n".to_owned()
    };
    let text = format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = {generation}\n{body}"
    );
    fleet.signed_text(&text)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn generation_on(s: &Arc<Shared>) -> Option<u64> {
    s.store()
        .get("default", "hello")
        .map(|e| e.manifest.generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_converges_and_late_nodes_catch_up() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let (b, b_stop) = fleet.start("b", Some(&a)).await;
    let (c, c_stop) = fleet.start("c", Some(&a)).await;

    let mut peers_ok = false;
    let start = tokio::time::Instant::now();
    while !peers_ok {
        assert!(start.elapsed() < DEADLINE, "3 nodes never saw each other");
        peers_ok = a.shared.peers().await.len() == 2 && c.shared.peers().await.len() == 2;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Applied on c, replicated to a and b by gossip, with the same content id.
    let (_, entry) = c
        .shared
        .apply(&signed(&fleet, 1, false))
        .await
        .expect("accepted");
    eventually("a and b to receive generation 1", || {
        generation_on(&a.shared) == Some(1) && generation_on(&b.shared) == Some(1)
    })
    .await;
    assert_eq!(
        a.shared
            .store()
            .get("default", "hello")
            .map(|e| e.content_id),
        Some(entry.content_id)
    );

    // A rollback to an older generation is refused everywhere, even through the API.
    c.shared
        .apply(&signed(&fleet, 2, false))
        .await
        .expect("generation 2");
    eventually("generation 2 everywhere", || {
        [&a, &b, &c]
            .iter()
            .all(|n| generation_on(&n.shared) == Some(2))
    })
    .await;
    assert!(a.shared.apply(&signed(&fleet, 1, false)).await.is_err());

    // A node that joins late catches up through anti-entropy (gossip happened before it).
    let (d, d_stop) = fleet.start("d", Some(&b)).await;
    eventually("late node d to catch up", || {
        generation_on(&d.shared) == Some(2)
    })
    .await;

    // A tombstone spreads the same way.
    b.shared
        .apply(&signed(&fleet, 3, true))
        .await
        .expect("tombstone");
    eventually("the tombstone everywhere", || {
        [&a, &b, &c, &d].iter().all(|n| {
            n.shared
                .store()
                .get("default", "hello")
                .is_some_and(|e| e.manifest.deleted && e.manifest.generation == 3)
        })
    })
    .await;

    // A restarted node keeps its identity and its desired state.
    let d_id = d.shared.peer_id;
    d_stop.cancel();
    d.join().await;
    let (d2, d2_stop) = fleet.start("d", Some(&a)).await;
    assert_eq!(d2.shared.peer_id, d_id);
    assert_eq!(generation_on(&d2.shared), Some(3));

    for s in [a_stop, b_stop, c_stop, d2_stop] {
        s.cancel();
    }
    for n in [a, b, c, d2] {
        tokio::time::timeout(Duration::from_secs(10), n.join())
            .await
            .expect("node stops within 10 s of shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_on_the_unix_socket() {
    let fleet = Fleet::new();
    let (a, stop) = fleet.start("a", None).await;
    let sock = a.api_socket.clone();
    let (_, status) = get(&sock, "/v1/status").await;
    assert!(status.contains(&a.shared.peer_id.to_base58()), "{status}");
    let (_, metrics) = get(&sock, "/metrics").await;
    assert!(metrics.contains("beemesh_workloads"), "{metrics}");
    stop.cancel();
    a.join().await;
    assert!(!sock.exists(), "the socket is removed on shutdown");
}

fn running_on(placements: &serde_json::Value) -> Vec<String> {
    placements["placements"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["state"] == "running")
                .filter_map(|p| p["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_is_placed_on_exactly_replicas_distinct_nodes_and_runs() {
    let fleet = Fleet::new();
    let (a, a_stop) = fleet.start("a", None).await;
    let (b, b_stop) = fleet.start("b", Some(&a)).await;
    let (c, c_stop) = fleet.start("c", Some(&a)).await;
    let manifest = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"sleeper\"\ngeneration = 1\n\
        [placement]\nreplicas = 2\nspread = \"node\"\n\
        [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"600\"]\n\
        resources = { cpu = \"10m\", memory = \"8Mi\" }\n";
    b.shared
        .apply(&fleet.signed_text(manifest))
        .await
        .expect("accepted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = serde_json::Value::Null;
    loop {
        let sock = c.api_socket.clone();
        let (code, json) = get(&sock, "/v1/workloads/default/sleeper").await;
        if code == 200 {
            last = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
            let mut nodes = running_on(&last);
            nodes.sort();
            nodes.dedup();
            if nodes.len() == 2 && last["placements"].as_array().map(Vec::len) == Some(2) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached 2 running replicas on distinct nodes: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in [a_stop, b_stop, c_stop] {
        s.cancel();
    }
    for n in [a, b, c] {
        let _ = tokio::time::timeout(Duration::from_secs(15), n.join()).await;
    }
}
