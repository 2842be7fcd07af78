//! Operators' reads and writes of a workload's key-value store (`beemesh kv`), through any
//! node's API (docs/consistency.md, "Operators: beemesh kv").
//!
//! `POST /v1/kv` takes a signed operator request ([`beemesh_manifest::operator`]): the
//! operation, the workload, its arguments, the time, a nonce, and the peer id of the node that
//! is to carry it out (a host of the workload's store). The API is guarded like every other
//! route (the unix socket's permissions, the bearer token on TCP); the request's authority is
//! its signature, which every node that acts on it verifies itself:
//!
//! 1. The node that received it checks the size, the signer (one of its `[trust] signers`),
//!    the signature, the form, the time (within 5 minutes of its clock) and the nonce (never
//!    seen before; [`ReplayGuard`]).
//! 2. If the request names this node, the node carries it out on its own store of the workload
//!    ([`Backends::kv`]). Otherwise it forwards the signed bytes, unchanged, to the node named,
//!    over [`PROTOCOL`], and relays the answer.
//! 3. A node receiving a request over [`PROTOCOL`] checks everything again, and carries it out
//!    only if the request names it; it never forwards. A peer carries a request; it cannot
//!    make one.
//!
//! Because a request names the one node that may carry it out, and that node runs a nonce at
//! most once, a signed request runs at most once anywhere, whoever replays it.
//!
//! Answers are JSON: the value and its revision, a write's revision, or a page of a listing;
//! errors are `{"error": "...", "reason": "..."}` with the HTTP status of [`Answer::status`].
//! Over the mesh the answer travels as `{"status": N, "body": {...}}`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use beemesh_manifest::operator::{self, KvOp, KvRequest, OperatorError, ReplayGuard};
use beemesh_manifest::{PublicKey, TrustPolicy};
use beemesh_mesh::{MeshError, PeerId};
use beemesh_state::kv::{Item, KvError, MAX_PAGE};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::node::Shared;
use crate::replica_api::{Backends, item_json};

/// Request/response protocol between nodes: the signed request's bytes → an [`Answer`] (JSON).
pub const PROTOCOL: &str = "/beemesh/kv-op/1";
/// Operator requests a node works on at once (from its API and from peers together); more are
/// refused as busy.
pub const MAX_CONCURRENT: usize = 64;
/// Most bytes of items in one listing's answer (below the mesh's 1 MiB message limit); a page
/// cut short says where to continue.
pub const ANSWER_BUDGET: usize = 512 * 1024;
/// Items in a listing when the request names no limit.
const DEFAULT_LIMIT: usize = 100;
/// How long a forwarded request may take (a strong write's own deadline is 5 s; the mesh's
/// request timeout is 30 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(20);
/// The statuses an answer may carry; anything else from a peer is not an answer.
const STATUSES: [u16; 10] = [200, 400, 403, 404, 412, 413, 429, 500, 503, 507];

/// This node's side of operator requests: the trust policy and the nonces seen.
pub struct OperatorKv {
    policy: TrustPolicy,
    replay: Mutex<ReplayGuard>,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for OperatorKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorKv").finish_non_exhaustive()
    }
}

/// An answer to an operator request: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }

    fn error(status: StatusCode, reason: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: status.as_u16(),
            body: json!({ "error": message.to_string(), "reason": reason }),
        }
    }

    /// Names the node that answered.
    fn answered_by(mut self, s: &Shared) -> Self {
        if let Value::Object(m) = &mut self.body {
            m.insert("node".into(), Value::String(s.peer_id.to_base58()));
            m.insert("node_name".into(), Value::String(s.name.clone()));
        }
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        (status, axum::Json(self.body)).into_response()
    }
}

