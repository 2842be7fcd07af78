//! `beemesh sidecar`: the replica's end of its channel to the node (DESIGN.md section 5,
//! docs/consistency.md).
//!
//! Under Podman the node runs this in one more container of the replica's pod: it listens on
//! `127.0.0.1:<port>` inside the pod's network namespace (which only the replica's own
//! containers share) and relays every connection, byte for byte, to the replica's Unix socket
//! on the node, which the node bind-mounts into this container alone. The sidecar interprets
//! nothing: the node knows which replica is calling from the socket the connection arrived
//! on, and checks the replica's token as well.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections relayed at once; more are closed at once (the replica retries).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection waits for the node's socket (the node may be restarting).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Relays connections to `listen` to the Unix socket `socket` until `shutdown`.
pub async fn relay(
    listen: SocketAddr,
    socket: PathBuf,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, socket = %socket.display(), "sidecar relaying");
    serve(listener, socket, shutdown).await;
    Ok(())
}

/// The accept loop of [`relay`], on a bound listener.
pub async fn serve(listener: TcpListener, socket: PathBuf, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let socket = Arc::new(socket);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{MAX_CONNECTIONS} connections open: refusing another");
            continue;
        };
        let socket = socket.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = pipe(stream, &socket) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "relay ended: {e}");
                    }
                }
            }
        });
    }
}

async fn pipe(mut tcp: tokio::net::TcpStream, socket: &Path) -> std::io::Result<()> {
    let mut unix = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| std::io::Error::other("the node's socket did not answer"))??;
    tokio::io::copy_bidirectional(&mut tcp, &mut unix).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_go_both_ways_and_a_missing_socket_closes_the_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.sock");
        let unix = tokio::net::UnixListener::bind(&path).expect("bind unix");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = unix.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, path.clone(), stop.clone()));
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");

        // The node's socket is gone: the relay closes the replica's connection.
        std::fs::remove_file(&path).expect("remove");
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);
        stop.cancel();
    }
}
