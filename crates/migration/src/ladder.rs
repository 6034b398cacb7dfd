//! The convergence ladder: what to do when precopy stops making progress.
//!
//! Users' complaint about live migration is the one that never ends (or
//! ends only when an orchestrator's 150 s–800 s/GiB timer gives up). The
//! ladder notices a stall within one window (10 s by default; KubeVirt's
//! detector waits 40 s) and climbs, one rung per stall:
//!
//! 1. **precopy** at the operator's downtime limit (QEMU's 300 ms default);
//! 2. **downtime steps**: the limit raised geometrically (as oVirt and
//!    Nova do) up to the operator's bound — skipping steps below QEMU's own
//!    expected downtime, and the whole rung when even the bound is below it;
//! 3. **throttle**: auto-converge slows the guest's vCPUs (QEMU raises the
//!    throttle every pass, so this rung gets several windows);
//! 4. **postcopy**, only if the operator allowed it: guaranteed to finish;
//! 5. otherwise **abort**, with the numbers that say why.
//!
//! QEMU refuses to change capabilities during a migration, so the throttle
//! rung cannot switch auto-converge on late. Instead [`setup`] switches it
//! on from the start with its ceiling at 1 % (`max-cpu-throttle` can change
//! at any time), and [`Action::LiftThrottleCap`] lifts the ceiling.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sample::{Sample, Status};

/// The operator's choices for one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LadderConfig {
    /// The downtime limit precopy starts with.
    pub downtime_ms: u64,
    /// The most downtime the operator accepts; the downtime rung climbs to
    /// it. Equal to `downtime_ms` disables that rung.
    pub max_downtime_ms: u64,
    /// How many raises the downtime rung makes to reach its bound.
    pub downtime_steps: u32,
    /// No progress for this long is a stall.
    pub stall_ms: u64,
    /// `remaining` must fall by this fraction of its best value to count as
    /// progress (re-dirtied pages make it wobble).
    pub min_gain: f64,
    /// Whether the throttle rung may slow the guest.
    pub allow_throttle: bool,
    /// Stall windows the throttle rung gets (the throttle climbs by QEMU's
    /// increment every pass, so one window is too few to judge it).
    pub throttle_windows: u32,
    pub allow_postcopy: bool,
    /// Bytes per second QEMU may send; `None` leaves QEMU's default.
    pub bandwidth_bps: Option<u64>,
    /// The whole migration may take this long before the ladder jumps to
    /// its last rung (postcopy, or abort).
    pub completion_timeout_ms: Option<u64>,
    /// Parallel TCP streams for memory (QEMU's multifd); `None`: one
    /// stream. QEMU 10 cannot combine it with postcopy.
    pub multifd_channels: Option<u8>,
    /// Not a byte sent for this long is a dead link (a cut cable, a
    /// destination that stopped reading): abort at once, whatever rung,
    /// never postcopy (TCP alone would wait minutes).
    pub link_silence_ms: u64,
}

impl Default for LadderConfig {
    fn default() -> Self {
        LadderConfig {
            downtime_ms: 300,
            max_downtime_ms: 2000,
            downtime_steps: 3,
            stall_ms: 10_000,
            min_gain: 0.05,
            allow_throttle: true,
            throttle_windows: 3,
            allow_postcopy: false,
            bandwidth_bps: None,
            completion_timeout_ms: None,
            link_silence_ms: 30_000,
            multifd_channels: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the downtime limit must be at least 1 ms (got {0})")]
    DowntimeZero(u64),
    #[error("the downtime bound ({max} ms) is below the starting limit ({start} ms)")]
    BoundBelowStart { start: u64, max: u64 },
    #[error("the downtime bound may be at most 2000000 ms (QEMU's own limit), got {0}")]
    BoundTooLarge(u64),
    #[error("the dead-link bound must be between 1 s and 1 h (got {0} ms)")]
    LinkSilence(u64),
    #[error("the stall window must be between 1 s and 10 min (got {0} ms)")]
    StallWindow(u64),
    #[error("the bandwidth must be at least 1 MiB/s (got {0} B/s)")]
    Bandwidth(u64),
    #[error("multifd takes 1 to 64 channels (got {0})")]
    MultifdChannels(u8),
    #[error("QEMU cannot combine multifd with postcopy: choose one")]
    MultifdWithPostcopy,
}

impl LadderConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.downtime_ms == 0 {
            return Err(ConfigError::DowntimeZero(0));
        }
        if self.max_downtime_ms < self.downtime_ms {
            return Err(ConfigError::BoundBelowStart {
                start: self.downtime_ms,
                max: self.max_downtime_ms,
            });
        }
        if self.max_downtime_ms > 2_000_000 {
            return Err(ConfigError::BoundTooLarge(self.max_downtime_ms));
        }
        if !(1_000..=600_000).contains(&self.stall_ms) {
            return Err(ConfigError::StallWindow(self.stall_ms));
        }
        if let Some(b) = self.bandwidth_bps.filter(|b| *b < 1 << 20) {
            return Err(ConfigError::Bandwidth(b));
        }
        if let Some(n) = self.multifd_channels {
            if !(1..=64).contains(&n) {
                return Err(ConfigError::MultifdChannels(n));
            }
            if self.allow_postcopy {
                return Err(ConfigError::MultifdWithPostcopy);
            }
        }
        if !(1_000..=3_600_000).contains(&self.link_silence_ms) {
            return Err(ConfigError::LinkSilence(self.link_silence_ms));
        }
        Ok(())
    }

