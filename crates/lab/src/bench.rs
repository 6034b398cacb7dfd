//! `tandem bench throughput`: how much a protected guest can still do.
//!
//! On the drill's topology, the guest runs fixed amounts of CPU-bound work
//! (`SPIN`) and memory-dirtying work (`DIRTY`); the client times each from
//! outside (the guest's own clock stops during epoch pauses, so only wall
//! time tells). Unprotected first, then protected at each epoch length, in
//! one run, so the ratios compare like with like.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde::Serialize;

use crate::stats_ms;
use crate::{bring_up, exchange, ft_backup, ft_primary, protect, topology, wait_for, DrillOptions};

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    /// `None`: unprotected.
    pub epoch_ms: Option<u64>,
    pub spin_ms_median: f64,
    pub dirty_ms_median: f64,
    /// Unprotected time / this time (1.0 = no slowdown).
    pub spin_ratio: f64,
    pub dirty_ratio: f64,
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub epochs_per_s: f64,
}

/// Tears a bench's site down and removes its work directory (daemon logs,
/// the drill disk). A failed bench returns early and keeps it as evidence.
fn finish(site: crate::Site) {
    let work = site.work.clone();
    drop(site);
    let _ = std::fs::remove_dir_all(&work);
}

/// Runs each workload `reps` times and returns the median wall time (ms).
fn time_work(ns: &str, line: String, want: &'static str, reps: usize) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..reps {
        let l = line.clone();
        let (reply, ms) = topology::spawn_in_ns(ns, move || {
            let t = Instant::now();
            let r = exchange(&l, Duration::from_secs(120));
            (r, t.elapsed().as_secs_f64() * 1e3)
        })?
        .join()
        .map_err(|_| anyhow!("workload thread panicked"))??;
        let reply = reply?;
        if !reply.starts_with(want) {
            bail!("guest answered {reply:?} to {line:?}");
        }
        times.push(ms);
    }
    Ok(stats_ms(&mut times, 50.0))
}

pub fn throughput(
    opts: &DrillOptions,
    epochs: &[u64],
    spin: u64,
    dirty: u64,
    reps: usize,
    mut say: impl FnMut(&str),
) -> anyhow::Result<Vec<ThroughputRow>> {
    let tag = format!("{}t", std::process::id() % 100_000);
    let site = bring_up(opts, &tag)?;
    let ns = site.topo.c.clone();
    let spin_line = format!("SPIN {spin}");
    let dirty_line = format!("DIRTY {dirty}");
    // The first DIRTY touches fresh guest pages (allocation faults) and the
    // first SPIN warms TCG's translation cache; neither belongs in a ratio.
    say("warming up the guest");
    time_work(&ns, spin_line.clone(), "SPUN", 1)?;
    time_work(&ns, dirty_line.clone(), "DIRTIED", 1)?;
    say("measuring the unprotected guest");
    let base_spin = time_work(&ns, spin_line.clone(), "SPUN", reps)?;
    let base_dirty = time_work(&ns, dirty_line.clone(), "DIRTIED", reps)?;
    let mut rows = vec![ThroughputRow {
        epoch_ms: None,
        spin_ms_median: base_spin,
        dirty_ms_median: base_dirty,
        spin_ratio: 1.0,
        dirty_ratio: 1.0,
        pause_p50_ms: 0.0,
        pause_p99_ms: 0.0,
        epochs_per_s: 0.0,
    }];
    for &e in epochs {
        say(&format!("protecting with {e} ms epochs"));
        protect(&site.a, &site.b, &site.repl, opts, e)?;
        let s = time_work(&ns, spin_line.clone(), "SPUN", reps)?;
        let d = time_work(&ns, dirty_line.clone(), "DIRTIED", reps)?;
        let st = ft_primary(&site.a)?;
        rows.push(ThroughputRow {
            epoch_ms: Some(e),
            spin_ms_median: s,
            dirty_ms_median: d,
            spin_ratio: base_spin / s,
            dirty_ratio: base_dirty / d,
            pause_p50_ms: st.pause_p50_ms,
            pause_p99_ms: st.pause_p99_ms,
            epochs_per_s: st.epochs_per_s,
        });
        let _: tandem_api::FtStatus =
            crate::block_on(site.a.api().post("/v1/vms/drill/unprotect", &()))?;
        wait_for("backup released", Duration::from_secs(30), || {
            (ft_backup(&site.b).ok()?.state.as_str() == "stopped").then_some(())
        })?;
    }
    finish(site);
    Ok(rows)
}

/// One line of `tandem bench output`.
#[derive(Debug, Clone, Serialize)]
pub struct OutputRow {
    pub epoch_ms: u64,
    pub mode: String,
    /// Request/response whose reply a rule passes (`PING` → `PONG`).
    pub pass_rr_p50_ms: f64,
    pub pass_rr_p99_ms: f64,
    /// Request/response whose reply is state (`PUT` → `OK n`): held.
    pub hold_rr_p50_ms: f64,
    pub hold_rr_p99_ms: f64,
    /// Guest → client TCP bulk transfer (`bulk-tcp`: passes, clamped).
    pub bulk_mbit_s: f64,
}

