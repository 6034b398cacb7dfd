//! Small running statistics for status reports.

use std::collections::VecDeque;
use std::time::Duration;

/// The most recent pauses, for p50/p99 in `tandem ft status`.
pub struct PauseStats {
    window: VecDeque<f64>,
    cap: usize,
}

impl PauseStats {
    pub fn new(cap: usize) -> Self {
        PauseStats {
            window: VecDeque::with_capacity(cap),
            cap: cap.max(1),
        }
    }

    pub fn record(&mut self, d: Duration) {
        if self.window.len() == self.cap {
            self.window.pop_front();
        }
        self.window.push_back(d.as_secs_f64() * 1000.0);
    }

    /// (p50, p99) in milliseconds; zeros before the first sample.
    pub fn p50_p99(&self) -> (f64, f64) {
        let mut v: Vec<f64> = self.window.iter().copied().collect();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        (percentile(&v, 50.0), percentile(&v, 99.0))
    }
}

/// Nearest-rank percentile of sorted data.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn window_keeps_the_latest() {
        let mut s = PauseStats::new(3);
        for ms in [100, 1, 2, 3] {
            s.record(Duration::from_millis(ms));
        }
        assert_eq!(s.p50_p99(), (2.0, 3.0));
    }
}
