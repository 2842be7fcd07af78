//! Time to start a replica through the Podman driver versus `podman run -d` of the same
//! image by the same (rootless) user, interleaved in one run.
//!
//! ```text
//! cargo run --release -p beemesh-driver --example bench_start -- [RUNS] [SOCKET] [IMAGE]
//! ```
//! Defaults: 20 runs, the `beemesh-test` user's socket (as `.ci/setup-podman` prepares it),
//! `localhost/busybox:latest`. Run as root (the CLI runs are made as the socket's owner
//! through `runuser`) or as the socket's owner.
//!
//! Measured:
//! - driver: `ensure` of a new replica until it returns Running: image check, pod (infra
//!   container, slirp4netns, a port forward), container create (libpod call), pod start,
//!   status read back;
//! - `podman run -d` with the same confinement and network flags (pod-less, one process
//!   start of the podman CLI included), until the command returns;
//! - `podman run -d` with no flags, for reference.
//!
//! Removal after each run is not timed. The first run of each is a warm-up and not counted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beemesh_driver::{ContainerDriver, PodmanConfig, PodmanDriver, ReplicaSpec, ReplicaState};
use beemesh_manifest::Manifest;

fn socket_owner(socket: &Path) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(socket).ok()?.uid();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| (uid, f[0].to_owned()))
    })
}

/// `podman ARGS` as the socket's owner; returns the wall time and the output.
fn podman(owner: &(u32, String), args: &[&str]) -> Result<(Duration, String), String> {
    let runtime_dir = format!("/run/user/{}", owner.0);
    let me = rustix::process::getuid().as_raw();
    let mut cmd = if me == owner.0 {
        Command::new("podman")
    } else {
        let mut c = Command::new("runuser");
        c.args(["-u", &owner.1, "--", "podman"]);
        c
    };
    cmd.args(args)
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .current_dir("/");
    let start = Instant::now();
    let out = cmd.output().map_err(|e| format!("running podman: {e}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n == 0 {
        Duration::ZERO
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let socket = args.get(1).map(PathBuf::from).unwrap_or_else(|| {
        let uid = socket_owner_uid_of("beemesh-test").unwrap_or(0);
        PathBuf::from(format!("/run/user/{uid}/podman/podman.sock"))
    });
    let image = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "localhost/busybox:latest".into());
    let owner = socket_owner(&socket)
        .ok_or_else(|| format!("cannot find the owner of {}", socket.display()))?;

    let mut config = PodmanConfig::new(&socket);
    config.stop_timeout = Duration::from_secs(1);
    let driver = PodmanDriver::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let manifest = Manifest::from_toml(
        "bench.toml",
        &format!(
            "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"bench\"\ngeneration = 1\n\n[[container]]\nname = \"web\"\nimage = \"{image}\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\"]\nports = [{{ name = \"http\", container = 8080 }}]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let manifest = Arc::new(manifest);
    let same_flags = [
        "run",
        "-d",
        "--name",
        "bm-bench-cli",
        "--network",
        "slirp4netns",
        "-p",
        "127.0.0.1::8080",
        "--read-only",
        "--cap-drop",
        "all",
        "--security-opt",
        "no-new-privileges",
        "--init",
        "--memory",
        "64m",
        "--cpus",
        "0.1",
        &image,
        "httpd",
        "-f",
        "-p",
        "8080",
    ];
    let plain = [
        "run",
        "-d",
        "--name",
        "bm-bench-plain",
        &image,
        "httpd",
        "-f",
        "-p",
        "8080",
    ];

    let (mut t_driver, mut t_cli, mut t_plain) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=runs {
        let spec = ReplicaSpec::new(
            manifest.clone(),
            u32::try_from(i).unwrap_or(0),
            format!("sha256:bench-{i}"),
            "bench",
        );
        let start = Instant::now();
        let status = driver.ensure(&spec).await.map_err(|e| e.to_string())?;
        let took = start.elapsed();
        if status.state != ReplicaState::Running {
            return Err(format!("replica did not start: {}", status.state));
        }
        driver.stop(&spec.id).await.map_err(|e| e.to_string())?;

        let (cli, _) = podman(&owner, &same_flags)?;
        podman(&owner, &["rm", "-f", "-t", "0", "bm-bench-cli"])?;
        let (pl, _) = podman(&owner, &plain)?;
        podman(&owner, &["rm", "-f", "-t", "0", "bm-bench-plain"])?;
        if i > 0 {
            t_driver.push(took);
            t_cli.push(cli);
            t_plain.push(pl);
        }
        eprintln!(
            "run {i:>2}: driver {} | podman run -d (same flags) {} | podman run -d {}",
            ms(took),
            ms(cli),
            ms(pl)
        );
    }
    let row = |name: &str, v: &mut Vec<Duration>| {
        let m = median(v);
        let (min, max) = (
            v.first().copied().unwrap_or_default(),
            v.last().copied().unwrap_or_default(),
        );
        println!(
            "| {name} | {runs} | {} | {} | {} |",
            ms(m),
            ms(min),
            ms(max)
        );
        m
    };
    let (version, _) = podman(&owner, &["version", "--format", "{{.Client.Version}}"])
        .map(|(_, v)| (v, ()))
        .unwrap_or_default();
    println!(
        "\nPodman {version}, rootless as {}, image {image}\n",
        owner.1
    );
    println!("| start | runs | median | min | max |");
    println!("|---|---|---|---|---|");
    let d = row(
        "Podman driver `ensure` (pod + container, port forward)",
        &mut t_driver,
    );
    let c = row("`podman run -d` with the same flags (no pod)", &mut t_cli);
    let p = row("`podman run -d` (no flags)", &mut t_plain);
    println!(
        "\nratio driver / `podman run -d` same flags: {:.2}; driver / plain: {:.2}",
        d.as_secs_f64() / c.as_secs_f64().max(1e-9),
        d.as_secs_f64() / p.as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn socket_owner_uid_of(user: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&user))
                .then(|| f.get(2)?.parse().ok())
                .flatten()
        })
}
