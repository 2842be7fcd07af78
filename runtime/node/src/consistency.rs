//! The node's side of per-workload consistency (DESIGN.md section 5): which store backs each
//! workload's state endpoint on this node.

use std::sync::Arc;

use beemesh_state::kv::{Kv, KvError};

use crate::replica_api::Backends;

/// The stores of the workloads whose replicas run on this node.
#[derive(Default)]
pub struct Consistency {}

impl Consistency {
    pub fn new() -> Self {
        Self {}
    }
}

impl Backends for Consistency {
    fn kv(&self, namespace: &str, name: &str) -> Result<Arc<dyn Kv>, KvError> {
        Err(KvError::Unavailable {
            reason: format!("no store of {namespace}/{name} runs on this node"),
        })
    }
}
