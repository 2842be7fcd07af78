//! Settings of a node's Raft groups, filled by the node from `host.toml`.
//!
//! Defaults are for a mesh, not a LAN: peers may be a WAN hop or a slow radio link apart, and a
//! 2-core edge host runs containers beside the daemon.
//!
//! - `heartbeat_ms = 500`: two idle messages per second per follower per group; with hundreds of
//!   groups per node that is the dominant idle cost, so not faster. It also bounds how long a
//!   linearizable read waits to confirm leadership (openraft uses the heartbeat interval as that
//!   confirmation's deadline), so it must stay above the mesh's round-trip time.
//! - `election_timeout_min_ms = 2000`, `election_timeout_max_ms = 4000`: four to eight heartbeats,
//!   so three lost heartbeats in a row (a congested link, a CPU stall) do not start an election
//!   (which, without pre-vote in openraft 0.9, would depose a healthy leader); the spread makes
//!   split votes rare. After a leader dies, followers refuse votes until one maximum election
//!   timeout has passed since its last heartbeat (openraft's leader lease), so a new leader
//!   serves after 4 to about 8 s: inside the scheduler's `reschedule_after` (10 s by default).
//!   Meshes on good links can halve all three timings.
//! - `request_timeout_ms = 5000`: how long a client read or write may wait for a leader, a
//!   quorum and the commit. A request that finds no leader in time fails cleanly with
//!   `NoLeader` (retryable); only a write a leader accepted but could not commit ends as
//!   `Timeout` (outcome unknown).
//! - `max_rpc_bytes = 960 KiB`: below the mesh's 1 MiB request-response limit with room for
//!   its framing. AppendEntries batches are cut to fit; snapshots travel in
//!   `snapshot_chunk_bytes` chunks.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::Error;
use super::types::{GroupId, MAX_KEY_BYTES, MAX_VALUE_BYTES};

/// Room for the envelope, the vote, log ids and membership around a payload.
const RPC_OVERHEAD_BYTES: usize = 32 * 1024;

/// Settings of the Raft groups of one node (see the module docs for the defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in [min, max) starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Deadline of one client read or write, and of one membership step.
    pub request_timeout_ms: u64,
    /// Deadline for sending and installing one snapshot chunk.
    pub install_snapshot_timeout_ms: u64,
    /// How long a first voter that is not the group's bootstrapper waits for the bootstrapper
    /// before initialising the group itself (0: twice the maximum election timeout).
    pub bootstrap_grace_ms: u64,
    /// Groups one node may hold.
    pub max_groups: usize,
    /// Largest encoded Raft message, sent or accepted.
    pub max_rpc_bytes: usize,
    /// Snapshot chunk size.
    pub snapshot_chunk_bytes: usize,
    /// Most log entries in one AppendEntries (also cut to `max_rpc_bytes`).
    pub max_entries_per_rpc: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every_entries: u64,
    /// Log entries kept behind a snapshot, so a follower that lags a little catches up from the
    /// log rather than a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Most items in one listing page.
    pub max_list_items: usize,
    /// Forwarded requests (writes, read-index and membership requests) in flight, each way.
    pub max_pending_forwards: usize,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 500,
            election_timeout_min_ms: 2000,
            election_timeout_max_ms: 4000,
            request_timeout_ms: 5000,
            install_snapshot_timeout_ms: 10_000,
            bootstrap_grace_ms: 0,
            max_groups: 1024,
            max_rpc_bytes: 960 * 1024,
            snapshot_chunk_bytes: 256 * 1024,
            max_entries_per_rpc: 64,
            snapshot_every_entries: 1000,
            logs_kept_after_snapshot: 200,
            max_list_items: 1000,
            max_pending_forwards: 256,
        }
    }
}

impl RaftConfig {
    /// Fast timings for in-process tests: 50 ms heartbeats, elections after 300 to 600 ms.
    pub fn for_tests() -> Self {
        Self {
            heartbeat_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            request_timeout_ms: 3000,
            install_snapshot_timeout_ms: 2000,
            ..Self::default()
        }
    }

