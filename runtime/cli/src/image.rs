//! `beemesh image build` and `beemesh image configure` (runtime/image; docs/images.md).

use std::path::PathBuf;

use anyhow::{Context, bail};
use beemesh_image::build::{BuildOptions, BuildReport, DEFAULT_CACHE_DIR};
use beemesh_image::configure::ConfigureOptions;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a bootable host image from a spec: DIR/<name>.raw (GPT: ESP with systemd-boot,
    /// read-only erofs root, BEEMESH config partition; the data partition is created at first
    /// boot), DIR/<name>.qcow2 and DIR/<name>.manifest.json. Needs root and Debian's
    /// mmdebstrap, erofs-utils, dosfstools, mtools, qemu-utils.
    Build(BuildArgs),

    /// Write one host's files (host.toml, admission ticket, API token, network files) into an
    /// image's BEEMESH partition, without mounting anything. Configure a copy per host, or
    /// flash the configured image with dd.
    Configure(ConfigureArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The image spec (images/node.toml).
    #[arg(value_name = "SPEC.toml")]
    spec: PathBuf,

    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Build exactly the lock file's packages; fail if the spec asks for another set.
    #[arg(long, conflicts_with = "update_lock")]
    locked: bool,

    /// Resolve the packages afresh (newest in the suite) and rewrite the lock file.
    #[arg(long)]
    update_lock: bool,

    /// The beemesh binary to include (default: the spec's host.beemesh).
    #[arg(long, value_name = "PATH")]
    beemesh: Option<PathBuf>,

    /// Where the package tarball of locked builds is cached.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CACHE_DIR, env = "BEEMESH_IMAGE_CACHE")]
    cache_dir: PathBuf,

    /// Do not use or fill the cache.
    #[arg(long)]
    no_cache: bool,

    /// Keep the work directory (DIR/.<name>.work: the unpacked root file system).
    #[arg(long)]
    keep_work: bool,

    /// Build twice (without the cache) into DIR/a and DIR/b and compare: fails, naming the
    /// first differing partition and file, unless both .raw images have the same sha256.
    #[arg(long, conflicts_with = "update_lock")]
    check_reproducible: bool,
}

#[derive(Debug, Args)]
pub struct ConfigureArgs {
    /// A raw image built by `beemesh image build` (or a copy of it).
    #[arg(value_name = "IMAGE.raw")]
    image: PathBuf,

    /// The host config (checked like `beemesh config check` first).
    #[arg(long, value_name = "HOST.toml")]
    host: PathBuf,

    /// The host's admission ticket (`beemesh ticket issue`). A fleet ticket's secret key is
    /// copied with it, from FILE.key unless --ticket-key says otherwise.
    #[arg(long, value_name = "FILE")]
    ticket: Option<PathBuf>,

    /// The fleet ticket's secret key (default: the ticket's path plus `.key`).
    #[arg(long, value_name = "FILE", requires = "ticket")]
    ticket_key: Option<PathBuf>,

    /// Bootstrap peers, one multiaddr (ending in /p2p/<peer-id>) per line: merged into the
    /// host config's [mesh] bootstrap.
    #[arg(long, value_name = "FILE")]
    bootstrap: Option<PathBuf>,

    /// The bearer token of the TCP API ([api] token_file = "/run/beemesh-config/token").
    #[arg(long, value_name = "FILE")]
    token: Option<PathBuf>,

    /// A systemd-networkd .network/.netdev/.link file (static addresses); repeatable.
    #[arg(long, value_name = "FILE")]
    network: Vec<PathBuf>,

    /// A container image archive (`podman save -o FILE.tar`) the node's Podman loads at
    /// boot, for hosts without a registry; repeatable.
    #[arg(long = "image", value_name = "FILE.tar")]
    images: Vec<PathBuf>,
}

pub fn run(cmd: &ImageCommand, format: Format) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(a) => build(a, format),
        ImageCommand::Configure(a) => configure(a, format),
    }
}

