//! The node API: HTTP/JSON on the unix socket `[api] socket` (protected by file permissions)
//! and optionally on `[api] listen` (TCP, every request needs `Authorization: Bearer <token>`).
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/status` | this node: peer id, name, labels, version, uptime, peer count, capacity, sandbox |
//! | `GET /v1/peers` | admitted peers that are up |
//! | `GET /v1/workloads` | the desired state, with placements |
//! | `GET /v1/workloads/{namespace}/{name}` | one workload, with its signed manifest |
//! | `GET /v1/workloads/{namespace}/{name}/logs` | a replica's log lines, streamed, from whichever node runs it ([`crate::logs`]) |
//! | `POST /v1/workloads` | a signed manifest: 202 with the content id, or 4xx with the reason |
//! | `POST /v1/kv` | a signed operator request to a workload's store ([`crate::operator_kv`]) |
//! | `GET /metrics` | Prometheus text format |

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use beemesh_manifest::host::ApiSection;
use beemesh_manifest::input::MAX_SIGNED_BYTES;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;

use beemesh_scheduler::WorkloadId;

use crate::node::{NodeError, Shared};
use crate::placement;
use crate::store::{Entry, Outcome, SubmitError};

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/workloads", get(workloads).post(apply))
        .route("/v1/workloads/{namespace}/{name}", get(workload))
        .route(
            "/v1/workloads/{namespace}/{name}/logs",
            get(crate::logs::http),
        )
        .route("/v1/kv", post(crate::operator_kv::http))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_SIGNED_BYTES as usize + 1024))
        .with_state(shared)
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    let peers = s.peers().await;
    let listen: Vec<String> = s
        .mesh
        .listen_addrs()
        .await
        .unwrap_or_default()
        .iter()
        .map(|a| a.to_string())
        .collect();
    axum::Json(json!({
        "peer_id": s.peer_id.to_base58(),
        "name": s.name,
        "labels": s.labels,
        "domain": s.domain,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "peers": peers.len(),
        "listen": listen,
        "capacity": s.capacity,
        "workloads": s.store().len(),
        "sandbox": s.sandbox,
    }))
    .into_response()
}

async fn peers(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(s.peers().await).into_response()
}

/// Peer id → node name, for placements (the local node included).
async fn names(s: &Shared) -> BTreeMap<String, String> {
    let mut names: BTreeMap<String, String> = s
        .peers()
        .await
        .into_iter()
        .map(|p| (p.peer_id, p.name))
        .collect();
    names.insert(s.peer_id.to_base58(), s.name.clone());
    names
}

async fn placements(s: &Shared, entries: &[(String, String)]) -> BTreeMap<WorkloadId, Value> {
    let ids: Vec<WorkloadId> = entries
        .iter()
        .map(|(ns, n)| WorkloadId::new(ns, n))
        .collect();
    let statuses = placement::statuses(&s.placement, &s.mesh, &s.peer_id.to_base58(), ids).await;
    let names = names(s).await;
    statuses
        .into_iter()
        .map(|(id, (st, coordinator))| {
            let list: Vec<Value> = st
                .placements
                .iter()
                .map(|p| {
                    json!({
                        "node": names.get(&p.node).cloned().unwrap_or_else(|| p.node.clone()),
                        "peer_id": p.node,
                        "index": p.index,
                        "generation": p.generation,
                        "state": p.state,
                    })
                })
                .collect();
            let v = json!({
                "placements": list,
                "placed": st.placed,
                "running": st.running,
                "unschedulable": st.unschedulable,
                "coordinator": coordinator.map(|c| names.get(&c).cloned().unwrap_or(c)),
            });
            (id, v)
        })
        .collect()
}

/// How long a host has to answer for its group's state.
const GROUP_STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Hosts asked, in turn, for a strong workload's group.
const GROUP_STATUS_TRIES: usize = 3;

/// The Raft group of each strong workload among `entries`, as this node or one of the hosts
/// in `placed` sees it (`"group": null` when none answered).
async fn groups(
    s: &Shared,
    entries: &[Entry],
    placed: &BTreeMap<WorkloadId, Value>,
) -> BTreeMap<WorkloadId, Value> {
    use beemesh_manifest::workload::ConsistencyMode;
    let live = crate::node::live_peers(s).await;
    let names = names(s).await;
    let name_of = |p: &String| names.get(p).cloned().unwrap_or_else(|| p.clone());
    let asks = entries
        .iter()
        .filter(|e| e.manifest.consistency.mode == ConsistencyMode::Strong && !e.manifest.deleted)
        .map(|e| {
            let id = WorkloadId::new(&e.manifest.namespace, &e.manifest.name);
            let hosts: Vec<String> = placed
                .get(&id)
                .and_then(|v| v["placements"].as_array())
                .into_iter()
                .flatten()
                .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                .collect();
            let (ns, name) = (e.manifest.namespace.clone(), e.manifest.name.clone());
            let live = &live;
            async move {
                let own = s.consistency.group_view(&ns, &name, live).await;
                // The leader's own view is the one that is current; a follower's, or that of
                // a node removed while it was down, may lag.
                if own
                    .as_ref()
                    .is_some_and(|v| v.leader.as_ref() == Some(&v.node))
                {
                    return (id, own);
                }
                let request = crate::consistency::group_status_request(&ns, &name);
                let local = s.peer_id.to_base58();
                let asks = hosts
                    .iter()
                    .filter(|h| **h != local)
                    .take(GROUP_STATUS_TRIES)
                    .filter_map(|h| h.parse().ok())
                    .map(|peer| {
                        let ask =
                            s.mesh
                                .request(peer, crate::consistency::GROUP_STATUS, request.clone());
                        async move {
                            match tokio::time::timeout(GROUP_STATUS_TIMEOUT, ask).await {
                                Ok(Ok(bytes)) => {
                                    serde_json::from_slice::<crate::consistency::GroupView>(&bytes)
                                        .ok()
                                }
                                _ => None,
                            }
                        }
                    });
                let mut views: Vec<crate::consistency::GroupView> =
                    futures_util::future::join_all(asks)
                        .await
                        .into_iter()
                        .flatten()
                        .collect();
                views.extend(own);
                let best = views.into_iter().max_by_key(|v| {
                    (
                        v.leader.as_ref() == Some(&v.node),
                        v.leader.is_some(),
                        v.term,
                    )
                });
                (id, best)
            }
        });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .map(|(id, v)| {
            let rendered = v.map_or(Value::Null, |v| {
                json!({
                    "seen_by": name_of(&v.node),
                    "leader": v.leader.as_ref().map(name_of),
                    "term": v.term,
                    "voters": v.voters.iter().map(name_of).collect::<Vec<_>>(),
                    "learners": v.learners.iter().map(name_of).collect::<Vec<_>>(),
                    "commit_index": v.commit_index,
                    "last_applied": v.last_applied,
                    "quorum_lost": v.quorum_lost,
                })
            });
            (id, rendered)
        })
        .collect()
}

/// A strong workload's group, and its failure when the group lost its quorum (it is never
/// re-created empty: the operator decides, see docs/consistency.md).
fn set_group(v: &mut Value, group: &Value) {
    v["group"] = group.clone();
    if let Some(reason) = group["quorum_lost"].as_str() {
        v["failed"] = Value::String(reason.to_owned());
    }
}

fn view(e: &Entry, with_signed: bool, placed: Option<&Value>) -> Value {
    let m = &e.manifest;
    let mut v = json!({
        "namespace": m.namespace,
        "name": m.name,
        "generation": m.generation,
        "digest": e.content_id.to_string(),
        "replicas": m.placement.replicas,
        "deleted": m.deleted,
        "consistency": m.consistency.mode,
        "labels": m.labels,
        "expires": m.expires,
        "placements": [],
    });
    if let Some(Value::Object(p)) = placed {
        for (k, val) in p {
            v[k] = val.clone();
        }
    }
    if with_signed {
        v["signed"] = Value::String(e.signed_text.clone());
    }
    v
}

async fn workloads(State(s): State<Arc<Shared>>) -> Response {
    let entries: Vec<Entry> = s.store().entries().cloned().collect();
    let keys: Vec<(String, String)> = entries
        .iter()
        .map(|e| (e.manifest.namespace.clone(), e.manifest.name.clone()))
        .collect();
    let placed = placements(&s, &keys).await;
    let groups = groups(&s, &entries, &placed).await;
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let id = WorkloadId::new(&e.manifest.namespace, &e.manifest.name);
            let mut v = view(e, false, placed.get(&id));
            if let Some(g) = groups.get(&id) {
                set_group(&mut v, g);
            }
            v
        })
        .collect();
    axum::Json(list).into_response()
}

async fn workload(
    State(s): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let entry = s.store().get(&namespace, &name).cloned();
    match entry {
        Some(e) => {
            let placed = placements(&s, &[(namespace.clone(), name.clone())]).await;
            let groups = groups(&s, std::slice::from_ref(&e), &placed).await;
            let id = WorkloadId::new(&namespace, &name);
            let mut v = view(&e, true, placed.get(&id));
            if let Some(g) = groups.get(&id) {
                set_group(&mut v, g);
            }
            axum::Json(v).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("no workload {namespace}/{name}"),
        ),
    }
}

async fn apply(State(s): State<Arc<Shared>>, body: String) -> Response {
    match s.apply(&body).await {
        Ok((outcome, e)) => {
            let status = match outcome {
                Outcome::Accepted => StatusCode::ACCEPTED,
                Outcome::Unchanged => StatusCode::OK,
            };
            let mut v = view(&e, false, None);
            v["content_id"] = v["digest"].clone();
            v["status"] = Value::from(match outcome {
                Outcome::Accepted => "accepted",
                Outcome::Unchanged => "unchanged",
            });
            (status, axum::Json(v)).into_response()
        }
        Err(e) => {
            let status = match &e {
                SubmitError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                SubmitError::Envelope(_) => StatusCode::BAD_REQUEST,
                SubmitError::Untrusted(_) => StatusCode::FORBIDDEN,
                SubmitError::Rollback(_) => StatusCode::CONFLICT,
                SubmitError::Io { .. } | SubmitError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                SubmitError::Interrupted(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            tracing::warn!("refused manifest from the API: {e}");
            error(status, error_text(&e))
        }
    }
}

/// The whole cause chain on one line.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    s.metrics
        .peers
        .set(s.mesh.peers().await.map(|p| p.len()).unwrap_or(0) as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(token): State<Arc<String>>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        next.run(request).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required on the TCP listener",
        )
    }
}

type Served = (
    PathBuf,
    Option<std::net::SocketAddr>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Binds the unix socket (and the TCP listener when configured) and serves until shutdown.
pub async fn serve(
    shared: Arc<Shared>,
    cfg: &ApiSection,
    shutdown: CancellationToken,
) -> Result<Served, NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let socket = cfg.socket.clone();
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|cause| NodeError::Dir {
            path: dir.to_owned(),
            cause,
        })?;
    }
    if socket.exists() {
        // A live socket means another node runs here; a dead one is left over from a crash.
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Err(NodeError::Api(format!(
                "{} is in use: is another beemesh node running?",
                socket.display()
            )));
        }
        let _ = std::fs::remove_file(&socket);
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| NodeError::Api(format!("cannot listen on {}: {e}", socket.display())))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| NodeError::Api(format!("cannot set the mode of {}: {e}", socket.display())))?;

    let app = router(shared.clone());
    let mut tasks = Vec::new();
    let sd = shutdown.clone();
    let unix_app = app.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, unix_app)
            .with_graceful_shutdown(sd.cancelled_owned())
            .await
        {
            tracing::error!("API on the unix socket failed: {e}");
        }
    }));

    let mut tcp_addr = None;
    if let Some(addr) = cfg.listen {
        let token_file = cfg
            .token_file
            .as_ref()
            .ok_or_else(|| NodeError::Config("api.listen needs api.token_file".into()))?;
        let token = beemesh_manifest::input::read_file(token_file, 4096, "an API token file")
            .map_err(|e| NodeError::Api(e.to_string()))?
            .trim()
            .to_owned();
        if token.len() < 16 {
            return Err(NodeError::Config(format!(
                "the token in {} is shorter than 16 characters",
                token_file.display()
            )));
        }
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| NodeError::Api(format!("cannot listen on {addr}: {e}")))?;
        tcp_addr = tcp.local_addr().ok();
        let tcp_app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, tcp_app)
                .with_graceful_shutdown(sd.cancelled_owned())
                .await
            {
                tracing::error!("API on TCP failed: {e}");
            }
        }));
    }
    Ok((socket, tcp_addr, tasks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
