//! Workload manifests (`api = "beemesh/v1"`, `kind = "Workload"`), as DESIGN.md section 2
//! fixes them: types with defaults, unknown keys refused, and a `validate` step that reports
//! every problem with its key path.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::diag::{self, Invalid, KeyPath, Problems};
use crate::names::{check_capability, check_dns_label, check_env_name, check_label};
use crate::quantity::{Cpu, Duration, Memory};

pub const API_VERSION: &str = "beemesh/v1";
pub const KIND_WORKLOAD: &str = "Workload";
/// Upper bound on replicas of one workload; far above any real fleet's need, low enough that
/// a typo cannot make every node tender for millions of replicas.
pub const MAX_REPLICAS: u32 = 10_000;

fn default_namespace() -> String {
    "default".to_owned()
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}
fn yes() -> bool {
    true
}

/// A workload manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub api: String,
    pub kind: String,
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub generation: u64,
    /// RFC 3339; an expired manifest is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// A tombstone: the workload is deleted everywhere.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// Free-form labels; shown and selectable, never security-relevant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub consistency: Consistency,
    #[serde(default)]
    pub rollout: Rollout,
    #[serde(default, rename = "container", skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub spread: Spread,
    /// Node labels required.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Node labels preferred (scored, not required).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prefer: BTreeMap<String, String>,
    /// How long a vanished node's replicas wait before they are placed elsewhere.
    #[serde(default = "default_reschedule_after")]
    pub reschedule_after: Duration,
}

fn one() -> u32 {
    1
}
fn default_reschedule_after() -> Duration {
    Duration::from_secs(10)
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            replicas: 1,
            spread: Spread::default(),
            selector: BTreeMap::new(),
            prefer: BTreeMap::new(),
            reschedule_after: default_reschedule_after(),
        }
    }
}

/// How replicas may share nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// At most one replica per node.
    #[default]
    Node,
    /// Replicas may share a node.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consistency {
    #[serde(default)]
    pub mode: ConsistencyMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyMode {
    /// A CRDT map replicated by gossip: for stateless work.
    #[default]
    Eventual,
    /// A Raft group among the replicas: for stateful work.
    Strong,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Replicas replaced at a time when a new generation arrives.
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// Extra replicas that may be started above `replicas` during a rollout.
    #[serde(default)]
    pub max_surge: u32,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_unavailable: 1,
            max_surge: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's default arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub resources: Resources,
    /// Liveness: a replica failing it `failures` times in a row is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Readiness: a replica is not counted as running (nor sent traffic) until it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Health>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub security: Security,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub name: String,
    /// Port inside the container.
    pub container: u16,
    /// Port on the host to forward (through slirp4netns); the driver chooses one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// CPU and memory reserved for (and limited to) one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpu")]
    pub cpu: Cpu,
    #[serde(default = "default_memory")]
    pub memory: Memory,
}

fn default_cpu() -> Cpu {
    Cpu(100)
}
fn default_memory() -> Memory {
    Memory(64 << 20)
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu: default_cpu(),
            memory: default_memory(),
        }
    }
}

/// A probe: exactly one of `http` (a path, with `port`), `tcp` (a port) or `exec` (a command).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default = "default_interval")]
    pub interval: Duration,
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// Wait this long after start before the first probe.
    #[serde(default)]
    pub initial_delay: Duration,
    /// Consecutive failures that count as unhealthy.
    #[serde(default = "default_failures")]
    pub failures: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_failures() -> u32 {
    3
}

/// A per-replica scratch volume: created with the replica, removed with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub path: String,
    /// Backed by memory (tmpfs) rather than disk.
    #[serde(default, skip_serializing_if = "is_false")]
    pub memory: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Memory>,
}

