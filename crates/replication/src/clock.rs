//! Time as the protocol sees it.
//!
//! Every timeout in the fencing and takeover logic is measured on a
//! monotonic clock: a wall-clock step (NTP, an operator's `date`) must
//! neither fence a healthy primary nor delay a needed fence. The only
//! wall-clock value is the shim's lease deadline, because another process
//! (the QEMU shim) reads it; it is derived from the monotonic silence at the
//! moment it is written.
//!
//! The monotonic clock is tokio's, so tests that run on a paused runtime
//! (`#[tokio::test(start_paused = true)]`) step time deterministically
//! without touching the host clock; [`Clock`] supplies the wall-clock
//! mapping, which tests replace.

use std::time::Duration;

pub use tokio::time::Instant;

/// Where the protocol reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic now (tokio's, so a paused test runtime steps it).
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// Unix time in ms, only for deadlines another process reads.
    fn unix_ms(&self) -> u64;
}

/// The host's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The unix-ms deadline that is `remaining` from now on `clock`.
pub fn unix_deadline(clock: &dyn Clock, remaining: Duration) -> u64 {
    clock
        .unix_ms()
        .saturating_add(remaining.as_millis().min(u64::MAX as u128) as u64)
}
