//! TCP and HTTP probes against an address the host can reach (a forwarded port or, for the
//! process driver, the port the process listens on).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::types::ProbeOutcome;

pub async fn tcp(addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeOutcome::Passed {
            detail: format!("tcp {addr} accepted"),
        },
        Ok(Err(e)) => ProbeOutcome::Failed {
            detail: format!("tcp {addr}: {e}"),
        },
        Err(_) => ProbeOutcome::Failed {
            detail: format!("tcp {addr}: no answer within {timeout:?}"),
        },
    }
}

/// `GET path` over HTTP/1.1; a status from 200 to 399 passes (as Kubernetes does).
pub async fn http(addr: SocketAddr, path: &str, timeout: Duration) -> ProbeOutcome {
    match tokio::time::timeout(timeout, http_status(addr, path)).await {
        Ok(Ok(code)) if (200..400).contains(&code) => ProbeOutcome::Passed {
            detail: format!("GET http://{addr}{path}: {code}"),
        },
        Ok(Ok(code)) => ProbeOutcome::Failed {
            detail: format!("GET http://{addr}{path}: {code}"),
        },
        Ok(Err(e)) => ProbeOutcome::Failed {
            detail: format!("GET http://{addr}{path}: {e}"),
        },
        Err(_) => ProbeOutcome::Failed {
            detail: format!("GET http://{addr}{path}: no answer within {timeout:?}"),
        },
    }
}

/// Sends one request and returns the response status code.
pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: beemesh-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need; read until its end (bounded).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status_line(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(80)])
            ),
        )
    })
}

fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 404 Not Found\r\nx"), Some(404));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
    }

    #[tokio::test]
    async fn probes_against_a_local_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if req.starts_with("GET /healthz ") {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(5);
        assert!(http(addr, "/healthz", t).await.passed());
        let failed = http(addr, "/other", t).await;
        assert!(
            matches!(&failed, ProbeOutcome::Failed { detail } if detail.contains("503")),
            "{failed:?}"
        );
        server.abort();
        // Nothing listens on a freshly closed port.
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let caddr = closed.local_addr().expect("addr");
        drop(closed);
        assert!(!tcp(caddr, t).await.passed());
    }
}
