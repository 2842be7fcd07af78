//! The host config, `/etc/beemesh/host.toml` (DESIGN.md section 2).
//!
//! Unknown keys are errors, every error names the file, line and key, and every section has
//! defaults so that a minimal file (a `[trust]` section) is a working node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::diag::{self, Invalid, KeyPath, Problems};
use crate::keys::PublicKey;
use crate::names::{check_dns_label, check_dns_name, check_label};
use crate::quantity::{Cpu, Duration, Memory};

/// The default location of the host config.
pub const DEFAULT_PATH: &str = "/etc/beemesh/host.toml";
/// The label of the FAT partition that carries a host's own config on a flashed image.
pub const CONFIG_PARTITION_LABEL: &str = "BEEMESH";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub mesh: MeshSection,
    pub trust: TrustSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub resources: ResourcesSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub sandbox: SandboxSection,
    #[serde(default)]
    pub consistency: ConsistencySection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Defaults to the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/beemesh")
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            name: None,
            labels: BTreeMap::new(),
            data_dir: default_data_dir(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Multiaddrs ending in `/p2p/<peer-id>`.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    #[serde(default = "yes")]
    pub mdns: bool,
    /// How often a node announces itself (labels, capacity) to the mesh.
    #[serde(default = "default_announce_interval")]
    pub announce_interval: Duration,
    /// A peer that has not announced for this long is declared gone.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout: Duration,
}

fn default_listen() -> Vec<String> {
    vec![
        "/ip4/0.0.0.0/tcp/4001".to_owned(),
        "/ip4/0.0.0.0/udp/4001/quic-v1".to_owned(),
    ]
}
fn yes() -> bool {
    true
}
fn default_announce_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_peer_timeout() -> Duration {
    Duration::from_secs(8)
}

impl Default for MeshSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            bootstrap: Vec::new(),
            mdns: true,
            announce_interval: default_announce_interval(),
            peer_timeout: default_peer_timeout(),
        }
    }
}

/// Timing of the Raft groups of strong workloads (docs/consistency.md, "Timing"). The
/// defaults suit a mesh of WAN links and small hosts; every node of a group should use the
/// same values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencySection {
    /// Leader heartbeat interval.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time between these starts an election.
    #[serde(default = "default_election_timeout_min")]
    pub election_timeout_min: Duration,
    #[serde(default = "default_election_timeout_max")]
    pub election_timeout_max: Duration,
    /// Deadline of one read or write of a replica, and of one membership step.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Duration,
}

