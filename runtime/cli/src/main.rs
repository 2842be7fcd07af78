//! `beemesh`: one binary for operators. A thin clap front over the runtime crates.
//!
//! Exit codes: 0 success, 1 failure (a one-line reason on stderr, then details such as every
//! diagnostic of an invalid file, one per line), 2 usage error.

mod client;
mod config;
mod daemon;
mod dev;
mod image;
mod keys;
mod kube;
mod kv;
mod logs;
mod output;
mod remote;
mod sign;
mod ticket;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::output::Format;

/// BeeMesh: a peer-to-peer mesh that places, runs and heals signed workloads on machines that
/// belong to no cluster.
///
/// Offline work (keys, signing, verification, Kubernetes conversion, config checks) needs no
/// running node.
#[derive(Debug, Parser)]
#[command(
    name = "beemesh",
    version,
    propagate_version = true,
    max_term_width = 100
)]
#[command(after_help = "First steps:
  beemesh key gen --out operator.key          # an operator signing key
  beemesh sign examples/hello.toml --key operator.key --out hello.signed.toml
  beemesh verify hello.signed.toml --signer operator.key
  beemesh config check examples/host.toml")]
struct Cli {
    /// Output format of commands that print data.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Text)]
    output: Format,

    /// The node API: a unix socket path or http://HOST:PORT (with BEEMESH_TOKEN).
    #[arg(long, global = true, env = "BEEMESH_API", default_value = client::DEFAULT_API, value_name = "SOCKET|URL")]
    api: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon: join the mesh, replicate desired state, serve the API.
    Node(daemon::NodeArgs),

    /// Run a local mesh on loopback with throwaway keys, for a first try (no files, no root).
    Dev(dev::DevArgs),

    /// Show this node: peer id, name, peers, capacity, sandbox.
    Status,

    /// List what the mesh knows.
    Get {
        #[arg(value_enum)]
        kind: remote::Kind,
    },

    /// Submit a signed manifest to the mesh through the node's API.
    ///
    /// With --wait, follow the placements until every replica of the applied generation runs
    /// (progress on stderr, a summary on stdout); on timeout, exit 1 naming what is missing
    /// and why replicas are unschedulable.
    Apply(remote::ApplyArgs),

    /// Delete a workload everywhere: signs and submits a tombstone (a higher generation with
    /// deleted = true).
    Delete(remote::DeleteArgs),

    /// Show a replica's output, from whichever node runs it, through this node's API.
    ///
    /// Lines print as `container | text` (`-o json`: one JSON object per line). Without
    /// --replica, the lowest replica that is running (else the lowest placed one).
    Logs(logs::LogsArgs),

    /// Read and write a workload's state (its key-value store) as an operator.
    ///
    /// Every request is signed with your operator key (--key FILE), which must be one of the
    /// nodes' [trust] signers: one signature is enough, whatever the manifests' threshold.
    /// What is signed: the operation, NS/NAME, the key and the value (or --prefix, --after and
    /// --limit), --if-revision, the time, a random nonce, and the peer id of the node that is
    /// to carry it out: a host of one of the workload's replicas, picked from the placements
    /// (the node you talk to forwards the request there, unchanged; that host checks the
    /// signature again).
    ///
    /// A node accepts a request only within 5 minutes of the time it was signed, by the
    /// node's clock and either way, and only once: keep clocks in sync (NTP). `beemesh kv`
    /// signs a new request for every attempt; a saved request cannot be sent again.
    #[command(subcommand, after_help = kv::EXAMPLES)]
    Kv(kv::KvCommand),

    /// Create and inspect Ed25519 keys (operator signing keys, admission keys).
    #[command(subcommand)]
    Key(KeyCommand),

    /// Sign a workload manifest (or add a signature to an already signed one).
    ///
    /// The manifest is validated first. The output embeds the manifest's exact bytes plus the
    /// signatures; run it again with another key to collect signatures for a threshold.
    Sign(sign::SignArgs),

