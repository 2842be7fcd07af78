//! BeeMesh container drivers: what the node's reconcile loop uses to run replicas.
//!
//! - [`ContainerDriver`]: the object-safe async trait (`Arc<dyn ContainerDriver>`);
//!   [`reconcile`] runs one pass of the loop over it.
//! - [`podman::PodmanDriver`]: rootless Podman through its API socket, one pod per replica,
//!   slirp4netns networking with port forwards.
//! - [`process::ProcessDriver`]: plain child processes confined with Landlock,
//!   no_new_privs, no capabilities and resource limits, for hosts without Podman.
//!
//! Replicas are found by labels ([`labels`]), so a restarted daemon adopts what it already
//! runs and removes what is no longer wanted. docs/drivers.md explains the choices.

pub mod driver;
pub mod error;
pub mod labels;
pub mod podman;
pub mod probe;
pub mod process;
pub mod procfs;
pub mod sidecar;
mod tracker;
pub mod types;

pub use driver::{ContainerDriver, ReconcileOutcome, reconcile};
pub use error::DriverError;
pub use podman::{PodmanConfig, PodmanDriver};
pub use process::{ProcessConfig, ProcessDriver};
pub use types::*;
