//! A deterministic simulation of the replication protocol that drives the
//! real [`Primary`] and [`Backup`] through adversarial schedules.
//!
//! Each schedule runs on its own single-threaded tokio runtime with a
//! paused clock, so every timeout is stepped, not slept: seconds of
//! protocol time cost milliseconds. The real code runs unchanged behind
//! its seams: the guest is [`guest::SimGuest`] (RAM in a file, a CPU task
//! that writes it and answers clients, a shim that enforces the lease), the
//! link is [`net::SimLink`] (per-direction cuts, latency, resets), and the
//! backup writes a real replica store in a temporary directory and "runs"
//! the VM through [`guest::SimActivate`], which checks what it resumes.
//!
//! A schedule is drawn from a seed: timeouts and epoch length, and up to
//! six faults at random moments — a cut of either direction or both, a
//! latency step, a connection reset, QEMU crashing, the primary's tandemd
//! crashing (its tasks stop, the guest is left to its lease), protection
//! ended on purpose, a slow disk check (the epoch loop busy with the guest
//! stopped), and another VM of the same name protected to the same backup.
//! Everything heals at the end and the pair gets time to settle.
//!
//! Invariants, checked while it runs and at the end:
//! - never two running copies: the backup never resumes the VM while the
//!   primary's guest runs, and that guest never runs after the takeover;
//! - no committed output lost: the resumed checkpoint contains every reply
//!   a client has seen (output commit released it);
//! - the resumed replica is exactly one checkpoint (its RAM is the guest's
//!   RAM at the stop its device state names) of this VM;
//! - a replica only ever holds one identity (no page of the other VM);
//! - no needless takeover: the backup never takes over a primary that was
//!   never silenced (no cut, no crash);
//! - progress: with no fault at all, epochs commit and replies flow.
//!
//! A failing seed replays: `TANDEM_SIM_SEED=<n> cargo test -p
//! tandem-replication --lib sim::tests::replay -- --nocapture`.

mod guest;
mod net;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::backup::{Backup, BackupConfig, BackupFaults};
use crate::clock::Instant;
use crate::primary::{Primary, PrimaryConfig, PrimaryFaults};
use crate::tracker::TrackerChoice;
use crate::DiskSource;
use guest::{SimActivate, SimClock, SimDisk, SimGuest, World};
use net::{Net, SimLink};

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = splitmix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// One fault, at a moment of the schedule.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// Cut primary→backup, backup→primary, or both, for a while.
    Cut {
        to_backup: bool,
        to_primary: bool,
        heal_after: Duration,
    },
    Latency {
        ms: u64,
        heal_after: Duration,
    },
    Reset,
    QemuCrash,
    /// The primary's tandemd dies: no fence from it any more, only the
    /// shim's lease.
    TandemdCrash,
    /// `tandem unprotect`: the guest runs on, unprotected.
    Unprotect,
    /// The next disk check takes this long (guest stopped, loop busy).
    SlowCheck(Duration),
    /// Another VM with the same name is protected to the same backup.
    Intruder,
}

impl Fault {
    /// Whether the fault can silence the primary for the backup (only
    /// then may it take over). A reset does when the primary cannot
    /// reconnect in time (its loop busy with a slow checkpoint, say).
    fn silences(&self) -> bool {
        matches!(
            self,
            Fault::Cut { .. } | Fault::Reset | Fault::QemuCrash | Fault::TandemdCrash
        )
    }
}

/// The bugs a schedule can be run with, each restoring code that a fix
/// replaced (the simulation must find them).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bugs {
    pub(crate) take_over_on_suspicion: bool,
    pub(crate) heartbeats_only_when_idle: bool,
    pub(crate) one_way_liveness: bool,
    pub(crate) ignore_identity: bool,
    /// tandemd's takeover rule before the simulation: fence + 2
    /// heartbeats, without the shim lease's grace.
    pub(crate) takeover_without_lease_grace: bool,
    pub(crate) unconfirmed_bye: bool,
    pub(crate) degrade_without_bye: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    pub(crate) seed: u64,
    epoch: Duration,
    heartbeat: Duration,
    fence: Duration,
    takeover: Duration,
    faults: Vec<(Duration, Fault)>,
    /// The primary's degrade policy (half the schedules): short, so that
    /// latency and slow checks trip it.
    degrade_after: Option<Duration>,
}

/// How long faults may start after the beginning, and how long the pair
/// then gets to settle with everything healed.
const FAULT_WINDOW_MS: u64 = 3000;
const SETTLE: Duration = Duration::from_millis(2500);