    /// Checks the settings; the error names the setting and its value.
    pub fn validate(&self) -> Result<(), Error> {
        fn bad(field: &str, value: impl ToString, reason: impl Into<String>) -> Error {
            Error::Config {
                field: field.to_string(),
                value: value.to_string(),
                reason: reason.into(),
            }
        }
        if !(10..=60_000).contains(&self.heartbeat_ms) {
            return Err(bad(
                "heartbeat_ms",
                self.heartbeat_ms,
                "must be 10 to 60000",
            ));
        }
        if self.election_timeout_min_ms < 3 * self.heartbeat_ms {
            return Err(bad(
                "election_timeout_min_ms",
                self.election_timeout_min_ms,
                format!(
                    "must be at least three heartbeats ({} ms)",
                    3 * self.heartbeat_ms
                ),
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms
            || self.election_timeout_max_ms > 600_000
        {
            return Err(bad(
                "election_timeout_max_ms",
                self.election_timeout_max_ms,
                format!(
                    "must be above election_timeout_min_ms ({}) and at most 600000",
                    self.election_timeout_min_ms
                ),
            ));
        }
        if self.request_timeout_ms < self.heartbeat_ms || self.request_timeout_ms > 600_000 {
            return Err(bad(
                "request_timeout_ms",
                self.request_timeout_ms,
                "must be at least one heartbeat and at most 600000",
            ));
        }
        if self.install_snapshot_timeout_ms < self.heartbeat_ms {
            return Err(bad(
                "install_snapshot_timeout_ms",
                self.install_snapshot_timeout_ms,
                "must be at least one heartbeat",
            ));
        }
        if !(1..=65_536).contains(&self.max_groups) {
            return Err(bad("max_groups", self.max_groups, "must be 1 to 65536"));
        }
        let min_rpc = MAX_VALUE_BYTES + MAX_KEY_BYTES + RPC_OVERHEAD_BYTES;
        if !(min_rpc..=64 * 1024 * 1024).contains(&self.max_rpc_bytes) {
            return Err(bad(
                "max_rpc_bytes",
                self.max_rpc_bytes,
                format!("must be {min_rpc} (the largest value plus room) to 67108864 (64 MiB)"),
            ));
        }
        if self.snapshot_chunk_bytes < 4096
            || self.snapshot_chunk_bytes + RPC_OVERHEAD_BYTES > self.max_rpc_bytes
        {
            return Err(bad(
                "snapshot_chunk_bytes",
                self.snapshot_chunk_bytes,
                format!(
                    "must be at least 4096 and leave {RPC_OVERHEAD_BYTES} bytes of max_rpc_bytes ({})",
                    self.max_rpc_bytes
                ),
            ));
        }
        if !(1..=10_000).contains(&self.max_entries_per_rpc) {
            return Err(bad(
                "max_entries_per_rpc",
                self.max_entries_per_rpc,
                "must be 1 to 10000",
            ));
        }
        if self.snapshot_every_entries < 2 {
            return Err(bad(
                "snapshot_every_entries",
                self.snapshot_every_entries,
                "must be at least 2",
            ));
        }
        if !(1..=100_000).contains(&self.max_list_items) {
            return Err(bad(
                "max_list_items",
                self.max_list_items,
                "must be 1 to 100000",
            ));
        }
        if !(1..=100_000).contains(&self.max_pending_forwards) {
            return Err(bad(
                "max_pending_forwards",
                self.max_pending_forwards,
                "must be 1 to 100000",
            ));
        }
        Ok(())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.election_timeout_max_ms)
    }

    pub fn bootstrap_grace(&self) -> Duration {
        if self.bootstrap_grace_ms == 0 {
            2 * self.election_timeout_max()
        } else {
            Duration::from_millis(self.bootstrap_grace_ms)
        }
    }

    /// The openraft configuration of one group.
    pub(crate) fn openraft(&self, group: &GroupId) -> Result<Arc<openraft::Config>, Error> {
        let c = openraft::Config {
            cluster_name: group.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.max_entries_per_rpc,
            // A follower further behind than this gets a snapshot; above the snapshot interval
            // as openraft requires.
            replication_lag_threshold: self.snapshot_every_entries + self.logs_kept_after_snapshot,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            snapshot_max_chunk_size: self.snapshot_chunk_bytes as u64,
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            ..openraft::Config::default()
        };
        c.validate().map(Arc::new).map_err(|e| Error::Config {
            field: "raft".into(),
            value: group.to_string(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_test_settings_validate() {
        RaftConfig::default().validate().unwrap();
        RaftConfig::for_tests().validate().unwrap();
        let g = GroupId::new("default", "db").unwrap();
        RaftConfig::default().openraft(&g).unwrap();
    }

    #[test]
    fn errors_name_the_setting_and_value() {
        let c = RaftConfig {
            election_timeout_min_ms: 100,
            ..RaftConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("election_timeout_min_ms = 100"), "{e}");
        let c = RaftConfig {
            max_rpc_bytes: 1000,
            ..RaftConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_rpc_bytes = 1000"), "{e}");
    }

    #[test]
    fn parses_from_toml_style_serde() {
        let c: RaftConfig =
            serde_json::from_str(r#"{"heartbeat_ms": 250, "election_timeout_min_ms": 1000}"#)
                .unwrap();
        assert_eq!(c.heartbeat_ms, 250);
        assert_eq!(c.election_timeout_max_ms, 4000);
        assert!(serde_json::from_str::<RaftConfig>(r#"{"heartbeet_ms": 1}"#).is_err());
    }
}
