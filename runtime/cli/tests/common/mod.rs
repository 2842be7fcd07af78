//! Helpers shared by the integration tests of the `beemesh` binary (and by the membership
//! benchmark in `examples/`, which includes `api.rs` by path).
//!
//! - [`api`]: a small synchronous client for the node API on its unix socket, and
//!   [`api::eventually`], the one way these tests wait for anything.
//! - [`netns`]: multi-host rigs of network namespaces with real `beemesh node` processes.

// Every test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

pub mod api;
pub mod netns;
