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
            (ft_backup(&site.b).ok()?.state == "stopped").then_some(())
        })?;
    }
    drop(site);
    Ok(rows)
}
