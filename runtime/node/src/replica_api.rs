//! The node's end of each replica's state channel (DESIGN.md section 5, docs/consistency.md):
//! one endpoint per replica this node runs, serving the workload's key-value store to that
//! replica alone.
//!
//! - **Podman** (the product's runtime): the endpoint is a Unix socket in a directory of the
//!   replica's own, `<data_dir>/s/<16 hex digits of a hash of the replica>/state.sock` (short,
//!   because a socket's path must fit in 108 bytes). The driver bind-mounts that directory
//!   into the replica's `beemesh sidecar` container only, which relays
//!   `127.0.0.1:7480` inside the pod's network namespace to it. The socket is the identity:
//!   a connection on it can only come from that pod. Nothing is published on the host's
//!   loopback, and no other workload can reach it.
//! - **Process driver**: processes share the host's network namespace, so the endpoint is a
//!   TCP port on the host's `127.0.0.1`, which every local process can reach: the token is
//!   the only barrier there (docs/consistency.md says so).
//!
//! Either way the replica gets `BEEMESH_STATE_URL` and `BEEMESH_STATE_TOKEN` (a random
//! per-replica secret, kept outside the socket directory, checked on every request as
//! `Authorization: Bearer <token>`: defence in depth under Podman).
//!
//! The API: `GET|PUT|DELETE /v1/kv/{key}` (`POST` is `PUT`; a value is the request or response body;
//! its revision is the `ETag`; `If-Match: "<revision>"` makes a write conditional),
//! `GET /v1/kv?prefix=P&after=K&limit=N` (a JSON page). Errors are JSON
//! `{"error": "...", "reason": "..."}`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use beemesh_driver::{ReplicaId, SIDECAR_SOCKET_DIR, Sidecar};
use beemesh_state::kv::{Item, Kv, KvError, MAX_PAGE, MAX_VALUE_BYTES, Page};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The port the sidecar listens on inside a replica's pod.
pub const STATE_PORT: u16 = 7480;
/// The socket's name in the replica's socket directory.
pub const SOCKET_NAME: &str = "state.sock";

/// Finds the key-value store of a workload (its consistency mode's).
pub trait Backends: Send + Sync {
    fn kv(&self, namespace: &str, name: &str) -> Result<Arc<dyn Kv>, KvError>;
}

/// How replicas reach their endpoints.
#[derive(Debug, Clone)]
pub enum Channel {
    /// A sidecar container per replica (Podman): `rootfs` holds `program`.
    Sidecar { rootfs: PathBuf, program: String },
    /// A TCP port on the host's loopback per replica (process driver).
    Loopback,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot prepare the state endpoint of {replica} in {}: {cause}", path.display())]
    Io {
        replica: String,
        path: PathBuf,
        cause: std::io::Error,
    },
}

struct Served {
    stop: CancellationToken,
    socket_dir: Option<PathBuf>,
    env: BTreeMap<String, String>,
    sidecar: Option<Sidecar>,
}

/// The endpoints of the replicas this node runs.
pub struct Endpoints {
    dir: PathBuf,
    /// Parent of the sockets' directories (short paths).
    sockets: PathBuf,
    channel: Channel,
    backends: Arc<dyn Backends>,
    served: Mutex<BTreeMap<String, Served>>,
    shutdown: CancellationToken,
}

