//! The [`ContainerDriver`] trait: what the node's reconcile loop needs from a runtime.

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::error::DriverError;
use crate::types::{
    DriverReport, HealthReport, LogOptions, LogStream, ReplicaId, ReplicaInfo, ReplicaSpec,
    ReplicaStatus, Usage,
};

/// A container runtime as the node sees it. Object-safe: the node holds
/// `Arc<dyn ContainerDriver>`.
///
/// Every method is idempotent and safe to call concurrently; calls for one replica are
/// serialised inside the driver. The reconcile loop calls [`ensure`](Self::ensure) for every
/// wanted replica periodically (every few seconds) and [`stop`](Self::stop) for every listed
/// replica that is no longer wanted; [`reconcile`] does both.
#[async_trait]
pub trait ContainerDriver: Send + Sync {
    /// `"podman"` or `"process"`.
    fn name(&self) -> &'static str;

    /// Brings the replica to its spec and reports its state:
    /// - nothing there: create and start it (pulling a missing image);
    /// - running with the same content id: adopt it (after a daemon restart) or leave it;
    /// - running with another content id, or broken (a container missing): replace it;
    /// - a container has died: start it again, with back-off for repeated deaths.
    ///
    /// A replica that cannot run (no such image, create refused, crash loop) is returned as
    /// `Ok` with [`ReplicaState::Failed`](crate::ReplicaState::Failed) and a reason; it is
    /// retried on later calls with exponential back-off. `Err` means the driver itself failed
    /// (runtime unreachable, host I/O error) or the spec is unusable.
    async fn ensure(&self, spec: &ReplicaSpec) -> Result<ReplicaStatus, DriverError>;

    /// The replica's current state without changing anything; `None` if it does not exist.
    async fn status(&self, id: &ReplicaId) -> Result<Option<ReplicaStatus>, DriverError>;

    /// Stops the replica and removes everything it owns (containers, pod, scratch volumes,
    /// state directory). Stopping a replica that does not exist succeeds.
    async fn stop(&self, id: &ReplicaId) -> Result<(), DriverError>;

    /// Every replica on this host, found by its labels (not by this instance's memory).
    async fn list(&self) -> Result<Vec<ReplicaInfo>, DriverError>;

    /// The replica's output: the last `tail` lines of each container, then (with `follow`)
    /// new lines until the replica stops.
    async fn logs(&self, id: &ReplicaId, opts: LogOptions) -> Result<LogStream, DriverError>;

    /// CPU time and memory of the replica's processes.
    async fn usage(&self, id: &ReplicaId) -> Result<Usage, DriverError>;

    /// Runs the replica's declared liveness and readiness probes once. Takes the spec
    /// because the probes are declared in the manifest; the driver keeps no copy of it, so
    /// a restarted daemon can probe replicas it adopted.
    async fn health(&self, spec: &ReplicaSpec) -> Result<HealthReport, DriverError>;

    /// What this driver enforces on this host and what it cannot.
    async fn report(&self) -> DriverReport;
}

/// The outcome of one [`reconcile`] pass.
#[derive(Debug, Default)]
pub struct ReconcileOutcome {
    /// One entry per wanted replica.
    pub ensured: Vec<(ReplicaId, Result<ReplicaStatus, DriverError>)>,
    /// Replicas found on the host that were not wanted, with the result of stopping them.
    pub removed: Vec<(ReplicaId, Result<(), DriverError>)>,
}

/// One pass of the node's reconcile loop over a driver: ensures every wanted replica and
/// stops every labelled replica that is not wanted (left over from an earlier run, a deleted
/// workload or a replica moved elsewhere). Replicas recorded for another node name are left
/// alone unless `remove_foreign` is set.
pub async fn reconcile(
    driver: &dyn ContainerDriver,
    wanted: &[ReplicaSpec],
    node: &str,
    remove_foreign: bool,
) -> Result<ReconcileOutcome, DriverError> {
    let mut outcome = ReconcileOutcome::default();
    let wanted_ids: BTreeSet<&ReplicaId> = wanted.iter().map(|s| &s.id).collect();
    for info in driver.list().await? {
        if wanted_ids.contains(&info.id) || (info.node != node && !remove_foreign) {
            continue;
        }
        let result = driver.stop(&info.id).await;
        outcome.removed.push((info.id, result));
    }
    for spec in wanted {
        let result = driver.ensure(spec).await;
        outcome.ensured.push((spec.id.clone(), result));
    }
    Ok(outcome)
}
