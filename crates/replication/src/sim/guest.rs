//! The simulated guest, its QEMU shim, its clients and the backup host's
//! way of running it, each recording what the invariants need.
//!
//! The guest writes a counter into its RAM pages while it runs; every
//! write is also a reply to a client, held by output commit until the
//! checkpoint that covers it commits. Each checkpoint stop keeps a copy of
//! RAM and puts its stop number and counter into the device state, so a
//! takeover can check that the replica it resumes is exactly one
//! checkpoint, and that it contains every reply a client has seen.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backup::{Activate, ActivateError};
use crate::clock::{Clock, Instant};
use crate::primary::{CheckpointWindow, DeviceStateSave, Guest, GuestError, GuestExit};
use crate::replica::{DEVICE_STATE_FILE, RAM_FILE};
use crate::wire::PAGE_SIZE;
use crate::{disklog, DiskSource, EpochObserver};

pub(super) const PAGES: u64 = 16;

/// What every part of a scenario reports to.
#[derive(Default)]
pub(super) struct World {
    violations: Mutex<Vec<String>>,
    /// The backup runs the VM (it took over).
    pub(super) backup_active: AtomicBool,
    pub(super) takeovers: AtomicU64,
    /// Times the degrade policy released the output.
    pub(super) degrades: AtomicU64,
    /// The highest counter any client has seen a reply for.
    pub(super) released: AtomicU64,
    pub(super) replies_released: AtomicU64,
}

impl World {
    /// Records a broken invariant (once per kind: the first words up to
    /// the first parenthesis or colon).
    pub(super) fn violation(&self, what: String) {
        let kind = |w: &str| w.split([':', '(']).next().unwrap_or("").to_string();
        let mut v = self.violations.lock();
        if !v.iter().any(|seen| kind(seen) == kind(&what)) {
            v.push(what);
        }
    }

    pub(super) fn violations(&self) -> Vec<String> {
        self.violations.lock().clone()
    }
}

/// The lease clock: the paused runtime's monotonic time, as ms.
pub(super) struct SimClock {
    pub(super) origin: Instant,
}

impl Clock for SimClock {
    fn lease_ms(&self) -> u64 {
        // An offset keeps a deadline of 0 meaning "long ago".
        1_000_000 + Instant::now().duration_since(self.origin).as_millis() as u64
    }
}

#[derive(Default)]
struct GuestState {
    running: bool,
    /// The fence paused it.
    fenced: bool,
    /// The shim froze it (SIGSTOP) when the lease ran out: for good.
    frozen: bool,
    crashed: bool,
    exit: Option<GuestExit>,
    lease: Option<u64>,
    counter: u64,
    stops: u64,
}

/// One checkpoint stop: the counter then, and RAM.
type Snapshot = (u64, Vec<u8>);

pub(super) struct GuestInner {
    name: String,
    uuid: String,
    /// Written into every page, so another VM's data is recognisable.
    pub(super) tag: u8,
    ram: PathBuf,
    state: Mutex<GuestState>,
    /// Checkpoint stops and the user's lifecycle operations (the fence)
    /// exclude each other, as the supervisor's lifecycle lock does.
    lifecycle: Arc<tokio::sync::Mutex<()>>,
    snapshots: Mutex<HashMap<u64, Snapshot>>,
    pub(super) output: Arc<Output>,
    world: Arc<World>,
    /// Only the VM whose replica is watched counts for the invariants.
    watched: bool,
}

#[derive(Clone)]
pub(super) struct SimGuest(pub(super) Arc<GuestInner>);

impl SimGuest {
    pub(super) fn new(
        dir: &Path,
        uuid: &str,
        tag: u8,
        world: Arc<World>,
        watched: bool,
    ) -> SimGuest {
        let ram = dir.join(format!("guest-{tag:02x}.ram"));
        let f = std::fs::File::create(&ram).expect("guest RAM file");
        f.set_len(PAGES * PAGE_SIZE as u64).expect("guest RAM size");
        SimGuest(Arc::new(GuestInner {
            name: "web".into(),
            uuid: uuid.into(),
            tag,
            ram,
            state: Mutex::new(GuestState {
                running: true,
                ..Default::default()
            }),
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
            snapshots: Mutex::new(HashMap::new()),
            output: Arc::new(Output {
                world: world.clone(),
                watched,
                state: Mutex::new(OutputState::default()),
            }),
            world,
            watched,
        }))
    }

