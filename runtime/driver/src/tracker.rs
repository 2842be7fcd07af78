//! Per-replica memory of a driver instance: a lock per replica (so concurrent `ensure`s of
//! one replica cannot race), restart counts and back-off, and failures that are retried
//! slowly instead of in a loop.
//!
//! Nothing here is needed for correctness across daemon restarts: a new instance starts with
//! an empty tracker and rebuilds its view from labels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use crate::types::{BackoffPolicy, ReplicaId};

#[derive(Debug, Default)]
struct Memo {
    /// This instance has created or adopted the replica.
    seen: bool,
    restarts: u32,
    /// Restarts since the replica last stayed up for `reset_after`.
    streak: u32,
    last_restart: Option<Instant>,
    failure: Option<Failure>,
}

#[derive(Debug)]
struct Failure {
    content_id: String,
    reason: String,
    attempts: u32,
    retry_at: Instant,
}

#[derive(Debug)]
pub struct Tracker {
    policy: BackoffPolicy,
    memos: Mutex<HashMap<ReplicaId, Memo>>,
    locks: Mutex<HashMap<ReplicaId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Returned when a failed replica is still waiting out its back-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub reason: String,
    pub retry_in: Duration,
}

impl Tracker {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            memos: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn memos(&self) -> MutexGuard<'_, HashMap<ReplicaId, Memo>> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.memos.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialises operations on one replica.
    pub async fn lock(&self, id: &ReplicaId) -> OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(id.clone()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Marks the replica as handled by this instance; returns whether it already was.
    pub fn mark_seen(&self, id: &ReplicaId) -> bool {
        let mut memos = self.memos();
        let memo = memos.entry(id.clone()).or_default();
        std::mem::replace(&mut memo.seen, true)
    }

    pub fn restarts(&self, id: &ReplicaId) -> u32 {
        self.memos().get(id).map_or(0, |m| m.restarts)
    }

    /// `Ok` if a dead container of the replica may be restarted now, else the time left.
    pub fn may_restart(&self, id: &ReplicaId) -> Result<(), Duration> {
        let now = Instant::now();
        let memos = self.memos();
        let Some(memo) = memos.get(id) else {
            return Ok(());
        };
        let Some(last) = memo.last_restart else {
            return Ok(());
        };
        if now.duration_since(last) >= self.policy.reset_after {
            return Ok(());
        }
        let ready_at = last + self.policy.delay(memo.streak);
        if now >= ready_at {
            Ok(())
        } else {
            Err(ready_at - now)
        }
    }

    pub fn record_restart(&self, id: &ReplicaId) {
        let now = Instant::now();
        let mut memos = self.memos();
        let memo = memos.entry(id.clone()).or_default();
        if memo
            .last_restart
            .is_some_and(|l| now.duration_since(l) >= self.policy.reset_after)
        {
            memo.streak = 0;
        }
        memo.streak = memo.streak.saturating_add(1);
        memo.restarts = memo.restarts.saturating_add(1);
        memo.last_restart = Some(now);
    }

    /// If the replica failed for this content id and its back-off has not elapsed, the
    /// earlier reason and the time left.
    pub fn pending_failure(&self, id: &ReplicaId, content_id: &str) -> Option<Pending> {
        let now = Instant::now();
        let memos = self.memos();
        let f = memos.get(id)?.failure.as_ref()?;
        if f.content_id != content_id || now >= f.retry_at {
            return None;
        }
        Some(Pending {
            reason: f.reason.clone(),
            retry_in: f.retry_at - now,
        })
    }

    /// Records a failure and returns the reason with the retry time appended.
    pub fn record_failure(&self, id: &ReplicaId, content_id: &str, reason: String) -> String {
        let now = Instant::now();
        let mut memos = self.memos();
        let memo = memos.entry(id.clone()).or_default();
        let attempts = match &memo.failure {
            Some(f) if f.content_id == content_id => f.attempts.saturating_add(1),
            _ => 1,
        };
        let wait = self.policy.delay(attempts).max(self.policy.initial);
        memo.failure = Some(Failure {
            content_id: content_id.to_owned(),
            reason: reason.clone(),
            attempts,
            retry_at: now + wait,
        });
        format!(
            "{reason} (attempt {attempts}; next attempt in {})",
            human(wait)
        )
    }

    pub fn clear_failure(&self, id: &ReplicaId) {
        if let Some(m) = self.memos().get_mut(id) {
            m.failure = None;
        }
    }

    /// Forgets everything about a stopped replica.
    pub fn forget(&self, id: &ReplicaId) {
        self.memos().remove(id);
    }
}

pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64().ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(600),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_back_off() {
        let t = Tracker::new(policy());
        let id = ReplicaId::new("default", "web", 0);
        assert!(t.may_restart(&id).is_ok());
        t.record_restart(&id);
        // The second restart waits `initial`, the third twice that.
        assert!(t.may_restart(&id).is_err());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(t.may_restart(&id).is_ok());
        t.record_restart(&id);
        let left = t.may_restart(&id).expect_err("backing off");
        assert_eq!(left, Duration::from_secs(4));
        assert_eq!(t.restarts(&id), 2);
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(t.may_restart(&id).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_slowly_per_content_id() {
        let t = Tracker::new(policy());
        let id = ReplicaId::new("default", "web", 0);
        let msg = t.record_failure(&id, "sha256:a", "no such image".into());
        assert!(msg.contains("attempt 1"), "{msg}");
        let p = t.pending_failure(&id, "sha256:a").expect("pending");
        assert_eq!(p.reason, "no such image");
        // A new manifest is tried at once.
        assert!(t.pending_failure(&id, "sha256:b").is_none());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(t.pending_failure(&id, "sha256:a").is_none());
        let msg = t.record_failure(&id, "sha256:a", "no such image".into());
        assert!(msg.contains("attempt 2; next attempt in 4s"), "{msg}");
        t.clear_failure(&id);
        assert!(t.pending_failure(&id, "sha256:a").is_none());
    }
}