impl Endpoints {
    pub fn new(
        data_dir: &Path,
        channel: Channel,
        backends: Arc<dyn Backends>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            dir: data_dir.join("replicas"),
            sockets: data_dir.join("s"),
            channel,
            backends,
            served: Mutex::new(BTreeMap::new()),
            shutdown,
        }
    }

    /// Serves `replica`'s endpoint (once; again after a node restart, with the same token,
    /// socket and port, since a running replica keeps its environment) and returns what the
    /// driver adds to the replica: its environment and, under Podman, its sidecar.
    pub async fn ensure(
        &self,
        replica: &ReplicaId,
    ) -> Result<(BTreeMap<String, String>, Option<Sidecar>), EndpointError> {
        let object = replica.object_name();
        if let Some(s) = self.lock().get(&object) {
            return Ok((s.env.clone(), s.sidecar.clone()));
        }
        let root = self.dir.join(&object);
        let err = |path: &Path| {
            let (replica, path) = (replica.to_string(), path.to_owned());
            move |cause| EndpointError::Io {
                replica,
                path,
                cause,
            }
        };
        crate::node::prepare_dir(&root, 0o700).map_err(|e| EndpointError::Io {
            replica: replica.to_string(),
            path: root.clone(),
            cause: std::io::Error::other(e.to_string()),
        })?;
        let token = read_or_create_token(&root.join("token")).map_err(err(&root))?;
        let stop = self.shutdown.child_token();
        let app = router(Arc::new(Endpoint {
            namespace: replica.namespace.clone(),
            name: replica.name.clone(),
            token: token.clone(),
            backends: self.backends.clone(),
        }));
        let mut env = BTreeMap::new();
        env.insert("BEEMESH_STATE_TOKEN".to_owned(), token);
        let mut socket_dir = None;
        let sidecar = match &self.channel {
            Channel::Sidecar { rootfs, program } => {
                let sock_dir = self.sockets.join(short_name(&object));
                std::fs::create_dir_all(&sock_dir).map_err(err(&sock_dir))?;
                let socket = sock_dir.join(SOCKET_NAME);
                if socket.as_os_str().len() >= MAX_SOCKET_PATH {
                    return Err(EndpointError::Io {
                        replica: replica.to_string(),
                        path: socket.clone(),
                        cause: std::io::Error::other(format!(
                            "a Unix socket's path must be shorter than {MAX_SOCKET_PATH} bytes: give [node] data_dir a shorter path"
                        )),
                    });
                }
                let _ = std::fs::remove_file(&socket);
                let listener = tokio::net::UnixListener::bind(&socket).map_err(err(&socket))?;
                socket_dir = Some(sock_dir.clone());
                spawn_serving(listener, app, stop.clone(), replica.to_string());
                env.insert(
                    "BEEMESH_STATE_URL".to_owned(),
                    format!("http://127.0.0.1:{STATE_PORT}"),
                );
                Some(Sidecar {
                    rootfs: rootfs.clone(),
                    command: vec![
                        format!("/bin/{program}"),
                        "sidecar".to_owned(),
                        "--listen".to_owned(),
                        format!("127.0.0.1:{STATE_PORT}"),
                        "--socket".to_owned(),
                        format!("{SIDECAR_SOCKET_DIR}/{SOCKET_NAME}"),
                    ],
                    socket_dir: sock_dir,
                    port: STATE_PORT,
                })
            }
            Channel::Loopback => {
                let port_file = root.join("port");
                let wanted: u16 = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                let listener = match tokio::net::TcpListener::bind(("127.0.0.1", wanted)).await {
                    Ok(l) => l,
                    // The old port is taken: a new one (a replica that kept the old address
                    // loses its endpoint until it is restarted with the new one).
                    Err(_) if wanted != 0 => tokio::net::TcpListener::bind(("127.0.0.1", 0))
                        .await
                        .map_err(err(&port_file))?,
                    Err(e) => return Err(err(&port_file)(e)),
                };
                let addr: SocketAddr = listener.local_addr().map_err(err(&port_file))?;
                beemesh_manifest::input::write_atomically(
                    &port_file,
                    addr.port().to_string().as_bytes(),
                )
                .map_err(|e| EndpointError::Io {
                    replica: replica.to_string(),
                    path: port_file.clone(),
                    cause: std::io::Error::other(e.to_string()),
                })?;
                spawn_serving(listener, app, stop.clone(), replica.to_string());
                env.insert("BEEMESH_STATE_URL".to_owned(), format!("http://{addr}"));
                None
            }
        };
        let served = Served {
            stop,
            socket_dir,
            env: env.clone(),
            sidecar: sidecar.clone(),
        };
        self.lock().insert(object, served);
        Ok((env, sidecar))
    }

    /// Stops the endpoints of replicas not in `wanted` (object names) and removes their
    /// directories (token, socket, port).
    pub fn retain(&self, wanted: &BTreeSet<String>) {
        let gone: Vec<(String, Served)> = {
            let mut served = self.lock();
            let names: Vec<String> = served
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            names
                .into_iter()
                .filter_map(|n| served.remove(&n).map(|s| (n, s)))
                .collect()
        };
        for (object, s) in gone {
            s.stop.cancel();
            for dir in std::iter::once(self.dir.join(&object)).chain(s.socket_dir) {
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Served>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn spawn_serving<L>(listener: L, app: Router, stop: CancellationToken, replica: String)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = served.await {
            tracing::warn!(%replica, "state endpoint stopped: {e}");
        }
    });
}

/// The longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 108;