fn default_heartbeat() -> Duration {
    Duration(500)
}
fn default_election_timeout_min() -> Duration {
    Duration::from_secs(2)
}
fn default_election_timeout_max() -> Duration {
    Duration::from_secs(4)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for ConsistencySection {
    fn default() -> Self {
        Self {
            heartbeat: default_heartbeat(),
            election_timeout_min: default_election_timeout_min(),
            election_timeout_max: default_election_timeout_max(),
            request_timeout: default_request_timeout(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// The trust domain in workload identities: `beemesh://<domain>/<namespace>/<name>`.
    pub domain: String,
    /// Operator keys that may sign workloads.
    pub signers: Vec<PublicKey>,
    /// Signatures needed from distinct signers.
    #[serde(default = "one")]
    pub threshold: u32,
    /// The key whose tickets admit nodes to the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<PublicKey>,
    /// This node's admission ticket (default: the one on the config partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<PathBuf>,
    /// The ticket secret key of a fleet ticket (default: the ticket's path with `.key`
    /// appended, where `beemesh ticket issue` writes it). A peer ticket needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_key: Option<PathBuf>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    #[serde(default)]
    pub driver: Driver,
    #[serde(default)]
    pub network: Network,
    /// The Podman API socket (default: the daemon user's rootless socket,
    /// `$XDG_RUNTIME_DIR/podman/podman.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub podman_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    #[default]
    Podman,
    Process,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    Slirp4netns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSection {
    #[serde(default)]
    pub reserve: Reserve,
}

/// Capacity kept back for the host itself and never offered to workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    #[serde(default = "default_reserve_cpu")]
    pub cpu: Cpu,
    #[serde(default = "default_reserve_memory")]
    pub memory: Memory,
}

fn default_reserve_cpu() -> Cpu {
    Cpu(500)
}
fn default_reserve_memory() -> Memory {
    Memory(256 << 20)
}

impl Default for Reserve {
    fn default() -> Self {
        Self {
            cpu: default_reserve_cpu(),
            memory: default_reserve_memory(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Optional TCP listener, protected by the bearer token in `token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token for `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/beemesh/api.sock")
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            listen: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSection {
    #[serde(default)]
    pub landlock: LandlockMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockMode {
    /// Refuse to start where Landlock cannot be enforced.
    #[default]
    Required,
    /// Start and report what could not be enforced.
    BestEffort,
    Off,
}

impl HostConfig {
    /// Parses and validates a host config. `source` names the file in diagnostics.
    pub fn from_toml(source: &str, text: &str) -> Result<Self, Invalid> {
        let c: HostConfig = diag::from_toml(source, text)?;
        c.validate().locate(source, Some(text))?;
        Ok(c)
    }

    /// Reads, parses and validates a host config file (size-bounded).
    pub fn load(path: &std::path::Path) -> Result<Self, LoadError> {
        let text =
            crate::input::read_file(path, crate::input::MAX_HOST_CONFIG_BYTES, "a host config")?;
        Ok(Self::from_toml(&path.display().to_string(), &text)?)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise host config: {e}\n"))
    }

    pub fn validate(&self) -> Problems {
        let mut p = Problems::new();
        let root = KeyPath::root();

        let node = root.key("node");
        if let Some(name) = &self.node.name
            && let Err(e) = check_dns_label(name)
        {
            p.push(node.key("name"), e);
        }
        for (k, v) in &self.node.labels {
            for (s, is_key) in [(k, true), (v, false)] {
                if let Err(e) = check_label(s, is_key) {
                    p.push(node.key("labels").key(k.clone()), e);
                }
            }
        }
        if !self.node.data_dir.is_absolute() {
            p.push(
                node.key("data_dir"),
                format!("{:?} must be an absolute path", self.node.data_dir),
            );
        }

        let mesh = root.key("mesh");
        for (i, l) in self.mesh.listen.iter().enumerate() {
            if let Err(e) = l.parse::<multiaddr::Multiaddr>() {
                p.push(
                    mesh.key("listen").index(i),
                    format!("{l:?} is not a multiaddr: {e}"),
                );
            }
        }
        for (i, b) in self.mesh.bootstrap.iter().enumerate() {
            match b.parse::<multiaddr::Multiaddr>() {
                Err(e) => p.push(
                    mesh.key("bootstrap").index(i),
                    format!("{b:?} is not a multiaddr: {e}"),
                ),
                Ok(a) if !a.iter().any(|pr| matches!(pr, multiaddr::Protocol::P2p(_))) => p.push(
                    mesh.key("bootstrap").index(i),
                    format!("{b:?} must end in /p2p/<peer-id> so the peer can be authenticated"),
                ),
                Ok(_) => {}
            }
        }
        if self.mesh.announce_interval.as_millis() < 100 {
            p.push(mesh.key("announce_interval"), "must be at least 100ms");
        }
        if self.mesh.peer_timeout <= self.mesh.announce_interval {
            p.push(
                mesh.key("peer_timeout"),
                format!(
                    "{} must be longer than announce_interval ({}), or every peer would flap",
                    self.mesh.peer_timeout, self.mesh.announce_interval
                ),
            );
        }

        let c = root.key("consistency");
        let (hb, min, max, req) = (
            self.consistency.heartbeat.as_millis(),
            self.consistency.election_timeout_min.as_millis(),
            self.consistency.election_timeout_max.as_millis(),
            self.consistency.request_timeout.as_millis(),
        );
        if !(10..=60_000).contains(&hb) {
            p.push(c.key("heartbeat"), "must be 10ms to 60s");
        }
        if min < 3 * hb {
            p.push(
                c.key("election_timeout_min"),
                format!(
                    "{} must be at least three heartbeats ({}ms), or a few late heartbeats depose a healthy leader",
                    self.consistency.election_timeout_min,
                    3 * hb
                ),
            );
        }
        if max <= min || max > 600_000 {
            p.push(
                c.key("election_timeout_max"),
                format!(
                    "{} must be longer than election_timeout_min ({}) and at most 10m",
                    self.consistency.election_timeout_max, self.consistency.election_timeout_min
                ),
            );
        }
        if req < hb || req > 600_000 {
            p.push(
                c.key("request_timeout"),
                "must be at least one heartbeat and at most 10m",
            );
        }

        let trust = root.key("trust");
        for (key, path) in [
            ("ticket", &self.trust.ticket),
            ("ticket_key", &self.trust.ticket_key),
        ] {
            if let Some(path) = path
                && (path.as_os_str().is_empty() || path.to_string_lossy().ends_with('/'))
            {
                p.push(trust.key(key), format!("{path:?} is not a file path"));
            }
        }
        if let Some(key) = &self.trust.ticket_key {
            let ticket = self.trust.ticket.as_deref();
            if ticket == Some(key.as_path()) {
                p.push(
                    trust.key("ticket_key"),
                    format!(
                        "{key:?} is also trust.ticket; the ticket secret key is a file of its own"
                    ),
                );
            }
        }
        if let Err(e) = check_dns_name(&self.trust.domain) {
            p.push(trust.key("domain"), e);
        }
        if self.trust.signers.is_empty() {
            p.push(
                trust.key("signers"),
                "at least one operator key is needed, or this node can accept no workload \
                 (`beemesh key gen` makes one)",
            );
        }
        let distinct: BTreeSet<_> = self.trust.signers.iter().collect();
        if distinct.len() != self.trust.signers.len() {
            p.push(trust.key("signers"), "a key is listed twice");
        }
        if self.trust.threshold == 0 {
            p.push(trust.key("threshold"), "must be at least 1");
        } else if self.trust.threshold as usize > distinct.len() && !distinct.is_empty() {
            p.push(
                trust.key("threshold"),
                format!(
                    "{} signatures can never be collected from {} distinct signer{}",
                    self.trust.threshold,
                    distinct.len(),
                    if distinct.len() == 1 { "" } else { "s" }
                ),
            );
        }

        let api = root.key("api");
        if !self.api.socket.is_absolute() {
            p.push(
                api.key("socket"),
                format!("{:?} must be an absolute path", self.api.socket),
            );
        }
        if self.api.listen.is_some() && self.api.token_file.is_none() {
            p.push(
                api.key("token_file"),
                "a TCP listener needs a bearer token file; the unix socket is protected by file permissions, TCP is not",
            );
        }
        p
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the host config")]
    Read(#[from] crate::input::ReadError),
    #[error("invalid host config")]
    Invalid(#[from] Invalid),
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn minimal() -> String {
        format!("[trust]\ndomain = \"example.org\"\nsigners = [\"{KEY}\"]\n")
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = HostConfig::from_toml("h.toml", &minimal()).expect("valid");
        assert_eq!(c.node.data_dir, PathBuf::from("/var/lib/beemesh"));
        assert_eq!(c.mesh.listen.len(), 2);
        assert!(c.mesh.mdns);
        assert_eq!(c.trust.threshold, 1);
        assert_eq!(c.runtime.driver, Driver::Podman);
        assert_eq!(c.sandbox.landlock, LandlockMode::Required);
        assert_eq!(c.resources.reserve.memory, Memory(256 << 20));
        let again = HostConfig::from_toml("again", &c.to_toml()).expect("round trip");
        assert_eq!(c, again);
    }

    #[test]
    fn raft_timings_are_checked_against_each_other() {
        let c = HostConfig::from_toml("h.toml", &minimal()).expect("valid");
        assert_eq!(c.consistency.heartbeat, Duration(500));
        assert_eq!(c.consistency.election_timeout_max, Duration::from_secs(4));
        let text = format!(
            "{}[consistency]\nheartbeat = \"1s\"\nelection_timeout_min = \"2s\"\nelection_timeout_max = \"2s\"\nrequest_timeout = \"100ms\"\n",
            minimal()
        );
        let e = HostConfig::from_toml("h.toml", &text).expect_err("invalid");
        let keys: Vec<_> = e.diagnostics.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "consistency.election_timeout_min",
                "consistency.election_timeout_max",
                "consistency.request_timeout"
            ],
            "{e:?}"
        );
        assert!(
            e.diagnostics[0]
                .reason
                .contains("three heartbeats (3000ms)"),
            "{e}"
        );
        let fast = format!(
            "{}[consistency]\nheartbeat = \"150ms\"\nelection_timeout_min = \"1s\"\nelection_timeout_max = \"2s\"\n",
            minimal()
        );
        HostConfig::from_toml("h.toml", &fast).expect("a faster mesh");
    }

    #[test]
    fn missing_trust_is_reported() {
        let e = HostConfig::from_toml("h.toml", "[node]\nname = \"a\"\n").expect_err("no trust");
        assert!(e.to_string().contains("missing field `trust`"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = format!("{}[sandbox]\nlandlok = \"off\"\n", minimal());
        let e = HostConfig::from_toml("h.toml", &text).expect_err("unknown");
        let d = &e.diagnostics[0];
        assert_eq!(d.line, Some(5), "{e}");
        assert!(d.reason.contains("unknown field `landlok`"), "{e}");
        assert!(
            d.reason.contains("landlock"),
            "suggests the known field: {e}"
        );
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = format!(
            "[node]\nname = \"Edge_01\"\ndata_dir = \"var/lib\"\n[mesh]\nbootstrap = [\"/ip4/10.0.0.1/tcp/4001\"]\n{}threshold = 2\n",
            minimal()
        );
        let e = HostConfig::from_toml("h.toml", &text).expect_err("invalid");
        let keys: Vec<_> = e.diagnostics.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "node.name",
                "node.data_dir",
                "mesh.bootstrap[0]",
                "trust.threshold"
            ],
            "{e:?}"
        );
        assert_eq!(e.diagnostics[2].line, Some(5));
    }

    #[test]
    fn bad_signer_key_is_located() {
        let text = minimal().replace(KEY, "ed25519:nope");
        let e = HostConfig::from_toml("h.toml", &text).expect_err("bad key");
        let d = &e.diagnostics[0];
        assert_eq!(
            (d.line, d.key.as_str()),
            (Some(3), "trust.signers[0]"),
            "{e}"
        );
    }

    #[test]
    fn landlock_modes_parse() {
        for (s, m) in [
            ("required", LandlockMode::Required),
            ("best-effort", LandlockMode::BestEffort),
            ("off", LandlockMode::Off),
        ] {
            let text = format!("{}[sandbox]\nlandlock = \"{s}\"\n", minimal());
            assert_eq!(
                HostConfig::from_toml("h", &text)
                    .expect("valid")
                    .sandbox
                    .landlock,
                m
            );
        }
    }

    #[test]
    fn the_ticket_key_is_checked_beside_the_ticket() {
        let with = |extra: &str| HostConfig::from_toml("h.toml", &format!("{}{extra}", minimal()));
        let c = with("ticket = \"/etc/beemesh/ticket\"\nticket_key = \"/etc/beemesh/t.key\"\n")
            .expect("valid");
        assert_eq!(
            c.trust.ticket_key.as_deref(),
            Some(std::path::Path::new("/etc/beemesh/t.key"))
        );
        assert_eq!(
            HostConfig::from_toml("again", &c.to_toml()).expect("round trip"),
            c
        );
        assert_eq!(with("").expect("valid").trust.ticket_key, None);
        for (extra, line, reason) in [
            (
                "ticket = \"t\"\nticket_key = \"t\"\n",
                5,
                "\"t\" is also trust.ticket",
            ),
            ("ticket_key = \"\"\n", 4, "\"\" is not a file path"),
            ("ticket_key = \"/etc/beemesh/\"\n", 4, "is not a file path"),
            (
                "ticket_keys = \"t.key\"\n",
                4,
                "unknown field `ticket_keys`",
            ),
        ] {
            let e = with(extra).expect_err(extra);
            let d = &e.diagnostics[0];
            assert_eq!(d.line, Some(line), "{e}");
            assert!(d.reason.contains(reason), "{e}");
            assert!(d.key.starts_with("trust.ticket"), "{e}");
        }
    }
}
