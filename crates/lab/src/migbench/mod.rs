//! `tandem bench migrate`: live migration by `tandem migrate` against plain
//! QEMU migration as libvirt runs it by default, on the same guest, side
//! by side in one run.
//!
//! Two sites, each the drill's three namespaces ([`Topology`]: hosts A and
//! B, the client's fabric bridge in C, the A–B link `a-repl`/`b-repl` that
//! carries the migration stream), both links shaped to `--bandwidth` with
//! `tc tbf` (a link of that speed: the stop-and-copy is not held to QEMU's
//! own rate limit, a real link holds it):
//!
//! - **tandem**: a tandemd per host (no cluster identity: the stream is
//!   plain TCP, as libvirt's default), the guest's NIC on the tandem
//!   switch, whose uplinks are cabled to C; `tandem migrate drill
//!   --to-socket B --listen 10.88.0.2:0 --bandwidth N --json`, its ladder
//!   at its defaults (no postcopy).
//! - **plain QEMU**: two QEMUs started by the bench from the same spec
//!   (`tandem_vmspec::build_argv`, the NIC a tap on a Linux bridge with the
//!   host's uplink, as libvirt's default network plumbing does), the
//!   destination `-S -incoming defer`; capability `events` on both ends,
//!   `max-bandwidth` libvirt's "unlimited" (`QEMU_DOMAIN_MIG_BANDWIDTH_MAX`
//!   MiB/s), `downtime-limit` left at QEMU's 300 ms, no auto-converge, no
//!   postcopy, no timeout (libvirt's defaults), `migrate` over QMP, and the
//!   destination `cont`ed on its `MIGRATION completed` event (libvirt's
//!   Finish). A migration still running after `--bound-s` is cancelled and
//!   counted as "did not converge".
//!
//! Per run, for both: the client in C sends `PING` to the guest every
//! 10 ms on one TCP connection ([`probe`]) and the client-visible **gap**
//! is the longest time between two replies across the migration; the
//! dirtying load ([`probe::Load`]) rewrites the guest service's 32 MiB
//! `DIRTY` buffer at the asked rate; QEMU's own numbers (downtime, bytes,
//! `dirty-pages-rate` × page size) come from `query-migrate` (tandem's
//! through its report and `--json` events). The guest migrates back and
//! forth (A→B, B→A, …); the two systems take turns, their order swapped
//! every run.
//!
//! Everything the run makes is removed on every exit path (an interrupt
//! included): the daemons and QEMUs, then the namespaces, then the work
//! directory and the RAM files in /dev/shm.

mod netfollow;
mod plain;
mod probe;
mod tandem;

pub use netfollow::NetRun;
/// `--netfollow`'s window after a migration and its binding bound, s.
pub const NETFOLLOW_SETTLE_S: u64 = netfollow::SETTLE.as_secs();
pub const NETFOLLOW_BINDING_BOUND_S: u64 = netfollow::BINDING_BOUND.as_secs();

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::topology::{self, Topology};

/// The guest service's `DIRTY` buffer: 8192 pages of 4 KiB.
pub const DIRTY_BUFFER_PAGES: u64 = 8192;
/// libvirt's default migration bandwidth, MiB/s
/// (`QEMU_DOMAIN_MIG_BANDWIDTH_MAX` = `INT64_MAX / (1024 * 1024)`): no
/// limit. libvirt sets `max-bandwidth` to it, in bytes, before `migrate`.
pub const LIBVIRT_BANDWIDTH_MAX_MIB: u64 = i64::MAX as u64 / (1024 * 1024);
/// QEMU's default `downtime-limit`, which libvirt leaves alone.
pub const QEMU_DOWNTIME_LIMIT_MS: u64 = 300;
const READY: &str = "TANDEM-GUEST-READY";
/// The dirtying load runs this long before each migration starts.
const WARM: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct MigOptions {
    /// Asked dirtying levels, MiB/s (0: idle guest).
    pub dirty_mib_s: Vec<u64>,
    /// Migrations per system and level.
    pub runs: u32,
    pub memory_mib: u32,
    /// The migration link's speed (both sites), MiB/s; also what
    /// `tandem migrate --bandwidth` is told.
    pub bandwidth_mib_s: u64,
    /// A plain QEMU migration still running after this long did not
    /// converge (libvirt itself has no bound).
    pub bound_s: u64,
    /// The `tandem` CLI.
    pub tandem: PathBuf,
    pub tandemd: PathBuf,
    /// The QEMU the plain side runs (tandemd runs its own default).
    pub qemu: PathBuf,
    pub qboot_rom: PathBuf,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
    /// The tandem side's guest is protected (fault tolerance) to a backup
    /// tandemd for the whole run; its migrations move the protection (the
    /// CLI does) and report the destination's first commit.
    pub protected: bool,
    /// The network following the guest (issue 19): the guest takes its
    /// address by DHCP and joins a multicast group; numbered unicast and
    /// multicast streams to it are counted; tandem's switches snoop DHCP
    /// (with IP source guard) and IGMP, and a third system, tandem without
    /// the migrated flag, runs beside the other two.
    pub netfollow: bool,
}

