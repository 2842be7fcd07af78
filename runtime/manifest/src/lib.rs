//! BeeMesh's bottom layer: the files an operator writes and the rules for trusting them.
//!
//! - [`workload`]: workload manifests (`beemesh/v1` `Workload`) and their validation;
//! - [`host`]: the host config (`/etc/beemesh/host.toml`);
//! - [`keys`], [`signed`], [`trust`]: Ed25519 keys, signed manifests and the trust policy
//!   (threshold of operator signatures, expiry);
//! - [`operator`]: signed operator requests to a workload's key-value store (`beemesh kv`);
//! - [`generations`]: rollback protection over a persisted generation store;
//! - [`kube`]: Kubernetes Pod, Deployment and StatefulSet import.
//!
//! Nothing here is async or does network I/O; every read of outside input is size-bounded
//! ([`input`]) and every error names the file, position, key and reason ([`diag`]).

pub mod diag;
pub mod generations;
pub mod host;
pub mod input;
pub mod keys;
pub mod kube;
pub mod names;
pub mod operator;
pub mod quantity;
pub mod signed;
pub mod ticket;
pub mod trust;
pub mod workload;

pub use diag::{Diagnostic, Invalid, KeyPath};
pub use host::HostConfig;
pub use keys::{PublicKey, SecretKey};
pub use quantity::{Cpu, Duration, Memory};
pub use signed::{ContentId, SignedManifest};
pub use trust::{TrustPolicy, Verified};
pub use workload::Manifest;
