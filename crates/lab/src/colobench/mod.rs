//! `tandem bench pause`: the epoch pause of tandem against QEMU's own COLO
//! checkpointing, on the same guest, side by side in one run.
//!
//! Each cell (guest RAM × dirty rate) runs both systems one after the other,
//! in a network namespace made for the run (loopback only, deleted on every
//! exit path):
//!
//! - **tandem**: two tandemds (primary and backup, replication over a unix
//!   socket), the guest protected with each tracker asked for in turn
//!   (`--tracker`); the collect inside each pause comes from tandemd's
//!   per-epoch debug line (`collect_us`). tandemd's QEMU is
//!   started through a wrapper that adds a second QMP monitor, so the bench
//!   sees QEMU's own events without disturbing tandemd's connection.
//! - **COLO**: a primary QEMU and a secondary QEMU (`-incoming`), capability
//!   `x-colo` on both, `x-checkpoint-delay` = the epoch, migration over a
//!   unix socket until the primary reaches state `colo`. Periodic
//!   checkpoints only: no colo-compare, no disk (the guest has none).
//!
//! The pause is measured the same way for both: on the primary QEMU, from
//! each QMP `STOP` event to the next `RESUME` (QEMU's own timestamps). tandem
//! stops the guest with QMP `stop` and resumes it with `cont`; COLO stops it
//! in its checkpoint and restarts it once the secondary has loaded the
//! checkpoint. tandem's own statistics (`ft status`) are reported beside as
//! a cross-check.
//!
//! The load is the guest service's `DIRTY n`, sent once per epoch from the
//! namespace through QEMU's user-mode port forward: each request rewrites
//! the same first `n` pages of a 32 MiB buffer, so about `n` pages are dirty
//! in every epoch.
//!
//! The module by concern: [`qmp`] (the events the pause is measured from),
//! [`measure`] (the dirtying load, the measurement window and its
//! statistics), [`tandem`] (the tandem side: two tandemds, the guest
//! protected) and [`colo`] (the COLO peer: two QEMUs in COLO mode); this
//! file holds the options, the report, and the run over all cells.

mod colo;
mod measure;
mod qmp;
mod tandem;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use nix::sys::signal::{signal, SigHandler, Signal};
use serde::Serialize;

use crate::{topology, Rng};

/// The guest service's `DIRTY` buffer: 8192 pages of 4 KiB.
const DIRTY_BUFFER_PAGES: u64 = 8192;
const GUEST_CMDLINE: &str = "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2";
const READY: &str = "TANDEM-GUEST-READY";

#[derive(Debug, Clone)]
pub struct PauseOptions {
    pub memory_mib: Vec<u32>,
    pub epoch_ms: u64,
    /// Guest memory dirtied per second, MiB/s (0: idle guest).
    pub dirty_mib_s: Vec<u64>,
    /// Measurement window per system and cell.
    pub seconds: u64,
    /// Chooses which system runs first in each cell.
    pub seed: u64,
    pub tandemd: PathBuf,
    /// The QEMU tandemd runs the guest on.
    pub qemu: PathBuf,
    /// The QEMU that runs COLO (see qemu-scripts/colo-qemu.sh).
    pub colo_qemu: PathBuf,
    /// LD_PRELOAD for the COLO QEMUs (qemu-scripts/colo-bql-shim.c).
    pub colo_shim: Option<PathBuf>,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
    /// tandem's dirty-page trackers (`scan`, `soft-dirty`, `uffd`, `auto`):
    /// tandem runs once per tracker in each cell, COLO once.
    pub trackers: Vec<String>,
}