/// One migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    pub run: u32,
    /// `A->B` or `B->A`.
    pub direction: String,
    pub converged: bool,
    /// Wall time of the whole operation: tandem, the `tandem migrate`
    /// command (destination prepared, stream, confirm, source removed);
    /// plain QEMU, the destination QEMU's start to its `cont`.
    pub total_ms: Option<f64>,
    /// QEMU's own time of the stream (`total-time`; tandem's report
    /// `elapsed_ms`, polled every 200 ms by tandemd).
    pub stream_ms: Option<f64>,
    /// QEMU's `downtime`.
    pub downtime_ms: Option<f64>,
    /// A protected VM (tandem, `--protected`): from the end of the stream
    /// to the destination's first commit to the backup (the report's
    /// `first_commit_ms`; the guest's output is held until then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_commit_ms: Option<f64>,
    /// The longest time between two client replies across the migration
    /// (from the last reply before it started to the service after it).
    pub gap_ms: f64,
    /// The longest gap in the [`WARM`] window just before, under the same
    /// load: what the load alone costs the client.
    pub gap_before_ms: f64,
    /// Whether the client was served again after the migration.
    pub served_after: bool,
    /// RAM bytes QEMU sent (`ram.transferred`).
    pub transferred_bytes: u64,
    /// The rung that finished it (plain QEMU: `precopy`).
    pub rung: String,
    /// The highest `dirty-pages-rate` × page size QEMU reported during the
    /// migration, MiB/s (`None`: it finished before QEMU's first reading).
    pub dirty_seen_mib_s: Option<f64>,
    /// The load's own account (from the client): `DIRTY` requests the
    /// guest answered in the run (warm-up, migration, settle), the rate of
    /// distinct pages they rewrote, and the longest one.
    pub dirty_requests: u64,
    pub dirtied_mib_s: Option<f64>,
    pub dirty_request_max_ms: f64,
    /// Why it did not converge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `--netfollow`: what the network did to the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<NetRun>,
    /// The run could not be measured (the numbers above are then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Median and p99 (nearest rank) of a cell's converged runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub runs: usize,
    pub converged: usize,
    pub errors: usize,
    pub total_p50_ms: Option<f64>,
    pub total_p99_ms: Option<f64>,
    pub downtime_p50_ms: Option<f64>,
    pub downtime_p99_ms: Option<f64>,
    /// Protected runs only (the runs that report one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_commit_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_commit_p99_ms: Option<f64>,
    pub gap_p50_ms: Option<f64>,
    pub gap_p99_ms: Option<f64>,
    pub gap_before_p50_ms: Option<f64>,
    pub sent_p50_mib: Option<f64>,
    pub sent_p99_mib: Option<f64>,
    pub dirty_seen_p50_mib_s: Option<f64>,
    /// The load's achieved rate (all measured runs, converged or not).
    pub dirtied_p50_mib_s: Option<f64>,
    /// Which rung finished the converged runs, and how often.
    pub rungs: BTreeMap<String, usize>,
    /// `--netfollow` runs only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<NetStats>,
}