impl Schedule {
    pub(crate) fn from_seed(seed: u64) -> Schedule {
        let mut r = Rng(seed);
        let heartbeat = r.ms(20, 60);
        let fence = heartbeat * (4 + r.below(5) as u32);
        // tandemd's rule, and anything above it.
        let takeover = crate::primary::min_takeover_timeout(fence, heartbeat) + r.ms(0, 200);
        let epoch = r.ms(10, 60);
        let n = r.below(7) as usize;
        let mut faults = Vec::with_capacity(n);
        for _ in 0..n {
            let at = r.ms(100, FAULT_WINDOW_MS);
            let fault = match r.below(16) {
                0..=2 => Fault::Cut {
                    to_backup: true,
                    to_primary: false,
                    heal_after: r.ms(50, 2000),
                },
                3..=5 => Fault::Cut {
                    to_backup: false,
                    to_primary: true,
                    heal_after: r.ms(50, 2000),
                },
                6..=7 => Fault::Cut {
                    to_backup: true,
                    to_primary: true,
                    heal_after: r.ms(50, 2000),
                },
                8..=9 => Fault::Latency {
                    ms: r.below(40),
                    heal_after: r.ms(100, 1500),
                },
                10 => Fault::Reset,
                11 => Fault::QemuCrash,
                12 => Fault::TandemdCrash,
                13 => Fault::Unprotect,
                14 => Fault::SlowCheck(r.ms(100, 1500)),
                _ => Fault::Intruder,
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|(at, _)| *at);
        // Drawn last, so a seed's faults are what they were before.
        let degrade_after = (r.below(2) == 0).then(|| r.ms(100, 800));
        Schedule {
            seed,
            epoch,
            heartbeat,
            fence,
            takeover,
            faults,
            degrade_after,
        }
    }

    fn silenced(&self) -> bool {
        self.faults.iter().any(|(_, f)| f.silences())
    }
}

/// What one schedule did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) violations: Vec<String>,
    pub(crate) committed: u64,
    pub(crate) replies: u64,
    pub(crate) takeovers: u64,
    pub(crate) degrades: u64,
}

/// Runs `schedule` with `bugs` on a fresh paused runtime.
pub(crate) fn run(schedule: &Schedule, bugs: Bugs) -> Outcome {
    let mut schedule = schedule.clone();
    if bugs.takeover_without_lease_grace {
        let above = schedule.takeover
            - crate::primary::min_takeover_timeout(schedule.fence, schedule.heartbeat);
        schedule.takeover = schedule.fence + schedule.heartbeat * 2 + above;
    }
    let schedule = &schedule;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let dir = tempfile::Builder::new()
        .prefix("tandem-sim-")
        .tempdir_in(scratch())
        .expect("a scratch directory");
    let outcome = rt.block_on(scenario(schedule, bugs, dir.path()));
    rt.shutdown_background();
    outcome
}

/// tmpfs when there is one: a schedule makes hundreds of fsyncs.
fn scratch() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

struct Protected {
    guest: SimGuest,
    primary: Option<Primary>,
}

fn protect(
    guest: &SimGuest,
    net: &Arc<Net>,
    s: &Schedule,
    clock: &Arc<SimClock>,
    disk: Arc<SimDisk>,
    bugs: Bugs,
) -> Primary {
    let mut cfg = PrimaryConfig::over(Arc::new(SimLink {
        net: net.clone(),
        peer: format!("primary-{:02x}", guest.0.tag),
    }));
    cfg.epoch = s.epoch;
    cfg.heartbeat = s.heartbeat;
    cfg.fence_timeout = s.fence;
    cfg.degrade_after = s.degrade_after;
    cfg.tracker = TrackerChoice::Scan;
    cfg.observer = Some(guest.0.output.clone());
    cfg.clock = clock.clone();
    cfg.faults = PrimaryFaults {
        heartbeats_only_when_idle: bugs.heartbeats_only_when_idle,
        one_way_liveness: bugs.one_way_liveness,
        unconfirmed_bye: bugs.unconfirmed_bye,
        degrade_without_bye: bugs.degrade_without_bye,
    };
    Primary::spawn(guest.clone(), cfg, vec![disk as Arc<dyn DiskSource>])
}

