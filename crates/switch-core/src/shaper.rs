//! Token buckets: an average rate with a burst allowance, capped by a peak
//! rate. Two ways to use one:
//!
//! - **Policing** ([`TokenBucket::admit`]): a frame conforms when both
//!   buckets hold enough tokens; a non-conforming frame is dropped (and
//!   counted). For senders the switch cannot make wait: uplinks, host
//!   ports, and traffic towards a guest.
//! - **Shaping** ([`TokenBucket::reserve`]): a sender that can wait — a
//!   guest, whose frames stay in its TX ring until the switch takes them —
//!   asks first and is told how long to wait. Nothing is dropped; the
//!   guest's queue fills and its TCP slows to the policy.
//!
//! Time is passed in.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Shaping policy for one direction of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingPolicy {
    /// Sustained rate, kilobits per second.
    pub average_kbps: u64,
    /// Highest short-term rate, kilobits per second (≥ average).
    pub peak_kbps: u64,
    /// Bytes that may be sent at the peak rate above the average.
    pub burst_bytes: u64,
}

/// The peak bucket holds a quarter of the burst (at least two full
/// frames): the peak rate is enforced over millisecond timescales, while a
/// TCP sender's back-to-back segments are not cut down to a frame or two
/// (which collapses TCP far below the average rate).
fn peak_bucket_bytes(p: &ShapingPolicy) -> f64 {
    (p.burst_bytes as f64 / 4.0).max(3200.0)
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    policy: ShapingPolicy,
    /// Bytes available at the average rate (capacity: burst).
    avg_tokens: f64,
    peak_tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(policy: ShapingPolicy, now: Instant) -> Self {
        Self {
            policy,
            avg_tokens: policy.burst_bytes as f64,
            peak_tokens: peak_bucket_bytes(&policy),
            last: now,
        }
    }

    pub fn policy(&self) -> ShapingPolicy {
        self.policy
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        let burst = self.policy.burst_bytes as f64;
        self.avg_tokens =
            (self.avg_tokens + dt * self.policy.average_kbps as f64 * 125.0).min(burst);
        self.peak_tokens = (self.peak_tokens + dt * self.policy.peak_kbps as f64 * 125.0)
            .min(peak_bucket_bytes(&self.policy));
    }

    /// Shaping: a frame of `bytes` may start now if neither bucket is in
    /// debt, and is then charged in full — the buckets may go below zero,
    /// so a 64 KiB offloaded segment is never starved by a smaller bucket,
    /// and the debt is paid by waiting before the next one. Otherwise,
    /// how long until the buckets are out of debt.
    pub fn reserve(&mut self, bytes: usize, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.avg_tokens >= 0.0 && self.peak_tokens >= 0.0 {
            self.avg_tokens -= bytes as f64;
            self.peak_tokens -= bytes as f64;
            return Ok(());
        }
        let wait = |debt: f64, kbps: u64| {
            if debt >= 0.0 {
                0.0
            } else {
                -debt / (kbps.max(1) as f64 * 125.0)
            }
        };
        let secs = wait(self.avg_tokens, self.policy.average_kbps)
            .max(wait(self.peak_tokens, self.policy.peak_kbps));
        Err(Duration::from_secs_f64(secs.min(1.0)).max(Duration::from_micros(50)))
    }

    /// Charges a frame of `bytes`; `false` if it does not conform (the
    /// buckets are left untouched then).
    pub fn admit(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        let b = bytes as f64;
        if self.avg_tokens >= b && self.peak_tokens >= b {
            self.avg_tokens -= b;
            self.peak_tokens -= b;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn policy(avg: u64, peak: u64, burst: u64) -> ShapingPolicy {
        ShapingPolicy {
            average_kbps: avg,
            peak_kbps: peak,
            burst_bytes: burst,
        }
    }

    #[test]
    fn burst_then_average_rate() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 MB/s, 10 kB burst, peak high enough not to matter.
        let mut b = TokenBucket::new(policy(8_000, 1_000_000, 10_000), t0);
        let mut sent = 0;
        while b.admit(1000, t0) {
            sent += 1;
        }
        assert_eq!(
            sent, 3,
            "peak bucket (burst/4) caps the instantaneous burst"
        );
        let mut sent = 0;
        for ms in 1..=1000u64 {
            let now = t0 + Duration::from_millis(ms);
            while b.admit(1000, now) {
                sent += 1;
            }
        }
        // One second at 1 MB/s, plus at most the burst.
        assert!((1000..=1013).contains(&sent), "sent {sent} kB");
    }

    #[test]
    fn reserve_makes_the_sender_wait_and_never_starves_a_large_frame() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 MB/s, 10 kB burst (peak bucket 3200 bytes).
        let mut b = TokenBucket::new(policy(8_000, 16_000, 10_000), t0);
        assert_eq!(b.reserve(64_000, t0), Ok(()), "larger than any bucket");
        let wait = b.reserve(100, t0).unwrap_err();
        // 54 kB of debt at 1 MB/s, and ~61 kB at the 2 MB/s peak.
        assert!(
            (Duration::from_millis(50)..Duration::from_millis(60)).contains(&wait),
            "{wait:?}"
        );
        assert!(b.reserve(100, t0 + wait).is_ok());
    }

    proptest! {
        /// Shaping keeps the long-run rate: whatever the sender asks for,
        /// what was let through by time t is at most rate × t + burst +
        /// one frame.
        #[test]
        fn reserve_never_exceeds_policy(
            avg in 100u64..100_000,
            burst in 1600u64..100_000,
            frames in proptest::collection::vec(60usize..65_000, 1..300),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(policy(avg, avg * 4, burst), t0);
            let mut now = t0;
            let mut sent = 0f64;
            let largest = frames.iter().copied().max().unwrap_or(0) as f64;
            for len in frames {
                // A sender that always waits exactly as long as told.
                let mut tries = 0;
                while let Err(w) = b.reserve(len, now) {
                    now += w;
                    tries += 1;
                    prop_assert!(tries < 100_000);
                }
                sent += len as f64;
                let t = (now - t0).as_secs_f64();
                let allowed = t * avg as f64 * 125.0 + burst as f64 + largest;
                prop_assert!(sent <= allowed + 1.0, "sent {} > {}", sent, allowed);
            }
        }

        /// Whatever the arrival pattern, what is admitted over a window
        /// never exceeds rate × time + burst.
        #[test]
        fn never_exceeds_policy(
            avg in 100u64..100_000,
            burst in 1600u64..100_000,
            arrivals in proptest::collection::vec((0u64..5_000, 60usize..1600), 1..400),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(policy(avg, avg * 4, burst), t0);
            let mut t = 0u64;
            let mut admitted = 0f64;
            for (gap_us, len) in arrivals {
                t += gap_us;
                if b.admit(len, t0 + Duration::from_micros(t)) {
                    admitted += len as f64;
                }
            }
            let allowed = t as f64 / 1e6 * avg as f64 * 125.0 + burst as f64;
            prop_assert!(admitted <= allowed + 1.0, "admitted {} > {}", admitted, allowed);
        }
    }
}