/// A cell's `--netfollow` numbers over its converged runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetStats {
    pub unicast_lost_p50: Option<f64>,
    pub unicast_lost_p99: Option<f64>,
    pub unicast_late_p50: Option<f64>,
    pub unicast_late_p99: Option<f64>,
    /// Over the runs whose multicast was flowing before and after.
    pub multicast_gap_p50_ms: Option<f64>,
    pub multicast_gap_p99_ms: Option<f64>,
    /// Runs whose multicast was not flowing again at the end of the window.
    pub multicast_not_back: usize,
    /// Runs whose multicast was not flowing when the migration began (a
    /// previous run's loss not yet repaired).
    pub multicast_not_flowing_before: usize,
    pub binding_p50_ms: Option<f64>,
    pub binding_p99_ms: Option<f64>,
    /// Runs whose destination had no binding within the bound.
    pub binding_missing: usize,
    pub binding_kept: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    pub stats: Stats,
    pub runs: Vec<RunResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub dirty_asked_mib_s: u64,
    pub tandem: Side,
    pub plain: Side,
    /// `--netfollow`: tandem without the migrated flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noflag: Option<Side>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigReport {
    pub qemu: String,
    pub memory_mib: u32,
    pub bandwidth_mib_s: u64,
    pub bound_s: u64,
    pub runs: u32,
    /// The tandem side's guest was protected to a backup tandemd.
    pub protected: bool,
    pub netfollow: bool,
    /// What each side was told, for the record.
    pub tandem_settings: String,
    pub plain_settings: String,
    pub load: String,
    pub cells: Vec<Cell>,
}

// ------------------------------------------------------------ interrupts

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// SIGINT/SIGTERM end the run through the normal error path, so every
/// process, namespace and file goes. A thread with its own runtime waits
/// for them (no handler of our own: nothing unsafe).
fn watch_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("migbench-signals".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    let _ = tx.send(());
                    return;
                };
                rt.block_on(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let int = signal(SignalKind::interrupt());
                    let term = signal(SignalKind::terminate());
                    let _ = tx.send(());
                    let (Ok(mut int), Ok(mut term)) = (int, term) else {
                        return;
                    };
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    INTERRUPTED.store(true, Ordering::SeqCst);
                });
            });
        if spawned.is_ok() {
            // Registered before anything is started.
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    });
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking early (with an error) on an interrupt.
fn pause(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_interrupted()?;
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupted()
}

// ------------------------------------------------------------ shared parts

/// The guest's spec, the same for both systems but for its NIC's backend
/// lines (`backend = …`): kernel, initrd, the guest service at
/// [`topology::GUEST_IP`], no disk (the benchmark moves memory; both
/// systems use shared storage in place, which moves nothing).
fn guest_spec(o: &MigOptions, nic_backend: &str) -> String {
    format!(
        r#"name = "drill"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 5
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip={ip}"
[[nics]]
name = "eth0"
mac = "52:54:00:77:00:10"
{nic_backend}
"#,
        mem = o.memory_mib,
        k = o.image_dir.join("vmlinux").display(),
        i = o.image_dir.join("initrd.img").display(),
        ip = if o.netfollow {
            "dhcp".to_string()
        } else {
            format!("{}/24", topology::GUEST_IP)
        },
    )
}