/// Container confinement. The defaults are the safe ones: read-only root, no capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub read_only_root: bool,
    /// Capabilities to keep (all others are dropped), e.g. `["NET_BIND_SERVICE"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// User id inside the container's user namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<u32>,
    /// Refuse to start when the image would run as uid 0.
    #[serde(default, skip_serializing_if = "is_false")]
    pub run_as_non_root: bool,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            read_only_root: true,
            capabilities: Vec::new(),
            run_as_user: None,
            run_as_group: None,
            run_as_non_root: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Workload identities (`namespace/name`) that may connect; empty means nobody.
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// External destinations allowed (`host:port`, `*.domain:port` or `CIDR:port`).
    #[serde(default)]
    pub egress: Vec<String>,
}

impl Manifest {
    /// Parses and validates a manifest. `source` names the file in diagnostics.
    pub fn from_toml(source: &str, text: &str) -> Result<Self, Invalid> {
        let m: Manifest = diag::from_toml(source, text)?;
        m.validate().locate(source, Some(text))?;
        Ok(m)
    }

    /// Writes the manifest as TOML.
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail; keep the error path anyway.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise manifest: {e}\n"))
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The expiry time, if one is set and valid.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.expires
            .as_deref()
            .and_then(|e| OffsetDateTime::parse(e, &Rfc3339).ok())
    }

    /// Total CPU and memory one replica asks for.
    pub fn replica_resources(&self) -> (Cpu, Memory) {
        self.containers
            .iter()
            .fold((Cpu(0), Memory(0)), |(c, m), k| {
                (
                    Cpu(c.0.saturating_add(k.resources.cpu.0)),
                    Memory(m.0.saturating_add(k.resources.memory.0)),
                )
            })
    }

    /// Checks everything the types cannot: names, ranges, references, exclusive choices.
    pub fn validate(&self) -> Problems {
        let mut p = Problems::new();
        let root = KeyPath::root();
        if self.api != API_VERSION {
            p.push(
                root.key("api"),
                format!(
                    "unsupported api {:?}; this version reads {API_VERSION:?}",
                    self.api
                ),
            );
        }
        if self.kind != KIND_WORKLOAD {
            p.push(
                root.key("kind"),
                format!(
                    "unsupported kind {:?}; expected {KIND_WORKLOAD:?}",
                    self.kind
                ),
            );
        }
        if let Err(e) = check_dns_label(&self.name) {
            p.push(root.key("name"), e);
        }
        if let Err(e) = check_dns_label(&self.namespace) {
            p.push(root.key("namespace"), e);
        }
        if self.generation == 0 {
            p.push(root.key("generation"), "must be at least 1");
        }
        if let Some(e) = &self.expires
            && OffsetDateTime::parse(e, &Rfc3339).is_err()
        {
            p.push(
                root.key("expires"),
                format!("{e:?} is not an RFC 3339 timestamp such as \"2027-06-01T00:00:00Z\""),
            );
        }
        check_labels(&mut p, &root.key("labels"), &self.labels);

        let pl = root.key("placement");
        if self.placement.replicas == 0 {
            p.push(pl.key("replicas"), "must be at least 1");
        } else if self.placement.replicas > MAX_REPLICAS {
            p.push(
                pl.key("replicas"),
                format!(
                    "{} is more than the maximum of {MAX_REPLICAS}",
                    self.placement.replicas
                ),
            );
        }
        check_labels(&mut p, &pl.key("selector"), &self.placement.selector);
        check_labels(&mut p, &pl.key("prefer"), &self.placement.prefer);
        if self.placement.reschedule_after.as_millis() < 1000 {
            p.push(pl.key("reschedule_after"), "must be at least 1s");
        }
        if self.rollout.max_unavailable == 0 && self.rollout.max_surge == 0 {
            p.push(
                root.key("rollout").key("max_unavailable"),
                "max_unavailable and max_surge cannot both be 0 (a rollout could never progress)",
            );
        }

        if self.containers.is_empty() && !self.deleted {
            p.push(
                root.key("container"),
                "a workload needs at least one [[container]] (only a tombstone with deleted = true may have none)",
            );
        }
        let mut names = BTreeSet::new();
        let mut ports = BTreeMap::new();
        for (i, c) in self.containers.iter().enumerate() {
            let at = root.key("container").index(i);
            if let Err(e) = check_dns_label(&c.name) {
                p.push(at.key("name"), e);
            } else if !names.insert(c.name.as_str()) {
                p.push(
                    at.key("name"),
                    format!("container name {:?} is used twice", c.name),
                );
            }
            c.validate(&mut p, &at, &mut ports);
        }

        let po = root.key("policy");
        for (i, a) in self.policy.allow_from.iter().enumerate() {
            if let Err(e) = check_identity(a) {
                p.push(po.key("allow_from").index(i), e);
            }
        }
        for (i, e) in self.policy.egress.iter().enumerate() {
            if let Err(e) = check_egress(e) {
                p.push(po.key("egress").index(i), e);
            }
        }
        p
    }
}