    /// The downtime limits the downtime rung walks through, ascending, the
    /// last one the bound: `start · r^k` with `r` chosen so that step
    /// `downtime_steps` lands on the bound.
    pub fn downtime_ladder(&self) -> Vec<u64> {
        let (start, max) = (self.downtime_ms.max(1), self.max_downtime_ms);
        if max <= start || self.downtime_steps == 0 {
            return Vec::new();
        }
        let n = self.downtime_steps;
        let ratio = (max as f64 / start as f64).powf(1.0 / n as f64);
        let mut steps: Vec<u64> = (1..n)
            .map(|k| (start as f64 * ratio.powi(k as i32)).round() as u64)
            .filter(|v| *v > start && *v < max)
            .collect();
        steps.push(max);
        steps.dedup();
        steps
    }
}

/// Where on the ladder a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "rung")]
pub enum Rung {
    Precopy,
    Downtime { limit_ms: u64 },
    Throttle,
    Postcopy,
}

impl std::fmt::Display for Rung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rung::Precopy => f.write_str("precopy"),
            Rung::Downtime { limit_ms } => write!(f, "downtime {limit_ms} ms"),
            Rung::Throttle => f.write_str("throttle"),
            Rung::Postcopy => f.write_str("postcopy"),
        }
    }
}

/// What the driver must tell QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SetDowntime { ms: u64 },
    LiftThrottleCap,
    StartPostcopy,
    Abort { reason: String },
}

