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
/// Longest line of a streamed answer.
const MAX_LINE: usize = 4 << 20;

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

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
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
        Ok(req.body(Full::new(Bytes::from(body.unwrap_or_default())))?)
    }

    fn connect_err(&self) -> String {
        format!(
            "cannot reach the node API at {} (is `beemesh node` running? set --api or BEEMESH_API)",
            self.describe()
        )
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let req = self.request(method, path, body)?;
        let connect_err = || self.connect_err();
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

    /// GETs a streamed answer and calls `each` with every line of its body as it arrives,
    /// until the body ends or `each` returns `false`. A non-2xx status fails with the API's
    /// error message. `idle` bounds the wait for each piece of the body (`None`: no bound, to
    /// follow a stream).
    pub async fn get_lines(
        &self,
        path: &str,
        idle: Option<Duration>,
        mut each: impl FnMut(&[u8]) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let req = self.request(Method::GET, path, None)?;
        let open = async {
            match &self.endpoint {
                Endpoint::Unix(p) => {
                    let stream = tokio::net::UnixStream::connect(p)
                        .await
                        .with_context(|| self.connect_err())?;
                    open(stream, req).await
                }
                Endpoint::Tcp { authority } => {
                    let stream = tokio::net::TcpStream::connect(authority.as_str())
                        .await
                        .with_context(|| self.connect_err())?;
                    open(stream, req).await
                }
            }
        };
        let (resp, driver) = tokio::time::timeout(self.timeout, open)
            .await
            .with_context(|| {
                format!(
                    "node API at {} did not answer within {:?}",
                    self.describe(),
                    self.timeout
                )
            })??;
        let _abort = AbortOnDrop(driver);
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = tokio::time::timeout(
                self.timeout,
                http_body_util::Limited::new(body, MAX_RESPONSE).collect(),
            )
            .await
            .context("the node API did not finish its answer")?
            .map_err(|e| anyhow::anyhow!("reading the API response: {e}"))?
            .to_bytes();
            decode(status, &bytes)?;
            bail!("node API answered {status}");
        }
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let frame = match idle {
                Some(t) => tokio::time::timeout(t, body.frame())
                    .await
                    .with_context(|| format!("the node API sent nothing for {t:?}"))?,
                None => body.frame().await,
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| anyhow::anyhow!("reading the API response: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if !each(&line[..i])? {
                    return Ok(());
                }
            }
            if pending.len() > MAX_LINE {
                bail!("the node API sent a line longer than {MAX_LINE} bytes");
            }
        }
        if !pending.is_empty() {
            each(&pending)?;
        }
        Ok(())
    }
}

/// Stops the connection task when the reader is done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends a request and returns the response with its body still to be read, and the task that
/// drives the connection.
async fn open<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(
    hyper::Response<hyper::body::Incoming>,
    tokio::task::JoinHandle<()>,
)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await;
    match resp {
        Ok(r) => Ok((r, driver)),
        Err(e) => {
            driver.abort();
            Err(e.into())
        }
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