    /// Runs the guest's CPU: while it executes, one page write (and one
    /// reply) every `every`.
    pub(super) async fn cpu(self, every: Duration, mut rng: u64) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0.ram)
            .expect("guest RAM file");
        loop {
            tokio::time::sleep(every).await;
            let counter = {
                let mut s = self.0.state.lock();
                if !(s.running && !s.frozen && !s.crashed) {
                    continue;
                }
                s.counter += 1;
                s.counter
            };
            if self.0.watched && self.0.world.backup_active.load(Ordering::SeqCst) {
                self.0.world.violation(format!(
                    "two running copies: the primary's guest ran (counter {counter}) after the backup took over"
                ));
            }
            rng = super::splitmix(rng);
            let page = rng % PAGES;
            let mut bytes = [0u8; 9];
            bytes[0] = self.0.tag;
            bytes[1..].copy_from_slice(&counter.to_le_bytes());
            file.write_all_at(&bytes, page * PAGE_SIZE as u64)
                .expect("guest RAM write");
            self.0.output.reply(counter);
        }
    }

    /// The shim: freezes QEMU for good once its lease has run out.
    pub(super) async fn shim(self, clock: Arc<SimClock>) {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut s = self.0.state.lock();
            if let Some(deadline) = s.lease {
                if clock.lease_ms() > deadline {
                    s.frozen = true;
                }
            }
        }
    }

    pub(super) fn crash(&self) {
        let mut s = self.0.state.lock();
        s.crashed = true;
        s.running = false;
        s.exit = Some(GuestExit::Crashed);
    }

    pub(super) fn executing(&self) -> bool {
        let s = self.0.state.lock();
        s.running && !s.frozen && !s.crashed
    }

    pub(super) fn counter(&self) -> u64 {
        self.0.state.lock().counter
    }

    fn snapshot(&self, stop: u64) -> Option<Snapshot> {
        self.0.snapshots.lock().get(&stop).cloned()
    }
}

pub(super) struct SimWindow {
    guest: SimGuest,
    stop: u64,
    counter: u64,
    stopped: bool,
    _lifecycle: tokio::sync::OwnedMutexGuard<()>,
}

impl CheckpointWindow for SimWindow {
    fn spawn_device_state(&self, _timeout: Duration) -> DeviceStateSave {
        let mut state = Vec::with_capacity(17);
        state.extend_from_slice(&self.stop.to_le_bytes());
        state.extend_from_slice(&self.counter.to_le_bytes());
        state.push(self.guest.0.tag);
        Box::pin(async move { Ok(state) })
    }

    async fn resume(self) -> Result<(), GuestError> {
        if self.stopped {
            let mut s = self.guest.0.state.lock();
            if !s.crashed {
                s.running = true;
            }
        }
        Ok(())
    }
}

impl Guest for SimGuest {
    type Window<'a> = SimWindow;

    fn name(&self) -> &str {
        &self.0.name
    }
    fn uuid(&self) -> String {
        self.0.uuid.clone()
    }
    fn ram_file(&self) -> &Path {
        &self.0.ram
    }
    fn ram_size(&self) -> u64 {
        PAGES * PAGE_SIZE as u64
    }
    fn qemu_pid(&self) -> Option<u32> {
        None
    }
    fn spec_toml(&self) -> String {
        "name = \"web\"\n".into()
    }
    fn is_closed(&self) -> bool {
        self.0.state.lock().crashed
    }
    fn exit(&self) -> Option<GuestExit> {
        self.0.state.lock().exit
    }

    async fn stop_for_checkpoint(&self) -> Result<SimWindow, GuestError> {
        let guard = self.0.lifecycle.clone().lock_owned().await;
        let (stop, counter, stopped) = {
            let mut s = self.0.state.lock();
            if s.crashed {
                return Err(GuestError::Other("QEMU is gone".into()));
            }
            let stopped = s.running;
            s.running = false;
            s.stops += 1;
            (s.stops, s.counter, stopped)
        };
        let ram = std::fs::read(&self.0.ram).map_err(|e| GuestError::Other(e.to_string()))?;
        self.0.snapshots.lock().insert(stop, (counter, ram));
        Ok(SimWindow {
            guest: self.clone(),
            stop,
            counter,
            stopped,
            _lifecycle: guard,
        })
    }

    fn renew_lease(&self, deadline: u64) -> std::io::Result<()> {
        self.0.state.lock().lease = Some(deadline);
        Ok(())
    }
    fn clear_lease(&self) {
        self.0.state.lock().lease = None;
    }
    async fn fence(&self, _why: &str) -> Result<bool, GuestError> {
        let _l = self.0.lifecycle.lock().await;
        let mut s = self.0.state.lock();
        if s.crashed {
            return Err(GuestError::Other("QEMU is gone".into()));
        }
        let was = s.running;
        s.running = false;
        s.fenced = true;
        Ok(was)
    }
    async fn unfence(&self) -> Result<(), GuestError> {
        let _l = self.0.lifecycle.lock().await;
        let mut s = self.0.state.lock();
        if s.crashed {
            return Err(GuestError::Other("QEMU is gone".into()));
        }
        s.fenced = false;
        s.running = true;
        Ok(())
    }
}

#[derive(Default)]
struct OutputState {
    /// Output now is covered by this checkpoint.
    open: u64,
    /// Replies held: (covering checkpoint, counter).
    held: Vec<(u64, u64)>,
    /// Protection ended: output flows unprotected.
    ended: bool,
    /// The degrade policy released the output: replies go out unheld
    /// (and count as seen by clients) until the next session.
    passthrough: bool,
}

/// Output commit as the switch's gate does it, for the guest's replies.
pub(super) struct Output {
    world: Arc<World>,
    watched: bool,
    state: Mutex<OutputState>,
}

