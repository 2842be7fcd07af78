//! `beemesh image configure`: writes one host's files into an image's `BEEMESH` config
//! partition with mtools, without mounting anything, so one generic image serves a fleet.
//!
//! The partition afterwards holds exactly:
//!
//! | file | from | read at boot by |
//! |---|---|---|
//! | `host.toml` | `--host` (plus `--bootstrap` peers merged into `[mesh] bootstrap`) | `beemesh node` (/run/beemesh-config/host.toml) |
//! | `ticket` | `--ticket` | the node: the default ticket path is `ticket` beside host.toml |
//! | `ticket.key` | `--ticket-key`, else the ticket's path plus `.key` (fleet tickets only) | the node: the default ticket key path is the ticket's plus `.key` |
//! | `token` | `--token` | the node, when `[api] token_file` names /run/beemesh-config/token |
//! | `network/*.network` | `--network` | systemd-networkd (copied to /run/systemd/network) |
//! | `images/*.tar` | `--image` | beemesh-images.service: `podman load` as the beemesh user (air-gapped hosts) |
//! | `README.txt` | this builder | people who open the partition |

use std::path::{Path, PathBuf};
use std::process::Command;

use beemesh_manifest::HostConfig;

use crate::gpt;
use crate::tools::{self, CONFIGURE_TOOLS, ToolError};

/// The GPT partition name (and FAT label) of the config partition.
pub const CONFIG_LABEL: &str = beemesh_manifest::host::CONFIG_PARTITION_LABEL;
/// Where the image's boot unit copies the partition's files: owned by root, readable by the
/// node's group, not writable by the node (runtime/cli/src/daemon.rs reads it from there).
pub const CONFIG_COPY_DIR: &str = "/run/beemesh-config";

pub const README: &str = "This is a BeeMesh host's config partition (label BEEMESH).\r\n\
At boot its files are copied to /run/beemesh-config/ before the node starts:\r\n\
  host.toml           the host config (beemesh config check host.toml)\r\n\
  ticket              the admission ticket (beemesh ticket issue)\r\n\
  ticket.key          a fleet ticket's secret key (keep it secret; peer tickets have none)\r\n\
  token               the bearer token of the node's TCP API, if [api] listen is set\r\n\
  network/*.network   systemd-networkd files (static addresses)\r\n\
  images/*.tar        container images loaded into the node's Podman at boot\r\n\
Write them with: beemesh image configure IMAGE.raw --host host.toml --ticket ticket\r\n\
(a fleet ticket's key, ticket.key beside it, is copied with it)\r\n";