/// 16 hex digits of SHA-256 of a replica's object name: its socket directory's name.
fn short_name(object: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(object.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A 32-byte random token in hex, persisted (0600) so a restarted node keeps its replicas'.
fn read_or_create_token(path: &Path) -> std::io::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(t.to_owned());
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    beemesh_manifest::input::write_atomically(path, token.as_bytes())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(token)
}

struct Endpoint {
    namespace: String,
    name: String,
    token: String,
    backends: Arc<dyn Backends>,
}

impl Endpoint {
    fn kv(&self) -> Result<Arc<dyn Kv>, KvError> {
        self.backends.kv(&self.namespace, &self.name)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), self.token.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The replica-facing routes over one endpoint.
fn router(endpoint: Arc<Endpoint>) -> Router {
    Router::new()
        .route("/v1/kv", get(list))
        // POST is PUT for clients that cannot send PUT (busybox wget --post-data).
        .route(
            "/v1/kv/{*key}",
            get(read).put(write).post(write).delete(remove),
        )
        .layer(DefaultBodyLimit::max(MAX_VALUE_BYTES + 1024))
        .with_state(endpoint)
}

fn error(status: StatusCode, what: &str, reason: impl std::fmt::Display) -> Response {
    (
        status,
        axum::Json(json!({ "error": what, "reason": reason.to_string() })),
    )
        .into_response()
}

fn kv_error(e: KvError) -> Response {
    let status = match &e {
        KvError::InvalidKey { .. } => StatusCode::BAD_REQUEST,
        KvError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        KvError::Precondition { .. } => StatusCode::PRECONDITION_FAILED,
        KvError::Unsupported { .. } => StatusCode::BAD_REQUEST,
        KvError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
        KvError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        KvError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let what = match &e {
        KvError::InvalidKey { .. } => "invalid key",
        KvError::TooLarge { .. } => "too large",
        KvError::Precondition { .. } => "precondition failed",
        KvError::Unsupported { .. } => "unsupported",
        KvError::Full { .. } => "store full",
        KvError::Unavailable { .. } => "unavailable",
        KvError::Internal(_) => "internal error",
    };
    if let KvError::Precondition { actual, .. } = &e {
        // The key's revision now (0: absent), for the client's next attempt.
        let current = actual.unwrap_or(0);
        return (
            status,
            [(header::ETAG, format!("\"{current}\""))],
            axum::Json(json!({ "error": what, "reason": e.to_string(), "current": current })),
        )
            .into_response();
    }
    error(status, what, e)
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send the replica's token: Authorization: Bearer $BEEMESH_STATE_TOKEN",
    )
}

/// `If-Match: "7"` (or `7`): the revision a write expects.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, String> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim().trim_matches('"');
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| format!("{text:?} is not a revision (a number, as in the ETag)"))
}

async fn read(
    State(e): State<Arc<Endpoint>>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if !e.authorized(&headers) {
        return unauthorized();
    }
    let kv = match e.kv() {
        Ok(kv) => kv,
        Err(err) => return kv_error(err),
    };
    match kv.get(&key).await {
        Ok(Some(item)) => (
            StatusCode::OK,
            [
                (header::ETAG, format!("\"{}\"", item.revision)),
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            ],
            item.value,
        )
            .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not found",
            format!("no key {key:?}"),
        ),
        Err(err) => kv_error(err),
    }
}

async fn write(
    State(e): State<Arc<Endpoint>>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !e.authorized(&headers) {
        return unauthorized();
    }
    let expected = match if_match(&headers) {
        Ok(x) => x,
        Err(reason) => return error(StatusCode::BAD_REQUEST, "bad If-Match", reason),
    };
    let kv = match e.kv() {
        Ok(kv) => kv,
        Err(err) => return kv_error(err),
    };
    match kv.put(&key, body.to_vec(), expected).await {
        Ok(w) => (
            StatusCode::OK,
            [(header::ETAG, format!("\"{}\"", w.revision))],
            axum::Json(json!({ "revision": w.revision })),
        )
            .into_response(),
        Err(err) => kv_error(err),
    }
}

