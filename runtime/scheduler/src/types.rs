//! The plain data the scheduler works on: node and workload identities, resources, the
//! placement-relevant part of a manifest, and replica identities.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use beemesh_manifest::workload::{MAX_REPLICAS, Manifest, Spread};
use beemesh_manifest::{ContentId, Cpu, Memory};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds on the caller's monotonic clock. The scheduler never reads a clock: every
/// input comes with `now`, and every deadline it reports is on the same scale.
pub type Millis = u64;

/// Position of a replica within its workload: `0..replicas`.
pub type ReplicaIndex = u32;

/// What the scheduler needs of a node identity: a total order (for deterministic iteration),
/// hashing, and stable bytes. Ring positions and tie-breaks are hashes of [`NodeKey::key_bytes`],
/// so they agree across processes, platforms and versions; never derive them from `Hash`.
pub trait NodeKey: Clone + Ord + Hash + fmt::Debug {
    fn key_bytes(&self) -> Cow<'_, [u8]>;
}

/// A node identity as the node uses it: the base58 libp2p peer id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl NodeKey for NodeId {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.as_bytes())
    }
}

impl NodeKey for String {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }
}

/// Compact ids for simulators and tests.
impl NodeKey for u32 {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.to_le_bytes().to_vec())
    }
}

impl NodeKey for u64 {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.to_le_bytes().to_vec())
    }
}

/// `namespace/name`. Shared strings: ids are cloned into every message and table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadId {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl WorkloadId {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self {
            namespace: Arc::from(namespace.as_ref()),
            name: Arc::from(name.as_ref()),
        }
    }

    /// The bytes hashed for the workload's ring position.
    pub(crate) fn key_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.namespace.len() + self.name.len() + 1);
        b.extend_from_slice(self.namespace.as_bytes());
        b.push(b'/');
        b.extend_from_slice(self.name.as_bytes());
        b
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A content id (SHA-256 of the manifest bytes); written `sha256:HEX` on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl From<ContentId> for Digest {
    fn from(c: ContentId) -> Self {
        Self(c.0)
    }
}

impl From<Digest> for ContentId {
    fn from(d: Digest) -> Self {
        ContentId(d.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ContentId(self.0).fmt(f)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = ContentId(self.0).to_hex();
        write!(f, "sha256:{}…", &hex[..12])
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        ContentId::parse(&s)
            .map(Digest::from)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a sha256 content id")))
    }
}

/// CPU in millicores and memory in bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Resources {
    #[serde(default)]
    pub cpu: u64,
    #[serde(default)]
    pub memory: u64,
}

impl Resources {
    pub const ZERO: Resources = Resources { cpu: 0, memory: 0 };

    pub fn new(cpu: Cpu, memory: Memory) -> Self {
        Self {
            cpu: cpu.0,
            memory: memory.0,
        }
    }

    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu <= free.cpu && self.memory <= free.memory
    }

    pub fn saturating_sub(&self, o: &Resources) -> Resources {
        Resources {
            cpu: self.cpu.saturating_sub(o.cpu),
            memory: self.memory.saturating_sub(o.memory),
        }
    }

    pub fn saturating_add(&self, o: &Resources) -> Resources {
        Resources {
            cpu: self.cpu.saturating_add(o.cpu),
            memory: self.memory.saturating_add(o.memory),
        }
    }

    pub fn times(&self, n: u32) -> Resources {
        Resources {
            cpu: self.cpu.saturating_mul(u64::from(n)),
            memory: self.memory.saturating_mul(u64::from(n)),
        }
    }

    /// How many copies of `self` fit in `free` (capped at `cap`; a zero request fits `cap`).
    pub fn copies_in(&self, free: &Resources, cap: u32) -> u32 {
        let per = |need: u64, have: u64| have.checked_div(need).unwrap_or(u64::from(cap));
        let n = per(self.cpu, free.cpu).min(per(self.memory, free.memory));
        u32::try_from(n.min(u64::from(cap))).unwrap_or(cap)
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} CPU and {} memory",
            Cpu(self.cpu),
            Memory(self.memory)
        )
    }
}

/// What a node tells the mesh about itself (from its announcement).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Host capacity minus `[resources] reserve`.
    #[serde(default)]
    pub allocatable: Resources,
}

/// The placement-relevant part of one generation of a workload manifest. Travels in tenders,
/// awards and reports, so that every node taking part knows exactly what is placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub id: WorkloadId,
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub content: Digest,
    /// A tombstone: the workload is deleted everywhere.
    #[serde(default)]
    pub deleted: bool,
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub spread: Spread,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub prefer: BTreeMap<String, String>,
    /// CPU and memory of one replica (the sum over its containers).
    #[serde(default)]
    pub resources: Resources,
    /// How long a vanished node's replicas wait before they are placed elsewhere.
    #[serde(default = "default_reschedule_after")]
    pub reschedule_after: Millis,
    /// Replicas replaced at a time when a new generation arrives (at least 1 is used).
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// `[consistency] mode = "strong"`: the replicas' hosts form a Raft group, whose first
    /// voters the coordinator names in the workload's first awards.
    #[serde(default)]
    pub strong: bool,
}

