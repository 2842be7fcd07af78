//! The BeeMesh node daemon (`beemesh node`): wires the host config, the desired-state store,
//! the mesh and the HTTP API together, and replicates desired state across the mesh.
//!
//! Layering: this is the only crate that knows every other one. `cli` starts it through
//! [`run`]; everything else talks to a running node through its API.

pub mod api;
pub mod authority;
pub mod capacity;
pub mod consistency;
pub mod logging;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod operator_kv;
pub mod placement;
pub mod replica_api;
pub mod sidecar;
pub mod store;

pub use node::{NodeError, NodeOptions, RunningNode, Shared, start};

use tokio_util::sync::CancellationToken;

/// Runs a node until `shutdown` fires (SIGTERM/SIGINT in the daemon), notifying systemd when
/// it is ready and when it stops.
pub async fn run(opts: NodeOptions, shutdown: CancellationToken) -> Result<(), NodeError> {
    let node = start(opts, shutdown.clone()).await?;
    notify::ready(&format!(
        "peer {} serving {}",
        node.shared.peer_id,
        node.api_socket.display()
    ));
    notify::spawn_watchdog(shutdown.clone());
    shutdown.cancelled().await;
    notify::stopping();
    tracing::info!("shutting down");
    node.join().await;
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        shutdown.cancel();
    });
    Ok(())
}
