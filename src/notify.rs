//! systemd readiness protocol (sd_notify(3)) for `Type=notify` units: READY=1 once the FUSE file
//! is usable, STOPPING=1 when the mount ends. Without `NOTIFY_SOCKET` every call is a no-op.

use sd_notify::NotifyState;

/// Tells the service manager the disk is mounted, so units ordered after us may start.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// Tells the service manager we are shutting down (unmounted, flushing or done).
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("can't notify the service manager: {e}");
    }
}
