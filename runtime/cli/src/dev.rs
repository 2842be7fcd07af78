//! `beemesh dev`: a local mesh with embedded defaults, for a first try.
//!
//! Nothing to write and no root needed: a throwaway operator key and admission key in a fresh
//! temporary directory, a fleet ticket, and N nodes on loopback in this process, each with its
//! own data directory and API socket. Replicas run under rootless Podman when the current
//! user's Podman API answers, else as host processes (the process driver). `dev` writes an
//! example workload that works with the chosen driver into its directory and prints what to
//! export and the exact commands to sign and apply it; it runs until Ctrl-C, then stops its
//! replicas and removes its directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use beemesh_driver::ContainerDriver;
use beemesh_manifest::ticket::{Ticket, default_key_path};
use beemesh_manifest::{HostConfig, SecretKey};
use beemesh_node::{NodeOptions, RunningNode, logging};
use clap::{Args, ValueEnum};
use hyper::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::client::Client;

const AFTER_HELP: &str = "\
What you get:
  N nodes (dev-1, dev-2, ...) in this process on 127.0.0.1, admitted by a throwaway admission
  key and trusting a throwaway operator key, all in a new temporary directory (or --dir). The
  directory also holds hello.toml, an example workload made for the chosen driver: a shell loop
  that prints a line every 5 seconds, with one replica on each of up to 3 nodes.

  dev prints the commands to run in another shell: export BEEMESH_API (node 1's API socket),
  sign hello.toml with the operator key, `apply --wait` it (it returns once the replicas run),
  `get workloads` (each replica on its own node, running) and `logs default/hello` (what a
  replica printed). Ctrl-C stops the nodes and their replicas and removes the directory (a --dir
  directory is kept).

Drivers (--driver auto picks one and says why):
  podman   rootless Podman through the current user's API socket
           ($XDG_RUNTIME_DIR/podman/podman.sock; `systemctl --user start podman.socket` or
           `podman system service --time=0 &` starts it). The example uses a local busybox or
           alpine image, or pulls docker.io/library/busybox.
  process  replicas are host processes (images are ignored; the example runs the host's sh).
           What auto picks as root: BeeMesh runs Podman rootless only.

Examples:
  beemesh dev                      # 3 nodes
  beemesh dev --nodes 1            # one node; it places at once (scheduler in solo mode)
  beemesh dev --driver process     # never Podman";

#[derive(Debug, Args)]
#[command(
    after_help = "Then run the commands it prints in another shell; Ctrl-C stops everything. \
                  `beemesh dev --help` says more.",
    after_long_help = AFTER_HELP
)]
pub struct DevArgs {
    /// How many nodes to run (1 to 32). With one node the scheduler runs in solo mode and
    /// places at once; with more it first waits a few seconds for the mesh to settle.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    nodes: u16,

    /// What runs the replicas: `podman` (rootless Podman), `process` (host processes), or
    /// `auto`: Podman when the current user's rootless Podman API answers, else processes.
    #[arg(long, value_enum, default_value_t = DriverChoice::Auto)]
    driver: DriverChoice,

    /// Keep state in this directory (kept on exit) instead of a fresh temporary one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DriverChoice {
    Auto,
    Podman,
    Process,
}

/// The driver `dev` runs its nodes with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chosen {
    Podman { socket: PathBuf, image: String },
    Process,
}

impl Chosen {
    fn name(&self) -> &'static str {
        match self {
            Chosen::Podman { .. } => "podman",
            Chosen::Process => "process",
        }
    }
}

/// Local images the Podman example may use, in order of preference (each has `sh`).
const LOCAL_IMAGES: &[&str] = &[
    "localhost/busybox:latest",
    "docker.io/library/busybox:latest",
    "docker.io/library/alpine:latest",
];
/// What to pull when none of [`LOCAL_IMAGES`] is present.
const PULL_IMAGE: &str = "docker.io/library/busybox:latest";
/// Stands in for the image with the process driver, which ignores images.
const PROCESS_IMAGE: &str = "localhost/busybox:latest";
/// The name of the example workload; namespace `default`.
const EXAMPLE: &str = "hello";
/// The example's container.
const EXAMPLE_CONTAINER: &str = "hello";

