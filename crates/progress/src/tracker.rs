//! The progress model: pure, time is passed in with every sample.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::event::{Event, DONE, RUNNING};

/// One reading of a job's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Units (bytes) done so far.
    pub done: u64,
    /// Units the job currently says remain (may grow).
    pub remaining: u64,
    /// Milliseconds on the caller's monotonic clock.
    pub at_ms: u64,
}

/// Below 1.0 until [`Tracker::finish`]: a job that is not done never shows
/// 100 %.
pub const MAX_UNFINISHED: f64 = 0.999;

/// Time constant of the rate's moving average. Weighting by elapsed time
/// rather than per sample keeps the smoothing the same whether the caller
/// polls every 100 ms or every 5 s.
const RATE_TAU_MS: f64 = 2000.0;

/// The progress model of one job.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    fraction: f64,
    done: u64,
    remaining: u64,
    /// Time and `done` of the last sample that moved the clock: rates are
    /// measured from here, so samples at the same instant add up instead
    /// of dividing by zero.
    anchor: Option<(u64, u64)>,
    rate: Option<f64>,
    finished: bool,
}

impl Tracker {
    /// A job that has not reported yet: 0 %, no rate.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Takes a reading. A sample older than the last one is ignored, and a
    /// `done` counter that went backwards is not believed: progress shown
    /// once is never taken back.
    pub fn observe(&mut self, s: Sample) {
        if self.anchor.is_some_and(|(at, _)| s.at_ms < at) {
            return;
        }
        let done = s.done.max(self.done);
        match self.anchor {
            None => self.anchor = Some((s.at_ms, done)),
            Some((at, prev_done)) => {
                let dt = s.at_ms.saturating_sub(at);
                if dt > 0 {
                    let now = done.saturating_sub(prev_done) as f64 * 1000.0 / dt as f64;
                    let alpha = 1.0 - (-(dt as f64) / RATE_TAU_MS).exp();
                    let rate = match self.rate {
                        Some(r) => r + alpha * (now - r),
                        None => now,
                    };
                    if rate.is_finite() {
                        self.rate = Some(rate.max(0.0));
                    }
                    self.anchor = Some((s.at_ms, done));
                }
            }
        }
        self.done = done;
        if self.finished {
            // A finished job has nothing left, whatever a late reading says.
            return;
        }
        self.remaining = s.remaining;
        let total = done as f64 + s.remaining as f64;
        if total > 0.0 {
            let f = (done as f64 / total).min(MAX_UNFINISHED);
            self.fraction = self.fraction.max(f);
        }
    }

    /// The job is done: exactly 100 % from now on.
    pub fn finish(&mut self) {
        self.finished = true;
        self.fraction = 1.0;
        self.remaining = 0;
    }

    /// Whether [`Tracker::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// In [0, 1], never decreasing; 1 only after [`Tracker::finish`].
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// The largest `done` seen.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// What the job last said remains (0 once finished).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Units per second, smoothed; 0 until two readings at different
    /// times. Always finite and non-negative.
    pub fn rate(&self) -> f64 {
        self.rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(0.0)
    }

    /// Time left at the current rate; `None` without a rate (a guess from
    /// nothing is worse than no guess) or once finished.
    pub fn eta(&self) -> Option<Duration> {
        let r = self.rate();
        if r <= 0.0 || self.finished {
            return None;
        }
        Duration::try_from_secs_f64(self.remaining as f64 / r).ok()
    }

