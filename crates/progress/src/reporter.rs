//! The I/O side: where and how often events are written.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::event::Event;
use crate::render::render_bar;

/// Lines mode writes at most this often while nothing but the numbers
/// change: a log of a long job stays readable.
const LINE_INTERVAL_MS: u64 = 1000;

/// How a [`Reporter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One line rewritten in place on a terminal (standard error).
    Terminal,
    /// Plain lines, at most one a second unless the state or phase
    /// changes (standard error that is a log or a pipe).
    Lines,
    /// One JSON line per event on standard output (`--json`).
    Json,
}

impl Mode {
    /// JSON if asked for; otherwise a bar only where a person is looking,
    /// because `\r` and escape codes make a mess of logs.
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

/// The terminal's width from `COLUMNS` if the shell exported it, else 80;
/// one less, so the line never reaches the last column and wraps (after a
/// wrap, `\r` rewrites only the last row and old bars pile up).
fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c > 1)
        .unwrap_or(80)
        - 1
}

/// Writes a job's events.
pub struct Reporter {
    mode: Mode,
    out: Box<dyn Write + Send>,
    epoch: Instant,
    width: usize,
    /// Lines mode: when the last line was written, in which state and phase.
    last_line: Option<(u64, String, String)>,
    /// Terminal mode: a bar is on screen without its newline.
    open_line: bool,
}

impl Reporter {
    /// To standard error, or standard output for JSON (so scripts can
    /// read events without the human text).
    pub fn new(mode: Mode) -> Reporter {
        let out: Box<dyn Write + Send> = match mode {
            Mode::Json => Box::new(std::io::stdout()),
            Mode::Terminal | Mode::Lines => Box::new(std::io::stderr()),
        };
        Reporter::with_writer(mode, out)
    }

    /// To any writer (tests, a log file).
    pub fn with_writer(mode: Mode, out: Box<dyn Write + Send>) -> Reporter {
        let width = match mode {
            Mode::Terminal => terminal_width(),
            // A log keeps the whole message of a failure.
            Mode::Lines | Mode::Json => usize::MAX,
        };
        Reporter {
            mode,
            out,
            epoch: Instant::now(),
            width,
            last_line: None,
            open_line: false,
        }
    }

