//! The key-value interface a replica's state endpoint serves (DESIGN.md section 5), whatever
//! the workload's consistency mode: the node's HTTP layer speaks to a [`Kv`], and each mode's
//! store implements it.
//!
//! Keys are printable UTF-8 without control characters, at most [`MAX_KEY_BYTES`]; values are
//! bytes, at most [`MAX_VALUE_BYTES`]. A revision orders the writes of one key (for `strong`
//! workloads a group-wide counter, as in etcd; for `eventual` ones the write's timestamp): a
//! conditional write names the revision it expects.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most items one page of a listing holds.
pub const MAX_PAGE: usize = 1000;

/// One key's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: u64,
}

/// A page of a listing by prefix, in key order; `next` continues after its last key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Page {
    pub items: Vec<Item>,
    pub next: Option<String>,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The key's revision after the write.
    pub revision: u64,
}

/// Why a key-value request failed. Each maps to one HTTP status in the node's API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("{what} is {size} bytes; the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("key {key:?} is at revision {actual:?}, not {expected}")]
    Precondition {
        key: String,
        expected: u64,
        actual: Option<u64>,
    },
    #[error("conditional writes need strong consistency; this workload is {mode}")]
    Unsupported { mode: &'static str },
    #[error("the store is full: {reason}")]
    Full { reason: String },
    #[error("not available now: {reason}")]
    Unavailable { reason: String },
    #[error("{0}")]
    Internal(String),
}

/// Checks a key against the rules above.
pub fn check_key(key: &str) -> Result<(), KvError> {
    let bad = |reason: &str| KvError::InvalidKey {
        key: key.chars().take(64).collect(),
        reason: reason.to_owned(),
    };
    if key.is_empty() {
        return Err(bad("empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::TooLarge {
            what: "the key",
            size: key.len(),
            limit: MAX_KEY_BYTES,
        });
    }
    if key.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    Ok(())
}

/// Checks a value's size.
pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::TooLarge {
            what: "the value",
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// A workload's key-value store, as one of its replicas sees it.
#[async_trait]
pub trait Kv: Send + Sync {
    /// The consistency mode, for messages: `eventual` or `strong`.
    fn mode(&self) -> &'static str;
    async fn get(&self, key: &str) -> Result<Option<Item>, KvError>;
    /// Writes `value`; with `if_revision`, only if the key is at that revision (0: absent).
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        if_revision: Option<u64>,
    ) -> Result<Written, KvError>;
    /// Deletes `key` (absent is fine); with `if_revision` as for [`Kv::put`].
    async fn delete(&self, key: &str, if_revision: Option<u64>) -> Result<Written, KvError>;
    /// Keys starting with `prefix`, after `after` (exclusive), at most `limit`.
    async fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, KvError>;
}

impl From<crate::crdt::KvError> for KvError {
    fn from(e: crate::crdt::KvError) -> Self {
        use crate::crdt::KvError as C;
        match e {
            C::EmptyKey => KvError::InvalidKey {
                key: String::new(),
                reason: "empty".into(),
            },
            C::KeyTooLong { len, limit, .. } => KvError::TooLarge {
                what: "the key",
                size: len,
                limit,
            },
            C::KeyNotPrintable { key, at } => KvError::InvalidKey {
                key,
                reason: format!("a control character at byte {at}"),
            },
            C::ValueTooLarge { len, limit, .. } => KvError::TooLarge {
                what: "the value",
                size: len,
                limit,
            },
            C::PrefixTooLong { len, limit } => KvError::TooLarge {
                what: "the prefix",
                size: len,
                limit,
            },
            e @ (C::TooManyKeys { .. } | C::TooManyBytes { .. }) => KvError::Full {
                reason: e.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_are_checked() {
        assert!(check_key("counter").is_ok());
        assert!(check_key("a/b c:d").is_ok());
        assert!(matches!(check_key(""), Err(KvError::InvalidKey { .. })));
        assert!(matches!(check_key("a\nb"), Err(KvError::InvalidKey { .. })));
        assert!(matches!(
            check_key(&"k".repeat(MAX_KEY_BYTES + 1)),
            Err(KvError::TooLarge { .. })
        ));
        assert!(check_value(&vec![0; MAX_VALUE_BYTES]).is_ok());
        assert!(matches!(
            check_value(&vec![0; MAX_VALUE_BYTES + 1]),
            Err(KvError::TooLarge { limit, .. }) if limit == MAX_VALUE_BYTES
        ));
    }
}
