//! Storage tests: openraft's conformance suite, and what survives a restart.

#![allow(clippy::unwrap_used)]

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::*;

const PEER: &str = "12D3KooWTestNodeA";

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let s = open(dir.path(), PEER)
            .await
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, s.log, s.sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}