fn options(a: &BuildArgs, out: PathBuf, cache: bool) -> BuildOptions {
    BuildOptions {
        spec: a.spec.clone(),
        out,
        locked: a.locked,
        update_lock: a.update_lock,
        beemesh: a.beemesh.clone(),
        cache_dir: (cache && !a.no_cache).then(|| a.cache_dir.clone()),
        keep_work: a.keep_work,
        quiet: false,
    }
}

fn summary(r: &BuildReport) {
    println!(
        "{}: sha256 {}, {} MiB ({} MiB allocated)",
        r.raw.display(),
        r.raw_sha256,
        r.raw_size >> 20,
        r.raw_allocated >> 20
    );
    println!(
        "{}: sha256 {}, {} MiB",
        r.qcow2.display(),
        r.qcow2_sha256,
        r.qcow2_size >> 20
    );
    println!(
        "{}: {} packages{}{}; built in {:.0} s",
        r.manifest.display(),
        r.packages,
        if r.cache_hit {
            ", package tarball from the cache"
        } else {
            ""
        },
        if r.lock_written {
            ", lock file written"
        } else {
            ""
        },
        r.seconds
    );
}

fn build(a: &BuildArgs, format: Format) -> anyhow::Result<()> {
    if !a.check_reproducible {
        let r = beemesh_image::build(&options(a, a.out.clone(), true))
            .with_context(|| format!("cannot build {}", a.spec.display()))?;
        return match format {
            Format::Text => {
                summary(&r);
                Ok(())
            }
            Format::Json => output::json(&serde_json::to_value(&r)?),
        };
    }
    // Both builds run every step, mmdebstrap included: the cache would hide a tarball that
    // is not reproducible.
    let mut reports = Vec::new();
    for sub in ["a", "b"] {
        eprintln!("reproducibility check: build {sub}");
        let r = beemesh_image::build(&options(a, a.out.join(sub), false))
            .with_context(|| format!("cannot build {} (build {sub})", a.spec.display()))?;
        if sub == "a" && r.lock_written {
            bail!(
                "the first build wrote a new lock file; run the check again (both builds must \
                 install the same locked packages)"
            );
        }
        reports.push(r);
    }
    let (ra, rb) = (&reports[0], &reports[1]);
    let verdict = beemesh_image::build::compare(ra, rb);
    match format {
        Format::Text => {
            println!("build a: {}  {}", ra.raw_sha256, ra.raw.display());
            println!("build b: {}  {}", rb.raw_sha256, rb.raw.display());
        }
        Format::Json => output::json(&json!({
            "reproducible": verdict.is_ok(),
            "a": ra, "b": rb,
            "difference": verdict.as_ref().err(),
        }))?,
    }
    match verdict {
        Ok(()) => {
            if format == Format::Text {
                println!("reproducible: the two .raw images are bit-identical");
            }
            Ok(())
        }
        Err(diff) => bail!("{diff}"),
    }
}

fn configure(a: &ConfigureArgs, format: Format) -> anyhow::Result<()> {
    let opts = ConfigureOptions {
        host: a.host.clone(),
        ticket: a.ticket.clone(),
        ticket_key: a.ticket_key.clone(),
        bootstrap: a.bootstrap.clone(),
        token: a.token.clone(),
        network: a.network.clone(),
        images: a.images.clone(),
    };
    let done = beemesh_image::configure(&a.image, &opts)
        .with_context(|| format!("cannot configure {}", a.image.display()))?;
    for n in &done.notes {
        eprintln!("beemesh: note: {n}");
    }
    match format {
        Format::Text => {
            println!(
                "{}: BEEMESH partition now holds {}",
                a.image.display(),
                done.files.join(", ")
            );
            Ok(())
        }
        Format::Json => output::json(&serde_json::to_value(&done)?),
    }
}
