//! Hybrid logical clock (Kulkarni et al., 2014) for the `eventual` mode, as a pure value: the
//! caller passes the physical time (Unix milliseconds) with every call, so tests and the
//! simulator drive it, and nothing here reads a clock.
//!
//! A [`Timestamp`] orders by (physical milliseconds, logical counter, node), so two writes
//! never tie on arrival order: the node part (64 bits of SHA-256 of the peer id) breaks ties
//! between nodes, and the LWW map breaks the remaining (astronomically unlikely, or forged) ties
//! on the value itself.
//!
//! Guarantees:
//! - [`Hlc::issue`] is strictly greater than every timestamp this clock issued or accepted
//!   before, including before a restart: the owner persists [`Hlc::high_water`] with every
//!   write (the store does it in the same transaction) and reopens with [`Hlc::restore`].
//! - [`Hlc::observe`] refuses a remote timestamp more than `max_drift_ms` ahead of local physical
//!   time, and counts it. The default, 500 ms, is CockroachDB's default maximum clock offset:
//!   NTP keeps hosts within a few milliseconds on a LAN and tens over the internet, so 500 ms
//!   leaves room for a poorly synchronised host, while a host with a wrong clock can push its
//!   peers' clocks (and make its writes win over later ones) by at most that much. A refused
//!   entry is not lost: anti-entropy offers it again, and it is accepted once local time has
//!   caught up.
//!
//! `uhlc` 0.9 was not used: its clock is a global `fn() -> NTP64` read inside the library (no
//! injectable `now`), and it cannot be seeded with a persisted high-water mark.

use std::fmt;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Default bound on how far ahead of local time a peer's timestamp may be.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 500;

/// Encoded size of a [`Timestamp`] ([`Timestamp::to_bytes`]).
pub const TIMESTAMP_LEN: usize = 20;

/// A hybrid logical clock timestamp. The derived order is the total order of the map: physical
/// milliseconds, then the logical counter, then the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Unix milliseconds (the largest physical time seen, not necessarily the local clock).
    pub physical: u64,
    /// Counter for events within one physical millisecond.
    pub logical: u32,
    /// The issuing node ([`node_tag`] of its peer id).
    pub node: u64,
}

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp {
        physical: 0,
        logical: 0,
        node: 0,
    };

    /// Big-endian, so byte order equals timestamp order.
    pub fn to_bytes(&self) -> [u8; TIMESTAMP_LEN] {
        let mut out = [0u8; TIMESTAMP_LEN];
        out[..8].copy_from_slice(&self.physical.to_be_bytes());
        out[8..12].copy_from_slice(&self.logical.to_be_bytes());
        out[12..].copy_from_slice(&self.node.to_be_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8; TIMESTAMP_LEN]) -> Self {
        let mut p = [0u8; 8];
        let mut l = [0u8; 4];
        let mut n = [0u8; 8];
        p.copy_from_slice(&bytes[..8]);
        l.copy_from_slice(&bytes[8..12]);
        n.copy_from_slice(&bytes[12..]);
        Timestamp {
            physical: u64::from_be_bytes(p),
            logical: u32::from_be_bytes(l),
            node: u64::from_be_bytes(n),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{:016x}", self.physical, self.logical, self.node)
    }
}

/// The 64-bit node part of timestamps issued by the node with this peer id.
pub fn node_tag(peer_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"beemesh-hlc-node/1\0")
        .chain_update(peer_id.as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HlcError {
    #[error(
        "timestamp {remote} is {ahead_ms} ms ahead of local physical time {local_ms} (drift bound {max_drift_ms} ms)"
    )]
    TooFarAhead {
        remote: Timestamp,
        local_ms: u64,
        ahead_ms: u64,
        max_drift_ms: u64,
    },
}

/// A hybrid logical clock for one node.
#[derive(Debug, Clone)]
pub struct Hlc {
    node: u64,
    last: Timestamp,
    max_drift_ms: u64,
    refused: u64,
}

impl Hlc {
    /// A fresh clock (nothing issued or accepted yet).
    pub fn new(node: u64, max_drift_ms: u64) -> Self {
        Self::restore(node, Timestamp::ZERO, max_drift_ms)
    }

