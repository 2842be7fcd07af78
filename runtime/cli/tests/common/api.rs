//! A synchronous HTTP/1.1 client for the node API on its unix socket (`[api] socket`), and
//! polling with a deadline.
//!
//! One request per connection (`Connection: close`), a timeout on every read and write and a
//! bound on the response size, so that a hung or misbehaving node fails a test with a message
//! instead of hanging it. It understands what the node's API sends: a status line, headers,
//! and a body delimited by `Content-Length`, by chunked encoding or by the end of the
//! connection.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Largest response read (the largest answer of the API is a workload list).
const MAX_RESPONSE: usize = 16 << 20;
/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`eventually`] probes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why a request did not give the expected answer.
#[derive(Debug)]
pub enum ApiError {
    /// No answer: nothing listens on the socket (the node is down or still starting), or the
    /// connection broke or timed out.
    Unreachable(String),
    /// An answer that is not a well-formed HTTP response, or a body that is not the JSON
    /// expected.
    Malformed(String),
    /// A well-formed answer with an unexpected status.
    Status { status: u16, body: String },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unreachable(e) => write!(f, "no answer: {e}"),
            ApiError::Malformed(e) => write!(f, "malformed answer: {e}"),
            ApiError::Status { status, body } => write!(f, "HTTP {status}: {body}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::Malformed(format!(
                "{e} in {:?}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            ))
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An admitted peer as `GET /v1/peers` lists it (the fields scripts may rely on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Peer {
    pub peer_id: String,
    #[serde(default)]
    pub name: String,
}

/// A workload as `GET /v1/workloads` lists it (the fields scripts may rely on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub generation: u64,
    /// The content id: `sha256:` and the hex SHA-256 of the manifest bytes.
    pub digest: String,
}

/// The API of one node, reached through its unix socket.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
}

impl Api {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and reads the whole answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ApiError> {
        let unreachable = |what: &str, e: std::io::Error| {
            ApiError::Unreachable(format!("{what} {}: {e}", self.socket.display()))
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|e| unreachable("cannot connect to", e))?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .map_err(|e| unreachable("cannot set timeouts on", e))?;
        let body = body.unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: beemesh\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if !body.is_empty() || method == "POST" {
            request.push_str(&format!(
                "Content-Type: application/toml\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(|e| unreachable("cannot send a request to", e))?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| unreachable(&format!("no complete answer to {method} {path} from"), e))?;
        if raw.len() > MAX_RESPONSE {
            return Err(ApiError::Malformed(format!(
                "the answer to {method} {path} is larger than {MAX_RESPONSE} bytes"
            )));
        }
        parse_response(&raw)
    }

    /// `GET path`, expecting 200 and a JSON body of type `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let r = self.request("GET", path, None)?;
        if r.status != 200 {
            return Err(ApiError::Status {
                status: r.status,
                body: r.text(),
            });
        }
        r.json()
    }

    pub fn status(&self) -> Result<serde_json::Value, ApiError> {
        self.get("/v1/status")
    }

    /// The peer id the node reports for itself.
    pub fn peer_id(&self) -> Result<String, ApiError> {
        let status = self.status()?;
        status
            .get("peer_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::Malformed(format!("no peer_id in the status {status}")))
    }

    pub fn peers(&self) -> Result<Vec<Peer>, ApiError> {
        self.get("/v1/peers")
    }

    pub fn workloads(&self) -> Result<Vec<Workload>, ApiError> {
        self.get("/v1/workloads")
    }

    /// One workload; `None` when the node does not have it (404).
    pub fn workload(&self, namespace: &str, name: &str) -> Result<Option<Workload>, ApiError> {
        let r = self.request("GET", &format!("/v1/workloads/{namespace}/{name}"), None)?;
        match r.status {
            200 => r.json().map(Some),
            404 => Ok(None),
            status => Err(ApiError::Status {
                status,
                body: r.text(),
            }),
        }
    }

    /// `POST /v1/workloads` with a signed manifest: the status and the JSON answer.
    pub fn apply(&self, signed: &str) -> Result<(u16, serde_json::Value), ApiError> {
        let r = self.request("POST", "/v1/workloads", Some(signed.as_bytes()))?;
        Ok((r.status, r.json()?))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn malformed(what: impl Into<String>) -> ApiError {
    ApiError::Malformed(what.into())
}

fn parse_response(raw: &[u8]) -> Result<Response, ApiError> {
    let head_end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        malformed(format!(
            "no end of headers in {} bytes: {:?}",
            raw.len(),
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        ))
    })?;
    let head =
        std::str::from_utf8(&raw[..head_end]).map_err(|_| malformed("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(malformed(format!("status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed(format!("status line {status_line:?}")))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("header line {line:?}")))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| malformed(format!("Content-Length {value:?}")))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = content_length {
        rest.get(..n)
            .ok_or_else(|| malformed(format!("truncated body: {} of {n} bytes", rest.len())))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or_else(|| malformed("truncated chunk header"))?;
        let size_line = std::str::from_utf8(&data[..line_end])
            .map_err(|_| malformed("chunk header is not UTF-8"))?;
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| malformed(format!("chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| malformed(format!("truncated chunk of {size} bytes")))?;
        out.extend_from_slice(chunk);
        data = data
            .get(size + 2..)
            .ok_or_else(|| malformed("truncated chunk"))?;
    }
}

/// Probes every [`POLL_INTERVAL`] until `probe` returns `Ok`, for at most `timeout`; then
/// returns the last observation (the probe's error text) as the error.
pub fn poll_until<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// [`poll_until`] for tests: panics, naming `what` and the last observation, when the deadline
/// passes.
#[track_caller]
pub fn eventually<T>(
    what: impl fmt::Display,
    timeout: Duration,
    probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    match poll_until(timeout, probe) {
        Ok(v) => v,
        Err(last) => panic!(
            "timed out after {:.1?} waiting for {what}; last observation: {last}",
            started.elapsed()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").expect("length");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"[]"[..]));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{\"a\":1}"[..]));
        let r = parse_response(b"HTTP/1.0 202 Accepted\r\n\r\nabc").expect("close");
        assert_eq!(r.body, b"abc");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab").is_err());
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
    }
}