/// One system in one cell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SideResult {
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    /// Checkpoints (STOP→RESUME pairs) inside the window.
    pub checkpoints: usize,
    pub checkpoints_per_s: f64,
    /// Guest memory the load actually dirtied, MiB per second of wall time
    /// (a guest that is paused more gets less done).
    pub dirtied_mib_s: f64,
    /// Set when this system could not be measured in this cell (the other
    /// numbers are then zero).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// COLO only: why earlier attempts at this cell failed (retried).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_attempts: Vec<String>,
    /// tandem only: its own pause statistics (`tandem ft status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_epochs_per_s: Option<f64>,
    /// tandem only: the dirty-page collect inside each pause (tandemd's
    /// `collect_us`), p50 and p99 over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collect_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collect_p99_ms: Option<f64>,
    /// tandem only: the tracker as `ft status` names it, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracker_note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseRow {
    pub memory_mib: u32,
    pub dirty_mib_s: u64,
    /// tandem's tracker in this row (the cell's COLO result is shared by
    /// its rows).
    pub tracker: String,
    /// `tandem` or `colo`: which ran first in this cell.
    pub first: String,
    pub tandem: SideResult,
    pub colo: SideResult,
    /// tandem / COLO (below 1: tandem pauses less).
    pub ratio_p50: f64,
    pub ratio_p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseReport {
    pub tandem_qemu: String,
    pub colo_qemu: String,
    pub colo_shim: Option<PathBuf>,
    pub epoch_ms: u64,
    pub seconds: u64,
    pub rows: Vec<PauseRow>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM end the run through the normal error path, so every
/// QEMU and daemon is killed and the namespace deleted.
fn install_signal_handlers() {
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let _ = unsafe { signal(sig, SigHandler::Handler(on_signal)) };
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// First line of `qemu --version`.
pub fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| format!("{} (version unknown)", qemu.display()))
}

/// A QEMU binary's own firmware directory (`BIN/../share/qemu`), if any.
fn data_dir(qemu: &Path) -> Option<PathBuf> {
    let d = qemu.parent()?.parent()?.join("share/qemu");
    d.join("qboot.rom").is_file().then_some(d)
}

// ---------------------------------------------------------------- the run

/// Everything a run made, removed on every exit path: processes whose
/// command line names the work directory, then the namespace.
struct RunGuard {
    ns: String,
    work: PathBuf,
    keep: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        crate::kill_processes_mentioning(&self.work.to_string_lossy());
        topology::delete_netns(&self.ns);
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// Refuses a run that cannot work, before anything is started.
fn check_prerequisites(o: &PauseOptions) -> anyhow::Result<()> {
    for f in ["vmlinux", "initrd.img"] {
        if !o.image_dir.join(f).is_file() {
            bail!(
                "guest image {} missing: run images/build.sh",
                o.image_dir.join(f).display()
            );
        }
    }
    if !o.tandemd.is_file() {
        bail!("tandemd not found at {}", o.tandemd.display());
    }
    if !o.colo_qemu.is_file() {
        bail!(
            "the COLO QEMU {} is missing: run qemu-scripts/colo-qemu.sh (QEMU 10.0's COLO is broken; it unpacks Debian's 7.2 privately)",
            o.colo_qemu.display()
        );
    }
    if let Some(shim) = &o.colo_shim {
        if !shim.is_file() {
            bail!(
                "the COLO shim {} is missing: run qemu-scripts/colo-qemu.sh (or pass --colo-shim none)",
                shim.display()
            );
        }
    }
    if o.seconds == 0
        || o.memory_mib.is_empty()
        || o.dirty_mib_s.is_empty()
        || o.trackers.is_empty()
    {
        bail!("nothing to measure: give --seconds, --memory-mib, --dirty and --tracker");
    }
    if !(10..=1000).contains(&o.epoch_ms) {
        bail!("--epoch-ms {} is outside 10..=1000", o.epoch_ms);
    }
    Ok(())
}

pub fn pause_vs_colo(o: &PauseOptions, mut say: impl FnMut(&str)) -> anyhow::Result<PauseReport> {
    check_prerequisites(o)?;
    install_signal_handlers();
    let mut report = PauseReport {
        tandem_qemu: qemu_version(&o.qemu),
        colo_qemu: qemu_version(&o.colo_qemu),
        colo_shim: o.colo_shim.clone(),
        epoch_ms: o.epoch_ms,
        seconds: o.seconds,
        rows: Vec::new(),
    };
    let tag = format!("tcolo{}", std::process::id() % 100_000);
    let work = o.work_dir.join(&tag);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // On an error (an interrupt) everything goes; after a run with
    // failed cells, their logs stay.
    let mut guard = RunGuard {
        ns: tag.clone(),
        work: work.clone(),
        keep: false,
    };
    topology::ip(&["netns", "add", &tag]).context("creating the bench's network namespace")?;
    topology::in_ns(&tag, &["link", "set", "lo", "up"])?;

    let mut rng = Rng(o.seed);
    for &mem in &o.memory_mib {
        for &dirty in &o.dirty_mib_s {
            check_interrupted()?;
            let colo_first = rng.below(2) == 1;
            let cell = Cell {
                ns: &tag,
                work: &work,
                mem,
                dirty,
            };
            report.rows.extend(cell.run(o, colo_first, &mut say)?);
        }
    }
    guard.keep = report.rows.iter().any(|r| {
        r.tandem.error.is_some() || r.colo.error.is_some() || !r.colo.failed_attempts.is_empty()
    });
    if guard.keep {
        say(&format!(
            "logs of the failed attempts kept in {}",
            work.display()
        ));
    }
    drop(guard);
    Ok(report)
}

/// One cell of the run: a guest RAM size and a dirty rate, in the run's
/// namespace and work directory.
struct Cell<'a> {
    ns: &'a str,
    work: &'a Path,
    mem: u32,
    dirty: u64,
}

