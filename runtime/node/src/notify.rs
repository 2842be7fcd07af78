//! systemd integration: `READY=1` once the node serves its API and has joined the mesh's
//! listeners, `WATCHDOG=1` pings when the unit sets `WatchdogSec=`, `STOPPING=1` on shutdown.
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!("sd_notify READY failed: {e}");
    }
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Pings the watchdog at half its interval until `shutdown` fires, when systemd asked for one.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                }
            }
        }
    });
}
