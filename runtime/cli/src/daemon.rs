//! `beemesh node`: runs the daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use beemesh_manifest::HostConfig;
use beemesh_node::{NodeOptions, logging};
use beemesh_sandbox::SandboxPolicy;
use clap::Args;
use tokio_util::sync::CancellationToken;

/// Where a flashed image's boot unit copies the `BEEMESH` config partition's files: a
/// root-owned directory the daemon may read (group) but not write, apart from the API
/// socket's directory (`/run/beemesh`), which the daemon writes.
pub const CONFIG_PARTITION_COPY: &str = "/run/beemesh-config/host.toml";

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The host config. Default: the config partition's copy (/run/beemesh-config/host.toml)
    /// when it exists, else /etc/beemesh/host.toml.
    #[arg(long, value_name = "FILE", env = "BEEMESH_CONFIG")]
    config: Option<PathBuf>,
}

fn resolve(config: Option<&Path>) -> PathBuf {
    if let Some(c) = config {
        return c.to_owned();
    }
    let partition = Path::new(CONFIG_PARTITION_COPY);
    if partition.exists() {
        return partition.to_owned();
    }
    PathBuf::from(beemesh_manifest::host::DEFAULT_PATH)
}

/// The rootless Podman socket of the user the daemon runs as.
fn podman_socket(config: &HostConfig) -> Option<PathBuf> {
    if config.runtime.driver != beemesh_manifest::host::Driver::Podman {
        return None;
    }
    config.runtime.podman_socket.clone().or_else(|| {
        std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("podman/podman.sock"))
    })
}

pub fn node(a: &NodeArgs) -> anyhow::Result<()> {
    let target = logging::init();
    let path = resolve(a.config.as_deref());
    let config = HostConfig::load(&path)?;
    tracing::info!(config = %path.display(), logs = ?target, "starting beemesh node {}", env!("CARGO_PKG_VERSION"));

    // Confine the process before it touches anything from the network, and before the async
    // runtime starts threads (Landlock and capability changes apply to the calling thread).
    beemesh_node::node::prepare_dir(&config.node.data_dir, 0o700)?;
    if let Some(dir) = config.api.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let config_file = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    let ticket = beemesh_node::node::ticket_path(&config, Some(&path));
    // A fleet ticket's secret key (absent for a peer ticket: a missing path adds no rule).
    let ticket_key = beemesh_node::node::ticket_key_path(&config, Some(&path));
    let socket = podman_socket(&config);
    let mut policy = SandboxPolicy::for_daemon(&config, &[config_file], socket.as_deref());
    policy.read_only.push(ticket);
    policy.read_only.push(ticket_key);
    if config.runtime.driver == beemesh_manifest::host::Driver::Process {
        // Workloads of the process driver inherit the daemon's Landlock domain: they need
        // the system paths to run programs.
        policy
            .read_exec
            .extend(beemesh_driver::process::default_read_exec_paths());
    }
    // The process driver hides the node's API socket, data and config from its workloads in
    // a mount namespace, which a Landlock-confined process can no longer make: before
    // confine.
    let driver: Option<Arc<dyn beemesh_driver::ContainerDriver>> =
        if config.runtime.driver == beemesh_manifest::host::Driver::Process {
            Some(Arc::new(beemesh_node::node::process_driver(
                &config,
                Some(&path),
            )?))
        } else {
            None
        };
    // The replicas' sidecar runs this program from a root file system assembled here: it
    // reads the program and its libraries and runs ldd, which the confined daemon may not.
    let sidecar_rootfs = if config.runtime.driver == beemesh_manifest::host::Driver::Podman {
        let (rootfs, _) = beemesh_node::node::sidecar_root(None, &config.node.data_dir)?;
        Some(rootfs)
    } else {
        None
    };
    let status = beemesh_sandbox::confine(&policy)?;
    for gap in &status.not_enforced {
        tracing::warn!("sandbox: not enforced: {gap}");
    }
    let mut opts = NodeOptions::new(config, Some(path));
    opts.sandbox = serde_json::to_value(&status).context("sandbox status")?;
    opts.driver = driver;
    opts.sidecar_rootfs = sidecar_rootfs;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("beemesh")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        beemesh_node::cancel_on_signals(shutdown.clone())
            .context("cannot install signal handlers")?;
        beemesh_node::run(opts, shutdown).await?;
        anyhow::Ok(())
    })
}
