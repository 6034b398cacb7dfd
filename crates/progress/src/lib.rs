//! The project's one progress module: long jobs (live migration now;
//! deployment, the initial replication copy and image builds next) report
//! through it, so every one of them shows progress the same way.
//!
//! - [`Tracker`]: the model, pure. Its fraction never goes backwards,
//!   even when a job's remaining work grows again (a migrating guest
//!   re-dirties pages), and it reaches 100 % only when the job says it is
//!   done — users' complaints about other tools are exactly progress that
//!   goes backwards and progress stuck at 99.99 %.
//! - [`Event`]: one reading, as a JSON line for `--json`.
//! - [`render_bar`]: the one-line text form, free of control characters.
//! - [`Reporter`]: the I/O side: a bar rewritten in place on a terminal,
//!   plain rate-limited lines when not a terminal, JSON lines with
//!   `--json`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
const MAX_UNFINISHED: f64 = 0.999;
/// Weight of the newest rate measurement in the moving average.
const RATE_WEIGHT: f64 = 0.3;

/// The progress model of one job.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    fraction: f64,
    done: u64,
    remaining: u64,
    last: Option<(u64, u64)>,
    rate: Option<f64>,
    finished: bool,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Takes a reading. A sample older than the last one, or a `done`
    /// counter that went backwards, changes nothing it cannot prove.
    pub fn observe(&mut self, s: Sample) {
        if let Some((at, _)) = self.last {
            if s.at_ms < at {
                return;
            }
        }
        let done = s.done.max(self.done);
        if let Some((at, prev_done)) = self.last {
            let dt = s.at_ms - at;
            if dt > 0 {
                let now = (done - prev_done) as f64 * 1000.0 / dt as f64;
                self.rate = Some(match self.rate {
                    Some(r) => r + RATE_WEIGHT * (now - r),
                    None => now,
                });
                self.last = Some((s.at_ms, done));
            }
        } else {
            self.last = Some((s.at_ms, done));
        }
        self.done = done;
        self.remaining = s.remaining;
        let total = done as f64 + s.remaining as f64;
        if total > 0.0 && !self.finished {
            let f = (done as f64 / total).min(MAX_UNFINISHED);
            self.fraction = self.fraction.max(f);
        }
    }

    /// The job is done: 100 % from now on.
    pub fn finish(&mut self) {
        self.finished = true;
        self.fraction = 1.0;
        self.remaining = 0;
    }

    /// In [0, 1], never decreasing; 1 only after [`Tracker::finish`].
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Units per second, smoothed; 0 before two readings.
    pub fn rate(&self) -> f64 {
        self.rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(0.0)
    }

    /// Time left at the current rate, if there is one.
    pub fn eta(&self) -> Option<Duration> {
        let r = self.rate();
        if r <= 0.0 || self.finished {
            return None;
        }
        let s = self.remaining as f64 / r;
        (s.is_finite() && s < 1e9).then(|| Duration::from_secs_f64(s))
    }

    /// An event of this job in state `running` (or `done` once finished).
    pub fn event(&self, job: &str, phase: &str) -> Event {
        Event {
            job: job.to_string(),
            phase: phase.to_string(),
            state: if self.finished { "done" } else { "running" }.to_string(),
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

/// One progress reading as scripts see it (`--json`: one per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub job: String,
    pub phase: String,
    /// `running`, `done`, `failed` or `cancelled`.
    pub state: String,
    pub fraction: f64,
    pub done: u64,
    pub remaining: u64,
    pub rate_bps: f64,
    pub eta_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Job-specific fields (a migration's rung, iteration, dirty rate).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

impl Event {
    /// The event as one JSON line (JSON has no NaN or infinity: such
    /// values are written as 0).
    pub fn to_json_line(&self) -> String {
        let mut e = self.clone();
        e.fraction = finite(e.fraction).clamp(0.0, 1.0);
        e.rate_bps = finite(e.rate_bps);
        e.eta_s = e.eta_s.filter(|s| s.is_finite());
        let mut line = serde_json::to_string(&e).unwrap_or_else(|_| "{}".to_string());
        line.push('\n');
        line
    }

    fn is_final(&self) -> bool {
        self.state != "running"
    }
}

/// Text from elsewhere (a VM's name, a peer's message), safe to print on
/// a terminal: control characters become `?`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            let u = c as u32;
            if u < 0x20 || u == 0x7f || (0x80..=0x9f).contains(&u) {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Bytes per second, as `12.0 MiB/s`.
pub fn human_rate(bps: f64) -> String {
    let bps = finite(bps).max(0.0);
    format!("{}/s", human_bytes(bps as u64))
}

/// The one-line form: `job [#####-----]  57.3%  12.0 MiB/s  ETA 3s  …`.
/// Never longer than `width` characters, never a control character.
pub fn render_bar(e: &Event, width: usize) -> String {
    const BAR: usize = 20;
    let f = finite(e.fraction).clamp(0.0, 1.0);
    let filled = (f * BAR as f64).round() as usize;
    let mut line = format!(
        "{} [{}{}] {:5.1}%",
        sanitize(&e.job),
        "#".repeat(filled),
        "-".repeat(BAR - filled),
        f * 100.0
    );
    if e.state == "running" {
        line.push_str(&format!("  {}", human_rate(e.rate_bps)));
        if let Some(eta) = e.eta_s.filter(|s| s.is_finite()) {
            line.push_str(&format!("  ETA {}s", eta.ceil() as u64));
        }
    } else {
        line.push_str(&format!("  {}", sanitize(&e.state)));
    }
    for (k, v) in &e.extra {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        line.push_str(&format!("  {}={}", sanitize(k), sanitize(&v)));
    }
    if let Some(m) = &e.message {
        line.push_str(&format!("  {}", sanitize(m)));
    }
    line.chars().take(width).collect()
}

/// How a [`Reporter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One line rewritten in place on a terminal.
    Terminal,
    /// Plain lines, at most one a second (logs, pipes).
    Lines,
    /// JSON lines on standard output.
    Json,
}

impl Mode {
    pub fn auto(json: bool) -> Mode {
        if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Lines
        }
    }
}

/// Writes a job's events.
pub struct Reporter {
    mode: Mode,
    out: Box<dyn Write + Send>,
    epoch: Instant,
    last_line_ms: Option<u64>,
    last_state: Option<String>,
    width: usize,
    open_line: bool,
}

impl Reporter {
    /// To standard error, or standard output for JSON.
    pub fn new(mode: Mode) -> Reporter {
        let out: Box<dyn Write + Send> = match mode {
            Mode::Json => Box::new(std::io::stdout()),
            _ => Box::new(std::io::stderr()),
        };
        Reporter::with_writer(mode, out)
    }

    pub fn with_writer(mode: Mode, out: Box<dyn Write + Send>) -> Reporter {
        Reporter {
            mode,
            out,
            epoch: Instant::now(),
            last_line_ms: None,
            last_state: None,
            width: 120,
            open_line: false,
        }
    }

    pub fn emit(&mut self, e: &Event) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.emit_at(e, now);
    }

    /// [`Reporter::emit`] at a given time (tests).
    pub fn emit_at(&mut self, e: &Event, now_ms: u64) {
        // Output is best effort: a closed terminal must not fail the job.
        let _ = match self.mode {
            Mode::Json => self.out.write_all(e.to_json_line().as_bytes()),
            Mode::Terminal => {
                self.open_line = !e.is_final();
                let end = if e.is_final() { "\n" } else { "" };
                write!(self.out, "\r{}\x1b[K{end}", render_bar(e, self.width))
            }
            Mode::Lines => {
                let changed = self.last_state.as_deref() != Some(e.state.as_str());
                let due = self
                    .last_line_ms
                    .is_none_or(|t| now_ms.saturating_sub(t) >= 1000);
                if changed || due {
                    self.last_line_ms = Some(now_ms);
                    self.last_state = Some(e.state.clone());
                    writeln!(self.out, "{}", render_bar(e, self.width))
                } else {
                    Ok(())
                }
            }
        };
        let _ = self.out.flush();
    }

    /// Ends an in-place line, so what follows starts on its own.
    pub fn finish(&mut self) {
        if self.open_line {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.open_line = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn s(done: u64, remaining: u64, at_ms: u64) -> Sample {
        Sample {
            done,
            remaining,
            at_ms,
        }
    }

    #[test]
    fn never_backwards_when_remaining_grows_and_never_100_before_done() {
        let mut t = Tracker::new();
        t.observe(s(50, 50, 0));
        assert_eq!(t.fraction(), 0.5);
        t.observe(s(60, 200, 1000)); // the guest re-dirtied pages
        assert_eq!(t.fraction(), 0.5);
        t.observe(s(1000, 0, 2000));
        assert!(t.fraction() < 1.0);
        t.finish();
        assert_eq!(t.fraction(), 1.0);
    }

    #[test]
    fn rate_and_eta_survive_odd_clocks() {
        let mut t = Tracker::new();
        assert_eq!(t.rate(), 0.0);
        assert_eq!(t.eta(), None);
        t.observe(s(0, 1000, 1000));
        t.observe(s(100, 900, 1000)); // same instant: no rate from it
        assert_eq!(t.rate(), 0.0);
        t.observe(s(200, 800, 2000));
        assert_eq!(t.rate(), 200.0);
        assert_eq!(t.eta(), Some(Duration::from_secs(4)));
        t.observe(s(900, 100, 500)); // from the past: ignored
        assert_eq!(t.rate(), 200.0);
        t.observe(s(100, 800, 3000)); // done went backwards: not believed
        assert_eq!(t.event("j", "p").done, 200);
    }

    #[test]
    fn json_lines_carry_the_extra_fields_flat() {
        let mut t = Tracker::new();
        t.observe(s(1, 3, 0));
        let mut e = t.event("migrate vm1", "memory");
        e.extra.insert("rung".into(), serde_json::json!("precopy"));
        e.rate_bps = f64::NAN;
        let line = e.to_json_line();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["rung"], "precopy");
        assert_eq!(v["fraction"], 0.25);
        assert_eq!(v["rate_bps"], 0.0);
        assert_eq!(v["state"], "running");
    }

    #[test]
    fn the_bar_is_plain_text_within_its_width() {
        let mut t = Tracker::new();
        t.observe(s(0, 100, 0));
        t.observe(s(50, 50, 1000));
        let mut e = t.event("vm\x1b[2J\u{9b}", "m");
        e.message = Some("bad\rthing".into());
        let bar = render_bar(&e, 200);
        assert!(
            bar.starts_with("vm?[2J? [##########----------]  50.0%  50 B/s  ETA 1s"),
            "{bar}"
        );
        assert!(!bar.chars().any(|c| (c as u32) < 0x20));
        assert_eq!(render_bar(&e, 10).chars().count(), 10);
    }

    #[test]
    fn lines_mode_writes_at_most_once_a_second_unless_the_state_changes() {
        let buf = Buf::default();
        let mut r = Reporter::with_writer(Mode::Lines, Box::new(buf.clone()));
        let mut t = Tracker::new();
        t.observe(s(1, 9, 0));
        let e = t.event("j", "p");
        r.emit_at(&e, 0);
        r.emit_at(&e, 500);
        r.emit_at(&e, 999);
        r.emit_at(&e, 1000);
        let mut done = e.clone();
        done.state = "done".into();
        r.emit_at(&done, 1001);
        assert_eq!(buf.text().lines().count(), 3, "{}", buf.text());
        assert!(!buf.text().contains('\x1b'));
    }

    #[test]
    fn terminal_mode_rewrites_one_line_and_ends_it() {
        let buf = Buf::default();
        let mut r = Reporter::with_writer(Mode::Terminal, Box::new(buf.clone()));
        let e = Tracker::new().event("j", "p");
        r.emit_at(&e, 0);
        r.emit_at(&e, 10);
        r.finish();
        let text = buf.text();
        assert_eq!(text.matches('\r').count(), 2);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_rate(f64::INFINITY), "0 B/s");
    }

    proptest! {
        #[test]
        fn fraction_is_monotone_bounded_and_short_of_one(
            samples in prop::collection::vec((any::<u64>(), any::<u64>(), 0u64..1_000_000), 0..100)
        ) {
            let mut t = Tracker::new();
            let mut last = 0.0;
            for (d, r, at) in samples {
                t.observe(s(d >> 1, r >> 1, at));
                let f = t.fraction();
                prop_assert!(f >= last && (0.0..1.0).contains(&f));
                last = f;
                let _ = t.eta();
                prop_assert!(t.rate().is_finite());
            }
        }

        #[test]
        fn the_bar_never_carries_control_characters(job in any::<String>(), msg in any::<String>(), f in any::<f64>()) {
            let mut e = Tracker::new().event(&job, "p");
            e.fraction = f;
            e.message = Some(msg);
            let bar = render_bar(&e, 80);
            prop_assert!(!bar.chars().any(|c| (c as u32) < 0x20 || c as u32 == 0x7f));
            prop_assert!(bar.chars().count() <= 80);
        }
    }
}