    /// A clock that will never issue a timestamp at or below `high_water` (what
    /// [`Hlc::high_water`] returned before the restart, or the largest persisted timestamp).
    pub fn restore(node: u64, high_water: Timestamp, max_drift_ms: u64) -> Self {
        Hlc {
            node,
            last: high_water,
            max_drift_ms,
            refused: 0,
        }
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// The largest timestamp issued or accepted: persist it so that a restart resumes above it.
    pub fn high_water(&self) -> Timestamp {
        self.last
    }

    /// Remote timestamps refused by the drift bound since this clock was made.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// A new timestamp for a local event at physical time `now_ms`: greater than any before.
    pub fn issue(&mut self, now_ms: u64) -> Timestamp {
        let next = if now_ms > self.last.physical {
            Timestamp {
                physical: now_ms,
                logical: 0,
                node: self.node,
            }
        } else if self.last.logical < u32::MAX {
            Timestamp {
                physical: self.last.physical,
                logical: self.last.logical + 1,
                node: self.node,
            }
        } else {
            // 2^32 events in one millisecond: borrow the next millisecond.
            Timestamp {
                physical: self.last.physical.saturating_add(1),
                logical: 0,
                node: self.node,
            }
        };
        // `next` is above `last` whatever the node parts: a larger physical time, or the same
        // physical time with a larger counter.
        self.last = next;
        next
    }

    /// Check a remote timestamp against the drift bound without accepting it.
    pub fn check(&self, remote: Timestamp, now_ms: u64) -> Result<(), HlcError> {
        let limit = now_ms.saturating_add(self.max_drift_ms);
        if remote.physical > limit {
            return Err(HlcError::TooFarAhead {
                remote,
                local_ms: now_ms,
                ahead_ms: remote.physical - now_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// Accept a remote timestamp: later local timestamps will be above it. Refused (and
    /// counted) when it is more than the drift bound ahead of `now_ms`.
    pub fn observe(&mut self, remote: Timestamp, now_ms: u64) -> Result<(), HlcError> {
        if let Err(e) = self.check(remote, now_ms) {
            self.refused += 1;
            return Err(e);
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_is_strictly_increasing_even_when_time_goes_back() {
        let mut c = Hlc::new(7, DEFAULT_MAX_DRIFT_MS);
        let a = c.issue(1000);
        let b = c.issue(1000);
        let d = c.issue(900);
        let e = c.issue(1001);
        assert!(a < b && b < d && d < e, "{a} {b} {d} {e}");
        assert_eq!(d.physical, 1000);
        assert_eq!(
            e,
            Timestamp {
                physical: 1001,
                logical: 0,
                node: 7
            }
        );
    }

    #[test]
    fn observe_moves_the_clock_and_refuses_drift() {
        let mut c = Hlc::new(1, 500);
        let remote = Timestamp {
            physical: 1400,
            logical: 3,
            node: 9,
        };
        c.observe(remote, 1000).expect("within drift");
        let t = c.issue(1000);
        assert!(t > remote);
        let far = Timestamp {
            physical: 1501,
            logical: 0,
            node: 9,
        };
        let err = c.observe(far, 1000).expect_err("beyond drift");
        assert!(err.to_string().contains("501 ms ahead"), "{err}");
        assert_eq!(c.refused(), 1);
        assert!(c.issue(1000) < far);
    }

    #[test]
    fn equal_physical_and_logical_with_a_higher_node_still_issues_above() {
        let mut c = Hlc::new(1, 500);
        let remote = Timestamp {
            physical: 1000,
            logical: u32::MAX,
            node: u64::MAX,
        };
        c.observe(remote, 1000).expect("ok");
        let t = c.issue(1000);
        assert!(t > remote, "{t} {remote}");
        let t2 = c.issue(1000);
        assert!(t2 > t);
    }

    #[test]
    fn bytes_round_trip_and_keep_order() {
        let a = Timestamp {
            physical: 5,
            logical: 1,
            node: 9,
        };
        let b = Timestamp {
            physical: 5,
            logical: 2,
            node: 0,
        };
        assert_eq!(Timestamp::from_bytes(&a.to_bytes()), a);
        assert!(a.to_bytes() < b.to_bytes());
    }
}
