//! The client's side of a run, from the client namespace: the gap probe
//! (`PING` every 10 ms) and the dirtying load (`DIRTY`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use parking_lot::Mutex;

use super::{check_interrupted, interrupted, DIRTY_BUFFER_PAGES};
use crate::checker::{service_window, Probe as Answer};
use crate::topology::{spawn_in_ns, GUEST_IP};

/// The probe's request period.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(10);
/// No client thread outlives this, stopped or not.
const HARD_STOP: Duration = Duration::from_secs(1800);

fn guest() -> anyhow::Result<SocketAddr> {
    Ok(format!("{GUEST_IP}:7070").parse()?)
}

/// `PING` every [`PROBE_EVERY`] on one TCP connection, pipelined (a
/// request does not wait for the previous reply), each reply's arrival
/// timed. A lost segment is recovered by TCP (fast retransmit from the
/// stream of later requests, or the retransmission timer): that recovery
/// is part of what a client sees, so it is part of the gap. A broken
/// connection is opened again.
pub(super) struct Probe {
    stop: Arc<AtomicBool>,
    /// Arrival of each reply, ms after `base`.
    replies: Arc<Mutex<Vec<f64>>>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Probe {
    pub(super) fn start(ns: &str, base: Instant) -> anyhow::Result<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let (flag, out) = (stop.clone(), replies.clone());
        let addr = guest()?;
        let thread = spawn_in_ns(ns, move || {
            let hard = Instant::now() + HARD_STOP;
            while !flag.load(Ordering::SeqCst) && Instant::now() < hard {
                let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                ping_until_broken(s, &flag, hard, base, &out);
            }
        })?;
        Ok(Probe {
            stop,
            replies,
            thread,
        })
    }

