//! Direct libpod API calls over the Podman socket, for what podman-api 0.11 cannot express.
//!
//! podman-api's container create sends `no_new_privilages` (sic), which libpod ignores, so a
//! container created through it would run without no_new_privileges. Container creation
//! therefore posts our own SpecGenerator JSON to `/libpod/containers/create` on the same
//! socket. This is a deliberately small HTTP/1.1 client: one request per connection
//! (`Connection: close`), bounded response size, fixed-length or chunked bodies.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The libpod API version prefix used for raw calls (Podman 4.0 and later).
pub const API_PREFIX: &str = "/v4.0.0/libpod";
const MAX_RESPONSE: usize = 8 << 20;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// libpod's error message (`{"cause": ..., "message": ...}`) or the raw body.
    pub fn message(&self) -> String {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            message: Option<String>,
        }
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(ErrorBody { message: Some(m) }) => m,
            _ => String::from_utf8_lossy(&self.body).trim().to_owned(),
        }
    }
}

/// Sends `method path` with an optional JSON body to the libpod API on `socket`.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> std::io::Result<Response> {
    let payload = match body {
        Some(v) => serde_json::to_vec(v).map_err(std::io::Error::other)?,
        None => Vec::new(),
    };
    let mut stream = UnixStream::connect(socket).await?;
    let mut head = format!(
        "{method} {API_PREFIX}{path} HTTP/1.1\r\nHost: d\r\nUser-Agent: beemesh-driver\r\nConnection: close\r\nContent-Length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&payload).await?;
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if raw.len() > MAX_RESPONSE {
            return Err(invalid(format!(
                "response larger than {MAX_RESPONSE} bytes"
            )));
        }
    }
    parse_response(&raw)
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Parses a complete HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("response has no end of headers".into()))?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|e| invalid(format!("response head: {e}")))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| invalid(format!("bad status line {status_line:?}")))?,
        _ => return Err(invalid(format!("bad status line {status_line:?}"))),
    };
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| invalid(format!("bad Content-Length {v:?}")))?,
            );
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| invalid(format!("body shorter than Content-Length {n}")))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size".into()))?;
        let size_text =
            std::str::from_utf8(&data[..line_end]).map_err(|e| invalid(e.to_string()))?;
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| invalid("truncated chunk".into()))?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_length_response() {
        let raw = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"Id\":\"ab\"}\nextra";
        let r = parse_response(raw).expect("parses");
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"{\"Id\":\"ab\"}\n");
    }

    #[test]
    fn chunked_response_and_error_message() {
        let raw = b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\nf\r\n{\"message\":\"no \r\n9\r\nsuch x\"}\n\r\n0\r\n\r\n";
        let r = parse_response(raw).expect("parses");
        assert_eq!(r.status, 500);
        assert_eq!(r.message(), "no such x");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_response(b"nonsense").is_err());
        assert!(parse_response(b"SPDY 200\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").is_err());
    }
}
