//! A small HTTP/1.1 client for the node API, over its unix socket or TCP.
//!
//! The CLI finds its node through `--api` or `BEEMESH_API` (a unix socket path, or an
//! `http://host:port` URL), defaulting to `/run/beemesh/api.sock`. TCP listeners require a
//! bearer token, taken from `BEEMESH_TOKEN`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

pub const DEFAULT_API: &str = "/run/beemesh/api.sock";
/// Largest API response the CLI reads.
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { authority: String },
}

#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    pub fn new(api: &str, token: Option<String>) -> anyhow::Result<Self> {
        let endpoint = if let Some(rest) = api.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/').to_owned();
            if authority.is_empty() || authority.contains('/') {
                bail!("--api {api:?}: expected http://HOST:PORT");
            }
            Endpoint::Tcp { authority }
        } else if api.starts_with("https://") {
            bail!("--api {api:?}: https is not supported; use the unix socket or an SSH tunnel");
        } else {
            Endpoint::Unix(PathBuf::from(api))
        };
        Ok(Self {
            endpoint,
            token,
            timeout: Duration::from_secs(30),
        })
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { authority } => format!("http://{authority}"),
        }
    }

    /// Sends one request; returns the status and body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let fut = self.send_inner(method, path, body);
        tokio::time::timeout(self.timeout, fut)
            .await
            .with_context(|| {
                format!(
                    "node API at {} did not answer within {:?}",
                    self.describe(),
                    self.timeout
                )
            })?
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_owned(),
            Endpoint::Tcp { authority } => authority.clone(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/toml");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let connect_err = || {
            format!(
                "cannot reach the node API at {} (is `beemesh node` running? set --api or BEEMESH_API)",
                self.describe()
            )
        };
        let resp = match &self.endpoint {
            Endpoint::Unix(p) => {
                let stream = tokio::net::UnixStream::connect(p)
                    .await
                    .with_context(connect_err)?;
                roundtrip(stream, req).await?
            }
            Endpoint::Tcp { authority } => {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .with_context(connect_err)?;
                roundtrip(stream, req).await?
            }
        };
        Ok(resp)
    }

    /// GETs a JSON document, failing with the API's error message on a non-2xx status.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.send(Method::GET, path, None).await?;
        decode(status, &body)
    }

    pub async fn post_json(&self, path: &str, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.send(Method::POST, path, Some(body)).await?;
        decode(status, &body)
    }
}

async fn roundtrip<S>(stream: S, req: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the API response: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

fn decode(status: StatusCode, body: &[u8]) -> anyhow::Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .with_context(|| format!("node API answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let msg = value
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given")
            .to_owned();
        bail!("node refused ({status}): {msg}");
    }
    Ok(value)
}