    /// Verify a signed manifest against a trust policy: a host config's [trust] section, or
    /// signer keys given on the command line.
    Verify(sign::VerifyArgs),

    /// Convert Kubernetes objects.
    #[command(subcommand)]
    Kube(KubeCommand),

    /// Check host configs.
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Issue admission tickets that let nodes into the mesh.
    #[command(subcommand)]
    Ticket(TicketCommand),

    /// Build bootable host images and configure them per host.
    #[command(subcommand)]
    Image(image::ImageCommand),

    /// The replica's end of its state channel, run by the node in one more container of each
    /// replica's pod: relays 127.0.0.1:7480 inside the pod to the node's per-replica socket.
    /// Not for running by hand.
    Sidecar(SidecarArgs),
}

#[derive(Debug, Args)]
struct SidecarArgs {
    /// Where to listen, inside the replica's network namespace.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7480")]
    listen: std::net::SocketAddr,
    /// The node's socket for this replica, as bind-mounted into the sidecar.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
}

/// Runs the relay until SIGTERM or SIGINT.
fn sidecar(a: &SidecarArgs) -> anyhow::Result<()> {
    beemesh_node::logging::init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        beemesh_node::cancel_on_signals(stop.clone())?;
        beemesh_node::sidecar::relay(a.listen, a.socket.clone(), stop)
            .await
            .map_err(|e| anyhow::anyhow!("sidecar on {}: {e}", a.listen))
    })
}

#[derive(Debug, Subcommand)]
enum TicketCommand {
    /// Sign an admission ticket with the admission key: a fleet ticket (any holder) or a
    /// peer ticket (one PeerId), optionally expiring.
    Issue(ticket::IssueArgs),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Generate a secret key file (PKCS#8 PEM, mode 0600) and print its public key.
    ///
    /// Refuses to overwrite an existing file.
    Gen {
        /// Where to write the secret key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key ("ed25519:BASE64") of a secret key file.
    Show {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KubeCommand {
    /// Convert Pod, Deployment and StatefulSet objects (multi-document YAML) into BeeMesh
    /// manifests.
    ///
    /// Fields without effect here are accepted and listed as notes on stderr; fields that
    /// cannot be honoured are errors naming their path. Nothing is dropped silently.
    Convert(kube::ConvertArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a host config (host.toml) and report every problem with file, line and key.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The host config to check (`-` reads standard input).
    #[arg(value_name = "HOST.toml")]
    file: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = cli.output;
    let token = std::env::var("BEEMESH_TOKEN").ok();
    let client = || client::Client::new(&cli.api, token.clone());
    let result = match cli.command {
        Command::Node(a) => daemon::node(&a),
        Command::Dev(a) => dev::dev(&a),
        Command::Status => client().and_then(|c| remote::status(&c, out)),
        Command::Get { kind } => client().and_then(|c| remote::get(&c, kind, out)),
        Command::Apply(a) => client().and_then(|c| remote::apply(&c, &a, out)),
        Command::Delete(a) => client().and_then(|c| remote::delete(&c, &a, out)),
        Command::Logs(a) => client().and_then(|c| logs::logs(&c, &a, out)),
        Command::Kv(c) => client().and_then(|cl| kv::run(&cl, &c, out)),
        Command::Key(KeyCommand::Gen { out: path }) => keys::gen_key(&path, out),
        Command::Key(KeyCommand::Show { file }) => keys::show_key(&file, out),
        Command::Sign(a) => sign::sign(&a, out),
        Command::Verify(a) => sign::verify(&a, out),
        Command::Kube(KubeCommand::Convert(a)) => kube::convert(&a, out),
        Command::Config(ConfigCommand::Check(a)) => config::check(&a.file, out),
        Command::Ticket(TicketCommand::Issue(a)) => ticket::issue(&a, out),
        Command::Image(c) => image::run(&c, out),
        Command::Sidecar(a) => sidecar(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::report_error(&e);
            ExitCode::FAILURE
        }
    }
}