async fn remove(
    State(e): State<Arc<Endpoint>>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if !e.authorized(&headers) {
        return unauthorized();
    }
    let expected = match if_match(&headers) {
        Ok(x) => x,
        Err(reason) => return error(StatusCode::BAD_REQUEST, "bad If-Match", reason),
    };
    let kv = match e.kv() {
        Ok(kv) => kv,
        Err(err) => return kv_error(err),
    };
    match kv.delete(&key, expected).await {
        Ok(w) => axum::Json(json!({ "revision": w.revision })).into_response(),
        Err(err) => kv_error(err),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// A listing's item: the value as text when it is UTF-8, else base64.
pub(crate) fn item_json(i: &Item) -> serde_json::Value {
    match std::str::from_utf8(&i.value) {
        Ok(text) => json!({ "key": i.key, "revision": i.revision, "value": text }),
        Err(_) => {
            use base64::Engine as _;
            json!({
                "key": i.key,
                "revision": i.revision,
                "value_base64": base64::engine::general_purpose::STANDARD.encode(&i.value),
            })
        }
    }
}

async fn list(
    State(e): State<Arc<Endpoint>>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    if !e.authorized(&headers) {
        return unauthorized();
    }
    let kv = match e.kv() {
        Ok(kv) => kv,
        Err(err) => return kv_error(err),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    match kv.list(&q.prefix, q.after.as_deref(), limit).await {
        Ok(Page { items, next }) => axum::Json(json!({
            "items": items.iter().map(item_json).collect::<Vec<_>>(),
            "next": next,
        }))
        .into_response(),
        Err(err) => kv_error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use beemesh_state::kv::{Written, check_key, check_value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A map with per-key revisions: the seam for the HTTP layer's tests (the stores of the
    /// consistency modes have their own tests).
    #[derive(Default)]
    struct MapKv(Mutex<(u64, BTreeMap<String, Item>)>);

    #[async_trait]
    impl Kv for MapKv {
        fn mode(&self) -> &'static str {
            "test"
        }
        async fn get(&self, key: &str) -> Result<Option<Item>, KvError> {
            check_key(key)?;
            Ok(self.0.lock().expect("lock").1.get(key).cloned())
        }
        async fn put(
            &self,
            key: &str,
            value: Vec<u8>,
            if_revision: Option<u64>,
        ) -> Result<Written, KvError> {
            check_key(key)?;
            check_value(&value)?;
            let mut g = self.0.lock().expect("lock");
            let actual = g.1.get(key).map(|i| i.revision);
            if let Some(expected) = if_revision
                && actual.unwrap_or(0) != expected
            {
                return Err(KvError::Precondition {
                    key: key.into(),
                    expected,
                    actual,
                });
            }
            g.0 += 1;
            let revision = g.0;
            g.1.insert(
                key.into(),
                Item {
                    key: key.into(),
                    value,
                    revision,
                },
            );
            Ok(Written { revision })
        }
        async fn delete(&self, key: &str, _: Option<u64>) -> Result<Written, KvError> {
            let mut g = self.0.lock().expect("lock");
            g.1.remove(key);
            g.0 += 1;
            Ok(Written { revision: g.0 })
        }
        async fn list(
            &self,
            prefix: &str,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Page, KvError> {
            let g = self.0.lock().expect("lock");
            let mut items: Vec<Item> = g
                .1
                .values()
                .filter(|i| i.key.starts_with(prefix) && after.is_none_or(|a| i.key.as_str() > a))
                .cloned()
                .collect();
            let next = (items.len() > limit).then(|| items[limit - 1].key.clone());
            items.truncate(limit);
            Ok(Page { items, next })
        }
    }

    struct One(Arc<MapKv>);
    impl Backends for One {
        fn kv(&self, _: &str, name: &str) -> Result<Arc<dyn Kv>, KvError> {
            if name == "web" {
                Ok(self.0.clone())
            } else {
                Err(KvError::Unavailable {
                    reason: format!("no store for {name}"),
                })
            }
        }
    }

    /// One HTTP/1.1 request over a fresh connection: (status, headers, body).
    async fn call(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        s.write_all(body).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("headers end");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head[9..12].parse().expect("status");
        (status, head, raw[split + 4..].to_vec())
    }

    #[tokio::test]
    async fn a_replica_reads_and_writes_its_workloads_store_with_its_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = Arc::new(MapKv::default());
        let stop = CancellationToken::new();
        let eps = Endpoints::new(
            dir.path(),
            Channel::Loopback,
            Arc::new(One(kv.clone())),
            stop.clone(),
        );
        let id = ReplicaId::new("default", "web", 0);
        let (env, sidecar) = eps.ensure(&id).await.expect("endpoint");
        assert!(
            sidecar.is_none(),
            "the process driver's channel has no sidecar"
        );
        let url = env["BEEMESH_STATE_URL"].clone();
        let token = env["BEEMESH_STATE_TOKEN"].clone();
        assert_eq!(token.len(), 64);
        let addr = url.trim_start_matches("http://").to_owned();
        let auth = format!("Bearer {token}");
        let h = [("Authorization", auth.as_str())];

        // Without the token: nothing.
        let (status, _, _) = call(&addr, "GET", "/v1/kv/a", &[], b"").await;
        assert_eq!(status, 401);
        let (status, _, _) = call(
            &addr,
            "PUT",
            "/v1/kv/a",
            &[("Authorization", "Bearer x")],
            b"1",
        )
        .await;
        assert_eq!(status, 401);
        assert!(kv.0.lock().expect("lock").1.is_empty());

        let (status, head, _) = call(&addr, "PUT", "/v1/kv/greeting/en", &h, b"hello").await;
        assert_eq!(status, 200, "{head}");
        let (status, head, body) = call(&addr, "GET", "/v1/kv/greeting/en", &h, b"").await;
        assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
        assert!(head.to_ascii_lowercase().contains("etag: \"1\""), "{head}");
        let (status, _, body) = call(&addr, "GET", "/v1/kv/missing", &h, b"").await;
        assert_eq!(status, 404);
        assert!(String::from_utf8_lossy(&body).contains("no key"));
        // Conditional writes: the ETag is the revision.
        let stale = [("Authorization", auth.as_str()), ("If-Match", "\"7\"")];
        let (status, _, body) = call(&addr, "PUT", "/v1/kv/greeting/en", &stale, b"hi").await;
        assert_eq!(status, 412, "{}", String::from_utf8_lossy(&body));
        let fresh = [("Authorization", auth.as_str()), ("If-Match", "\"1\"")];
        let (status, _, _) = call(&addr, "PUT", "/v1/kv/greeting/en", &fresh, b"hi").await;
        assert_eq!(status, 200);
        // Limits answer 413 with the reason.
        let big = vec![b'x'; MAX_VALUE_BYTES + 1];
        let (status, _, body) = call(&addr, "PUT", "/v1/kv/big", &h, &big).await;
        assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
        // Listing by prefix, in pages.
        call(&addr, "PUT", "/v1/kv/greeting/fr", &h, b"salut").await;
        call(&addr, "PUT", "/v1/kv/other", &h, b"x").await;
        let (status, _, body) =
            call(&addr, "GET", "/v1/kv?prefix=greeting/&limit=1", &h, b"").await;
        assert_eq!(status, 200);
        let page: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(page["items"][0]["key"], "greeting/en");
        assert_eq!(page["items"][0]["value"], "hi");
        assert_eq!(page["next"], "greeting/en");

        // A node restart keeps the token and the port (the running replica keeps its env).
        stop.cancel();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the old endpoint never stopped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let stop2 = CancellationToken::new();
        let eps2 = Endpoints::new(
            dir.path(),
            Channel::Loopback,
            Arc::new(One(kv)),
            stop2.clone(),
        );
        let (env2, _) = eps2.ensure(&id).await.expect("endpoint again");
        assert_eq!(env2, env);
        // A replica that is gone has its endpoint and files removed.
        eps2.retain(&BTreeSet::new());
        assert!(!dir.path().join("replicas").join(id.object_name()).exists());
        stop2.cancel();
    }

    #[tokio::test]
    async fn a_sidecar_channel_serves_on_the_replicas_own_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        let eps = Endpoints::new(
            dir.path(),
            Channel::Sidecar {
                rootfs: dir.path().join("rootfs"),
                program: "beemesh".into(),
            },
            Arc::new(One(Arc::new(MapKv::default()))),
            stop.clone(),
        );
        let id = ReplicaId::new("default", "other", 2);
        let (env, sidecar) = eps.ensure(&id).await.expect("endpoint");
        let sidecar = sidecar.expect("a sidecar");
        assert_eq!(env["BEEMESH_STATE_URL"], "http://127.0.0.1:7480");
        assert_eq!(
            sidecar.command,
            [
                "/bin/beemesh",
                "sidecar",
                "--listen",
                "127.0.0.1:7480",
                "--socket",
                "/run/beemesh/state.sock"
            ]
        );
        // The token is not in the directory the sidecar sees.
        let visible: Vec<_> = std::fs::read_dir(&sidecar.socket_dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(visible, [SOCKET_NAME]);
        // Through the socket: a workload without a store gets a clear 503.
        let mut s = tokio::net::UnixStream::connect(sidecar.socket_dir.join(SOCKET_NAME))
            .await
            .expect("connect");
        let req = format!(
            "GET /v1/kv/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            env["BEEMESH_STATE_TOKEN"]
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
        assert!(raw.contains("no store for other"), "{raw}");
        stop.cancel();
    }
}