#[derive(Debug, Clone, Default)]
pub struct ConfigureOptions {
    pub host: PathBuf,
    pub ticket: Option<PathBuf>,
    /// A fleet ticket's secret key (default: the ticket's path with `.key` appended, where
    /// `beemesh ticket issue` writes it). A peer ticket has none.
    pub ticket_key: Option<PathBuf>,
    /// A file of bootstrap multiaddrs (one per line, `#` comments) merged into the host
    /// config's `[mesh] bootstrap`.
    pub bootstrap: Option<PathBuf>,
    pub token: Option<PathBuf>,
    pub network: Vec<PathBuf>,
    /// Container image archives (`podman save` output) loaded at boot.
    pub images: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{0}")]
    Image(String),
    #[error("invalid host config")]
    Host(#[from] beemesh_manifest::host::LoadError),
    #[error("invalid host config after merging the bootstrap peers")]
    Merged(#[from] beemesh_manifest::Invalid),
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{}: {reason}", path.display())]
    Ticket { path: PathBuf, reason: String },
}

/// What `configure` wrote, and remarks for the operator.
#[derive(Debug, Default, serde::Serialize)]
pub struct Configured {
    pub image: PathBuf,
    pub partition_offset: u64,
    pub files: Vec<String>,
    pub notes: Vec<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigureError> {
    std::fs::read(path).map_err(|cause| ConfigureError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Merges bootstrap multiaddrs into a host config's text; returns the new text.
pub fn merge_bootstrap(host_text: &str, peers: &str) -> Result<String, String> {
    let mut doc: toml::Table = toml::from_str(host_text).map_err(|e| e.to_string())?;
    let mesh = doc
        .entry("mesh")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(mesh) = mesh.as_table_mut() else {
        return Err("[mesh] is not a table".into());
    };
    let list = mesh
        .entry("bootstrap")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let Some(list) = list.as_array_mut() else {
        return Err("mesh.bootstrap is not an array".into());
    };
    for line in peers.lines() {
        let addr = line.split('#').next().unwrap_or_default().trim();
        if !addr.is_empty() && !list.iter().any(|v| v.as_str() == Some(addr)) {
            list.push(toml::Value::String(addr.to_owned()));
        }
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

/// The mtools image argument for a partition inside a disk image.
fn mtools_image(image: &Path, offset: u64) -> String {
    format!("{}@@{offset}", image.display())
}

fn mtools(program: &str) -> Command {
    let mut c = Command::new(program);
    // Images made by mkfs.fat on a file have no real geometry; do not let mtools refuse.
    c.env("MTOOLS_SKIP_CHECK", "1");
    c
}

/// Writes `files` (name on the partition, bytes) into the FAT file system at `offset` of
/// `image`, replacing whatever the partition held.
pub fn write_fat(
    image: &Path,
    offset: u64,
    files: &[(String, Vec<u8>)],
) -> Result<(), ConfigureError> {
    let img = mtools_image(image, offset);
    // Empty the partition: a stale ticket or token from an earlier configure must not stay.
    let listing = tools::run(mtools("mdir").args(["-b", "-i", &img, "::/"])).unwrap_or_default();
    for entry in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let entry = entry.trim_end_matches('/');
        if entry.ends_with("/.") || entry.ends_with("/..") {
            continue;
        }
        tools::run(mtools("mdeltree").args(["-i", &img, entry]))
            .or_else(|_| tools::run(mtools("mdel").args(["-i", &img, entry])))?;
    }
    let staging = tempdir()?;
    let mut dirs_made = Vec::new();
    for (name, bytes) in files {
        let local = staging.path().join(name.replace('/', "_"));
        std::fs::write(&local, bytes).map_err(|cause| ConfigureError::Read {
            path: local.clone(),
            cause,
        })?;
        if let Some((dir, _)) = name.rsplit_once('/')
            && !dirs_made.iter().any(|d| d == dir)
        {
            tools::run(mtools("mmd").args(["-i", &img, &format!("::/{dir}")]))?;
            dirs_made.push(dir.to_owned());
        }
        tools::run(mtools("mcopy").args([
            "-o",
            "-i",
            &img,
            &local.display().to_string(),
            &format!("::/{name}"),
        ]))?;
    }
    Ok(())
}

/// A fresh staging directory of its own (removed when dropped, also on error).
fn tempdir() -> Result<tempfile::TempDir, ConfigureError> {
    tempfile::Builder::new()
        .prefix("beemesh-configure-")
        .tempdir()
        .map_err(|cause| ConfigureError::Read {
            path: std::env::temp_dir(),
            cause,
        })
}

/// The partition's files for the ticket at `ticket`: the ticket, and for a fleet ticket its
/// secret key (from `key`, else beside the ticket), checked to be the ticket's own. A fleet
/// ticket of format 1, which has no key, is refused: it would admit whoever saw it.
fn ticket_files(
    ticket: &Path,
    key: Option<&Path>,
) -> Result<Vec<(String, Vec<u8>)>, ConfigureError> {
    use beemesh_manifest::ticket::{Binding, Ticket, default_key_path};
    let bad = |reason: String| ConfigureError::Ticket {
        path: ticket.to_owned(),
        reason,
    };
    let text = beemesh_manifest::input::read_file(
        ticket,
        beemesh_manifest::ticket::MAX_TICKET_BYTES,
        "an admission ticket",
    )
    .map_err(|e| bad(e.to_string()))?;
    let parsed = Ticket::parse(&ticket.display().to_string(), &text)
        .map_err(|e| bad(format!("not an admission ticket: {e}")))?;
    let mut files = vec![("ticket".to_owned(), text.into_bytes())];
    // A format 1 fleet ticket binds nothing: the error names the remedy.
    match parsed.binding().map_err(|e| bad(e.to_string()))? {
        Binding::Holder(holder) => {
            let key_path = key.map_or_else(|| default_key_path(ticket), Path::to_path_buf);
            let secret = beemesh_manifest::SecretKey::load(&key_path).map_err(|e| {
                bad(format!(
                    "a fleet ticket goes with its ticket key, and {} is not usable: {e} \
                     (pass it with --ticket-key)",
                    key_path.display()
                ))
            })?;
            if secret.public() != holder {
                return Err(bad(format!(
                    "{} holds the ticket key {}, but the ticket is bound to {holder}",
                    key_path.display(),
                    secret.public()
                )));
            }
            files.push(("ticket.key".to_owned(), read(&key_path)?));
        }
        Binding::Peer(_) => {
            if let Some(k) = key {
                return Err(ConfigureError::Usage(format!(
                    "{} is a peer ticket, which needs no ticket key; drop --ticket-key {}",
                    ticket.display(),
                    k.display()
                )));
            }
        }
    }
    Ok(files)
}

/// Configures one host in `image` (a raw GPT disk image built by `beemesh image build`).
pub fn configure(image: &Path, opts: &ConfigureOptions) -> Result<Configured, ConfigureError> {
    tools::check_tools(CONFIGURE_TOOLS)?;
    let part = gpt::find(image, CONFIG_LABEL).map_err(ConfigureError::Image)?;

    // The host config must be valid before it goes anywhere near a host.
    HostConfig::load(&opts.host)?;
    let mut host_text = String::from_utf8_lossy(&read(&opts.host)?).into_owned();
    if let Some(b) = &opts.bootstrap {
        let peers = String::from_utf8_lossy(&read(b)?).into_owned();
        host_text = merge_bootstrap(&host_text, &peers).map_err(|e| {
            ConfigureError::Usage(format!(
                "{}: cannot merge bootstrap peers: {e}",
                opts.host.display()
            ))
        })?;
    }
    let source = format!("{} (as written to {CONFIG_LABEL})", opts.host.display());
    let config = HostConfig::from_toml(&source, &host_text)?;

    let mut out = Configured {
        image: image.to_owned(),
        partition_offset: part.offset,
        ..Default::default()
    };
    let mut files = vec![("host.toml".to_owned(), host_text.into_bytes())];
    if let Some(t) = &opts.ticket {
        files.extend(ticket_files(t, opts.ticket_key.as_deref())?);
        let key_on_partition = Path::new(CONFIG_COPY_DIR).join("ticket.key");
        if files.iter().any(|(n, _)| n == "ticket.key")
            && let Some(k) = &config.trust.ticket_key
            && *k != key_on_partition
        {
            out.notes.push(format!(
                "the ticket key is written as {} but [trust] ticket_key is {}",
                key_on_partition.display(),
                k.display()
            ));
        }
    } else if let Some(k) = &opts.ticket_key {
        return Err(ConfigureError::Usage(format!(
            "--ticket-key {} without --ticket: the key belongs to a ticket",
            k.display()
        )));
    } else if config.trust.admission.is_some() && config.trust.ticket.is_none() {
        out.notes.push(
            "no --ticket: the node looks for its admission ticket beside host.toml on this \
             partition and will not start without one"
                .into(),
        );
    }
    let token_on_partition = Path::new(CONFIG_COPY_DIR).join("token");
    if let Some(t) = &opts.token {
        files.push(("token".to_owned(), read(t)?));
        if config.api.token_file.as_deref() != Some(token_on_partition.as_path()) {
            out.notes.push(format!(
                "--token is written as {} but [api] token_file is {:?}",
                token_on_partition.display(),
                config.api.token_file
            ));
        }
    } else if config.api.token_file.as_deref() == Some(token_on_partition.as_path()) {
        return Err(ConfigureError::Usage(format!(
            "[api] token_file is {} (this partition) but no --token was given",
            token_on_partition.display()
        )));
    }
    for n in &opts.network {
        let name = n
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".network") && !name.ends_with(".netdev") && !name.ends_with(".link") {
            return Err(ConfigureError::Usage(format!(
                "{}: a --network file must be a systemd-networkd .network, .netdev or .link file",
                n.display()
            )));
        }
        files.push((format!("network/{name}"), read(n)?));
    }
    for i in &opts.images {
        let name = i
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".tar") {
            return Err(ConfigureError::Usage(format!(
                "{}: an --image must be a .tar archive from `podman save`",
                i.display()
            )));
        }
        files.push((format!("images/{name}"), read(i)?));
    }
    files.push(("README.txt".to_owned(), README.as_bytes().to_vec()));
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    if total as u64 > part.size / 2 {
        return Err(ConfigureError::Usage(format!(
            "{total} bytes of files do not fit the {} byte config partition",
            part.size
        )));
    }
    write_fat(image, part.offset, &files)?;
    out.files = files.into_iter().map(|(n, _)| n).collect();
    Ok(out)
}

/// Reads one file back from an image's config partition (tests, `--check`).
pub fn read_file(image: &Path, name: &str) -> Result<Vec<u8>, ConfigureError> {
    let part = gpt::find(image, CONFIG_LABEL).map_err(ConfigureError::Image)?;
    let img = mtools_image(image, part.offset);
    let out = mtools("mtype")
        .args(["-i", &img, &format!("::/{name}")])
        .output()
        .map_err(|cause| {
            ConfigureError::Tool(ToolError::Spawn {
                program: "mtype".into(),
                cause,
            })
        })?;
    if !out.status.success() {
        return Err(ConfigureError::Image(format!(
            "{name} is not on the config partition: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_peers_are_merged_once() {
        let host = "[trust]\ndomain = \"example.org\"\nsigners = []\n[mesh]\nbootstrap = [\"/ip4/1.2.3.4/tcp/4001/p2p/A\"]\n";
        let peers =
            "# fleet seeds\n/ip4/1.2.3.4/tcp/4001/p2p/A\n/ip4/5.6.7.8/tcp/4001/p2p/B  # second\n\n";
        let merged = merge_bootstrap(host, peers).expect("merges");
        let doc: toml::Table = toml::from_str(&merged).expect("toml");
        let list = doc["mesh"]["bootstrap"].as_array().expect("array");
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].as_str(), Some("/ip4/5.6.7.8/tcp/4001/p2p/B"));
        let fresh = merge_bootstrap("[trust]\ndomain = \"x.org\"\n", "/ip4/1.1.1.1/tcp/1/p2p/C")
            .expect("merges");
        assert!(
            fresh.contains("bootstrap = [\"/ip4/1.1.1.1/tcp/1/p2p/C\"]"),
            "{fresh}"
        );
    }
}