/// The example workload for `driver`, with `replicas` replicas (one per node).
fn example_manifest(driver: &Chosen, replicas: u16) -> String {
    let (image, note) = match driver {
        Chosen::Podman { image, .. } => (
            image.as_str(),
            "# Podman runs each replica in its own pod from `image` (rootless, read-only root).",
        ),
        Chosen::Process => (
            PROCESS_IMAGE,
            "# The process driver ignores `image` and runs `command` on the host: `sh` from the host.",
        ),
    };
    format!(
        r#"# The example workload of `beemesh dev`, written for the {driver} driver.
# A shell loop that prints a line every 5 seconds and listens on no port, so every replica fits
# on one machine. It ends when the process that started it is gone (with the process driver,
# the dev mesh itself), so even a killed dev mesh leaves no process behind.
# examples/hello.toml is a web server for real hosts.
{note}
api = "beemesh/v1"
kind = "Workload"
name = "{EXAMPLE}"
namespace = "default"
generation = 1                      # raise it for every change you apply
labels = {{ app = "hello" }}

[placement]
replicas = {replicas}
spread = "node"                     # at most one replica per node

[consistency]
mode = "eventual"

[[container]]
name = "{EXAMPLE_CONTAINER}"
image = "{image}"
command = ["sh", "-c", 'while [ -e "/proc/$PPID" ]; do echo "$GREETING from replica ${{BEEMESH_REPLICA:-$(hostname)}}"; sleep 5; done']
env = {{ GREETING = "hello" }}
resources = {{ cpu = "50m", memory = "16Mi" }}
"#,
        driver = driver.name(),
    )
}

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// "1 node", "3 nodes".
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `s` as one shell word: as is when that is safe, else single-quoted.
fn shell_word(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@%".contains(c));
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn utf8(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{}: beemesh dev needs a UTF-8 path", p.display()))
}

fn host_toml(
    root: &str,
    i: u16,
    operator: &SecretKey,
    admission: &SecretKey,
    bootstrap: Option<&str>,
    driver: &Chosen,
) -> String {
    let node = format!("{root}/node{i}");
    let zone = if i % 2 == 1 { "a" } else { "b" };
    let runtime = match driver {
        Chosen::Podman { socket, .. } => format!(
            "driver = \"podman\"\npodman_socket = {}",
            toml_str(&socket.display().to_string())
        ),
        Chosen::Process => "driver = \"process\"".to_owned(),
    };
    format!(
        r#"# beemesh dev: node {i}
[node]
name = "dev-{i}"
labels = {{ zone = "{zone}" }}
data_dir = {data}

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
ticket = {ticket}
ticket_key = {ticket_key}

[runtime]
{runtime}

[resources]
reserve = {{ cpu = "0", memory = "0" }}

[api]
socket = {sock}

[sandbox]
# The process driver confines each replica with Landlock where the kernel has it.
landlock = "best-effort"
"#,
        data = toml_str(&format!("{node}/data")),
        bootstrap = bootstrap.map(toml_str).unwrap_or_default(),
        op = operator.public(),
        adm = admission.public(),
        ticket = toml_str(&format!("{root}/fleet.ticket")),
        ticket_key = toml_str(&format!("{root}/fleet.ticket.key")),
        sock = toml_str(&format!("{node}/api.sock")),
    )
}

/// The effective user id, from the owner of `/proc/self` (no libc call needed).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Picks the driver; returns it and why.
async fn choose_driver(choice: DriverChoice) -> anyhow::Result<(Chosen, String)> {
    let socket = beemesh_driver::podman::default_socket();
    let start_hint =
        "`systemctl --user start podman.socket`, or `podman system service --time=0 &`";
    let (chosen, why) = match choice {
        DriverChoice::Process => (Chosen::Process, "--driver process".to_owned()),
        DriverChoice::Podman => {
            let mut socket = socket;
            if !beemesh_driver::podman::socket_answers(&socket).await {
                // Root's Podman service listens on the system socket.
                let system = PathBuf::from("/run/podman/podman.sock");
                if !(running_as_root() && beemesh_driver::podman::socket_answers(&system).await) {
                    bail!(
                        "--driver podman: no Podman API answers at {}; start it with {start_hint}, or use --driver process",
                        socket.display()
                    );
                }
                socket = system;
            }
            let image = podman_image(&socket)
                .await
                .context("--driver podman: no image for the example workload")?;
            let why = format!("--driver podman; the Podman API answers at {}", socket.display());
            (Chosen::Podman { socket, image }, why)
        }
        DriverChoice::Auto if running_as_root() => (
            Chosen::Process,
            "auto: running as root, and BeeMesh runs Podman rootless only; --driver podman uses root's Podman anyway"
                .to_owned(),
        ),
        DriverChoice::Auto => {
            if beemesh_driver::podman::socket_answers(&socket).await {
                match podman_image(&socket).await {
                    Ok(image) => {
                        let why = format!(
                            "auto: the rootless Podman API answers at {}",
                            socket.display()
                        );
                        (Chosen::Podman { socket, image }, why)
                    }
                    Err(e) => (
                        Chosen::Process,
                        format!(
                            "auto: rootless Podman answers at {}, but it has no image for the example: {e:#}",
                            socket.display()
                        ),
                    ),
                }
            } else {
                (
                    Chosen::Process,
                    format!(
                        "auto: no rootless Podman API answers at {}; to use Podman, start it with {start_hint}",
                        socket.display()
                    ),
                )
            }
        }
    };
    Ok((chosen, why))
}

/// An image with `sh` for the Podman example: a local busybox or alpine, else a pulled busybox.
async fn podman_image(socket: &Path) -> anyhow::Result<String> {
    let podman = Client::new(utf8(socket)?, None)?;
    for image in LOCAL_IMAGES {
        let (status, _) = podman
            .send(
                Method::GET,
                &format!("/v4.0.0/libpod/images/{image}/exists"),
                None,
            )
            .await
            .with_context(|| format!("asking Podman at {} for {image}", socket.display()))?;
        if status == StatusCode::NO_CONTENT {
            return Ok((*image).to_owned());
        }
    }
    eprintln!(
        "beemesh dev: none of {} is present; pulling {PULL_IMAGE}",
        LOCAL_IMAGES.join(", ")
    );
    let (status, body) = podman
        .send(
            Method::POST,
            &format!("/v4.0.0/libpod/images/pull?reference={PULL_IMAGE}&quiet=true"),
            None,
        )
        .await
        .with_context(|| format!("pulling {PULL_IMAGE}"))?;
    // The answer is a stream of JSON objects; a failed pull has one with "error".
    let error = serde_json::Deserializer::from_slice(&body)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .find_map(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
    match (status.is_success(), error) {
        (true, None) => Ok(PULL_IMAGE.to_owned()),
        (_, e) => bail!(
            "pulling {PULL_IMAGE} failed ({}); make a busybox image available to Podman \
             (`podman pull {PULL_IMAGE}`, or import a busybox rootfs as localhost/busybox:latest \
             as .ci/setup-podman does)",
            e.unwrap_or_else(|| format!("Podman answered {status}"))
        ),
    }
}

/// Where `beemesh` is found on PATH, canonicalised.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

pub fn dev(a: &DevArgs) -> anyhow::Result<()> {
    // Kademlia complains while the first node has no peer yet; that is expected here.
    logging::init_with_default("warn,libp2p_kad=error");
    let (root, guard) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            let d = d
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", d.display()))?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("beemesh-dev-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            (t.path().to_owned(), Some(t))
        }
    };
    let root_str = utf8(&root)?.to_owned();
    let key_at = |name: &str| -> anyhow::Result<SecretKey> {
        let path = root.join(name);
        if path.exists() {
            return SecretKey::load(&path).with_context(|| format!("loading {}", path.display()));
        }
        let k = SecretKey::generate()?;
        k.save_new(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(k)
    };
    let operator = key_at("operator.key")?;
    let admission = key_at("admission.key")?;
    let ticket_path = root.join("fleet.ticket");
    let ticket_key_path = default_key_path(&ticket_path);
    let usable = std::fs::read_to_string(&ticket_path)
        .ok()
        .and_then(|t| Ticket::parse(&ticket_path.display().to_string(), &t).ok())
        .is_some_and(|t| t.holder.is_some())
        && ticket_key_path.exists();
    if !usable {
        // A first run, or a directory from a release whose fleet tickets had no ticket key
        // (those are refused now): this directory's own files, so they are replaced.
        let (t, k) = Ticket::issue_fleet(&admission, time::OffsetDateTime::now_utc(), None)?;
        let _ = std::fs::remove_file(&ticket_key_path);
        k.save_new(&ticket_key_path)
            .with_context(|| format!("writing {}", ticket_key_path.display()))?;
        std::fs::write(&ticket_path, t.to_toml())
            .with_context(|| format!("cannot write {}", ticket_path.display()))?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        beemesh_node::cancel_on_signals(shutdown.clone())
            .context("cannot install signal handlers")?;
        // Closing the terminal stops the mesh too (and its replicas with it).
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install signal handlers")?;
        let on_hangup = shutdown.clone();
        tokio::spawn(async move {
            if hangup.recv().await.is_some() {
                on_hangup.cancel();
            }
        });

        let (driver, why) = choose_driver(a.driver).await?;
        let replicas = a.nodes.min(3);
        let example = root.join(format!("{EXAMPLE}.toml"));
        std::fs::write(&example, example_manifest(&driver, replicas))
            .with_context(|| format!("cannot write {}", example.display()))?;

        let mut nodes: Vec<RunningNode> = Vec::new();
        let mut bootstrap: Option<String> = None;
        for i in 1..=a.nodes {
            let text = host_toml(
                &root_str,
                i,
                &operator,
                &admission,
                bootstrap.as_deref(),
                &driver,
            );
            let dir = root.join(format!("node{i}"));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join("host.toml");
            std::fs::write(&path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let config = HostConfig::from_toml(&path.display().to_string(), &text)?;
            let mut opts = NodeOptions::new(config, Some(path));
            opts.sandbox = serde_json::json!({ "mode": "off", "reason": "beemesh dev runs every node in one process" });
            if a.nodes == 1 {
                // Nothing to wait for: no peer can bring state or membership.
                opts.scheduler.solo = true;
                opts.scheduler.settle = 0;
            }
            let node = match beemesh_node::start(opts, shutdown.clone()).await {
                Ok(n) => n,
                Err(e) => {
                    shutdown.cancel();
                    stop_all(nodes).await;
                    return Err(anyhow::Error::new(e).context(format!("node {i} did not start")));
                }
            };
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
        while !shutdown.is_cancelled() && tokio::time::Instant::now() < deadline {
            let mut all = true;
            for n in &nodes {
                all &= n.shared.mesh.peers().await.map(|p| p.len()).unwrap_or(0) >= want;
            }
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !shutdown.is_cancelled() {
            print_instructions(&root, &nodes, (&driver, &why), replicas, guard.is_some());
        }
        shutdown.cancelled().await;
        stop_all(nodes).await;
        anyhow::Ok(())
    })?;
    match guard {
        Some(t) => {
            let shown = root.display().to_string();
            t.close()
                .with_context(|| format!("cannot remove {shown}"))?;
            eprintln!("beemesh dev: stopped; removed {shown}");
        }
        None => eprintln!("beemesh dev: stopped; state kept in {}", root.display()),
    }
    Ok(())
}

/// Waits for the nodes' loops to end, then stops every replica they ran: a dev mesh leaves
/// nothing running (a real node keeps its replicas across restarts and adopts them).
async fn stop_all(nodes: Vec<RunningNode>) {
    let mut stops = tokio::task::JoinSet::new();
    for n in nodes {
        let driver: Arc<dyn ContainerDriver> = n.shared.driver.clone();
        let name = n.shared.name.clone();
        n.join().await;
        let replicas = match driver.list().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("beemesh dev: {name}: cannot list its replicas: {e}");
                continue;
            }
        };
        for r in replicas.into_iter().filter(|r| r.node == name) {
            let driver = driver.clone();
            let name = name.clone();
            stops.spawn(async move {
                if let Err(e) = driver.stop(&r.id).await {
                    eprintln!("beemesh dev: {name}: cannot stop {}: {e}", r.id);
                }
            });
        }
    }
    let mut stopped = 0;
    while stops.join_next().await.is_some() {
        stopped += 1;
    }
    if stopped > 0 {
        eprintln!("beemesh dev: stopped {}", plural(stopped, "replica"));
    }
}

fn print_instructions(
    root: &Path,
    nodes: &[RunningNode],
    (driver, why): (&Chosen, &str),
    replicas: u16,
    temporary: bool,
) {
    let path = |p: PathBuf| shell_word(&p.display().to_string());
    let first = nodes
        .first()
        .map(|n| shell_word(&n.api_socket.display().to_string()))
        .unwrap_or_default();
    let example = path(root.join(format!("{EXAMPLE}.toml")));
    let signed = path(root.join(format!("{EXAMPLE}.signed.toml")));
    let key = path(root.join("operator.key"));
    println!(
        "beemesh dev: {} on loopback, state in {}",
        plural(nodes.len(), "node"),
        root.display()
    );
    match driver {
        Chosen::Podman { image, .. } => {
            println!("driver: podman ({why}); the example runs the image {image}");
        }
        Chosen::Process => println!("driver: process ({why})"),
    }
    for n in nodes {
        println!(
            "  {:<8} {}  api {}",
            n.shared.name,
            n.shared.peer_id,
            n.api_socket.display()
        );
    }
    println!();
    println!(
        "The example workload {example} runs {} of a shell loop, one per node.",
        plural(usize::from(replicas), "replica")
    );
    println!("In another shell:");
    // The commands must run the binary that is running now: put its directory first on PATH
    // when `beemesh` is not (for example under `cargo run`, or with another version installed).
    if let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize())
        && on_path("beemesh").as_ref() != Some(&me)
        && let Some(dir) = me.parent()
    {
        println!("  export PATH={}:\"$PATH\"", path(dir.to_owned()));
    }
    println!("  export BEEMESH_API={first}");
    println!("  beemesh get peers");
    println!("  beemesh sign {example} --key {key} --out {signed}");
    println!("  beemesh apply --wait {signed}");
    println!("  beemesh get workloads");
    println!("  beemesh logs default/{EXAMPLE}");
    println!();
    let names: Vec<String> = nodes
        .iter()
        .take(usize::from(replicas))
        .map(|n| format!("{}=running", n.shared.name))
        .collect();
    let when = if nodes.len() == 1 {
        "at once"
    } else {
        "within a few seconds"
    };
    println!(
        "`apply --wait` returns when the replicas run ({when}); `get workloads` then shows \
         default/{EXAMPLE} with {} placements, such as {}.",
        replicas,
        names.join(" ")
    );
    let also = match driver {
        Chosen::Process => format!(
            "they are also in {}/node*/data/process/*/logs/{EXAMPLE_CONTAINER}.log",
            shell_word(&root.display().to_string())
        ),
        Chosen::Podman { .. } => {
            format!("Podman has them too: podman logs bm_default_{EXAMPLE}_<N>_{EXAMPLE_CONTAINER}")
        }
    };
    println!(
        "Each replica prints a line every 5 seconds: `beemesh logs -f default/{EXAMPLE}` \
         follows one (--replica N picks which); {also}."
    );
    println!();
    if temporary {
        println!(
            "Ctrl-C stops the mesh and its replicas and removes {}.",
            root.display()
        );
    } else {
        println!(
            "Ctrl-C stops the mesh and its replicas; {} is kept.",
            root.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beemesh_manifest::Manifest;

    #[test]
    fn the_example_is_valid_for_both_drivers() {
        let podman = Chosen::Podman {
            socket: "/run/user/1000/podman/podman.sock".into(),
            image: "localhost/busybox:latest".into(),
        };
        for (driver, replicas) in [(Chosen::Process, 3), (podman, 1)] {
            let text = example_manifest(&driver, replicas);
            let m = Manifest::from_toml("hello.toml", &text).expect("a valid manifest");
            assert_eq!(m.name, EXAMPLE);
            assert_eq!(m.placement.replicas, u32::from(replicas));
            assert!(m.containers[0].ports.is_empty(), "needs no port");
            assert_eq!(m.containers[0].command[0], "sh");
        }
    }

    #[test]
    fn host_configs_are_valid_for_both_drivers() {
        let op = SecretKey::generate().expect("key");
        let adm = SecretKey::generate().expect("key");
        let podman = Chosen::Podman {
            socket: "/run/user/1000/po\"dman/podman.sock".into(),
            image: "x".into(),
        };
        for driver in [Chosen::Process, podman] {
            let text = host_toml(
                "/tmp/beemesh dev \"x\"",
                2,
                &op,
                &adm,
                Some(
                    "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRsuTYKyCB8Vpwu766bUws6Mz53xkpv2Yx2xmRSV6NuyP",
                ),
                &driver,
            );
            let c = HostConfig::from_toml("host.toml", &text).expect("a valid host config");
            assert_eq!(
                c.node.data_dir,
                PathBuf::from("/tmp/beemesh dev \"x\"/node2/data")
            );
            if let Chosen::Podman { socket, .. } = &driver {
                assert_eq!(c.runtime.podman_socket.as_ref(), Some(socket));
            }
        }
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("/tmp/a-b_c.d/e"), "/tmp/a-b_c.d/e");
        assert_eq!(shell_word("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
