//! The dirtying load, the measurement window, and its statistics.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

use super::qmp::{pauses_between, Qmp};
use super::{PauseOptions, SideResult, DIRTY_BUFFER_PAGES};
use crate::{exchange_at, stats_ms, topology};

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(super) fn summarize(mut pauses: Vec<f64>, window_s: f64, dirtied_pages: u64) -> SideResult {
    SideResult {
        checkpoints: pauses.len(),
        checkpoints_per_s: pauses.len() as f64 / window_s,
        pause_p50_ms: stats_ms(&mut pauses, 50.0),
        pause_p99_ms: stats_ms(&mut pauses, 99.0),
        pause_max_ms: pauses.last().copied().unwrap_or(0.0),
        dirtied_mib_s: dirtied_pages as f64 * 4096.0 / (1 << 20) as f64 / window_s,
        ..SideResult::default()
    }
}

// ---------------------------------------------------------------- load

/// The dirtying client: `DIRTY pages` once per epoch on one connection.
struct Load {
    stop: Arc<AtomicBool>,
    pages: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>,
}

impl Load {
    fn start(ns: &str, port: u16, pages: u64, period: Duration) -> anyhow::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let thread = topology::spawn_in_ns(ns, move || -> anyhow::Result<()> {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .context("connecting to the guest service")?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut w = s;
            let mut line = String::new();
            let mut next = Instant::now();
            let hard_stop = Instant::now() + Duration::from_secs(3600);
            while !flag.load(Ordering::SeqCst) && Instant::now() < hard_stop {
                writeln!(w, "DIRTY {pages}")?;
                line.clear();
                r.read_line(&mut line).context("waiting for DIRTIED")?;
                if !line.starts_with("DIRTIED") {
                    bail!("the guest answered {:?} to DIRTY {pages}", line.trim());
                }
                count.fetch_add(pages, Ordering::SeqCst);
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    // Behind (the guest was paused): no catch-up burst.
                    next = now;
                }
            }
            Ok(())
        })?;
        Ok(Load {
            stop,
            pages: done,
            thread,
        })
    }

    /// Stops the client and reports how it ended.
    fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow!("the load thread panicked"))??
    }
}

/// Pages per `DIRTY` request for `mib_s` at one request per epoch.
fn pages_per_epoch(mib_s: u64, epoch_ms: u64) -> u64 {
    (mib_s * 256 * epoch_ms / 1000).clamp(1, DIRTY_BUFFER_PAGES)
}

/// Runs the load (if any) while `qmp` collects events for `seconds`;
/// returns the window's pauses and the pages dirtied in it.
pub(super) fn measure(
    qmp: &mut Qmp,
    ns: &str,
    port: u16,
    o: &PauseOptions,
    dirty_mib_s: u64,
) -> anyhow::Result<(Vec<f64>, f64, u64)> {
    // Settle: the first checkpoints after the start are not steady state.
    qmp.collect_until(Instant::now() + Duration::from_secs(1))?;
    let load = if dirty_mib_s > 0 {
        Some(Load::start(
            ns,
            port,
            pages_per_epoch(dirty_mib_s, o.epoch_ms),
            Duration::from_millis(o.epoch_ms),
        )?)
    } else {
        None
    };
    let from = now_s();
    let t0 = Instant::now();
    let base = load
        .as_ref()
        .map(|l| l.pages.load(Ordering::SeqCst))
        .unwrap_or(0);
    let res = qmp.collect_until(t0 + Duration::from_secs(o.seconds));
    let window = t0.elapsed().as_secs_f64();
    let to = now_s();
    let pages = load
        .as_ref()
        .map(|l| l.pages.load(Ordering::SeqCst) - base)
        .unwrap_or(0);
    let ended = load.map(Load::finish).unwrap_or(Ok(()));
    res?;
    ended.context("the dirtying client")?;
    Ok((pauses_between(&qmp.events, from, to), window, pages))
}

/// Faults in the guest's whole dirty buffer before any checkpointing, so
/// neither system replicates first-touch allocation during the window.
pub(super) fn warm_up(ns: &str, port: u16) -> anyhow::Result<()> {
    let addr = format!("127.0.0.1:{port}");
    topology::spawn_in_ns(ns, move || -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match exchange_at(&addr, "PING", Duration::from_secs(2)) {
                Ok(r) if r == "PONG" => break,
                _ if Instant::now() > deadline => {
                    bail!("the guest service is not reachable at {addr}")
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        let r = exchange_at(
            &addr,
            &format!("DIRTY {DIRTY_BUFFER_PAGES}"),
            Duration::from_secs(60),
        )?;
        if !r.starts_with("DIRTIED") {
            bail!("the guest answered {r:?} to DIRTY");
        }
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow!("warm-up thread panicked"))??
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_rate_becomes_pages_per_epoch() {
        assert_eq!(pages_per_epoch(16, 50), 204);
        assert_eq!(pages_per_epoch(64, 50), 819);
        assert_eq!(pages_per_epoch(1, 10), 2);
        assert_eq!(pages_per_epoch(0, 50), 1);
        assert_eq!(pages_per_epoch(10_000, 1000), DIRTY_BUFFER_PAGES);
    }
}