/// `tc` inside a namespace this bench made.
fn tc_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "tc"])
        .args(args)
        .output()
        .context("running `tc` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Shapes the migration link of a site to `mib_s` in both directions.
fn shape_link(topo: &Topology, mib_s: u64) -> anyhow::Result<()> {
    let bytes_s = mib_s.saturating_mul(1 << 20);
    let rate = format!("{}bit", bytes_s.saturating_mul(8));
    // At least a GSO segment, and 10 ms at the rate (≥ rate / HZ).
    let burst = (bytes_s / 100).max(256 << 10).to_string();
    for (ns, dev) in [(&topo.a, "a-repl"), (&topo.b, "b-repl")] {
        tc_in(
            ns,
            &[
                "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "50ms",
            ],
        )?;
    }
    Ok(())
}

/// Waits until the serial/console text `read()` shows the guest service
/// ready, or `alive()` fails, within `timeout`.
fn wait_ready(
    what: &str,
    timeout: Duration,
    mut read: impl FnMut() -> Option<String>,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        alive()?;
        if read().is_some_and(|s| s.contains(READY)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: the guest service was not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one system's migration yielded (the client's view is added by
/// [`run_once`]).
#[derive(Debug, Default)]
struct Moved {
    converged: bool,
    total_ms: Option<f64>,
    stream_ms: Option<f64>,
    downtime_ms: Option<f64>,
    first_commit_ms: Option<f64>,
    transferred_bytes: u64,
    rung: String,
    dirty_seen_mib_s: Option<f64>,
    note: Option<String>,
}

/// A system under test: its client namespace and one migration of its
/// guest to its other host.
trait System {
    fn name(&self) -> &'static str;
    fn client_ns(&self) -> &str;
    /// `A->B` or `B->A`, for the migration [`System::migrate`] runs next.
    fn direction(&self) -> &'static str;
    fn migrate(&mut self, say: &mut dyn FnMut(&str)) -> anyhow::Result<Moved>;
    /// `--netfollow`: the site's streams to the guest.
    fn streams(&self) -> Option<&netfollow::Streams>;
    /// `--netfollow`, a snooping switch: whether the host running the
    /// guest holds its DHCP binding. `None`: this system keeps none.
    fn binding_present(&self) -> Option<anyhow::Result<bool>> {
        None
    }
}

/// One migration of `sys` under `dirty` MiB/s, with the client watching.
fn run_once(
    sys: &mut dyn System,
    dirty: u64,
    run: u32,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<RunResult> {
    let ns = sys.client_ns().to_string();
    let direction = sys.direction().to_string();
    let base = Instant::now();
    let probe = probe::Probe::start(&ns, base)?;
    let served = probe.wait_replies(10, Duration::from_secs(30));
    if let Err(e) = served {
        let _ = probe.stop();
        return Err(e.context(format!("{}: the client is not served before", sys.name())));
    }
    let load = if dirty > 0 {
        Some(probe::Load::start(&ns, dirty)?)
    } else {
        None
    };
    let warm = pause(WARM);
    let net_before = match sys.streams() {
        Some(s) if warm.is_ok() => Some(s.snapshot()),
        _ => None,
    };
    let t_start = ms(base.elapsed());
    let moved = warm.and_then(|_| sys.migrate(say));
    let t_end = ms(base.elapsed());
    let ended = Instant::now();
    let binding = if moved.as_ref().is_ok_and(|m| m.converged) {
        binding_back(sys, ended)
    } else {
        Ok(None)
    };
    // The service after: 20 replies (200 ms of it), within 10 s.
    let after = probe.wait_replies_after(t_end, 20, Duration::from_secs(10));
    // Checked after the client's threads have stopped.
    let net = (|| -> anyhow::Result<Option<NetRun>> {
        match (net_before, sys.streams()) {
            (Some(before), Some(streams)) if moved.as_ref().is_ok_and(|m| m.converged) => {
                let until = ended + netfollow::SETTLE;
                pause(until.saturating_duration_since(Instant::now()))?;
                let before = before?;
                let after = streams.snapshot()?;
                let mut n = netfollow::account(&before, &after);
                n.binding_kept = sys.binding_present().is_some();
                n.binding_ms = binding?;
                Ok(Some(n))
            }
            _ => Ok(None),
        }
    })();
    let dirtied = load.map(probe::Load::finish).unwrap_or_default();
    let replies = probe.stop();
    let moved = moved?;
    let net = net.context("the network's account")?;
    let gaps = probe::gaps(&replies, t_start, t_end, after, WARM);
    Ok(RunResult {
        run,
        direction,
        converged: moved.converged,
        total_ms: moved.total_ms,
        stream_ms: moved.stream_ms,
        downtime_ms: moved.downtime_ms,
        first_commit_ms: moved.first_commit_ms,
        gap_ms: gaps.across_ms,
        gap_before_ms: gaps.before_ms,
        served_after: after.is_some(),
        transferred_bytes: moved.transferred_bytes,
        rung: moved.rung,
        dirty_seen_mib_s: moved.dirty_seen_mib_s,
        dirty_requests: dirtied.requests,
        dirtied_mib_s: dirtied.achieved_mib_s,
        dirty_request_max_ms: dirtied.request_max_ms,
        note: moved.note,
        net,
        error: None,
    })
}

/// `--netfollow`: ms after `ended` until the destination holds the
/// guest's binding (0: already), `None` when it does not within the bound
/// or the system keeps none.
fn binding_back(sys: &dyn System, ended: Instant) -> anyhow::Result<Option<f64>> {
    let deadline = ended + netfollow::BINDING_BOUND;
    loop {
        check_interrupted()?;
        let probed = Instant::now();
        match sys.binding_present() {
            None => return Ok(None),
            Some(Ok(true)) => {
                return Ok(Some(ms(probed.saturating_duration_since(ended))));
            }
            Some(Ok(false)) => {}
            Some(Err(e)) => return Err(e.context("reading the destination's binding")),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(runs: &[RunResult]) -> Stats {
    let ok: Vec<&RunResult> = runs.iter().filter(|r| r.converged).collect();
    let pick = |f: &dyn Fn(&RunResult) -> Option<f64>, p: f64| -> Option<f64> {
        let mut v: Vec<f64> = ok.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| crate::stats_ms(&mut v, p))
    };
    let sent = |r: &RunResult| Some(r.transferred_bytes as f64 / (1u64 << 20) as f64);
    let mut rungs = BTreeMap::new();
    for r in &ok {
        *rungs.entry(r.rung.clone()).or_insert(0) += 1;
    }
    Stats {
        runs: runs.len(),
        converged: ok.len(),
        errors: runs.iter().filter(|r| r.error.is_some()).count(),
        total_p50_ms: pick(&|r| r.total_ms, 50.0),
        total_p99_ms: pick(&|r| r.total_ms, 99.0),
        downtime_p50_ms: pick(&|r| r.downtime_ms, 50.0),
        downtime_p99_ms: pick(&|r| r.downtime_ms, 99.0),
        first_commit_p50_ms: pick(&|r| r.first_commit_ms, 50.0),
        first_commit_p99_ms: pick(&|r| r.first_commit_ms, 99.0),
        gap_p50_ms: pick(&|r| Some(r.gap_ms), 50.0),
        gap_p99_ms: pick(&|r| Some(r.gap_ms), 99.0),
        gap_before_p50_ms: pick(&|r| Some(r.gap_before_ms), 50.0),
        sent_p50_mib: pick(&sent, 50.0),
        sent_p99_mib: pick(&sent, 99.0),
        dirty_seen_p50_mib_s: pick(&|r| r.dirty_seen_mib_s, 50.0),
        dirtied_p50_mib_s: {
            let mut v: Vec<f64> = runs.iter().filter_map(|r| r.dirtied_mib_s).collect();
            (!v.is_empty()).then(|| crate::stats_ms(&mut v, 50.0))
        },
        rungs,
        net: net_stats(&ok),
    }
}

fn net_stats(ok: &[&RunResult]) -> Option<NetStats> {
    let nets: Vec<&NetRun> = ok.iter().filter_map(|r| r.net.as_ref()).collect();
    if nets.is_empty() {
        return None;
    }
    let pick = |mut v: Vec<f64>, p: f64| (!v.is_empty()).then(|| crate::stats_ms(&mut v, p));
    let lost: Vec<f64> = nets.iter().map(|n| n.unicast_lost as f64).collect();
    let late: Vec<f64> = nets.iter().map(|n| n.unicast_late as f64).collect();
    let gaps: Vec<f64> = nets
        .iter()
        .filter(|n| n.multicast_before)
        .filter_map(|n| n.multicast_gap_ms)
        .collect();
    let bindings: Vec<f64> = nets.iter().filter_map(|n| n.binding_ms).collect();
    let kept = nets.iter().any(|n| n.binding_kept);
    Some(NetStats {
        unicast_lost_p50: pick(lost.clone(), 50.0),
        unicast_lost_p99: pick(lost, 99.0),
        unicast_late_p50: pick(late.clone(), 50.0),
        unicast_late_p99: pick(late, 99.0),
        multicast_gap_p50_ms: pick(gaps.clone(), 50.0),
        multicast_gap_p99_ms: pick(gaps, 99.0),
        multicast_not_back: nets.iter().filter(|n| n.multicast_gap_ms.is_none()).count(),
        multicast_not_flowing_before: nets.iter().filter(|n| !n.multicast_before).count(),
        binding_p50_ms: pick(bindings.clone(), 50.0),
        binding_p99_ms: pick(bindings, 99.0),
        binding_missing: if kept {
            nets.iter().filter(|n| n.binding_ms.is_none()).count()
        } else {
            0
        },
        binding_kept: kept,
    })
}

/// Refuses a run that cannot work, before anything is started.
fn check_prerequisites(o: &MigOptions) -> anyhow::Result<()> {
    for f in ["vmlinux", "initrd.img"] {
        if !o.image_dir.join(f).is_file() {
            bail!(
                "guest image {} missing: run images/build.sh",
                o.image_dir.join(f).display()
            );
        }
    }
    for (what, p) in [
        ("tandemd", &o.tandemd),
        ("tandem", &o.tandem),
        ("QEMU", &o.qemu),
        ("qboot", &o.qboot_rom),
    ] {
        if !p.is_file() {
            bail!("{what} not found at {}", p.display());
        }
    }
    if o.runs == 0 || o.dirty_mib_s.is_empty() {
        bail!("nothing to measure: give --runs and --dirty-mib-s");
    }
    if !(1..=100_000).contains(&o.bandwidth_mib_s) {
        bail!(
            "--bandwidth {} is outside 1..=100000 MiB/s",
            o.bandwidth_mib_s
        );
    }
    if !(5..=3600).contains(&o.bound_s) {
        bail!("--bound-s {} is outside 5..=3600", o.bound_s);
    }
    if let Some(d) = o.dirty_mib_s.iter().find(|&&d| d > 1024) {
        bail!("--dirty-mib-s {d}: at most 1024 MiB/s");
    }
    if !(128..=4096).contains(&o.memory_mib) {
        bail!("--memory-mib {} is outside 128..=4096", o.memory_mib);
    }
    if o.netfollow && o.protected {
        bail!("--netfollow and --protected together are not measured yet: run them separately");
    }
    if o.netfollow && !Path::new("/usr/sbin/dhcpd").is_file() {
        bail!(
            "--netfollow needs ISC dhcpd: apt-get install isc-dhcp-server (ci/setup-host.sh does)"
        );
    }
    Ok(())
}

/// The run's work directory and RAM files, removed last (after the sites,
/// which take their processes and namespaces with them).
struct WorkGuard {
    work: PathBuf,
    shm_prefix: String,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        // Anything still running on the run's files.
        crate::kill_processes_mentioning(&self.work.to_string_lossy());
        crate::kill_processes_mentioning(&self.shm_prefix);
        // TANDEM_BENCH_KEEP=1 keeps the logs (tandemd's, QEMU's) to read.
        if std::env::var_os("TANDEM_BENCH_KEEP").is_some_and(|v| v == "1") {
            eprintln!("bench: kept {}", self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
        remove_shm(&self.shm_prefix);
    }
}

/// Removes the RAM files (and tandemd's RAM directories) under /dev/shm
/// whose names start with `prefix`'s file name.
fn remove_shm(prefix: &str) {
    let Some(name) = Path::new(prefix).file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(name) {
            let p = e.path();
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
}

pub fn migrate_vs_plain(o: &MigOptions, mut say: impl FnMut(&str)) -> anyhow::Result<MigReport> {
    check_prerequisites(o)?;
    watch_signals();
    let say: &mut dyn FnMut(&str) = &mut say;
    let tag = format!("mig{}", std::process::id() % 100_000);
    let work = o.work_dir.join(format!("tmigbench-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _guard = WorkGuard {
        work: work.clone(),
        shm_prefix: format!("/dev/shm/tmigbench-{tag}"),
    };
    let mut report = MigReport {
        qemu: crate::colobench::qemu_version(&o.qemu),
        memory_mib: o.memory_mib,
        bandwidth_mib_s: o.bandwidth_mib_s,
        bound_s: o.bound_s,
        runs: o.runs,
        protected: o.protected,
        netfollow: o.netfollow,
        tandem_settings: format!(
            "tandem migrate --bandwidth {} (its ladder's defaults: downtime 300 ms raised up to 2000 ms, then throttle; no postcopy), plain TCP (hosts without identities){}",
            o.bandwidth_mib_s,
            if o.protected {
                "; the guest protected to a backup tandemd (epoch 50 ms, output commit classified), the protection moving with it"
            } else {
                ""
            }
        ),
        plain_settings: format!(
            "libvirt's defaults: capability events, max-bandwidth {LIBVIRT_BANDWIDTH_MAX_MIB} MiB/s (no limit), downtime-limit {QEMU_DOWNTIME_LIMIT_MS} ms (QEMU's), no auto-converge, no postcopy; destination -S, cont on MIGRATION completed; cancelled after {} s",
            o.bound_s
        ),
        load: format!(
            "DIRTY {DIRTY_BUFFER_PAGES} (the guest service's whole 32 MiB buffer) every 32/N s from the client namespace; link {} MiB/s (tc tbf)",
            o.bandwidth_mib_s
        ),
        cells: Vec::new(),
    };
    // Drop order: the plain site, then tandem's (each its processes first,
    // then its namespaces), then the work directory.
    say(if o.protected {
        "tandem: two tandemds in namespaces, the guest on A's switch, protected to a third (the backup)"
    } else {
        "tandem: two tandemds in namespaces, the guest on A's switch"
    });
    // (tandemd's RAM directories and the plain QEMUs' RAM files are named
    // after these directories: /dev/shm/tmigbench-<tag>…, removed at the end.)
    let t_work = work.join(format!("tmigbench-{tag}t"));
    let mut t =
        tandem::TandemSite::start(o, tandem::Flavour::Tandem, &format!("{tag}t"), &t_work, say)?;
    // The no-flag control first to go, then plain, then tandem.
    let mut n = if o.netfollow {
        say("tandem without the migrated flag: two more tandemds (--fault-association new), no source guard");
        let n_work = work.join(format!("tmigbench-{tag}n"));
        Some(tandem::TandemSite::start(
            o,
            tandem::Flavour::NoFlag,
            &format!("{tag}n"),
            &n_work,
            say,
        )?)
    } else {
        None
    };
    say("plain QEMU: two hosts in namespaces, the guest on a tap in A's bridge");
    let p_work = work.join(format!("tmigbench-{tag}q"));
    let mut p = plain::PlainSite::start(o, &format!("{tag}q"), &p_work, say)?;
    for &dirty in &o.dirty_mib_s {
        let mut cell = Cell {
            dirty_asked_mib_s: dirty,
            tandem: Side::default(),
            plain: Side::default(),
            noflag: n.as_ref().map(|_| Side::default()),
        };
        for run in 1..=o.runs {
            check_interrupted()?;
            // The systems take turns, their order rotated every run.
            let mut systems: Vec<&mut dyn System> = vec![&mut t, &mut p];
            if let Some(n) = n.as_mut() {
                systems.push(n);
            }
            let k = systems.len();
            systems.rotate_left((run as usize) % k);
            for sys in systems {
                let name = sys.name();
                let direction = sys.direction();
                say(&format!(
                    "dirty {dirty} MiB/s, run {run}/{}: {name} {direction}",
                    o.runs
                ));
                let r = match run_once(sys, dirty, run, say) {
                    Ok(r) => r,
                    Err(e) => {
                        check_interrupted()?;
                        say(&format!("  {name}: FAILED: {e:#}"));
                        RunResult {
                            run,
                            direction: direction.to_string(),
                            error: Some(format!("{e:#}")),
                            ..RunResult::default()
                        }
                    }
                };
                if r.error.is_none() {
                    say(&format!(
                        "  {name}: {} total {} downtime {}{} gap {:.0} ms (before {:.0}), {:.0} MiB, rung {}, dirty seen by QEMU {}, by the load {} (longest DIRTY {:.0} ms){}",
                        if r.converged { "converged," } else { "did NOT converge," },
                        opt_ms(r.total_ms),
                        opt_ms(r.downtime_ms),
                        r.first_commit_ms
                            .map(|f| format!(" first commit {f:.0} ms"))
                            .unwrap_or_default(),
                        r.gap_ms,
                        r.gap_before_ms,
                        r.transferred_bytes as f64 / (1u64 << 20) as f64,
                        r.rung,
                        r.dirty_seen_mib_s
                            .map_or_else(|| "-".to_string(), |d| format!("{d:.1} MiB/s")),
                        r.dirtied_mib_s
                            .map_or_else(|| "-".to_string(), |d| format!("{d:.1} MiB/s")),
                        r.dirty_request_max_ms,
                        r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
                    ));
                }
                if let Some(n) = &r.net {
                    say(&format!(
                        "  {name}: unicast lost {} (late {}), multicast gap {}{}, binding {}",
                        n.unicast_lost,
                        n.unicast_late,
                        n.multicast_gap_ms.map_or_else(
                            || format!("not back ({} lost)", n.multicast_lost),
                            |g| format!("{g:.0} ms")
                        ),
                        if n.multicast_before {
                            ""
                        } else {
                            " (not flowing before)"
                        },
                        match (n.binding_kept, n.binding_ms) {
                            (false, _) => "- (none kept)".to_string(),
                            (true, Some(b)) => format!("back after {b:.0} ms"),
                            (true, None) =>
                                format!("not back within {} s", netfollow::BINDING_BOUND.as_secs()),
                        }
                    ));
                }
                match name {
                    "tandem" => cell.tandem.runs.push(r),
                    "plain" => cell.plain.runs.push(r),
                    _ => cell.noflag.get_or_insert_with(Side::default).runs.push(r),
                }
            }
        }
        cell.tandem.stats = stats(&cell.tandem.runs);
        cell.plain.stats = stats(&cell.plain.runs);
        if let Some(side) = cell.noflag.as_mut() {
            side.stats = stats(&side.runs);
        }
        report.cells.push(cell);
    }
    drop(n);
    drop(p);
    drop(t);
    Ok(report)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.0} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(converged: bool, total: f64, gap: f64, rung: &str) -> RunResult {
        RunResult {
            converged,
            total_ms: Some(total),
            downtime_ms: Some(total / 10.0),
            gap_ms: gap,
            transferred_bytes: 3 << 20,
            rung: rung.into(),
            ..RunResult::default()
        }
    }

    #[test]
    fn stats_cover_the_converged_runs_only() {
        let runs = [
            run(true, 1000.0, 50.0, "precopy"),
            run(false, 99_999.0, 9_999.0, ""),
            run(true, 3000.0, 70.0, "downtime 565 ms"),
            RunResult {
                error: Some("x".into()),
                ..RunResult::default()
            },
        ];
        let s = stats(&runs);
        assert_eq!((s.runs, s.converged, s.errors), (4, 2, 1));
        assert_eq!(s.total_p50_ms, Some(1000.0));
        assert_eq!(s.total_p99_ms, Some(3000.0));
        assert_eq!(s.gap_p99_ms, Some(70.0));
        assert_eq!(s.sent_p50_mib, Some(3.0));
        assert_eq!(s.dirty_seen_p50_mib_s, None);
        assert_eq!(s.rungs.get("precopy"), Some(&1));
        assert_eq!(s.rungs.len(), 2);
    }

    #[test]
    fn first_commit_stats_skip_runs_without_one() {
        let with = |converged: bool, f: Option<f64>| RunResult {
            first_commit_ms: f,
            ..run(converged, 1000.0, 50.0, "precopy")
        };
        let runs = [
            with(true, Some(300.0)),
            with(true, None),
            with(true, Some(100.0)),
            with(false, Some(9_999.0)),
            with(true, Some(200.0)),
        ];
        let s = stats(&runs);
        assert_eq!(s.converged, 4);
        assert_eq!(s.first_commit_p50_ms, Some(200.0));
        assert_eq!(s.first_commit_p99_ms, Some(300.0));
        // Unprotected: no first commit anywhere, none in the stats.
        let s = stats(&[run(true, 1.0, 1.0, "precopy")]);
        assert_eq!((s.first_commit_p50_ms, s.first_commit_p99_ms), (None, None));
    }

    #[test]
    fn the_guest_spec_differs_only_in_the_nic_backend() {
        let o = MigOptions {
            dirty_mib_s: vec![0],
            runs: 1,
            memory_mib: 256,
            bandwidth_mib_s: 128,
            bound_s: 30,
            tandem: "/t".into(),
            tandemd: "/td".into(),
            qemu: "/q".into(),
            qboot_rom: "/qb".into(),
            image_dir: "/img".into(),
            work_dir: "/tmp".into(),
            protected: false,
            netfollow: false,
        };
        let a = guest_spec(&o, "backend = \"switch\"\nport_group = \"vms\"");
        let b = guest_spec(&o, "backend = \"tap\"\ntap = \"tq0\"");
        let strip = |s: &str| {
            s.lines()
                .filter(|l| {
                    !l.starts_with("backend")
                        && !l.starts_with("port_group")
                        && !l.starts_with("tap")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&a), strip(&b));
        assert!(a.contains("memory_mib = 256") && a.contains("tandem.ip=10.77.0.10/24"));
        // --netfollow: the guest asks DHCP for the same address.
        let dhcp = guest_spec(
            &MigOptions {
                netfollow: true,
                ..o
            },
            "backend = \"tap\"\ntap = \"tq0\"",
        );
        assert!(dhcp.contains("tandem.ip=dhcp\""), "{dhcp}");
    }

    #[test]
    fn libvirts_unlimited_bandwidth_fits_qemus_parameter() {
        // libvirt sends MiB/s × 1 MiB in bytes; it must not overflow.
        let bytes = LIBVIRT_BANDWIDTH_MAX_MIB.checked_mul(1 << 20);
        assert!(bytes.is_some_and(|b| b <= i64::MAX as u64));
    }
}
