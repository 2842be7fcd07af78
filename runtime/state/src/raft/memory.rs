//! An in-memory [`RaftTransport`] for tests: nodes of one process exchange the real encoded
//! messages through [`MemoryNetwork`], which can cut links (partitions), delay messages
//! (with seeded jitter) and lose nodes.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::network::{RaftTransport, TransportError};

/// What a node does with an incoming request: [`Groups`](super::Groups) is one.
pub trait RpcHandler: Send + Sync {
    fn handle(
        self: Arc<Self>,
        from: String,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;
}

#[derive(Default)]
struct NetState {
    nodes: HashMap<String, Weak<dyn RpcHandler>>,
    /// Directed links that drop every message.
    cut: HashSet<(String, String)>,
    delay: Duration,
    jitter: Duration,
    rng: u64,
    delivered: u64,
}

impl NetState {
    fn next_delay(&mut self) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        // xorshift64*: deterministic for a given seed.
        let mut x = self.rng.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let jitter_ns = self.jitter.as_nanos().max(1) as u64;
        self.delay + Duration::from_nanos(r % jitter_ns)
    }
}

/// A simulated network between the nodes of one process.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    state: Arc<Mutex<NetState>>,
}

impl MemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// The transport a node with peer id `local` sends through.
    pub fn transport(&self, local: &str) -> MemoryTransport {
        MemoryTransport {
            local: local.to_string(),
            net: self.clone(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut NetState) -> R) -> R {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut s)
    }

    /// Delivers requests for `peer` to `handler` (held weakly: dropping the node makes it
    /// unreachable).
    pub fn register(&self, peer: &str, handler: Arc<dyn RpcHandler>) {
        self.with(|s| s.nodes.insert(peer.to_string(), Arc::downgrade(&handler)));
    }

    /// Makes `peer` unreachable, as if it crashed.
    pub fn unregister(&self, peer: &str) {
        self.with(|s| s.nodes.remove(peer));
    }

    /// Splits the nodes into sides: messages between different sides are dropped. Nodes not
    /// named keep their links.
    pub fn partition(&self, sides: &[&[&str]]) {
        self.with(|s| {
            for (i, a) in sides.iter().enumerate() {
                for (j, b) in sides.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    for x in a.iter() {
                        for y in b.iter() {
                            s.cut.insert((x.to_string(), y.to_string()));
                        }
                    }
                }
            }
        });
    }

    /// Drops every message from `from` to `to` (one direction only: requests from `to` still
    /// arrive, their answers are lost).
    pub fn cut(&self, from: &str, to: &str) {
        self.with(|s| s.cut.insert((from.to_string(), to.to_string())));
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.with(|s| s.cut.clear());
    }

    /// Delays every message by `delay` plus up to `jitter`, drawn from a generator seeded
    /// with `seed`.
    pub fn set_delay(&self, delay: Duration, jitter: Duration, seed: u64) {
        self.with(|s| {
            s.delay = delay;
            s.jitter = jitter;
            s.rng = seed;
        });
    }

    /// Requests delivered so far.
    pub fn delivered(&self) -> u64 {
        self.with(|s| s.delivered)
    }
}

/// One node's end of a [`MemoryNetwork`].
#[derive(Clone)]
pub struct MemoryTransport {
    local: String,
    net: MemoryNetwork,
}

impl MemoryTransport {
    fn link_cut(&self, from: &str, to: &str) -> bool {
        self.net
            .with(|s| s.cut.contains(&(from.to_string(), to.to_string())))
    }
}

impl RaftTransport for MemoryTransport {
    async fn call(&self, target: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let unreachable = |reason: &str| TransportError::Unreachable {
            peer: target.to_string(),
            reason: reason.to_string(),
        };
        let delay = self.net.with(|s| s.next_delay());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.link_cut(&self.local, target) {
            return Err(unreachable("partitioned"));
        }
        let handler = self
            .net
            .with(|s| s.nodes.get(target).and_then(Weak::upgrade));
        let Some(handler) = handler else {
            return Err(unreachable("not running"));
        };
        let answer = handler.handle(self.local.clone(), request).await;
        let delay = self.net.with(|s| {
            s.delivered += 1;
            s.next_delay()
        });
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.link_cut(target, &self.local) {
            return Err(TransportError::Failed {
                peer: target.to_string(),
                reason: "the answer was lost to a partition".into(),
            });
        }
        Ok(answer)
    }
}