/// Round trips of `line` (`{i}` becomes the request's number) to the
/// guest service at `guest` on one persistent connection from `ns`, in ms.
pub(crate) fn round_trips(
    ns: &str,
    guest: &str,
    line: &'static str,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let addr = format!("{guest}:7070");
    topology::spawn_in_ns(ns, move || -> anyhow::Result<Vec<f64>> {
        use std::io::{BufRead, BufReader, Write};
        let addr: std::net::SocketAddr = addr.parse()?;
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = s;
        let mut out = Vec::with_capacity(n);
        let mut reply = String::new();
        for i in 0..n {
            let t = Instant::now();
            let text = line.replace("{i}", &i.to_string());
            w.write_all(format!("{text}\n").as_bytes())?;
            reply.clear();
            r.read_line(&mut reply)?;
            if reply.starts_with("ERR") || reply.is_empty() {
                bail!("guest answered {reply:?} to {text:?}");
            }
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(out)
    })?
    .join()
    .map_err(|_| anyhow!("round-trip thread panicked"))??
}

/// Bytes per second the guest's `BLAST` delivers to a sink in `ns`.
fn bulk_rate(ns: &str, ms: u64) -> anyhow::Result<f64> {
    let sink = topology::spawn_in_ns(ns, move || -> anyhow::Result<u64> {
        use std::io::Read;
        let l = std::net::TcpListener::bind((topology::CLIENT_IP, 7900))?;
        l.set_nonblocking(false)?;
        let (mut c, _) = l.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 65536];
        let mut n = 0u64;
        while let Ok(k) = c.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok(n)
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let line = format!("BLAST {}:7900 {ms}", topology::CLIENT_IP);
    let t = Instant::now();
    let reply = topology::spawn_in_ns(ns, move || {
        exchange(&line, Duration::from_millis(ms + 30_000))
    })?
    .join()
    .map_err(|_| anyhow!("blast thread panicked"))??;
    let got = sink.join().map_err(|_| anyhow!("sink panicked"))???;
    if !reply?.starts_with("BLASTED") {
        bail!("the guest's bulk send failed");
    }
    let secs = (ms as f64 / 1e3).max(t.elapsed().as_secs_f64().min(ms as f64 / 1e3));
    Ok(got as f64 / secs)
}

/// `tandem bench output`: request/response latency and bulk throughput
/// through a protected guest with output commit `off`, `all-hold` and
/// `classified`, side by side, per epoch length.
pub fn output(
    opts: &DrillOptions,
    epochs: &[u64],
    requests: usize,
    bulk_ms: u64,
    mut say: impl FnMut(&str),
) -> anyhow::Result<Vec<OutputRow>> {
    let tag = format!("{}o", std::process::id() % 100_000);
    let site = bring_up(opts, &tag)?;
    let ns = site.topo.c.clone();
    let rules = vec![
        r#"pass tcp sport 7070 payload 0:"PONG""#.to_string(),
        "hold tcp sport 7070".to_string(),
    ];
    let mut rows = Vec::new();
    for &e in epochs {
        say(&format!("protecting with {e} ms epochs"));
        crate::protect_with(&site.a, &site.b, &site.repl, opts, e, rules.clone())?;
        for mode in ["off", "all-hold", "classified"] {
            let _: tandem_api::OutputRules = crate::block_on(site.a.api().post(
                "/v1/ft/drill/rules",
                &tandem_api::RulesChange::Set {
                    profile: None,
                    rules: Vec::new(),
                    mode: Some(mode.to_string()),
                },
            ))?;
            say(&format!(
                "  {mode}: {requests} PING, {requests} PUT, {bulk_ms} ms bulk"
            ));
            let mut pass = round_trips(&ns, topology::GUEST_IP, "PING", requests)?;
            let mut hold = round_trips(&ns, topology::GUEST_IP, "PUT bench-{i}", requests)?;
            let bulk = bulk_rate(&ns, bulk_ms)?;
            rows.push(OutputRow {
                epoch_ms: e,
                mode: mode.to_string(),
                pass_rr_p50_ms: stats_ms(&mut pass, 50.0),
                pass_rr_p99_ms: stats_ms(&mut pass, 99.0),
                hold_rr_p50_ms: stats_ms(&mut hold, 50.0),
                hold_rr_p99_ms: stats_ms(&mut hold, 99.0),
                bulk_mbit_s: bulk * 8.0 / 1e6,
            });
        }
        let _: tandem_api::FtStatus =
            crate::block_on(site.a.api().post("/v1/vms/drill/unprotect", &()))?;
        wait_for("backup released", Duration::from_secs(30), || {
            (ft_backup(&site.b).ok()?.state.as_str() == "stopped").then_some(())
        })?;
    }
    finish(site);
    Ok(rows)
}

/// One line of `tandem bench tracker`: one collect's cost with each dirty
/// tracker, on the same memory, inside the guest (whose kernel has
/// soft-dirty bits; the host's may not).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrackerRow {
    pub mib: u64,
    /// Pages written per epoch.
    pub per_epoch: u64,
    pub epochs: u64,
    pub scan_p50_us: f64,
    pub scan_p99_us: f64,
    pub soft_p50_us: f64,
    pub soft_p99_us: f64,
    /// Pages each reported per epoch, on average.
    pub scan_reported: u64,
    pub soft_reported: u64,
    /// The soft-dirty collect's parts (p50): pagemap read, decision,
    /// `clear_refs`.
    pub soft_read_p50_us: f64,
    pub soft_decide_p50_us: f64,
    pub soft_clear_p50_us: f64,
    /// How the soft-dirty tracker noticed punches (`inotify`, `ctime`).
    pub punches: String,
}

/// Reads a `TRACKBENCH ok key=value …` reply; anything else is the guest's
/// refusal or failure, passed on as the error.
pub fn parse_trackbench(reply: &str) -> anyhow::Result<TrackerRow> {
    let Some(rest) = reply.strip_prefix("TRACKBENCH ok ") else {
        bail!("guest: {reply}");
    };
    let kv: std::collections::HashMap<&str, &str> = rest
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect();
    let num = |k: &str| -> anyhow::Result<f64> {
        kv.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| anyhow!("TRACKBENCH reply has no {k}: {reply}"))
    };
    Ok(TrackerRow {
        mib: num("mib")? as u64,
        per_epoch: num("per_epoch")? as u64,
        epochs: num("epochs")? as u64,
        scan_p50_us: num("scan_p50_us")?,
        scan_p99_us: num("scan_p99_us")?,
        soft_p50_us: num("soft_p50_us")?,
        soft_p99_us: num("soft_p99_us")?,
        scan_reported: num("scan_reported")? as u64,
        soft_reported: num("soft_reported")? as u64,
        soft_read_p50_us: num("soft_read_p50_us")?,
        soft_decide_p50_us: num("soft_decide_p50_us")?,
        soft_clear_p50_us: num("soft_clear_p50_us")?,
        punches: kv.get("punches").unwrap_or(&"?").to_string(),
    })
}