/// The HTTP status of a refused request.
fn refusal(e: &OperatorError) -> Answer {
    let status = match e {
        OperatorError::TooLarge { .. } | OperatorError::FieldTooLarge { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        OperatorError::Envelope(_) | OperatorError::Malformed { .. } => StatusCode::BAD_REQUEST,
        OperatorError::Untrusted { .. }
        | OperatorError::BadSignature { .. }
        | OperatorError::Stale { .. }
        | OperatorError::Replay { .. } => StatusCode::FORBIDDEN,
        OperatorError::ReplayCacheFull { .. } => StatusCode::TOO_MANY_REQUESTS,
        OperatorError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Answer::error(status, e.reason(), e)
}

fn kv_error(e: KvError) -> Answer {
    match e {
        KvError::InvalidKey { .. } => Answer::error(StatusCode::BAD_REQUEST, "invalid_key", e),
        KvError::TooLarge { .. } => Answer::error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e),
        KvError::Precondition {
            key,
            expected,
            actual,
        } => {
            let current =
                actual.map_or_else(|| "absent".to_owned(), |r| format!("at revision {r}"));
            let mut a = Answer::error(
                StatusCode::PRECONDITION_FAILED,
                "precondition",
                format!(
                    "key {key:?} is {current}, not at revision {expected}: read it again and write with the revision it has"
                ),
            );
            a.body["current_revision"] = json!(actual.unwrap_or(0));
            a
        }
        KvError::Unsupported { .. } => Answer::error(
            StatusCode::BAD_REQUEST,
            "unsupported",
            format!("{e}: leave out the revision"),
        ),
        KvError::Full { .. } => Answer::error(StatusCode::INSUFFICIENT_STORAGE, "full", e),
        KvError::Unavailable { .. } => {
            Answer::error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e)
        }
        KvError::Internal(_) => Answer::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
}

fn busy() -> Answer {
    Answer::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        format!("this node works on {MAX_CONCURRENT} operator requests already; try again"),
    )
}

/// Unix seconds by the node's clock.
fn now(s: &Shared) -> u64 {
    u64::try_from((s.clock)().unix_timestamp()).unwrap_or(0)
}

impl OperatorKv {
    /// Requests are trusted when one of `policy`'s signers signed them.
    pub fn new(policy: TrustPolicy) -> Self {
        Self {
            policy,
            replay: Mutex::new(ReplayGuard::default()),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        }
    }

    /// Envelope, signer, signature, form and time; the nonce is admitted separately
    /// ([`Self::admit`]), once the node knows it will act on the request.
    fn verify(&self, bytes: &[u8], now: u64) -> Result<(KvRequest, PublicKey), OperatorError> {
        let signed = operator::SignedKvRequest::parse(bytes)?;
        let request = signed.verify(&self.policy)?;
        operator::check_fresh(&request, now)?;
        Ok((request, *signed.key()))
    }

    fn admit(&self, request: &KvRequest, now: u64) -> Result<(), OperatorError> {
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(request, now)
    }
}

/// `POST /v1/kv`: a signed operator request from this node's API.
pub async fn http(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    from_api(&s, &body).await.into_response()
}

async fn from_api(s: &Shared, bytes: &[u8]) -> Answer {
    let Ok(_slot) = s.operator_kv.slots.clone().try_acquire_owned() else {
        return busy();
    };
    let now = now(s);
    let checked = s
        .operator_kv
        .verify(bytes, now)
        .and_then(|(r, by)| s.operator_kv.admit(&r, now).map(|()| (r, by)));
    let (request, by) = match checked {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("refused an operator request from the API: {e}");
            return refusal(&e);
        }
    };
    if request.node == s.peer_id.to_base58() {
        execute(s, &request, &by, "api").await
    } else {
        forward(s, &request, bytes.to_vec()).await
    }
}

/// Answers a peer's request on [`PROTOCOL`] (the node's event loop calls this).
pub async fn from_peer(s: &Shared, from: &PeerId, bytes: &[u8]) -> Vec<u8> {
    let answer = match s.operator_kv.slots.clone().try_acquire_owned() {
        Err(_) => busy(),
        Ok(_slot) => checked_from_peer(s, from, bytes).await,
    };
    serde_json::to_vec(&answer).unwrap_or_default()
}

async fn checked_from_peer(s: &Shared, from: &PeerId, bytes: &[u8]) -> Answer {
    let now = now(s);
    let local = s.peer_id.to_base58();
    let refused = |reason: &str| {
        s.metrics
            .scheduler
            .refused(&from.to_base58(), "kv_op", reason)
    };
    let (request, by) = match s.operator_kv.verify(bytes, now) {
        Ok(x) => x,
        Err(e) => {
            refused(e.reason());
            return refusal(&e).answered_by(s);
        }
    };
    // Never forwarded again: a request runs only where it says.
    if request.node != local {
        refused("wrong_node");
        return Answer::error(
            StatusCode::FORBIDDEN,
            "wrong_node",
            format!(
                "the request names node {}, not this node ({local}): a request runs only on the node it names",
                request.node
            ),
        )
        .answered_by(s);
    }
    if let Err(e) = s.operator_kv.admit(&request, now) {
        refused(e.reason());
        return refusal(&e).answered_by(s);
    }
    execute(s, &request, &by, &format!("peer {from}")).await
}