impl Cell<'_> {
    /// Both systems, one after the other, `colo_first` choosing the order;
    /// tandem once per tracker. One row per tracker.
    fn run(
        &self,
        o: &PauseOptions,
        colo_first: bool,
        say: &mut dyn FnMut(&str),
    ) -> anyhow::Result<Vec<PauseRow>> {
        let (mem, dirty) = (self.mem, self.dirty);
        say(&format!(
            "{mem} MiB guest, dirty {dirty} MiB/s: {} first",
            if colo_first { "COLO" } else { "tandem" }
        ));
        let mut colo = None;
        if colo_first {
            colo = Some(self.side(o, None, say)?);
        }
        let mut tandem = Vec::new();
        for t in &o.trackers {
            tandem.push((t.clone(), self.side(o, Some(t), say)?));
        }
        let colo = match colo {
            Some(c) => c,
            None => self.side(o, None, say)?,
        };
        let mut rows = Vec::new();
        for (tracker, tandem) in tandem {
            say(&format!(
                "  tandem ({tracker}) p50 {:.1} ms p99 {:.1} ms {:.1}/s, collect p50 {:.2} ms | COLO p50 {:.1} ms p99 {:.1} ms {:.1}/s",
                tandem.pause_p50_ms,
                tandem.pause_p99_ms,
                tandem.checkpoints_per_s,
                tandem.collect_p50_ms.unwrap_or(f64::NAN),
                colo.pause_p50_ms,
                colo.pause_p99_ms,
                colo.checkpoints_per_s
            ));
            rows.push(PauseRow {
                memory_mib: mem,
                dirty_mib_s: dirty,
                tracker,
                first: if colo_first { "colo" } else { "tandem" }.to_string(),
                ratio_p50: tandem.pause_p50_ms / colo.pause_p50_ms,
                ratio_p99: tandem.pause_p99_ms / colo.pause_p99_ms,
                tandem,
                colo: colo.clone(),
            });
        }
        Ok(rows)
    }

    /// One system. A system that fails in one cell is reported there; the
    /// run goes on (an interrupt still ends it).
    /// `tracker`: tandem with that tracker; `None`: COLO.
    fn side(
        &self,
        o: &PauseOptions,
        tracker: Option<&str>,
        say: &mut dyn FnMut(&str),
    ) -> anyhow::Result<SideResult> {
        let mut say = |m: &str| say(m);
        let (ns, work, mem, dirty) = (self.ns, self.work, self.mem, self.dirty);
        let colo = tracker.is_none();
        let r = match tracker {
            None => colo::run_colo_retried(o, ns, work, mem, dirty, &mut say),
            Some(t) => tandem::run_tandem(o, ns, work, mem, dirty, t, &mut say),
        };
        match r {
            Ok(r) => Ok(r),
            Err(e) => {
                check_interrupted()?;
                let name = if colo { "COLO" } else { "tandem" };
                say(&format!("  {name} FAILED in this cell: {e:#}"));
                Ok(SideResult {
                    error: Some(format!("{e:#}")),
                    ..SideResult::default()
                })
            }
        }
    }
}
