//! Helpers shared by the driver integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use beemesh_driver::{ContainerDriver, LogLine, LogOptions, ReplicaId, ReplicaSpec};
use beemesh_manifest::Manifest;
use futures_util::StreamExt;

pub const NODE: &str = "test-node";

/// Polls `f` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A validated manifest from `[[container]]` tables appended to a minimal header.
pub fn manifest(name: &str, containers: &str) -> Arc<Manifest> {
    let text = format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"{name}\"\ngeneration = 1\n\n{containers}"
    );
    match Manifest::from_toml("test.toml", &text) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("test manifest is invalid: {e}\n{text}"),
    }
}

pub fn spec(manifest: Arc<Manifest>, content_id: &str) -> ReplicaSpec {
    ReplicaSpec::new(manifest, 0, content_id, NODE)
}

/// The replica's log lines so far (no follow).
pub async fn log_lines(driver: &dyn ContainerDriver, id: &ReplicaId) -> Vec<LogLine> {
    let mut stream = match driver
        .logs(
            id,
            LogOptions {
                tail: None,
                follow: false,
            },
        )
        .await
    {
        Ok(s) => s,
        Err(e) => panic!("logs of {id}: {e}"),
    };
    let mut out = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap_or_else(|_| panic!("log stream of {id} stalled"))
    {
        match item {
            Ok(l) => out.push(l),
            Err(e) => panic!("log stream of {id}: {e}"),
        }
    }
    out
}

/// Waits until the logs contain a line starting with `prefix` and returns that line.
pub async fn wait_for_log(
    driver: &dyn ContainerDriver,
    id: &ReplicaId,
    prefix: &str,
    timeout: Duration,
) -> String {
    wait_for(
        &format!("a log line starting with {prefix:?} from {id}"),
        timeout,
        async || {
            log_lines(driver, id)
                .await
                .into_iter()
                .map(|l| l.line)
                .find(|l| l.starts_with(prefix))
        },
    )
    .await
}
