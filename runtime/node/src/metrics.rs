//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `api`, `gossip` or `sync`.
    pub source: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub source: String,
    /// `envelope`, `untrusted`, `rollback`, `too_large`, `storage`.
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub manifests_accepted: Family<SourceLabels, Counter>,
    pub manifests_rejected: Family<RejectLabels, Counter>,
    pub peers: Gauge,
    pub workloads: Gauge,
    pub peers_rejected: Counter,
    pub syncs: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("beemesh");
        let manifests_accepted = Family::<SourceLabels, Counter>::default();
        let manifests_rejected = Family::<RejectLabels, Counter>::default();
        let peers = Gauge::default();
        let workloads = Gauge::default();
        let peers_rejected = Counter::default();
        let syncs = Counter::default();
        registry.register(
            "manifests_accepted",
            "Signed manifests verified and stored, by source",
            manifests_accepted.clone(),
        );
        registry.register(
            "manifests_rejected",
            "Manifests refused, by source and reason",
            manifests_rejected.clone(),
        );
        registry.register("peers", "Admitted peers currently up", peers.clone());
        registry.register(
            "workloads",
            "Workloads in the desired state (tombstones included)",
            workloads.clone(),
        );
        registry.register(
            "peers_rejected",
            "Peers refused admission",
            peers_rejected.clone(),
        );
        registry.register(
            "anti_entropy_syncs",
            "Completed anti-entropy syncs with a peer",
            syncs.clone(),
        );
        Self {
            registry,
            manifests_accepted,
            manifests_rejected,
            peers,
            workloads,
            peers_rejected,
            syncs,
        }
    }

    pub fn accepted(&self, source: &str) {
        self.manifests_accepted
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    pub fn rejected(&self, source: &str, reason: &str) {
        self.manifests_rejected
            .get_or_create(&RejectLabels {
                source: source.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