/// Sends the signed bytes, unchanged, to the node the request names, and relays its answer.
async fn forward(s: &Shared, request: &KvRequest, bytes: Vec<u8>) -> Answer {
    let Ok(peer) = request.node.parse::<PeerId>() else {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("node {:?} is not a peer id", request.node),
        );
    };
    let name = s
        .peers()
        .await
        .into_iter()
        .find(|p| p.peer_id == request.node)
        .map(|p| format!("{} ({})", p.name, p.peer_id))
        .unwrap_or_else(|| request.node.clone());
    let maybe = if request.op.writes() {
        "; the write may or may not have happened"
    } else {
        ""
    };
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, s.mesh.request(peer, PROTOCOL, bytes)).await;
    match answer {
        Err(_) => Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_answer",
            format!("node {name} did not answer within {FORWARD_TIMEOUT:?}{maybe}"),
        ),
        // Certainly never sent.
        Ok(Err(
            e @ (MeshError::NotAdmitted { .. }
            | MeshError::BadName { .. }
            | MeshError::TooLarge { .. }
            | MeshError::Stopped),
        )) => Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unreachable",
            format!("node {name} is not reachable from node {}: {e}", s.name),
        ),
        Ok(Err(e)) => Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_answer",
            format!("node {name} did not answer: {e}{maybe}"),
        ),
        Ok(Ok(bytes)) => match serde_json::from_slice::<Answer>(&bytes) {
            Ok(a) if STATUSES.contains(&a.status) && a.body.is_object() => a,
            _ => Answer::error(
                StatusCode::BAD_GATEWAY,
                "bad_answer",
                format!("node {name} answered with something that is not an operator answer"),
            ),
        },
    }
}

/// Carries out a verified request on this node's store of the workload.
async fn execute(s: &Shared, request: &KvRequest, by: &PublicKey, via: &str) -> Answer {
    let (ns, name) = (&request.namespace, &request.name);
    let deleted = s.store().get(ns, name).map(|e| e.manifest.deleted);
    let answer = match deleted {
        None => Answer::error(
            StatusCode::NOT_FOUND,
            "no_workload",
            format!("no workload {ns}/{name}"),
        ),
        Some(true) => Answer::error(
            StatusCode::NOT_FOUND,
            "no_workload",
            format!("workload {ns}/{name} was deleted"),
        ),
        Some(false) => match s.consistency.kv(ns, name) {
            Err(KvError::Unavailable { reason }) => Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_store",
                format!(
                    "{reason}: node {} hosts no replica of {ns}/{name}; address a node that does (`beemesh kv` picks one from the placements)",
                    s.name
                ),
            ),
            Err(e) => kv_error(e),
            Ok(kv) => {
                let answer = run(kv.as_ref(), request).await;
                if request.op.writes() {
                    tracing::info!(
                        operator = %by,
                        workload = %request.workload(),
                        op = request.op.name(),
                        via,
                        status = answer.status,
                        revision = %answer.body["revision"],
                        "operator write"
                    );
                }
                let mut answer = answer;
                if let Value::Object(m) = &mut answer.body {
                    m.insert("mode".into(), Value::String(kv.mode().to_owned()));
                }
                answer
            }
        },
    };
    let mut answer = answer.answered_by(s);
    if let Value::Object(m) = &mut answer.body {
        m.insert("namespace".into(), Value::String(ns.clone()));
        m.insert("name".into(), Value::String(name.clone()));
    }
    answer
}

async fn run(kv: &dyn beemesh_state::kv::Kv, request: &KvRequest) -> Answer {
    match &request.op {
        KvOp::Get { key } => match kv.get(key).await {
            Ok(Some(item)) => Answer::ok(item_json(&item)),
            Ok(None) => {
                let mut a = Answer::error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("{} has no key {key:?}", request.workload()),
                );
                a.body["key"] = Value::String(key.clone());
                a
            }
            Err(e) => kv_error(e),
        },
        KvOp::Put {
            key,
            value,
            if_revision,
        } => match kv.put(key, value.clone(), *if_revision).await {
            Ok(w) => Answer::ok(json!({ "key": key, "revision": w.revision })),
            Err(e) => kv_error(e),
        },
        KvOp::Delete { key, if_revision } => match kv.delete(key, *if_revision).await {
            Ok(w) => Answer::ok(json!({ "key": key, "revision": w.revision })),
            Err(e) => kv_error(e),
        },
        KvOp::List {
            prefix,
            after,
            limit,
        } => {
            let limit = limit
                .map_or(DEFAULT_LIMIT, |l| l as usize)
                .clamp(1, MAX_PAGE);
            match kv.list(prefix, after.as_deref(), limit).await {
                Ok(page) => {
                    let (items, next) = within_budget(&page.items, page.next, ANSWER_BUDGET);
                    Answer::ok(json!({ "items": items, "next": next }))
                }
                Err(e) => kv_error(e),
            }
        }
    }
}

