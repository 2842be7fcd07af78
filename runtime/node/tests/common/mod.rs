//! Helpers shared by the node's integration tests: a fleet of in-process nodes on loopback.

// Each test binary uses a different subset.
#![allow(dead_code)]

use beemesh_manifest::ticket::Ticket;
use beemesh_manifest::{HostConfig, SecretKey, SignedManifest};
use beemesh_node::{NodeOptions, RunningNode, Shared};
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;
use time::OffsetDateTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Keys, a fleet ticket and a directory for in-process nodes on loopback.
pub struct Fleet {
    pub dir: TempDir,
    pub operator: SecretKey,
    pub admission: SecretKey,
}

impl Fleet {
    pub fn new() -> Self {
        let dir = TempDir::new().expect("tempdir");
        let admission = SecretKey::from_seed([42; 32]);
        let (ticket, key) =
            Ticket::issue_fleet(&admission, OffsetDateTime::now_utc(), None).expect("random");
        std::fs::write(dir.path().join("ticket"), ticket.to_toml()).expect("ticket");
        // Where the node looks by default: `.key` beside the ticket.
        key.save_new(&dir.path().join("ticket.key"))
            .expect("ticket key");
        Self {
            dir,
            operator: SecretKey::from_seed([7; 32]),
            admission,
        }
    }

    /// A host config: loopback, fast announcements, process driver, Landlock off.
    pub fn config(&self, name: &str, bootstrap: Option<String>) -> HostConfig {
        let root = self.dir.path().join(name);
        let text = format!(
            r#"
[node]
name = "{name}"
data_dir = "{data}"
[mesh]
listen = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = [{bootstrap}]
mdns = false
announce_interval = "300ms"
peer_timeout = "2s"
[trust]
domain = "example.org"
signers = ["{op}"]
admission = "{adm}"
ticket = "{ticket}"
[runtime]
driver = "process"
[api]
socket = "{sock}"
[sandbox]
landlock = "off"
"#,
            data = root.join("data").display(),
            bootstrap = bootstrap.map(|b| format!("{b:?}")).unwrap_or_default(),
            op = self.operator.public(),
            adm = self.admission.public(),
            ticket = self.dir.path().join("ticket").display(),
            sock = root.join("api.sock").display(),
        );
        HostConfig::from_toml(name, &text).expect("valid host config")
    }

    /// Starts node `name`, bootstrapping from `bootstrap`.
    pub async fn start(
        &self,
        name: &str,
        bootstrap: Option<&RunningNode>,
    ) -> (RunningNode, CancellationToken) {
        let boot = match bootstrap {
            Some(b) => Some(first_addr(&b.shared).await),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let node = beemesh_node::start(
            NodeOptions::new(self.config(name, boot), None),
            shutdown.clone(),
        )
        .await
        .expect("node starts");
        (node, shutdown)
    }

    /// `text` signed by the fleet's operator key.
    pub fn signed_text(&self, text: &str) -> String {
        let mut s = SignedManifest::new(text);
        s.add_signature("test", &self.operator).expect("sign");
        s.to_toml()
    }
}

/// The first listen address of a node, with its `/p2p/` suffix.
pub async fn first_addr(s: &Shared) -> String {
    let addrs = s.mesh.listen_addrs().await.expect("listen addrs");
    let a = addrs.first().expect("listening");
    format!("{a}/p2p/{}", s.peer_id)
}

/// Sends a GET over the unix socket and returns the connection, positioned at the start of
/// the answer (HTTP/1.0: the body ends when the server closes).
pub async fn open(sock: &Path, path: &str) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    s
}

/// A whole answer: (status code, body).
pub async fn get(sock: &Path, path: &str) -> (u16, String) {
    let mut s = open(sock, path).await;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut raw))
        .await
        .expect("the answer completes")
        .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}
