//! A minimal blocking QMP client that records the primary QEMU's
//! STOP/RESUME events: the pause is measured from them, the same way for
//! tandem and for COLO.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::check_interrupted;

/// A pause this long means the checkpointing is stuck.
const STALL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub(super) struct PauseEvent {
    stop: bool,
    /// QEMU's timestamp, seconds since the epoch.
    at: f64,
}

/// A minimal blocking QMP client: commands, and the STOP/RESUME events
/// that arrive in between.
pub(super) struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    partial: String,
    pub(super) events: Vec<PauseEvent>,
    what: String,
}

impl Qmp {
    pub(super) fn connect(path: &Path, timeout: Duration, what: &str) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            check_interrupted()?;
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("{what}: connecting to QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut q = Qmp {
            rd: BufReader::new(s.try_clone()?),
            wr: s,
            partial: String::new(),
            events: Vec::new(),
            what: what.to_string(),
        };
        let t = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = q.read_msg()? {
                if m.get("QMP").is_none() {
                    bail!("{what}: unexpected QMP greeting {m}");
                }
                break;
            }
            if Instant::now() > t {
                bail!("{what}: no QMP greeting within 10 s");
            }
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// One message, or `None` when nothing arrived within the read timeout.
    fn read_msg(&mut self) -> anyhow::Result<Option<Value>> {
        match self.rd.read_line(&mut self.partial) {
            Ok(0) => bail!("{}: QMP connection closed (QEMU exited?)", self.what),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                let v: Value = serde_json::from_str(&line)
                    .with_context(|| format!("{}: bad QMP message {line:?}", self.what))?;
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    if name == "STOP" || name == "RESUME" {
                        let ts = &v["timestamp"];
                        let at = ts["seconds"].as_f64().unwrap_or(0.0)
                            + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                        self.events.push(PauseEvent {
                            stop: name == "STOP",
                            at,
                        });
                    }
                }
                Ok(Some(v))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("{}: reading QMP", self.what)),
        }
    }

    pub(super) fn execute(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.wr, "{}", json!({"execute": cmd, "arguments": args}))
            .with_context(|| format!("{}: sending {cmd}", self.what))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(m) = self.read_msg()? {
                if let Some(r) = m.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = m.get("error") {
                    bail!(
                        "{}: QMP {cmd}: {}",
                        self.what,
                        e.get("desc").and_then(Value::as_str).unwrap_or("error")
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: QMP {cmd} not answered within 20 s (QEMU hung?)",
                    self.what
                );
            }
        }
    }

    /// Reads (and records) events until `until`. Fails if the guest stays
    /// stopped for [`STALL`]: a checkpoint that never ends (a COLO
    /// secondary that failed leaves its primary stopped for good: COLO
    /// has no heartbeat).
    pub(super) fn collect_until(&mut self, until: Instant) -> anyhow::Result<()> {
        let mut last = (self.events.len(), Instant::now());
        while Instant::now() < until {
            check_interrupted()?;
            self.read_msg()?;
            if self.events.len() != last.0 {
                last = (self.events.len(), Instant::now());
            } else if self.events.last().is_some_and(|e| e.stop) && last.1.elapsed() > STALL {
                bail!(
                    "{}: the guest has been stopped for over {STALL:?} (a checkpoint that never ends)",
                    self.what
                );
            }
        }
        Ok(())
    }
}

/// Pauses (ms) whose STOP and RESUME both fall in `[from, to]`.
pub(super) fn pauses_between(events: &[PauseEvent], from: f64, to: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut stopped = None;
    for e in events {
        if e.stop {
            stopped = Some(e.at);
        } else if let Some(s) = stopped.take() {
            if s >= from && e.at <= to {
                out.push((e.at - s) * 1e3);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(stop: bool, at: f64) -> PauseEvent {
        PauseEvent { stop, at }
    }

    #[test]
    fn pauses_pair_stop_with_the_next_resume_inside_the_window() {
        let events = [
            ev(true, 9.0),
            ev(false, 10.5), // starts before the window
            ev(true, 11.0),
            ev(false, 11.002),
            ev(false, 11.5), // RESUME without STOP
            ev(true, 12.0),
            ev(true, 12.1), // a second STOP restarts the pause
            ev(false, 12.104),
            ev(true, 19.9),
            ev(false, 20.5), // ends after the window
        ];
        let p = pauses_between(&events, 10.0, 20.0);
        assert_eq!(p.len(), 2);
        assert!((p[0] - 2.0).abs() < 1e-6);
        assert!((p[1] - 4.0).abs() < 1e-6);
    }
}
