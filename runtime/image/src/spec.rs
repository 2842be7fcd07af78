//! The image spec (`images/node.toml`): what goes into a BeeMesh host image.
//!
//! Parsing reuses the manifest crate's diagnostics, so every problem names the file, line,
//! column and key. Relative paths in the spec are resolved against the spec's directory.

use std::path::{Path, PathBuf};

use beemesh_manifest::diag::{self, KeyPath, Problems};
use beemesh_manifest::{HostConfig, Invalid, Memory};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Packages every image needs for its own design, whatever the spec adds (see
/// docs/images.md for why each is there).
pub const REQUIRED_PACKAGES: &[&str] = &[
    // boot: kernel, initramfs (with erofs), the boot loader copied onto the ESP
    "linux-image-amd64",
    "initramfs-tools",
    "systemd-boot-efi",
    // PID 1, device manager, logind (lingering user manager) and its bus
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "kmod",
    // DNS for /dns4/ bootstrap addresses (the node's libp2p resolver reads /etc/resolv.conf)
    "systemd-resolved",
    // the data partition (systemd-repart formats it with mkfs.ext4) and the config partition
    // (read with mtools, no mount)
    "e2fsprogs",
    "mtools",
    // the beemesh user and its subordinate id ranges
    "passwd",
    // rootless containers
    "podman",
    "runc",
    "slirp4netns",
    "uidmap",
    "catatonit",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The image's name: the output files are `<name>.raw`, `<name>.qcow2`, ...
    pub name: String,
    /// Fixed time for every timestamp in the image (seconds since 1970). The environment's
    /// `SOURCE_DATE_EPOCH` overrides it.
    pub source_date_epoch: u64,
    pub debian: DebianSection,
    #[serde(default)]
    pub boot: BootSection,
    #[serde(default)]
    pub disk: DiskSection,
    pub host: HostSection,
    #[serde(default)]
    pub debug: DebugSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianSection {
    pub suite: String,
    #[serde(default = "default_mirror")]
    pub mirror: String,
    #[serde(default = "default_arch")]
    pub architecture: String,
    /// Packages beyond [`REQUIRED_PACKAGES`].
    #[serde(default)]
    pub packages: Vec<String>,
    /// The lock file (exact versions and digests), relative to the spec.
    #[serde(default = "default_lock")]
    pub lock: PathBuf,
}

fn default_mirror() -> String {
    "http://deb.debian.org/debian".to_owned()
}
fn default_arch() -> String {
    "amd64".to_owned()
}
fn default_lock() -> PathBuf {
    PathBuf::from("node.lock")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// Kernel command line arguments added to the builder's own (`root=`, `ro`,
    /// `rootfstype=erofs`).
    #[serde(default = "default_cmdline")]
    pub cmdline: Vec<String>,
}

fn default_cmdline() -> Vec<String> {
    ["console=ttyS0", "lsm=landlock,lockdown,yama,bpf"]
        .map(str::to_owned)
        .to_vec()
}

impl Default for BootSection {
    fn default() -> Self {
        Self {
            cmdline: default_cmdline(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// The size of the `.raw` disk. The data partition fills whatever the real disk offers
    /// at first boot.
    #[serde(default = "default_disk_size")]
    pub size: Memory,
    #[serde(default = "default_esp_size")]
    pub esp_size: Memory,
    #[serde(default = "default_config_size")]
    pub config_size: Memory,
}

fn default_disk_size() -> Memory {
    Memory(2 << 30)
}
fn default_esp_size() -> Memory {
    Memory(128 << 20)
}
fn default_config_size() -> Memory {
    Memory(16 << 20)
}

impl Default for DiskSection {
    fn default() -> Self {
        Self {
            size: default_disk_size(),
            esp_size: default_esp_size(),
            config_size: default_config_size(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// The host.toml baked into the image as /etc/beemesh/host.toml (used when the config
    /// partition carries none), relative to the spec.
    pub defaults: PathBuf,
    /// The beemesh binary to include, relative to the spec (`--beemesh` overrides it).
    pub beemesh: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugSection {
    /// A root shell on the serial console without a password, and the journal forwarded to
    /// it. For tests only: the default image has no login at all.
    #[serde(default)]
    pub serial_console: bool,
}

/// A parsed spec plus where it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: ImageSpec,
    pub path: PathBuf,
    pub dir: PathBuf,
    /// SHA-256 of the spec file's bytes: the seed of every UUID in the image.
    pub hash: [u8; 32],
}

impl LoadedSpec {
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.dir.join(p)
        }
    }

    pub fn lock_path(&self) -> PathBuf {
        self.resolve(&self.spec.debian.lock)
    }

    pub fn hash_hex(&self) -> String {
        hex(&self.hash)
    }

    /// The package list given to the resolver: required plus the spec's, sorted, unique.
    pub fn requested_packages(&self) -> Vec<String> {
        let mut v: Vec<String> = REQUIRED_PACKAGES
            .iter()
            .map(|s| (*s).to_owned())
            .chain(self.spec.debian.packages.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A UUID for one purpose (`"disk"`, `"root"`, ...), derived from the spec's hash so two
    /// builds of one spec agree and two specs differ.
    pub fn uuid(&self, purpose: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.hash);
        h.update(purpose.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        // RFC 4122 variant, version 4 layout (random-looking, but derived).
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex(&b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// A 32-bit FAT volume id for one purpose, derived like [`Self::uuid`].
    pub fn volume_id(&self, purpose: &str) -> String {
        self.uuid(purpose)[..8].to_owned()
    }

    /// `SOURCE_DATE_EPOCH` from the environment if set, else the spec's.
    pub fn epoch(&self) -> u64 {
        std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(self.spec.source_date_epoch)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read the image spec {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid image spec")]
    Invalid(#[from] Invalid),
}

impl ImageSpec {
    /// Parses and validates a spec's text. `source` names the file in diagnostics; `dir` is
    /// where relative paths point (the host defaults are loaded and checked from there).
    pub fn from_toml(source: &str, text: &str, dir: &Path) -> Result<Self, Invalid> {
        let s: ImageSpec = diag::from_toml(source, text)?;
        s.validate(dir).locate(source, Some(text))?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<LoadedSpec, SpecError> {
        let bytes = std::fs::read(path).map_err(|cause| SpecError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let dir = path
            .parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_owned()
                }
            })
            .unwrap_or_else(|| PathBuf::from("."));
        let spec = Self::from_toml(&path.display().to_string(), &text, &dir)?;
        Ok(LoadedSpec {
            spec,
            path: path.to_owned(),
            dir,
            hash: Sha256::digest(&bytes).into(),
        })
    }

    pub fn validate(&self, dir: &Path) -> Problems {
        let mut p = Problems::new();
        let root = KeyPath::root();
        if let Err(e) = beemesh_manifest::names::check_dns_label(&self.name) {
            p.push(root.key("name"), e);
        }
        if self.source_date_epoch == 0 {
            p.push(
                root.key("source_date_epoch"),
                "must be a fixed time after 1970 (for example the date of the last change)",
            );
        }

        let deb = root.key("debian");
        if self.debian.suite.is_empty()
            || !self
                .debian
                .suite
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            p.push(
                deb.key("suite"),
                format!("{:?} is not a Debian suite name", self.debian.suite),
            );
        }
        if !(self.debian.mirror.starts_with("http://")
            || self.debian.mirror.starts_with("https://"))
        {
            p.push(
                deb.key("mirror"),
                format!(
                    "{:?} must be an http:// or https:// URL",
                    self.debian.mirror
                ),
            );
        }
        if self.debian.architecture != "amd64" {
            p.push(
                deb.key("architecture"),
                format!(
                    "{:?} is not supported yet: only amd64 images boot (systemd-boot x64, OVMF)",
                    self.debian.architecture
                ),
            );
        }
        for (i, pkg) in self.debian.packages.iter().enumerate() {
            if !valid_package_name(pkg) {
                p.push(
                    deb.key("packages").index(i),
                    format!(
                        "{pkg:?} is not a Debian package name (lowercase letters, digits, + - .; \
                         versions are pinned in the lock file, not here)"
                    ),
                );
            }
            if matches!(pkg.as_str(), "openssh-server" | "dropbear" | "telnetd") {
                p.push(
                    deb.key("packages").index(i),
                    format!(
                        "{pkg:?} would add a remote login; BeeMesh hosts are managed through the \
                         node API only"
                    ),
                );
            }
        }

        let boot = root.key("boot");
        for (i, arg) in self.boot.cmdline.iter().enumerate() {
            let key = arg.split('=').next().unwrap_or_default();
            if matches!(key, "root" | "rootfstype" | "ro" | "rw" | "init") {
                p.push(
                    boot.key("cmdline").index(i),
                    format!(
                        "{arg:?} is set by the builder (the root is the read-only erofs partition)"
                    ),
                );
            } else if arg.is_empty() || arg.chars().any(char::is_whitespace) {
                p.push(
                    boot.key("cmdline").index(i),
                    format!("{arg:?} must be one argument without spaces"),
                );
            }
        }

        let disk = root.key("disk");
        if self.disk.esp_size.bytes() < 64 << 20 {
            p.push(
                disk.key("esp_size"),
                "must be at least 64Mi (kernel, initramfs, boot loader)",
            );
        }
        if self.disk.config_size.bytes() < 2 << 20 {
            p.push(disk.key("config_size"), "must be at least 2Mi");
        }
        let min = self.disk.esp_size.bytes() + self.disk.config_size.bytes() + (512 << 20);
        if self.disk.size.bytes() < min {
            p.push(
                disk.key("size"),
                format!(
                    "{} is too small: the ESP, the config partition and a root of about 512Mi \
                     need at least {}",
                    self.disk.size,
                    Memory(min)
                ),
            );
        }

        let host = root.key("host");
        let defaults = if self.host.defaults.is_absolute() {
            self.host.defaults.clone()
        } else {
            dir.join(&self.host.defaults)
        };
        if let Err(e) = check_host_defaults(&defaults) {
            p.push(host.key("defaults"), e);
        }
        p
    }
}

/// The host defaults are a host.toml without (or with) a `[trust]` section: a fleet's keys are
/// never an image default (images/host-defaults.toml). They must make a valid host config
/// once a `[trust]` section is added.
pub fn check_host_defaults(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    if !doc.contains_key("trust") {
        let placeholder = "domain = \"example.org\"\nsigners = \
                           [\"ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"]\n";
        let trust: toml::Table = toml::from_str(placeholder).map_err(|e| e.to_string())?;
        doc.insert("trust".into(), toml::Value::Table(trust));
    }
    let merged = toml::to_string(&doc).map_err(|e| e.to_string())?;
    HostConfig::from_toml(&path.display().to_string(), &merged)
        .map(|_| ())
        .map_err(|e| {
            e.diagnostics
                .iter()
                .map(|d| format!("{}: {}", d.key, d.reason))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Debian policy 5.6.1: at least two characters, lowercase letters, digits, `+`, `-`, `.`,
/// starting with a letter or digit.
pub fn valid_package_name(s: &str) -> bool {
    s.len() >= 2
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "[trust]\ndomain = \"example.org\"\nsigners = [\"ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"]\n";

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("host.toml"), HOST).expect("write");
        d
    }

    fn minimal() -> String {
        "name = \"node\"\nsource_date_epoch = 1735689600\n[debian]\nsuite = \"bookworm\"\n\
         [host]\ndefaults = \"host.toml\"\nbeemesh = \"beemesh\"\n"
            .to_owned()
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let d = dir();
        let s = ImageSpec::from_toml("s.toml", &minimal(), d.path()).expect("valid");
        assert_eq!(s.debian.mirror, "http://deb.debian.org/debian");
        assert_eq!(s.disk.size, Memory(2 << 30));
        assert!(s.boot.cmdline.iter().any(|a| a.starts_with("lsm=landlock")));
        assert!(!s.debug.serial_console);
    }

    #[test]
    fn unknown_key_is_located() {
        let d = dir();
        let text = format!("{}[disk]\nsise = \"4Gi\"\n", minimal());
        let e = ImageSpec::from_toml("s.toml", &text, d.path()).expect_err("unknown key");
        let diag = &e.diagnostics[0];
        assert_eq!(diag.line, Some(9), "{e}");
        assert!(diag.reason.contains("unknown field `sise`"), "{e}");
    }

    #[test]
    fn bad_values_are_all_reported_with_lines() {
        let d = dir();
        let text = minimal()
            .replace("name = \"node\"", "name = \"Node_1\"")
            .replace(
                "suite = \"bookworm\"",
                "suite = \"bookworm\"\npackages = [\"Vim\", \"openssh-server\"]",
            )
            + "[boot]\ncmdline = [\"root=/dev/sda1\"]\n[disk]\nsize = \"100Mi\"\n";
        let e = ImageSpec::from_toml("s.toml", &text, d.path()).expect_err("invalid");
        let got: Vec<_> = e
            .diagnostics
            .iter()
            .map(|d| (d.key.as_str(), d.line))
            .collect();
        assert_eq!(
            got,
            [
                ("name", Some(1)),
                ("debian.packages[0]", Some(5)),
                ("debian.packages[1]", Some(5)),
                ("boot.cmdline[0]", Some(10)),
                ("disk.size", Some(12)),
            ],
            "{e:?}"
        );
    }

    #[test]
    fn invalid_host_defaults_are_reported_at_the_key() {
        let d = dir();
        std::fs::write(d.path().join("host.toml"), "[trust]\ndomain = \"x\"\n").expect("write");
        let e = ImageSpec::from_toml("s.toml", &minimal(), d.path()).expect_err("bad host");
        assert_eq!(e.diagnostics[0].key, "host.defaults");
        assert!(e.diagnostics[0].reason.contains("signers"), "{e}");
        // Without [trust] (the shared defaults file), the rest must still be valid.
        std::fs::write(
            d.path().join("host.toml"),
            "[sandbox]\nlandlock = \"best-effort\"\n",
        )
        .expect("write");
        ImageSpec::from_toml("s.toml", &minimal(), d.path()).expect("no trust is fine");
        std::fs::write(d.path().join("host.toml"), "[sandbox]\nlandlok = \"off\"\n")
            .expect("write");
        let e = ImageSpec::from_toml("s.toml", &minimal(), d.path()).expect_err("typo");
        assert!(e.diagnostics[0].reason.contains("landlok"), "{e}");
    }

    #[test]
    fn uuids_are_derived_and_distinct() {
        let d = dir();
        let path = d.path().join("s.toml");
        std::fs::write(&path, minimal()).expect("write");
        let a = ImageSpec::load(&path).expect("load");
        let b = ImageSpec::load(&path).expect("load");
        assert_eq!(a.uuid("root"), b.uuid("root"));
        assert_ne!(a.uuid("root"), a.uuid("esp"));
        assert_eq!(a.uuid("root").len(), 36);
        assert_eq!(&a.uuid("root")[14..15], "4");
        std::fs::write(&path, minimal().replace("node", "node2")).expect("write");
        let c = ImageSpec::load(&path).expect("load");
        assert_ne!(a.uuid("root"), c.uuid("root"));
        assert!(a.requested_packages().contains(&"podman".to_owned()));
    }
}