impl Container {
    fn validate(
        &self,
        p: &mut Problems,
        at: &KeyPath,
        ports: &mut BTreeMap<(u16, Protocol), String>,
    ) {
        if self.image.trim().is_empty() {
            p.push(
                at.key("image"),
                "must name an image, e.g. \"localhost/hello:1\"",
            );
        } else if self
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(
                at.key("image"),
                format!("{:?} contains whitespace", self.image),
            );
        }
        for (k, v) in [("command", &self.command), ("args", &self.args)] {
            for (i, s) in v.iter().enumerate() {
                if s.contains('\0') {
                    p.push(at.key(k).index(i), "contains a NUL byte");
                }
            }
        }
        for (k, v) in &self.env {
            if let Err(e) = check_env_name(k) {
                p.push(at.key("env").key(k.clone()), e);
            }
            if v.contains('\0') {
                p.push(at.key("env").key(k.clone()), "value contains a NUL byte");
            }
        }
        if let Some(w) = &self.workdir
            && !w.starts_with('/')
        {
            p.push(at.key("workdir"), format!("{w:?} must be an absolute path"));
        }
        let mut port_names = BTreeSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            let pat = at.key("ports").index(i);
            if let Err(e) = check_dns_label(&port.name) {
                p.push(pat.key("name"), e);
            } else if port.name.len() > 15 {
                p.push(
                    pat.key("name"),
                    format!("{:?} is longer than 15 characters", port.name),
                );
            } else if !port_names.insert(port.name.as_str()) {
                p.push(
                    pat.key("name"),
                    format!("port name {:?} is used twice", port.name),
                );
            }
            if port.container == 0 {
                p.push(pat.key("container"), "must be between 1 and 65535");
            }
            if port.host == Some(0) {
                p.push(pat.key("host"), "must be between 1 and 65535");
            }
            if let Some(other) = ports.insert((port.container, port.protocol), self.name.clone()) {
                p.push(
                    pat.key("container"),
                    format!(
                        "port {} is already declared by container {other:?}; replicas share one network namespace",
                        port.container
                    ),
                );
            }
        }
        if self.resources.cpu.millis() == 0 {
            p.push(at.key("resources").key("cpu"), "must be more than 0");
        }
        if self.resources.memory.bytes() < 4 << 20 {
            p.push(at.key("resources").key("memory"), "must be at least 4Mi");
        }
        for (k, h) in [("health", &self.health), ("ready", &self.ready)] {
            if let Some(h) = h {
                h.validate(p, &at.key(k));
            }
        }
        let mut vol_names = BTreeSet::new();
        let mut vol_paths = BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let vat = at.key("volumes").index(i);
            if let Err(e) = check_dns_label(&v.name) {
                p.push(vat.key("name"), e);
            } else if !vol_names.insert(v.name.as_str()) {
                p.push(
                    vat.key("name"),
                    format!("volume name {:?} is used twice", v.name),
                );
            }
            if !v.path.starts_with('/') {
                p.push(
                    vat.key("path"),
                    format!("{:?} must be an absolute path", v.path),
                );
            } else if v.path == "/" {
                p.push(vat.key("path"), "cannot mount over /");
            } else if !vol_paths.insert(v.path.trim_end_matches('/')) {
                p.push(vat.key("path"), format!("{:?} is mounted twice", v.path));
            }
            if v.size.is_some_and(|s| s.bytes() == 0) {
                p.push(vat.key("size"), "must be more than 0");
            }
        }
        let mut caps = BTreeSet::new();
        for (i, c) in self.security.capabilities.iter().enumerate() {
            if let Err(e) = check_capability(c) {
                p.push(at.key("security").key("capabilities").index(i), e);
            } else if !caps.insert(c) {
                p.push(
                    at.key("security").key("capabilities").index(i),
                    format!("{c:?} is listed twice"),
                );
            }
        }
        if self.security.run_as_non_root && self.security.run_as_user == Some(0) {
            p.push(
                at.key("security").key("run_as_user"),
                "is 0 but run_as_non_root is true",
            );
        }
    }
}