/// Boots the guest (unprotected: the guest's own time is what is measured)
/// and runs `TRACKBENCH` for each memory size and write count.
pub fn tracker(
    opts: &DrillOptions,
    mibs: &[u64],
    per_epoch: &[u64],
    epochs: u32,
    mut say: impl FnMut(&str),
) -> anyhow::Result<Vec<TrackerRow>> {
    // The bench's memfd lives in guest RAM beside the guest's own use.
    if let Some(&too_big) = mibs.iter().find(|&&m| m * 2 > u64::from(opts.memory_mib)) {
        bail!(
            "a {too_big} MiB tracker bench needs a guest of at least {} MiB (--memory-mib)",
            too_big * 2
        );
    }
    let tag = format!("{}k", std::process::id() % 100_000);
    let site = bring_up(opts, &tag)?;
    let ns = site.topo.c.clone();
    let mut rows = Vec::new();
    for &mib in mibs {
        for &pages in per_epoch {
            say(&format!("{mib} MiB, {pages} pages written per epoch"));
            let line = format!("TRACKBENCH {mib} {pages} {epochs}");
            let reply =
                topology::spawn_in_ns(&ns, move || exchange(&line, Duration::from_secs(900)))?
                    .join()
                    .map_err(|_| anyhow!("bench thread panicked"))??;
            rows.push(parse_trackbench(&reply?)?);
        }
    }
    finish(site);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trackbench_reply_is_read_or_refused() {
        let r = parse_trackbench(
            "TRACKBENCH ok mib=32 pages=8192 per_epoch=100 epochs=20 scan_p50_us=9000 \
             scan_p99_us=12000 soft_p50_us=700 soft_p99_us=900 scan_reported=99 soft_reported=100 \
             soft_read_p50_us=100 soft_decide_p50_us=200 soft_clear_p50_us=400 punches=inotify",
        )
        .unwrap();
        assert_eq!(r.mib, 32);
        assert_eq!(r.per_epoch, 100);
        assert_eq!(r.scan_p50_us, 9000.0);
        assert_eq!(r.soft_reported, 100);
        assert_eq!(r.soft_clear_p50_us, 400.0);
        assert_eq!(r.punches, "inotify");
        let e = parse_trackbench("TRACKBENCH unsupported no soft-dirty").unwrap_err();
        assert!(e.to_string().contains("no soft-dirty"), "{e}");
        assert!(parse_trackbench("TRACKBENCH ok mib=32").is_err());
        assert!(parse_trackbench("TRACKBENCH ok mib=32 per_epoch=NaN").is_err());
    }
}