impl Action {
    /// The QMP command and arguments; `None` for an abort, which the driver
    /// carries out as a cancel and reports.
    pub fn qmp(&self) -> Option<(&'static str, Value)> {
        match self {
            Action::SetDowntime { ms } => {
                Some(("migrate-set-parameters", json!({ "downtime-limit": ms })))
            }
            Action::LiftThrottleCap => Some((
                "migrate-set-parameters",
                json!({ "max-cpu-throttle": 99, "cpu-throttle-increment": 10 }),
            )),
            Action::StartPostcopy => Some(("migrate-start-postcopy", json!({}))),
            Action::Abort { .. } => None,
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Outcome {
    Completed {
        /// The rung it was on when it finished.
        rung: Rung,
        downtime_ms: Option<u64>,
        total_ms: Option<u64>,
    },
    Failed {
        reason: String,
    },
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Continue,
    Act(Action),
    Finished(Outcome),
}

/// The QMP settings a migration starts with: capabilities (which QEMU
/// accepts only before `migrate`) and parameters.
pub fn setup(cfg: &LadderConfig) -> (Vec<(&'static str, bool)>, Value) {
    // Every capability is set, off as well as on: QEMU keeps them between
    // migrations, and a checkpoint or FT's device-state capture leaves
    // `x-ignore-shared` on, which would skip the guest's (shared) RAM.
    let caps = vec![
        ("events", true),
        ("x-ignore-shared", false),
        ("auto-converge", cfg.allow_throttle),
        ("postcopy-ram", cfg.allow_postcopy),
        ("multifd", cfg.multifd_channels.is_some()),
    ];
    let mut params = json!({ "downtime-limit": cfg.downtime_ms });
    if let Some(n) = cfg.multifd_channels {
        params["multifd-channels"] = json!(n);
    }
    if cfg.allow_throttle {
        // On, but capped at 1 % until the throttle rung (see the module doc).
        params["cpu-throttle-initial"] = json!(1);
        params["max-cpu-throttle"] = json!(1);
    }
    if let Some(b) = cfg.bandwidth_bps {
        params["max-bandwidth"] = json!(b);
    }
    (caps, params)
}

/// The ladder of one migration, fed samples in time order.
#[derive(Debug, Clone)]
pub struct Ladder {
    cfg: LadderConfig,
    steps: Vec<u64>,
    rung: Rung,
    started_ms: u64,
    best_remaining: Option<u64>,
    best_at_ms: u64,
    throttle_windows_used: u32,
    aborting: bool,
    /// The most bytes seen sent, and when that count last grew.
    sent: u64,
    sent_at_ms: u64,
}

impl Ladder {
    pub fn new(cfg: LadderConfig, now_ms: u64) -> Ladder {
        Ladder {
            steps: cfg.downtime_ladder(),
            cfg,
            rung: Rung::Precopy,
            started_ms: now_ms,
            best_remaining: None,
            best_at_ms: now_ms,
            throttle_windows_used: 0,
            aborting: false,
            sent: 0,
            sent_at_ms: now_ms,
        }
    }

    pub fn rung(&self) -> Rung {
        self.rung
    }

    pub fn config(&self) -> &LadderConfig {
        &self.cfg
    }

    /// How long `remaining` has gone without progress at `now_ms`.
    pub fn stalled_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.best_at_ms)
    }

    /// Takes one sample and says what to do. Samples out of time order are
    /// taken at the latest time seen.
    pub fn observe(&mut self, s: &Sample) -> Decision {
        let now = s.at_ms.max(self.best_at_ms);
        match s.status {
            Some(Status::Completed) => {
                return Decision::Finished(Outcome::Completed {
                    rung: self.rung,
                    downtime_ms: s.downtime_ms,
                    total_ms: s.total_time_ms,
                })
            }
            Some(Status::Failed) => {
                return Decision::Finished(Outcome::Failed {
                    reason: s
                        .error
                        .clone()
                        .unwrap_or_else(|| "QEMU reports the migration failed".into()),
                })
            }
            Some(Status::Cancelled) => return Decision::Finished(Outcome::Cancelled),
            Some(Status::Postcopy) => {
                // QEMU guarantees postcopy terminates: nothing more to climb.
                self.rung = Rung::Postcopy;
                return Decision::Continue;
            }
            // Not over until QEMU says cancelled.
            Some(Status::Cancelling) => return Decision::Continue,
            Some(Status::Setup) | Some(Status::None) | None => {
                // Nothing is sent yet: a slow connect is not a stall.
                self.best_at_ms = now;
                self.sent_at_ms = now;
                return Decision::Continue;
            }
            Some(Status::Active) => {}
        }
        if self.aborting || self.rung == Rung::Postcopy {
            return Decision::Continue;
        }
        if s.transferred > self.sent {
            self.sent = s.transferred;
            self.sent_at_ms = now;
        } else if now.saturating_sub(self.sent_at_ms) >= self.cfg.link_silence_ms {
            self.aborting = true;
            return Decision::Act(Action::Abort {
                reason: format!(
                    "nothing was sent for {} ms (the migration link is down, or the destination stopped reading) with {} MiB remaining",
                    now.saturating_sub(self.sent_at_ms),
                    s.remaining >> 20
                ),
            });
        }
        let progressed = match self.best_remaining {
            None => true,
            Some(best) => (s.remaining as f64) < best as f64 * (1.0 - self.cfg.min_gain),
        };
        if progressed {
            self.best_remaining = Some(s.remaining);
            self.best_at_ms = now;
        }
        if let Some(limit) = self.cfg.completion_timeout_ms {
            if now.saturating_sub(self.started_ms) >= limit {
                return self.last_rung(s, format!("the migration ran past its {limit} ms bound"));
            }
        }
        if self.stalled_ms(now) < self.cfg.stall_ms {
            return Decision::Continue;
        }
        // A stall: climb, and give the new rung a whole window.
        self.best_at_ms = now;
        self.best_remaining = Some(s.remaining);
        self.climb(s)
    }

    fn climb(&mut self, s: &Sample) -> Decision {
        let current_limit = match self.rung {
            Rung::Precopy => Some(self.cfg.downtime_ms),
            Rung::Downtime { limit_ms } => Some(limit_ms),
            _ => None,
        };
        if let Some(current) = current_limit {
            let expected = s.expected_downtime_ms.unwrap_or(0);
            // The next step that exceeds both the current limit and what
            // QEMU expects to need; none if even the bound is too small.
            let next = self
                .steps
                .iter()
                .copied()
                .find(|v| *v > current && *v >= expected);
            if let Some(ms) = next {
                self.rung = Rung::Downtime { limit_ms: ms };
                return Decision::Act(Action::SetDowntime { ms });
            }
        }
        if self.cfg.allow_throttle && current_limit.is_some() {
            self.rung = Rung::Throttle;
            self.throttle_windows_used = 1;
            return Decision::Act(Action::LiftThrottleCap);
        }
        if self.rung == Rung::Throttle && self.throttle_windows_used < self.cfg.throttle_windows {
            self.throttle_windows_used += 1;
            return Decision::Continue;
        }
        self.last_rung(s, format!("no progress for {} ms", self.cfg.stall_ms))
    }

    fn last_rung(&mut self, s: &Sample, why: String) -> Decision {
        if self.cfg.allow_postcopy {
            self.rung = Rung::Postcopy;
            return Decision::Act(Action::StartPostcopy);
        }
        self.aborting = true;
        Decision::Act(Action::Abort {
            reason: format!(
                "did not converge ({why} on rung {}): {} MiB remain, the guest dirties {:.1} MiB/s against {:.1} MiB/s sent, QEMU expects {} ms of downtime against a bound of {} ms; allow postcopy, raise --max-downtime-ms or --bandwidth, or migrate when the guest is quieter",
                self.rung,
                s.remaining >> 20,
                s.dirty_rate_bps() as f64 / 1048576.0,
                s.bandwidth_bps() as f64 / 1048576.0,
                s.expected_downtime_ms
                    .map_or_else(|| "unknown".to_string(), |d| d.to_string()),
                self.cfg.max_downtime_ms,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sample of a link that carries data (the count of bytes sent grows
    /// with time).
    fn active(at_ms: u64, remaining: u64, expected: u64) -> Sample {
        Sample {
            at_ms,
            status: Some(Status::Active),
            transferred: (at_ms + 1) << 10,
            remaining,
            expected_downtime_ms: Some(expected),
            page_size: 4096,
            dirty_pages_rate: 16384,
            mbps: 800.0,
            ..Sample::default()
        }
    }

    /// Feeds a flat `remaining` every second from `from_ms` until the
    /// ladder acts; returns the action and the time it came.
    fn until_action(l: &mut Ladder, from_ms: u64, expected: u64) -> (Action, u64) {
        for t in (from_ms..from_ms + 1_000_000).step_by(1000) {
            if let Decision::Act(a) = l.observe(&active(t, 64 << 20, expected)) {
                return (a, t);
            }
        }
        panic!("the ladder never acted");
    }

    #[test]
    fn downtime_steps_are_geometric_and_end_on_the_bound() {
        let cfg = LadderConfig {
            downtime_ms: 300,
            max_downtime_ms: 2400,
            downtime_steps: 3,
            ..LadderConfig::default()
        };
        assert_eq!(cfg.downtime_ladder(), vec![600, 1200, 2400]);
        let flat = LadderConfig {
            max_downtime_ms: 300,
            ..cfg.clone()
        };
        assert!(flat.downtime_ladder().is_empty());
    }

    #[test]
    fn a_converging_migration_is_never_touched() {
        let mut l = Ladder::new(LadderConfig::default(), 0);
        let mut remaining = 1u64 << 30;
        for t in (0..60_000).step_by(500) {
            remaining = remaining * 9 / 10;
            assert_eq!(l.observe(&active(t, remaining, 100)), Decision::Continue);
        }
        let done = Sample {
            at_ms: 60_000,
            status: Some(Status::Completed),
            downtime_ms: Some(12),
            total_time_ms: Some(60_000),
            ..Sample::default()
        };
        assert_eq!(
            l.observe(&done),
            Decision::Finished(Outcome::Completed {
                rung: Rung::Precopy,
                downtime_ms: Some(12),
                total_ms: Some(60_000)
            })
        );
    }

    #[test]
    fn a_stall_is_seen_within_one_window() {
        let mut l = Ladder::new(LadderConfig::default(), 0);
        let (a, t) = until_action(&mut l, 0, 500);
        // QEMU expects 500 ms: the 300 → 2000 ladder's first step that
        // covers it is taken directly.
        assert_eq!(a, Action::SetDowntime { ms: 565 });
        assert_eq!(t, 10_000);
    }

    #[test]
    fn the_full_ladder_then_abort_with_the_numbers() {
        let mut l = Ladder::new(LadderConfig::default(), 0);
        let mut t = 0;
        let mut actions = Vec::new();
        loop {
            let (a, at) = until_action(&mut l, t, 100);
            t = at + 1000;
            let abort = matches!(a, Action::Abort { .. });
            actions.push(a);
            if abort {
                break;
            }
        }
        assert_eq!(
            &actions[..4],
            &[
                Action::SetDowntime { ms: 565 },
                Action::SetDowntime { ms: 1063 },
                Action::SetDowntime { ms: 2000 },
                Action::LiftThrottleCap,
            ]
        );
        let Action::Abort { reason } = &actions[4] else {
            panic!("{actions:?}")
        };
        assert!(reason.contains("64 MiB remain"), "{reason}");
        assert!(reason.contains("allow postcopy"), "{reason}");
        // Three stall windows on the throttle rung before the abort.
        assert_eq!(t - 1000, 10_000 * 4 + 10_000 * 3);
        // Once aborting, it asks for nothing more.
        assert_eq!(
            l.observe(&active(t + 50_000, 64 << 20, 100)),
            Decision::Continue
        );
    }

    #[test]
    fn a_bound_below_what_qemu_expects_skips_to_the_throttle_and_then_postcopy() {
        let cfg = LadderConfig {
            downtime_ms: 50,
            max_downtime_ms: 50,
            allow_postcopy: true,
            throttle_windows: 1,
            ..LadderConfig::default()
        };
        let mut l = Ladder::new(cfg, 0);
        assert_eq!(until_action(&mut l, 0, 700).0, Action::LiftThrottleCap);
        assert_eq!(l.rung(), Rung::Throttle);
        assert_eq!(until_action(&mut l, 11_000, 700).0, Action::StartPostcopy);
        assert_eq!(l.rung(), Rung::Postcopy);
        // Postcopy finishes whatever the numbers say.
        assert_eq!(
            l.observe(&active(500_000, 64 << 20, 700)),
            Decision::Continue
        );
    }

    #[test]
    fn without_throttle_or_postcopy_a_tight_bound_aborts_at_the_first_stall() {
        let cfg = LadderConfig {
            downtime_ms: 50,
            max_downtime_ms: 50,
            allow_throttle: false,
            allow_postcopy: false,
            ..LadderConfig::default()
        };
        let mut l = Ladder::new(cfg, 0);
        let (a, t) = until_action(&mut l, 0, 700);
        assert!(matches!(a, Action::Abort { .. }), "{a:?}");
        assert_eq!(t, 10_000);
        assert_eq!(
            setup(l.config()).0,
            vec![
                ("events", true),
                ("x-ignore-shared", false),
                ("auto-converge", false),
                ("postcopy-ram", false),
                ("multifd", false)
            ]
        );
    }

    #[test]
    fn a_silent_link_aborts_at_once_even_with_postcopy_allowed() {
        let cfg = LadderConfig {
            allow_postcopy: true,
            link_silence_ms: 5_000,
            ..LadderConfig::default()
        };
        let mut l = Ladder::new(cfg, 0);
        let sample = |t: u64, sent: u64, remaining: u64| Sample {
            transferred: sent,
            ..active(t, remaining, 10)
        };
        // Sending steadily, remaining falling: nothing to do.
        for t in 0..10 {
            let d = l.observe(&sample(t * 1000, (t + 1) * (8 << 20), (100 - t * 8) << 20));
            assert_eq!(d, Decision::Continue, "at {t} s");
        }
        // The count stops: 4 s is not yet silence, 5 s is.
        for t in 10..14 {
            assert_eq!(
                l.observe(&sample(t * 1000, 80 << 20, 20 << 20)),
                Decision::Continue
            );
        }
        match l.observe(&sample(14_000, 80 << 20, 20 << 20)) {
            Decision::Act(Action::Abort { reason }) => {
                assert!(reason.contains("nothing was sent for 5000 ms"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Aborting: no second action, and never postcopy.
        assert_eq!(
            l.observe(&sample(20_000, 80 << 20, 20 << 20)),
            Decision::Continue
        );
        assert_ne!(l.rung(), Rung::Postcopy);
    }

    #[test]
    fn setup_caps_the_throttle_until_its_rung() {
        let (caps, params) = setup(&LadderConfig {
            allow_postcopy: true,
            bandwidth_bps: Some(32 << 20),
            ..LadderConfig::default()
        });
        assert_eq!(
            caps,
            vec![
                ("events", true),
                ("x-ignore-shared", false),
                ("auto-converge", true),
                ("postcopy-ram", true),
                ("multifd", false)
            ]
        );
        assert_eq!(params["max-cpu-throttle"], 1);
        assert_eq!(params["max-bandwidth"], 32 << 20);
        assert_eq!(params["downtime-limit"], 300);
        assert_eq!(
            Action::LiftThrottleCap.qmp().unwrap().1["max-cpu-throttle"],
            99
        );
    }

    #[test]
    fn the_completion_bound_goes_to_the_last_rung() {
        let cfg = LadderConfig {
            completion_timeout_ms: Some(5_000),
            allow_postcopy: true,
            ..LadderConfig::default()
        };
        let mut l = Ladder::new(cfg, 0);
        let mut remaining = 1u64 << 30;
        let mut got = None;
        for t in (0..10_000).step_by(500) {
            remaining = remaining * 9 / 10;
            if let Decision::Act(a) = l.observe(&active(t, remaining, 100)) {
                got = Some((a, t));
                break;
            }
        }
        assert_eq!(got, Some((Action::StartPostcopy, 5_000)));
    }

    #[test]
    fn setup_time_is_not_a_stall() {
        let mut l = Ladder::new(LadderConfig::default(), 0);
        for t in (0..60_000).step_by(1000) {
            let s = Sample {
                at_ms: t,
                status: Some(Status::Setup),
                ..Sample::default()
            };
            assert_eq!(l.observe(&s), Decision::Continue);
        }
        assert_eq!(l.observe(&active(61_000, 1 << 30, 100)), Decision::Continue);
    }

    #[test]
    fn config_errors_are_clear() {
        let bad = LadderConfig {
            downtime_ms: 500,
            max_downtime_ms: 100,
            ..LadderConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "the downtime bound (100 ms) is below the starting limit (500 ms)"
        );
        assert!(LadderConfig::default().validate().is_ok());
        assert!(LadderConfig {
            bandwidth_bps: Some(1000),
            ..LadderConfig::default()
        }
        .validate()
        .is_err());
    }

    fn status() -> impl Strategy<Value = Option<Status>> {
        prop_oneof![
            Just(Some(Status::Active)),
            Just(Some(Status::Active)),
            Just(Some(Status::Active)),
            Just(Some(Status::Setup)),
            Just(Some(Status::Postcopy)),
            Just(None),
        ]
    }

    proptest! {
        /// Whatever QEMU reports: the downtime limit only rises and never
        /// passes the bound, postcopy is asked for only when allowed, an
        /// abort with postcopy allowed is only for a dead link, and
        /// nothing is asked for after postcopy or an abort.
        #[test]
        fn the_ladder_only_climbs(
            samples in prop::collection::vec((0u64..5000, 0u64..(1 << 32), 0u64..5000, status()), 1..200),
            allow_postcopy in any::<bool>(),
            allow_throttle in any::<bool>(),
            max in 300u64..5000,
        ) {
            let cfg = LadderConfig { allow_postcopy, allow_throttle, max_downtime_ms: max, ..LadderConfig::default() };
            let mut l = Ladder::new(cfg, 0);
            let mut t = 0;
            let mut limit = 300;
            let mut ended = false;
            for (dt, remaining, expected, status) in samples {
                t += dt;
                let s = Sample { at_ms: t, status, remaining, expected_downtime_ms: Some(expected), ..Sample::default() };
                match l.observe(&s) {
                    Decision::Act(a) => {
                        prop_assert!(!ended, "acted after the last rung: {:?}", a);
                        match a {
                            Action::SetDowntime { ms } => {
                                prop_assert!(ms > limit && ms <= max);
                                limit = ms;
                            }
                            Action::LiftThrottleCap => prop_assert!(allow_throttle),
                            Action::StartPostcopy => { prop_assert!(allow_postcopy); ended = true; }
                            // A dead link aborts even where postcopy is
                            // allowed: postcopy over it would leave the
                            // guest on the destination without its memory.
                            Action::Abort { reason } => {
                                prop_assert!(!allow_postcopy || reason.starts_with("nothing was sent"), "{}", reason);
                                ended = true;
                            }
                        }
                    }
                    Decision::Continue => {}
                    Decision::Finished(_) => prop_assert!(false),
                }
                if status == Some(Status::Postcopy) { ended = true; }
            }
        }
    }
}