impl Health {
    fn validate(&self, p: &mut Problems, at: &KeyPath) {
        let kinds = [self.http.is_some(), self.tcp.is_some(), self.exec.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if kinds != 1 {
            p.push(
                at.clone(),
                "set exactly one of http (with port), tcp or exec",
            );
        }
        if let Some(path) = &self.http {
            if !path.starts_with('/') {
                p.push(
                    at.key("http"),
                    format!("{path:?} must be a path starting with '/'"),
                );
            }
            match self.port {
                None => p.push(at.key("port"), "an http probe needs a port"),
                Some(0) => p.push(at.key("port"), "must be between 1 and 65535"),
                Some(_) => {}
            }
        } else if self.port.is_some() {
            p.push(
                at.key("port"),
                "port applies only to http probes (use tcp = PORT)",
            );
        }
        if self.tcp == Some(0) {
            p.push(at.key("tcp"), "must be between 1 and 65535");
        }
        if let Some(cmd) = &self.exec
            && cmd.is_empty()
        {
            p.push(at.key("exec"), "must name a command");
        }
        if self.interval.as_millis() < 100 {
            p.push(at.key("interval"), "must be at least 100ms");
        }
        if self.timeout.as_millis() == 0 {
            p.push(at.key("timeout"), "must be more than 0");
        }
        if self.failures == 0 {
            p.push(at.key("failures"), "must be at least 1");
        }
    }
}

fn check_labels(p: &mut Problems, at: &KeyPath, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        if let Err(e) = check_label(k, true) {
            p.push(at.key(k.clone()), e);
        }
        if let Err(e) = check_label(v, false) {
            p.push(at.key(k.clone()), e);
        }
    }
}

/// Checks a workload identity reference `namespace/name`.
pub fn check_identity(s: &str) -> Result<(), String> {
    let Some((ns, name)) = s.split_once('/') else {
        return Err(format!("{s:?} must be a workload as \"namespace/name\""));
    };
    check_dns_label(ns).map_err(|e| format!("namespace in {s:?}: {e}"))?;
    check_dns_label(name).map_err(|e| format!("name in {s:?}: {e}"))?;
    Ok(())
}

/// Checks an egress destination: `host:port`, `*.domain:port` or `CIDR:port`.
pub fn check_egress(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{s:?} must be a destination as \"host:port\", \"*.domain:port\" or \"10.0.0.0/8:443\""
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad()),
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Some((addr, prefix)) = host.split_once('/') {
        let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(n) if n <= max => return Ok(()),
            _ => return Err(bad()),
        }
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    crate::names::check_dns_name(name).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
api = "beemesh/v1"
kind = "Workload"
name = "hello"
generation = 3
labels = { app = "hello" }

[placement]
replicas = 3
selector = { zone = "eu-1" }