async fn scenario(s: &Schedule, bugs: Bugs, dir: &std::path::Path) -> Outcome {
    let origin = Instant::now();
    let world = Arc::new(World::default());
    let clock = Arc::new(SimClock { origin });
    let guest = SimGuest::new(dir, "uuid-a", 0xa1, world.clone(), true);
    let mut bcfg = BackupConfig::new(dir.join("replicas"));
    bcfg.heartbeat = s.heartbeat;
    bcfg.takeover_timeout = s.takeover;
    bcfg.suspect_after = s.fence;
    bcfg.faults = BackupFaults {
        ignore_identity: bugs.ignore_identity,
        take_over_on_suspicion: bugs.take_over_on_suspicion,
        ..BackupFaults::default()
    };
    let backup = Backup::new(
        bcfg,
        Arc::new(SimActivate {
            world: world.clone(),
            guest: guest.clone(),
        }),
    );
    let net = Net::new(backup.clone());
    let mut background = vec![
        tokio::spawn(guest.clone().cpu(Duration::from_millis(3), s.seed)),
        tokio::spawn(guest.clone().shim(clock.clone())),
    ];
    let disk = SimDisk::new();
    let mut a = Protected {
        guest: guest.clone(),
        primary: Some(protect(&guest, &net, s, &clock, disk.clone(), bugs)),
    };
    let mut intruders: Vec<Protected> = Vec::new();

    // Faults and their heals, in time order.
    let mut timeline: Vec<(Duration, Step)> = Vec::new();
    for &(at, f) in &s.faults {
        timeline.push((at, Step::Fault(f)));
        match f {
            Fault::Cut {
                to_backup,
                to_primary,
                heal_after,
            } => timeline.push((
                at + heal_after,
                Step::Heal {
                    to_backup,
                    to_primary,
                },
            )),
            Fault::Latency { heal_after, .. } => {
                timeline.push((at + heal_after, Step::HealLatency))
            }
            _ => {}
        }
    }
    timeline.sort_by_key(|(at, _)| *at);
    let mut end = Duration::from_millis(FAULT_WINDOW_MS);
    for (at, step) in timeline {
        tokio::time::sleep_until(origin + at).await;
        end = end.max(at);
        match step {
            Step::Heal {
                to_backup,
                to_primary,
            } => {
                if to_backup {
                    net.to_backup.set(true);
                }
                if to_primary {
                    net.to_primary.set(true);
                }
            }
            Step::HealLatency => net.latency_ms.store(0, Ordering::Relaxed),
            Step::Fault(f) => match f {
                Fault::Cut {
                    to_backup,
                    to_primary,
                    ..
                } => {
                    if to_backup {
                        net.to_backup.set(false);
                    }
                    if to_primary {
                        net.to_primary.set(false);
                    }
                }
                Fault::Latency { ms, .. } => net.latency_ms.store(ms, Ordering::Relaxed),
                Fault::Reset => net.reset(),
                Fault::QemuCrash => a.guest.crash(),
                Fault::TandemdCrash => {
                    if let Some(p) = a.primary.take() {
                        p.abort();
                        // The host's kernel resets its connections.
                        net.reset();
                    }
                }
                Fault::Unprotect => {
                    if let Some(p) = a.primary.take() {
                        p.stop().await;
                    }
                }
                Fault::SlowCheck(d) => *disk.slow_check.lock() = Some(d),
                Fault::Intruder => {
                    let tag = 0xb0 + intruders.len() as u8;
                    let other = SimGuest::new(
                        dir,
                        &format!("uuid-b{}", intruders.len()),
                        tag,
                        world.clone(),
                        false,
                    );
                    background.push(tokio::spawn(
                        other.clone().cpu(Duration::from_millis(3), s.seed ^ 0xb),
                    ));
                    let p = protect(&other, &net, s, &clock, SimDisk::new(), bugs);
                    intruders.push(Protected {
                        guest: other,
                        primary: Some(p),
                    });
                }
            },
        }
    }
    net.to_backup.set(true);
    net.to_primary.set(true);
    net.latency_ms.store(0, Ordering::Relaxed);
    tokio::time::sleep_until(origin + end + SETTLE).await;

    let committed = a
        .primary
        .as_ref()
        .map(|p| *p.committed().borrow())
        .unwrap_or(0);
    let takeovers = world.takeovers.load(Ordering::SeqCst);
    if takeovers > 0 && !s.silenced() {
        world.violation(format!(
            "the backup took over a primary that was never silenced (faults: {:?})",
            s.faults
        ));
    }
    if s.faults.is_empty() {
        let replies = world.replies_released.load(Ordering::SeqCst);
        if committed < 10 || replies == 0 {
            world.violation(format!(
                "no progress without faults: {committed} epochs committed, {replies} replies released"
            ));
        }
    }
    if let Err(e) = one_identity(&dir.join("replicas").join("web"), a.guest.0.tag) {
        world.violation(e);
    }
    let _ = a.guest.counter();

    for p in [a.primary.take()]
        .into_iter()
        .chain(intruders.iter_mut().map(|i| i.primary.take()))
        .flatten()
    {
        p.abort();
    }
    net.reset();
    for t in background {
        t.abort();
    }
    Outcome {
        violations: world.violations(),
        committed,
        replies: world.replies_released.load(Ordering::SeqCst),
        takeovers,
        degrades: world.degrades.load(Ordering::SeqCst),
    }
}

enum Step {
    Fault(Fault),
    Heal { to_backup: bool, to_primary: bool },
    HealLatency,
}

/// Every written page of the replica's RAM carries the watched VM's tag.
fn one_identity(replica: &std::path::Path, tag: u8) -> Result<(), String> {
    let Ok(ram) = std::fs::read(replica.join(crate::replica::RAM_FILE)) else {
        return Ok(());
    };
    for (i, page) in ram.chunks(crate::wire::PAGE_SIZE).enumerate() {
        if page[0] != 0 && page[0] != tag {
            return Err(format!(
                "the replica's page {i} holds another VM's data (tag {:02x})",
                page[0]
            ));
        }
    }
    Ok(())
}