    /// Waits for `n` replies in all.
    pub(super) fn wait_replies(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.replies.lock().len() < n {
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("fewer than {n} replies to PING within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The arrival of the `n`th reply after `t_ms`, if it comes within
    /// `timeout`.
    pub(super) fn wait_replies_after(&self, t_ms: f64, n: usize, timeout: Duration) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(&at) = self
                .replies
                .lock()
                .iter()
                .filter(|&&at| at > t_ms)
                .nth(n.saturating_sub(1))
            {
                return Some(at);
            }
            if Instant::now() > deadline || interrupted() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the client: the arrival of every reply, ms after `base`.
    pub(super) fn stop(self) -> Vec<f64> {
        self.stop.store(true, Ordering::SeqCst);
        // (A failed thread only loses replies, which the gap then shows.)
        let _ = self.thread.join();
        let mut v = std::mem::take(&mut *self.replies.lock());
        v.sort_by(f64::total_cmp);
        v
    }
}

/// One connection of the probe, until it breaks or the probe stops.
fn ping_until_broken(
    s: TcpStream,
    stop: &AtomicBool,
    hard: Instant,
    base: Instant,
    out: &Mutex<Vec<f64>>,
) {
    if s.set_nodelay(true).is_err() || s.set_write_timeout(Some(Duration::from_secs(1))).is_err() {
        return;
    }
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = s;
    let mut buf = [0u8; 512];
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) && Instant::now() < hard {
        let now = Instant::now();
        if now >= next {
            if w.write_all(b"PING\n").is_err() {
                return;
            }
            next += PROBE_EVERY;
            if next < now {
                // Behind (a slow write): no burst to catch up.
                next = now + PROBE_EVERY;
            }
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if r.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let at = base.elapsed().as_secs_f64() * 1e3;
                let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                out.lock().extend(std::iter::repeat_n(at, lines));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// The longest gaps the client saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Gaps {
    /// From the last reply at or before the start to `after` (the service
    /// after the migration; without it, 10 s past the end).
    pub(super) across_ms: f64,
    /// In the `warm` window just before the start.
    pub(super) before_ms: f64,
}

/// The gaps in the reply arrivals `replies` (ms, sorted) around a
/// migration from `t_start` to `t_end`.
pub(super) fn gaps(
    replies: &[f64],
    t_start: f64,
    t_end: f64,
    after: Option<f64>,
    warm: Duration,
) -> Gaps {
    let answers: Vec<Answer> = replies
        .iter()
        .map(|&at| Answer {
            at_ms: at,
            latency_ms: 0.0,
            ok: true,
        })
        .collect();
    let from = replies
        .iter()
        .copied()
        .filter(|&at| at <= t_start)
        .fold(None, |_, at| Some(at))
        .unwrap_or(t_start);
    let to = after.unwrap_or(t_end + 10_000.0).max(from);
    let warm_ms = warm.as_secs_f64() * 1e3;
    Gaps {
        across_ms: service_window(&answers, from, to).during_longest_gap_ms,
        before_ms: service_window(&answers, t_start - warm_ms, t_start).during_longest_gap_ms,
    }
}

/// The dirtying load: `DIRTY 8192` (the guest service rewrites its whole
/// 32 MiB buffer, every page) every 32/N seconds on one connection, so
/// the guest rewrites N MiB of distinct pages per second on average. A
/// request still running when the next is due delays it (no catch-up
/// burst): a guest that cannot keep up dirties less, which QEMU's reading
/// then shows.
pub(super) struct Load {
    stop: Arc<AtomicBool>,
    /// Each answered request: when it was sent and answered, ms after the
    /// load's start.
    answered: Arc<Mutex<Vec<(f64, f64)>>>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

/// What the load got done.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct LoadDone {
    pub(super) requests: u64,
    /// MiB of distinct pages rewritten per second, from the spacing of the
    /// requests the guest answered: (n − 1) × 32 MiB over the time from
    /// the first request sent to the last one sent. The asked rate when
    /// the guest keeps up; less when a request outlasts its period.
    pub(super) achieved_mib_s: Option<f64>,
    /// The longest a `DIRTY` request took, ms.
    pub(super) request_max_ms: f64,
}

impl LoadDone {
    fn from_requests(done: &[(f64, f64)]) -> LoadDone {
        let mib = (DIRTY_BUFFER_PAGES * 4096) as f64 / (1u64 << 20) as f64;
        let achieved = match (done.first(), done.last()) {
            (Some(first), Some(last)) if done.len() >= 2 && last.0 > first.0 => {
                Some((done.len() - 1) as f64 * mib / ((last.0 - first.0) / 1e3))
            }
            _ => None,
        };
        LoadDone {
            requests: done.len() as u64,
            achieved_mib_s: achieved,
            request_max_ms: done.iter().map(|(s, a)| a - s).fold(0.0, f64::max),
        }
    }
}

impl Load {
    pub(super) fn start(ns: &str, mib_s: u64) -> anyhow::Result<Load> {
        if mib_s == 0 {
            return Err(anyhow!("a load of 0 MiB/s is no load"));
        }
        let period =
            Duration::from_secs_f64((DIRTY_BUFFER_PAGES * 4096) as f64 / (mib_s << 20) as f64);
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let (flag, done) = (stop.clone(), answered.clone());
        let t0 = Instant::now();
        let ms = move || t0.elapsed().as_secs_f64() * 1e3;
        let addr = guest()?;
        let thread = spawn_in_ns(ns, move || {
            let hard = Instant::now() + HARD_STOP;
            let request = format!("DIRTY {DIRTY_BUFFER_PAGES}\n");
            let mut next = Instant::now();
            'connect: while !flag.load(Ordering::SeqCst) && Instant::now() < hard {
                let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                if s.set_read_timeout(Some(Duration::from_millis(100)))
                    .is_err()
                {
                    continue;
                }
                loop {
                    if flag.load(Ordering::SeqCst) || Instant::now() > hard {
                        break 'connect;
                    }
                    let sent = ms();
                    if s.write_all(request.as_bytes()).is_err() {
                        continue 'connect;
                    }
                    match read_line(&mut s, &flag, Duration::from_secs(60)) {
                        Some(l) if l.starts_with("DIRTIED") => {
                            done.lock().push((sent, ms()));
                        }
                        _ => continue 'connect,
                    }
                    next += period;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    while Instant::now() < next && !flag.load(Ordering::SeqCst) {
                        std::thread::sleep(
                            next.saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(50)),
                        );
                    }
                }
            }
        })?;
        Ok(Load {
            stop,
            answered,
            thread,
        })
    }

    /// Stops the load: what the guest got done.
    pub(super) fn finish(self) -> LoadDone {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        let done = self.answered.lock();
        LoadDone::from_requests(&done)
    }
}

/// One reply line (read timeout set by the caller), or `None` on EOF, an
/// error, `bound`, or `stop`.
fn read_line(s: &mut TcpStream, stop: &AtomicBool, bound: Duration) -> Option<String> {
    let deadline = Instant::now() + bound;
    let mut line = Vec::new();
    let mut b = [0u8; 64];
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        match s.read(&mut b) {
            Ok(0) => return None,
            Ok(n) => {
                line.extend_from_slice(&b[..n]);
                if let Some(i) = line.iter().position(|&c| c == b'\n') {
                    return Some(String::from_utf8_lossy(&line[..i]).into_owned());
                }
                if line.len() > 4096 {
                    return None;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_runs_from_the_last_reply_before_to_the_service_after() {
        // Replies every 10 ms until 1000, a hole, then every 10 ms from 1450.
        let mut r: Vec<f64> = (0..=100).map(|i| i as f64 * 10.0).collect();
        r.extend((0..50).map(|i| 1450.0 + i as f64 * 10.0));
        let g = gaps(&r, 1005.0, 1300.0, Some(1640.0), Duration::from_millis(500));
        assert!((g.across_ms - 450.0).abs() < 1e-9, "{g:?}");
        assert!((g.before_ms - 10.0).abs() < 1e-9, "{g:?}");
    }

    #[test]
    fn the_achieved_rate_comes_from_the_requests_spacing() {
        // Asked 16 MiB/s (every 2 s); the third request came late.
        let d = LoadDone::from_requests(&[(0.0, 90.0), (2000.0, 2100.0), (5000.0, 5300.0)]);
        assert_eq!(d.requests, 3);
        assert!(
            (d.achieved_mib_s.unwrap() - 64.0 / 5.0).abs() < 1e-9,
            "{d:?}"
        );
        assert!((d.request_max_ms - 300.0).abs() < 1e-9);
        assert_eq!(LoadDone::from_requests(&[(0.0, 1.0)]).achieved_mib_s, None);
    }

    #[test]
    fn a_client_never_served_again_sees_the_whole_bound() {
        let r: Vec<f64> = (0..=100).map(|i| i as f64 * 10.0).collect();
        let g = gaps(&r, 1000.0, 2000.0, None, Duration::from_millis(500));
        assert!((g.across_ms - 11_000.0).abs() < 1e-9, "{g:?}");
    }

    #[test]
    fn no_reply_before_the_start_counts_from_the_start() {
        let r = [1100.0, 1110.0];
        let g = gaps(&r, 1000.0, 1050.0, Some(1110.0), Duration::from_millis(500));
        assert!((g.across_ms - 100.0).abs() < 1e-9, "{g:?}");
        assert!((g.before_ms - 500.0).abs() < 1e-9, "{g:?}");
    }
}