    /// Lines no longer than `width` characters.
    pub fn with_width(mut self, width: usize) -> Reporter {
        self.width = width;
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Writes `e` (or not, in Lines mode, if a line went out less than a
    /// second ago and the state and phase are unchanged).
    pub fn emit(&mut self, e: &Event) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.emit_at(e, now);
    }

    /// [`Reporter::emit`] at `now_ms` on the caller's clock, so the rate
    /// limit can be tested.
    pub fn emit_at(&mut self, e: &Event, now_ms: u64) {
        // Output is best effort: a closed terminal or pipe must not fail
        // the job it reports on.
        let _ = match self.mode {
            Mode::Json => self.out.write_all(e.to_json_line().as_bytes()),
            Mode::Terminal => {
                let end = if e.is_final() { "\n" } else { "" };
                self.open_line = !e.is_final();
                write!(self.out, "\r{}\x1b[K{end}", render_bar(e, self.width))
            }
            Mode::Lines => {
                let due = match &self.last_line {
                    None => true,
                    Some((at, state, phase)) => {
                        *state != e.state
                            || *phase != e.phase
                            || now_ms.saturating_sub(*at) >= LINE_INTERVAL_MS
                    }
                };
                if due {
                    self.last_line = Some((now_ms, e.state.clone(), e.phase.clone()));
                    writeln!(self.out, "{}", render_bar(e, self.width))
                } else {
                    Ok(())
                }
            }
        };
        let _ = self.out.flush();
    }

    /// Ends a bar left on screen, so what is printed next (the result, an
    /// error) starts on a line of its own. Also done on drop.
    pub fn finish(&mut self) {
        if self.open_line {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.open_line = false;
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{CANCELLED, DONE, FAILED};
    use crate::tracker::{Sample, Tracker};
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

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
    }

    fn event() -> Event {
        let mut t = Tracker::new();
        t.observe(Sample {
            done: 1,
            remaining: 9,
            at_ms: 0,
        });
        t.event("migrate \x1b]0;pwned\x07vm1\u{9b}", "memory")
    }

    fn reporter(mode: Mode) -> (Reporter, Buf) {
        let buf = Buf::default();
        let r = Reporter::with_writer(mode, Box::new(buf.clone()));
        (r, buf)
    }

    #[test]
    fn auto_picks_json_when_asked() {
        assert_eq!(Mode::auto(true), Mode::Json);
        assert_ne!(Mode::auto(false), Mode::Json);
    }

    #[test]
    fn lines_mode_writes_at_most_once_a_second_unless_the_state_changes() {
        let (mut r, buf) = reporter(Mode::Lines);
        let e = event();
        for at in [0, 500, 999, 1000, 1500, 1999, 2000] {
            r.emit_at(&e, at);
        }
        assert_eq!(buf.text().lines().count(), 3, "{}", buf.text());
        let mut done = e.clone();
        done.state = DONE.into();
        r.emit_at(&done, 2001);
        assert_eq!(buf.text().lines().count(), 4, "{}", buf.text());
        assert!(buf.text().lines().last().unwrap().contains("done"));
    }

    #[test]
    fn lines_mode_writes_a_phase_change_at_once() {
        let (mut r, buf) = reporter(Mode::Lines);
        let e = event();
        r.emit_at(&e, 0);
        let mut next = e.clone();
        next.phase = "switchover".into();
        r.emit_at(&next, 10);
        r.emit_at(&next, 20);
        assert_eq!(buf.text().lines().count(), 2, "{}", buf.text());
    }

    #[test]
    fn lines_mode_is_plain_text() {
        let (mut r, buf) = reporter(Mode::Lines);
        let mut e = event();
        e.message = Some("x".repeat(300));
        r.emit_at(&e, 0);
        let mut failed = e.clone();
        failed.state = FAILED.into();
        r.emit_at(&failed, 1);
        r.finish();
        drop(r);
        let text = buf.text();
        assert!(text.ends_with('\n'));
        // Whole lines: a log keeps a long failure message.
        assert!(text.lines().all(|l| l.ends_with(&"x".repeat(300))));
        assert!(!text
            .chars()
            .any(|c| c != '\n' && ((c as u32) < 0x20 || c as u32 == 0x7f)));
    }

    #[test]
    fn terminal_mode_rewrites_one_line_and_ends_it_on_finish() {
        let (r, buf) = reporter(Mode::Terminal);
        let mut r = r.with_width(40);
        let e = event();
        r.emit_at(&e, 0);
        r.emit_at(&e, 10);
        assert!(!buf.text().contains('\n'));
        r.finish();
        r.finish();
        let text = buf.text();
        assert_eq!(text.matches('\r').count(), 2);
        assert_eq!(text.matches("\x1b[K").count(), 2);
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with("\x1b[K\n"));
        for bar in text.split('\r').filter(|s| !s.is_empty()) {
            let bar = bar.trim_end_matches('\n').trim_end_matches("\x1b[K");
            assert!(bar.starts_with("migrate ?]...  [#---"), "{bar:?}");
            assert!(bar.chars().count() <= 40, "{bar:?}");
            assert!(!bar.chars().any(|c| c.is_control()), "{bar:?}");
        }
    }

    #[test]
    fn terminal_mode_final_event_ends_its_line() {
        let (mut r, buf) = reporter(Mode::Terminal);
        let mut e = event();
        r.emit_at(&e, 0);
        e.state = CANCELLED.into();
        r.emit_at(&e, 1);
        r.finish();
        drop(r);
        let text = buf.text();
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with("cancelled\x1b[K\n"), "{text:?}");
    }

    #[test]
    fn dropping_a_reporter_ends_the_line() {
        let (mut r, buf) = reporter(Mode::Terminal);
        r.emit_at(&event(), 0);
        drop(r);
        assert!(buf.text().ends_with('\n'));
    }

    #[test]
    fn json_mode_writes_every_event_as_a_line() {
        let (mut r, buf) = reporter(Mode::Json);
        let e = event();
        r.emit_at(&e, 0);
        r.emit_at(&e, 0);
        r.finish();
        drop(r);
        let text = buf.text();
        assert_eq!(text.lines().count(), 2);
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["job"], "migrate \x1b]0;pwned\x07vm1\u{9b}");
        }
        assert!(
            !text.chars().any(|c| c != '\n' && c.is_control()),
            "{text:?}"
        );
    }

    #[test]
    fn a_broken_writer_does_not_fail_the_job() {
        for mode in [Mode::Terminal, Mode::Lines, Mode::Json] {
            let mut r = Reporter::with_writer(mode, Box::new(Broken));
            r.emit_at(&event(), 0);
            r.emit(&event());
            r.finish();
        }
    }
}
