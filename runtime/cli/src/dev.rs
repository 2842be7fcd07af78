//! `beemesh dev`: a local mesh with embedded defaults, for a first try.
//!
//! Nothing to write and no root needed: a throwaway operator key and admission key in a fresh
//! temporary directory, a fleet ticket, and N nodes on loopback in this process, each with its
//! own data directory and API socket. It prints what to export and the exact commands to sign
//! and apply the example workload, then runs until Ctrl-C and removes its directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use beemesh_manifest::ticket::Ticket;
use beemesh_manifest::{HostConfig, SecretKey};
use beemesh_node::{NodeOptions, RunningNode, logging};
use clap::Args;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// How many nodes to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    nodes: u16,

    /// Keep state in this directory (kept on exit) instead of a fresh temporary one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

fn host_toml(
    root: &Path,
    i: u16,
    operator: &SecretKey,
    admission: &SecretKey,
    bootstrap: Option<&str>,
) -> String {
    let node = root.join(format!("node{i}"));
    let zone = if i % 2 == 1 { "a" } else { "b" };
    format!(
        r#"# beemesh dev: node {i}
[node]
name = "dev-{i}"
labels = {{ zone = "{zone}" }}
data_dir = "{data}"

[mesh]
listen = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = [{bootstrap}]
mdns = false
announce_interval = "1s"
peer_timeout = "5s"

[trust]
domain = "dev.beemesh.local"
signers = ["{op}"]
admission = "{adm}"
ticket = "{ticket}"

[runtime]
driver = "process"

[resources]
reserve = {{ cpu = "0", memory = "0" }}

[api]
socket = "{sock}"

[sandbox]
landlock = "off"
"#,
        data = node.join("data").display(),
        bootstrap = bootstrap.map(|b| format!("{b:?}")).unwrap_or_default(),
        op = operator.public(),
        adm = admission.public(),
        ticket = root.join("fleet.ticket").display(),
        sock = node.join("api.sock").display(),
    )
}

pub fn dev(a: &DevArgs) -> anyhow::Result<()> {
    logging::init_with_default("warn");
    let (root, _guard) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("beemesh-dev-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            (t.path().to_owned(), Some(t))
        }
    };
    let key_at = |name: &str| -> anyhow::Result<SecretKey> {
        let path = root.join(name);
        if path.exists() {
            return Ok(SecretKey::load(&path)?);
        }
        let k = SecretKey::generate()?;
        k.save_new(&path)?;
        Ok(k)
    };
    let operator = key_at("operator.key")?;
    let admission = key_at("admission.key")?;
    let ticket_path = root.join("fleet.ticket");
    if !ticket_path.exists() {
        let t = Ticket::issue(&admission, None, time::OffsetDateTime::now_utc(), None);
        std::fs::write(&ticket_path, t.to_toml())
            .with_context(|| format!("cannot write {}", ticket_path.display()))?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        beemesh_node::cancel_on_signals(shutdown.clone())?;
        let mut nodes: Vec<RunningNode> = Vec::new();
        let mut bootstrap: Option<String> = None;
        for i in 1..=a.nodes {
            let text = host_toml(&root, i, &operator, &admission, bootstrap.as_deref());
            let path = root.join(format!("node{i}/host.toml"));
            std::fs::create_dir_all(root.join(format!("node{i}")))?;
            std::fs::write(&path, &text)?;
            let config = HostConfig::from_toml(&path.display().to_string(), &text)?;
            let mut opts = NodeOptions::new(config, Some(path));
            opts.sandbox = serde_json::json!({ "mode": "off", "reason": "beemesh dev runs every node in one process" });
            let node = beemesh_node::start(opts, shutdown.clone())
                .await
                .with_context(|| format!("node {i} did not start"))?;
            if bootstrap.is_none() {
                let addrs = node.shared.mesh.listen_addrs().await?;
                let first = addrs.first().context("node 1 has no listen address")?;
                bootstrap = Some(format!("{first}/p2p/{}", node.shared.peer_id));
            }
            nodes.push(node);
        }
        // Wait until the nodes see each other, so the printed commands work right away.
        let want = usize::from(a.nodes) - 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            let mut all = true;
            for n in &nodes {
                all &= n.shared.mesh.peers().await.map(|p| p.len()).unwrap_or(0) >= want;
            }
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        print_instructions(&root, &nodes);
        shutdown.cancelled().await;
        for n in nodes {
            n.join().await;
        }
        anyhow::Ok(())
    })?;
    if a.dir.is_none() {
        eprintln!("beemesh dev: stopped; removed {}", root.display());
    }
    Ok(())
}

fn print_instructions(root: &Path, nodes: &[RunningNode]) {
    let first = nodes
        .first()
        .map(|n| n.api_socket.display().to_string())
        .unwrap_or_default();
    let key = root.join("operator.key");
    let signed = root.join("hello.signed.toml");
    println!(
        "beemesh dev: {} nodes on loopback, state in {}",
        nodes.len(),
        root.display()
    );
    for n in nodes {
        println!(
            "  {:<8} {}  api {}",
            n.shared.name,
            n.shared.peer_id,
            n.api_socket.display()
        );
    }
    println!();
    println!("In another shell:");
    println!("  export BEEMESH_API={first}");
    println!("  beemesh get peers");
    println!(
        "  beemesh sign examples/hello.toml --key {} --out {}",
        key.display(),
        signed.display()
    );
    println!("  beemesh apply {}", signed.display());
    println!("  beemesh get workloads");
    println!();
    println!("Ctrl-C stops the mesh.");
}