fn one() -> u32 {
    1
}
fn default_reschedule_after() -> Millis {
    10_000
}

/// Why a manifest cannot become a [`WorkloadSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{workload}: placement.replicas must be 1 to {MAX_REPLICAS}, not {replicas}")]
    Replicas { workload: String, replicas: u32 },
}

impl WorkloadSpec {
    /// The placement part of a (verified) manifest with its content id.
    pub fn from_manifest(m: &Manifest, content: ContentId) -> Result<Self, SpecError> {
        let p = &m.placement;
        if !m.deleted && (p.replicas == 0 || p.replicas > MAX_REPLICAS) {
            return Err(SpecError::Replicas {
                workload: m.id(),
                replicas: p.replicas,
            });
        }
        let (cpu, memory) = m.replica_resources();
        Ok(Self {
            id: WorkloadId::new(&m.namespace, &m.name),
            generation: m.generation,
            content: content.into(),
            deleted: m.deleted,
            replicas: p.replicas.min(MAX_REPLICAS),
            spread: p.spread,
            selector: p.selector.clone(),
            prefer: p.prefer.clone(),
            resources: Resources::new(cpu, memory),
            reschedule_after: p.reschedule_after.as_millis(),
            max_unavailable: m.rollout.max_unavailable,
            strong: m.consistency.mode == beemesh_manifest::workload::ConsistencyMode::Strong,
        })
    }

    /// Replicas the mesh should run (none for a tombstone).
    pub fn wanted(&self) -> u32 {
        if self.deleted {
            0
        } else {
            self.replicas.min(MAX_REPLICAS)
        }
    }

    /// Whether a node with these labels may run the workload.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// How many `prefer` labels a node with these labels carries.
    pub fn preferred(&self, labels: &BTreeMap<String, String>) -> u32 {
        let n = self
            .prefer
            .iter()
            .filter(|(k, v)| labels.get(*k).is_some_and(|l| l == *v))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub(crate) fn transition_budget(&self) -> u32 {
        self.max_unavailable.max(1)
    }

    pub(crate) fn replica(&self, index: ReplicaIndex) -> Replica {
        Replica {
            id: ReplicaId {
                workload: self.id.clone(),
                index,
                generation: self.generation,
            },
            content: self.content,
            resources: self.resources,
        }
    }
}

/// Identifies a replica on a node: the driver names its container after it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId {
    pub workload: WorkloadId,
    pub index: ReplicaIndex,
    pub generation: u64,
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}@{}", self.workload, self.index, self.generation)
    }
}

/// What the driver needs to start a replica: the manifest is found by its content id in the
/// node's desired-state store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: ReplicaId,
    pub content: Digest,
    pub resources: Resources,
}

/// A replica's state as `beemesh get workloads` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Awarded, not yet acknowledged by the node.
    Pending,
    /// Accepted; the driver is starting it.
    Starting,
    Running,
    Failed,
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Starting => "starting",
            ReplicaState::Running => "running",
            ReplicaState::Failed => "failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_as_text() {
        let d = Digest([0xab; 32]);
        let s = serde_json::to_string(&d).expect("serialise");
        assert!(s.starts_with("\"sha256:abab"));
        let back: Digest = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Digest>("\"nope\"").is_err());
    }

    #[test]
    fn copies_in_counts_and_caps() {
        let r = Resources {
            cpu: 250,
            memory: 100,
        };
        let free = Resources {
            cpu: 1000,
            memory: 250,
        };
        assert_eq!(r.copies_in(&free, 10), 2);
        assert_eq!(r.copies_in(&free, 1), 1);
        assert_eq!(Resources::ZERO.copies_in(&free, 7), 7);
    }

    #[test]
    fn spec_from_manifest_carries_count_and_resources() {
        let text = r#"
api = "beemesh/v1"
kind = "Workload"
name = "web"
generation = 4
[placement]
replicas = 3
selector = { zone = "eu-1" }
prefer = { power = "solar" }
reschedule_after = "7s"
[[container]]
name = "a"
image = "x"
resources = { cpu = "250m", memory = "64Mi" }
[[container]]
name = "b"
image = "y"
resources = { cpu = "100m", memory = "32Mi" }
"#;
        let m = Manifest::from_toml("web.toml", text).expect("manifest");
        let s = WorkloadSpec::from_manifest(&m, ContentId::of(text.as_bytes())).expect("spec");
        assert_eq!(s.id, WorkloadId::new("default", "web"));
        assert_eq!(s.replicas, 3);
        assert_eq!(s.resources.cpu, 350);
        assert_eq!(s.resources.memory, 96 << 20);
        assert_eq!(s.reschedule_after, 7_000);
        assert_eq!(s.generation, 4);
        let json = serde_json::to_string(&s).expect("serialise");
        let back: WorkloadSpec = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, s);
    }
}