[[container]]
name = "web"
image = "localhost/hello:1"
command = ["httpd", "-f", "-p", "8080"]
ports = [{ name = "http", container = 8080 }]
resources = { cpu = "250m", memory = "64Mi" }
health = { http = "/healthz", port = 8080, interval = "5s", failures = 3 }
"#;

    fn problems(text: &str) -> Vec<String> {
        match Manifest::from_toml("m.toml", text) {
            Ok(_) => Vec::new(),
            Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn hello_parses_with_defaults() {
        let m = Manifest::from_toml("m.toml", HELLO).expect("valid");
        assert_eq!(m.namespace, "default");
        assert_eq!(m.placement.spread, Spread::Node);
        assert_eq!(m.consistency.mode, ConsistencyMode::Eventual);
        assert_eq!(m.containers[0].resources.cpu, Cpu(250));
        assert!(m.containers[0].security.read_only_root);
        assert_eq!(m.replica_resources(), (Cpu(250), Memory(64 << 20)));
    }

    #[test]
    fn to_toml_round_trips() {
        let m = Manifest::from_toml("m.toml", HELLO).expect("valid");
        let again = Manifest::from_toml("again", &m.to_toml()).expect("valid again");
        assert_eq!(m, again);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = HELLO.replace("replicas = 3", "replicas = 3\nreplica = 4");
        let errs = problems(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("m.toml:10:"), "{}", errs[0]);
        assert!(errs[0].contains("unknown field `replica`"), "{}", errs[0]);
        assert!(errs[0].contains("placement"), "{}", errs[0]);
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let errs = problems(&HELLO.replace("replicas = 3", "replicas = \"three\""));
        assert!(errs[0].starts_with("m.toml:9:"), "{}", errs[0]);
        assert!(errs[0].contains("placement.replicas"), "{}", errs[0]);
    }

    #[test]
    fn bad_quantity_names_the_container_field() {
        let errs = problems(&HELLO.replace("\"64Mi\"", "\"64MB\""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("container[0].resources.memory"),
            "{}",
            errs[0]
        );
        assert!(
            errs[0].contains("unknown memory unit \"MB\""),
            "{}",
            errs[0]
        );
        assert!(errs[0].starts_with("m.toml:17:"), "{}", errs[0]);
    }

    #[test]
    fn validation_reports_every_problem_located() {
        let text = HELLO
            .replace("replicas = 3", "replicas = 0")
            .replace("name = \"hello\"", "name = \"Hello_World\"")
            .replace("container = 8080", "container = 0");
        let errs = problems(&text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.starts_with("m.toml:4:8: name: ")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("m.toml:9:12: placement.replicas: must be at least 1")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("container[0].ports[0].container: must be between 1 and 65535")),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_expiry_and_health() {
        let text = HELLO
            .replace("generation = 3", "generation = 3\nexpires = \"tomorrow\"")
            .replace(
                "health = { http = \"/healthz\", port = 8080,",
                "health = { http = \"/healthz\", tcp = 8080,",
            );
        let errs = problems(&text);
        assert!(
            errs.iter()
                .any(|e| e.contains("expires: \"tomorrow\" is not an RFC 3339")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("container[0].health: set exactly one")),
            "{errs:?}"
        );
    }

    #[test]
    fn tombstone_needs_no_container() {
        let text = "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = 4\ndeleted = true\n";
        let m = Manifest::from_toml("t.toml", text).expect("tombstone is valid");
        assert!(m.deleted);
        let errs = problems(&text.replace("deleted = true\n", ""));
        assert!(errs[0].contains("at least one [[container]]"), "{errs:?}");
    }

    #[test]
    fn policy_references_are_checked() {
        let text = format!(
            "{HELLO}\n[policy]\nallow_from = [\"frontend\", \"default/frontend\"]\negress = [\"example.org:443\", \"10.0.0.0/8:5432\", \"nope\"]\n"
        );
        let errs = problems(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("policy.allow_from[0]"), "{errs:?}");
        assert!(errs[1].contains("policy.egress[2]"), "{errs:?}");
    }
}