    /// An event of this job in state `running` (`done` once finished);
    /// the caller adds job-specific `extra` fields or another state.
    pub fn event(&self, job: &str, phase: &str) -> Event {
        Event {
            job: job.to_string(),
            phase: phase.to_string(),
            state: if self.finished { DONE } else { RUNNING }.to_string(),
            fraction: self.fraction,
            done: self.done,
            remaining: self.remaining,
            rate_bps: self.rate(),
            eta_s: self.eta().map(|d| d.as_secs_f64()),
            message: None,
            extra: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(done: u64, remaining: u64, at_ms: u64) -> Sample {
        Sample {
            done,
            remaining,
            at_ms,
        }
    }

    #[test]
    fn fraction_never_goes_back_when_remaining_grows() {
        let mut t = Tracker::new();
        t.observe(s(50, 50, 0));
        assert_eq!(t.fraction(), 0.5);
        t.observe(s(60, 200, 1000)); // the guest re-dirtied pages
        assert_eq!(t.fraction(), 0.5);
        assert_eq!(t.remaining(), 200);
        t.observe(s(600, 200, 2000));
        assert_eq!(t.fraction(), 0.75);
    }

    #[test]
    fn fraction_stays_short_of_one_until_finish() {
        let mut t = Tracker::new();
        t.observe(s(1000, 0, 0));
        assert_eq!(t.fraction(), MAX_UNFINISHED);
        t.observe(s(u64::MAX, 0, 1));
        assert!(t.fraction() < 1.0);
        assert!(!t.is_finished());
        t.finish();
        assert_eq!(t.fraction(), 1.0);
        assert_eq!(t.eta(), None);
        // A late reading changes neither the fraction nor what remains.
        t.observe(s(5, 500, 2));
        assert_eq!(t.fraction(), 1.0);
        assert_eq!(t.remaining(), 0);
        assert_eq!(t.event("j", "p").state, "done");
    }

    #[test]
    fn nothing_to_do_yet_is_zero() {
        let mut t = Tracker::new();
        assert_eq!(t.fraction(), 0.0);
        t.observe(s(0, 0, 0));
        assert_eq!(t.fraction(), 0.0);
        assert_eq!(t.event("j", "p").state, "running");
    }

    #[test]
    fn done_going_backwards_is_ignored() {
        let mut t = Tracker::new();
        t.observe(s(200, 800, 0));
        t.observe(s(100, 800, 1000));
        assert_eq!(t.done(), 200);
        assert_eq!(t.fraction(), 0.2);
        // No negative rate from the drop.
        assert_eq!(t.rate(), 0.0);
    }

    #[test]
    fn rate_and_eta_with_equal_timestamps() {
        let mut t = Tracker::new();
        assert_eq!(t.rate(), 0.0);
        assert_eq!(t.eta(), None);
        t.observe(s(0, 1000, 1000));
        t.observe(s(100, 900, 1000)); // same instant: no rate from it
        assert_eq!(t.rate(), 0.0);
        assert_eq!(t.eta(), None);
        // The bytes done at the repeated instant count towards the next delta.
        t.observe(s(200, 800, 2000));
        assert_eq!(t.rate(), 200.0);
        assert_eq!(t.eta(), Some(Duration::from_secs(4)));
    }

    #[test]
    fn rate_ignores_samples_from_the_past() {
        let mut t = Tracker::new();
        t.observe(s(0, 1000, 1000));
        t.observe(s(200, 800, 2000));
        t.observe(s(900, 100, 500)); // older than the last: ignored entirely
        assert_eq!(t.rate(), 200.0);
        assert_eq!(t.done(), 200);
        assert_eq!(t.remaining(), 800);
    }

    #[test]
    fn rate_is_smoothed_over_time_not_samples() {
        // Two trackers see the same speed change, one polling 10 times as
        // often: after the same elapsed time they agree closely.
        let mut fast = Tracker::new();
        let mut slow = Tracker::new();
        for i in 0..=10u64 {
            fast.observe(s(i * 100, 0, i * 1000));
            slow.observe(s(i * 100, 0, i * 1000));
        }
        assert!((fast.rate() - 100.0).abs() < 1e-9);
        for i in 1..=20u64 {
            fast.observe(s(1000 + i * 100, 0, 10_000 + i * 100)); // 1000 B/s
        }
        for i in 1..=2u64 {
            slow.observe(s(1000 + i * 1000, 0, 10_000 + i * 1000));
        }
        let (f, sl) = (fast.rate(), slow.rate());
        assert!(f > 100.0 && f < 1000.0, "{f}");
        assert!((f - sl).abs() / f < 0.05, "{f} vs {sl}");
    }

    #[test]
    fn rate_decays_when_work_stops() {
        let mut t = Tracker::new();
        t.observe(s(0, 1000, 0));
        t.observe(s(500, 500, 1000));
        let before = t.rate();
        t.observe(s(500, 500, 3000));
        assert!(t.rate() < before && t.rate() > 0.0);
        t.observe(s(500, 500, 1_000_000));
        assert!(t.rate() < 1e-6);
    }

    #[test]
    fn eta_is_none_when_absurd() {
        let mut t = Tracker::new();
        t.observe(s(0, u64::MAX, 0));
        t.observe(s(1, u64::MAX, u64::MAX));
        // A rate of ~0 B/s: no panic, either no ETA or a finite one.
        let _ = t.eta();
        assert!(t.rate().is_finite());
    }

    proptest! {
        #[test]
        fn fraction_is_monotone_bounded_and_short_of_one(
            samples in prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..100),
            small in prop::collection::vec((0u64..1000, 0u64..1000, 0u64..5000), 0..100),
        ) {
            for samples in [samples, small] {
                let mut t = Tracker::new();
                let mut last = 0.0;
                for (d, r, at) in samples {
                    t.observe(s(d, r, at));
                    let f = t.fraction();
                    prop_assert!(f >= last, "{f} < {last}");
                    prop_assert!((0.0..1.0).contains(&f), "{f}");
                    last = f;
                    prop_assert!(t.rate().is_finite() && t.rate() >= 0.0);
                    let _ = t.eta();
                    let e = t.event("j", "p");
                    prop_assert!(e.eta_s.is_none_or(|x| x.is_finite() && x >= 0.0));
                }
                t.finish();
                prop_assert_eq!(t.fraction(), 1.0);
            }
        }
    }
}
