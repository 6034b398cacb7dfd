//! Time as the protocol sees it.
//!
//! Every timeout in the fencing and takeover logic is measured on a
//! monotonic clock: a wall-clock step (NTP, an operator's `date`) must
//! neither fence a healthy primary nor delay a needed fence. The shim's
//! lease deadline, which another process (the QEMU shim) reads, is on
//! `CLOCK_BOOTTIME`, the host-wide monotonic clock; it is derived from the
//! monotonic silence at the moment it is written.
//!
//! In-process time is tokio's, so tests that run on a paused runtime
//! (`#[tokio::test(start_paused = true)]`) step time deterministically
//! without touching the host clock; [`Clock`] supplies the lease clock,
//! which tests replace.

use std::time::Duration;

pub use tokio::time::Instant;

/// Where the protocol reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic now (tokio's, so a paused test runtime steps it).
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// The host-wide monotonic clock (ms) of deadlines another process
    /// reads: `CLOCK_BOOTTIME` on a real host.
    fn lease_ms(&self) -> u64;
}

/// The host's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn lease_ms(&self) -> u64 {
        tandem_supervisor::util::boottime_ms()
    }
}

/// The lease-clock deadline that is `remaining` from now on `clock`.
pub fn lease_deadline(clock: &dyn Clock, remaining: Duration) -> u64 {
    clock
        .lease_ms()
        .saturating_add(remaining.as_millis().min(u64::MAX as u128) as u64)
}