/// A listing's items, encoded, cut to about `budget` bytes (at least one item): when cut,
/// `next` is the last key kept, where the next page begins.
fn within_budget(
    items: &[Item],
    next: Option<String>,
    budget: usize,
) -> (Vec<Value>, Option<String>) {
    let mut out = Vec::with_capacity(items.len());
    let mut size = 0;
    for item in items {
        let v = item_json(item);
        let n = serde_json::to_vec(&v).map_or(budget, |b| b.len() + 1);
        if size + n > budget
            && let Some(last) = out.len().checked_sub(1).and_then(|i| items.get(i))
        {
            return (out, Some(last.key.clone()));
        }
        size += n;
        out.push(v);
    }
    (out, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, len: usize) -> Item {
        Item {
            key: key.to_owned(),
            value: vec![b'x'; len],
            revision: 1,
        }
    }

    #[test]
    fn the_limits_are_the_stores() {
        assert_eq!(
            operator::MAX_VALUE_BYTES,
            beemesh_state::kv::MAX_VALUE_BYTES
        );
        assert_eq!(operator::MAX_KEY_BYTES, beemesh_state::kv::MAX_KEY_BYTES);
        assert_eq!(operator::MAX_LIST_LIMIT as usize, MAX_PAGE);
    }

    #[test]
    fn a_listing_is_cut_to_the_budget_and_says_where_to_go_on() {
        let items: Vec<Item> = (0..10).map(|i| item(&format!("k{i}"), 100)).collect();
        let (all, next) = within_budget(&items, None, 1 << 20);
        assert_eq!((all.len(), next), (10, None));
        let (all, next) = within_budget(&items, Some("k9".into()), 1 << 20);
        assert_eq!((all.len(), next.as_deref()), (10, Some("k9")));
        // Room for three and a half items.
        let one = serde_json::to_vec(&item_json(&items[0])).map_or(0, |b| b.len() + 1);
        let (some, next) = within_budget(&items, None, 3 * one + one / 2);
        assert_eq!(some.len(), 3);
        assert_eq!(next.as_deref(), Some("k2"));
        // One item always goes, however large.
        let big = [item("big", 64 * 1024), item("more", 1)];
        let (one, next) = within_budget(&big, None, 1000);
        assert_eq!(one.len(), 1);
        assert_eq!(next.as_deref(), Some("big"));
        // A binary value comes as base64.
        let bin = Item {
            key: "b".into(),
            value: vec![0xff, 0],
            revision: 2,
        };
        let (v, _) = within_budget(&[bin], None, 1000);
        assert_eq!(v[0]["value_base64"], "/wA=");
    }

    #[test]
    fn refusals_have_the_statuses_operators_expect() {
        let key = beemesh_manifest::SecretKey::from_seed([1; 32]).public();
        for (e, status) in [
            (OperatorError::Untrusted { key }, 403),
            (OperatorError::BadSignature { key }, 403),
            (
                OperatorError::Stale {
                    issued_at: 0,
                    now: 1000,
                },
                403,
            ),
            (OperatorError::Replay { nonce: "00".into() }, 403),
            (OperatorError::ReplayCacheFull { limit: 1 }, 429),
            (OperatorError::TooLarge { size: 2, limit: 1 }, 413),
            (OperatorError::Envelope("x".into()), 400),
        ] {
            let a = refusal(&e);
            assert_eq!(a.status, status, "{e}");
            assert_eq!(a.body["reason"], e.reason());
            assert!(STATUSES.contains(&a.status));
        }
        let a = kv_error(KvError::Precondition {
            key: "k".into(),
            expected: 5,
            actual: Some(3),
        });
        assert_eq!((a.status, &a.body["current_revision"]), (412, &json!(3)));
        assert!(
            a.body["error"]
                .as_str()
                .is_some_and(|m| m.contains("at revision 3"))
        );
        for e in [
            KvError::InvalidKey {
                key: String::new(),
                reason: String::new(),
            },
            KvError::Unsupported { mode: "eventual" },
            KvError::Full {
                reason: String::new(),
            },
            KvError::Unavailable {
                reason: String::new(),
            },
            KvError::Internal(String::new()),
        ] {
            assert!(STATUSES.contains(&kv_error(e).status));
        }
    }
}