impl Output {
    fn reply(&self, counter: u64) {
        let mut s = self.state.lock();
        if s.ended {
            return;
        }
        if s.passthrough {
            drop(s);
            if self.watched {
                self.world.released.fetch_max(counter, Ordering::SeqCst);
                self.world.replies_released.fetch_add(1, Ordering::SeqCst);
            }
            return;
        }
        let open = s.open;
        s.held.push((open, counter));
    }

    fn release(&self, upto: u64) {
        let mut s = self.state.lock();
        let mut top = 0;
        let mut n = 0;
        s.held.retain(|&(epoch, counter)| {
            let out = epoch <= upto;
            if out {
                top = top.max(counter);
                n += 1;
            }
            !out
        });
        if self.watched && n > 0 {
            self.world.released.fetch_max(top, Ordering::SeqCst);
            self.world.replies_released.fetch_add(n, Ordering::SeqCst);
        }
    }
}

impl EpochObserver for Output {
    fn epoch_opened(&self, epoch: u64) {
        self.state.lock().open = epoch;
    }
    fn session_started(&self, _base: u64, first: u64) {
        let mut s = self.state.lock();
        s.passthrough = false;
        for (epoch, _) in s.held.iter_mut() {
            *epoch = (*epoch).max(first);
        }
        s.open = s.open.max(first);
    }
    fn committed(&self, epoch: u64) {
        self.release(epoch);
    }
    fn abandoned(&self) {
        self.state.lock().held.clear();
    }
    fn ended(&self) {
        let mut s = self.state.lock();
        s.ended = true;
        s.held.clear();
    }
    fn unprotected(&self) {
        if self.watched {
            self.world.degrades.fetch_add(1, Ordering::SeqCst);
        }
        self.release(u64::MAX);
        self.state.lock().passthrough = true;
    }
}

/// A small disk with no writes of its own, whose per-pause check can be
/// made slow (a QMP that takes its time), which is time the epoch loop
/// spends busy with the guest stopped.
pub(super) struct SimDisk {
    pub(super) slow_check: Mutex<Option<Duration>>,
    resync: AtomicBool,
}

pub(super) const DISK_SIZE: u64 = 4 * PAGE_SIZE as u64;

impl SimDisk {
    pub(super) fn new() -> Arc<SimDisk> {
        Arc::new(SimDisk {
            slow_check: Mutex::new(None),
            resync: AtomicBool::new(true),
        })
    }
}

impl DiskSource for SimDisk {
    fn name(&self) -> &str {
        "vda"
    }
    fn size(&self) -> u64 {
        DISK_SIZE
    }
    fn take_writes(&self) -> Vec<u8> {
        let mut log = Vec::new();
        if self.resync.swap(false, Ordering::SeqCst) {
            disklog::push_zero(&mut log, 0, DISK_SIZE);
        }
        log
    }
    fn resync_all(&self) {
        self.resync.store(true, Ordering::SeqCst);
    }
    fn check(&self) -> crate::link::BoxFuture<'_, Result<(), crate::DiskFailure>> {
        let slow = self.slow_check.lock().take();
        Box::pin(async move {
            if let Some(d) = slow {
                tokio::time::sleep(d).await;
            }
            Ok(())
        })
    }
}

/// The backup host running the VM from its replica: checks the replica
/// against what the primary's guest was at that checkpoint, and against
/// every reply a client saw.
pub(super) struct SimActivate {
    pub(super) world: Arc<World>,
    pub(super) guest: SimGuest,
}

impl Activate for SimActivate {
    fn activate(
        &self,
        _vm: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
    {
        let world = self.world.clone();
        let guest = self.guest.clone();
        Box::pin(async move {
            world.takeovers.fetch_add(1, Ordering::SeqCst);
            if guest.executing() {
                world.violation(
                    "two running copies: the backup took over while the primary's guest runs"
                        .into(),
                );
            }
            let state = std::fs::read(dir.join(DEVICE_STATE_FILE))?;
            let ram = std::fs::read(dir.join(RAM_FILE))?;
            if state.len() != 17 {
                world.violation(format!(
                    "the replica's device state is {} bytes, not a checkpoint's 17",
                    state.len()
                ));
                return Err("bad device state".into());
            }
            let stop = u64::from_le_bytes(state[..8].try_into().expect("8 bytes"));
            let counter = u64::from_le_bytes(state[8..16].try_into().expect("8 bytes"));
            if state[16] != guest.0.tag {
                world.violation(format!(
                    "the replica holds another VM's state (tag {:02x})",
                    state[16]
                ));
            }
            match guest.snapshot(stop) {
                Some((c, snap)) if c == counter && snap == ram => {}
                Some(_) => world.violation(format!(
                    "the replica's RAM is not checkpoint {stop}, which its device state names"
                )),
                None => world.violation(format!("checkpoint {stop} was never taken")),
            }
            let released = world.released.load(Ordering::SeqCst);
            if counter < released {
                world.violation(format!(
                    "a client saw reply {released}, but the resumed checkpoint holds only {counter}: committed output lost"
                ));
            }
            world.backup_active.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
}
