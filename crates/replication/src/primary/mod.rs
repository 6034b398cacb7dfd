//! The primary side: the epoch loop of one protected VM.
//!
//! Each epoch: stop the guest, collect dirty pages (copied while stopped),
//! take the device state and the epoch's disk writes, resume the guest —
//! the pause ends there — then ship the epoch. The backup answers
//! `COMMITTED(N)` once epoch N is durable; those numbers are published, in
//! order, on [`Primary::committed`] for whoever holds output until commit.
//!
//! Protecting a VM does not stop it for a full copy: the first epoch's RAM
//! is copied while the guest runs (each page is hashed *as copied*, so any
//! page that changes afterwards is caught by the next scan), and the first
//! consistent epoch follows at once.
//!
//! Fencing: if the backup has not been heard from (ack or heartbeat) for the
//! fencing timeout, the guest is paused and protection stops. The backup
//! takes over only after a longer timeout, so the two never both run.

mod epoch;
mod fence;
mod guest;
mod io;
mod session;
#[cfg(test)]
mod tests;

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

use tandem_api::{FtRole, FtState, FtStatus};
use tokio::sync::watch;
use tracing::{info, warn};

pub use guest::{CheckpointWindow, DeviceStateSave, Guest, GuestError, GuestExit};

use crate::clock::{Clock, Instant, SystemClock};
use crate::link::{Connect, Endpoint};
use crate::ram::RamMap;
use crate::stats::PauseStats;
use crate::tracker::{self, TrackerChoice, TrackerContext};
use crate::wire::PAGE_SIZE;
use crate::{DiskSource, EpochObserver};
use fence::{fence_watchdog, Contact};
pub use fence::{min_takeover_timeout, LEASE_GRACE};
use io::AbortOnDrop;

#[derive(Clone)]
pub struct PrimaryConfig {
    /// Where the backup listens (how the link is reached).
    pub backup: Arc<dyn Connect>,
    pub epoch: Duration,
    pub heartbeat: Duration,
    /// No word from the backup for this long: pause the guest (self-fence).
    pub fence_timeout: Duration,
    /// Epochs sent but not committed before the loop waits for the backup.
    pub max_inflight: u64,
    /// Bound on taking the device state.
    pub device_state_timeout: Duration,
    /// Told about epochs as they open and commit (output commit).
    pub observer: Option<Arc<dyn EpochObserver>>,
    /// Dirty-page tracker.
    pub tracker: TrackerChoice,
    /// Something besides QEMU writes guest RAM without reporting it (a
    /// vhost-user switch port): rules out page-table tracking.
    pub external_writers: bool,
    /// Where the switch records its writes into guest RAM, drained into
    /// the tracker at every checkpoint.
    pub external_log: Option<Arc<tandem_dirty::PageLog>>,
    /// Where every timeout reads the time.
    pub clock: Arc<dyn Clock>,
    /// This host's generation for the VM: 0 for a VM created here, one more
    /// than its replica's for a VM this host took over. The backup refuses
    /// a primary older than its replica.
    pub generation: u64,
    /// The backup stays reachable but commits nothing for this long (its
    /// disk is full, its applies fail, it is stuck): end protection on
    /// purpose rather than hold the VM's output for ever. The backup is
    /// told first (`Bye`, confirmed, so it disarms and cannot resume an
    /// older checkpoint), then held output goes out, the guest runs on
    /// unprotected, and protection is tried again from a full copy. `None`
    /// holds output until the backup commits or an operator ends
    /// protection.
    pub degrade_after: Option<Duration>,
    #[cfg(feature = "fault-injection")]
    pub faults: PrimaryFaults,
}

/// Test-only switches that restore the behaviour before a fix, so a test
/// can show it would catch the bug (`fault-injection` builds only).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrimaryFaults {
    /// Heartbeats only while the epoch loop idles (the version-1
    /// behaviour): a long running copy or digest wait is silence.
    pub heartbeats_only_when_idle: bool,
    /// Any frame from the backup counts as contact, echoed or not (the
    /// version-2 behaviour): an asymmetric partition that leaves the
    /// backup→primary direction open keeps the primary from fencing.
    pub one_way_liveness: bool,
    /// Protection ends and the guest runs on without the backup having
    /// confirmed `Bye` (the version-2 behaviour): an unprotect during a
    /// partition leaves the guest running while the backup takes over.
    pub unconfirmed_bye: bool,
    /// The degrade policy releases output and stops fencing without the
    /// backup's confirmed `Bye`: the backup stays armed on an older
    /// checkpoint and may resume it.
    pub degrade_without_bye: bool,
}

impl std::fmt::Debug for PrimaryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryConfig")
            .field("backup", &self.backup.to_string())
            .field("epoch", &self.epoch)
            .field("heartbeat", &self.heartbeat)
            .field("fence_timeout", &self.fence_timeout)
            .field("max_inflight", &self.max_inflight)
            .field("observer", &self.observer.is_some())
            .field("tracker", &self.tracker)
            .field("external_writers", &self.external_writers)
            .field("external_log", &self.external_log.is_some())
            .field("generation", &self.generation)
            .field("degrade_after", &self.degrade_after)
            .finish()
    }
}

impl PrimaryConfig {
    pub fn new(backup: Endpoint) -> Self {
        Self::over(Arc::new(backup))
    }

    /// A configuration whose link is `backup` (tests hand in a pipe).
    pub fn over(backup: Arc<dyn Connect>) -> Self {
        PrimaryConfig {
            backup,
            epoch: Duration::from_millis(50),
            heartbeat: Duration::from_millis(100),
            fence_timeout: Duration::from_millis(1500),
            max_inflight: 4,
            device_state_timeout: Duration::from_secs(5),
            observer: None,
            tracker: TrackerChoice::Auto,
            external_writers: false,
            external_log: None,
            clock: Arc::new(SystemClock),
            generation: 0,
            degrade_after: None,
            #[cfg(feature = "fault-injection")]
            faults: PrimaryFaults::default(),
        }
    }
}

/// A running protection of one VM.
pub struct Primary {
    status: Arc<Mutex<FtStatus>>,
    stop_tx: watch::Sender<bool>,
    hold: EpochHold,
    committed: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// Holds and releases a protection's checkpoints (see
/// [`EpochHold::hold`]); a clone may be used without the [`Primary`].
#[derive(Clone)]
pub struct EpochHold {
    /// Asks the epoch loop to take no checkpoint (a live migration owns
    /// QEMU's migration machinery meanwhile).
    hold_tx: Arc<watch::Sender<bool>>,
    /// The loop's answer: `Some(epoch)` once it is idle under the hold with
    /// every epoch it sent committed (`epoch` the last).
    held: watch::Receiver<Option<u64>>,
    status: Arc<Mutex<FtStatus>>,
}

impl EpochHold {
    /// Stops taking checkpoints and waits (up to `bound`) until every
    /// epoch sent is committed; returns the last one. Heartbeats and the
    /// fence go on, so the backup stays armed on that epoch, and output
    /// the guest sends from now on stays held: nothing a client sees can
    /// be contradicted if the backup has to resume from it. On error the
    /// hold is lifted again.
    pub async fn hold(&self, bound: Duration) -> Result<u64, HoldError> {
        self.hold_tx.send_replace(true);
        let mut held = self.held.clone();
        let waited = tokio::time::timeout(bound, held.wait_for(|h| h.is_some())).await;
        let outcome = match waited {
            Ok(Ok(h)) => Ok(h.unwrap_or_default()),
            Ok(Err(_)) => Err(HoldError::Ended),
            Err(_) => Err(HoldError::Timeout(bound, self.status.lock().detail.clone())),
        };
        if outcome.is_err() {
            self.hold_tx.send_replace(false);
        }
        outcome
    }

    /// Checkpoints go on (the migration that held them failed or was
    /// cancelled): the next commit releases the output held meanwhile.
    pub fn release(&self) {
        self.hold_tx.send_replace(false);
    }

    /// Whether checkpoints are held.
    pub fn is_holding(&self) -> bool {
        *self.hold_tx.borrow()
    }
}

/// Why epochs could not be held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error("protection has ended")]
    Ended,
    #[error("the backup did not commit the epochs in flight within {0:?} ({1})")]
    Timeout(Duration, String),
}

impl Primary {
    pub fn spawn<G: Guest>(port: G, cfg: PrimaryConfig, disks: Vec<Arc<dyn DiskSource>>) -> Self {
        let status = Arc::new(Mutex::new(FtStatus {
            vm: port.name().to_string(),
            role: Some(FtRole::Primary),
            state: FtState::Connecting,
            peer: cfg.backup.to_string(),
            epoch_ms: cfg.epoch.as_millis() as u64,
            tracker: cfg.tracker.to_string(),
            ..Default::default()
        }));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (hold_tx, hold_rx) = watch::channel(false);
        let (held_tx, held) = watch::channel(None);
        let (committed_tx, committed) = watch::channel(0);
        let engine = Engine {
            port,
            cfg,
            disks,
            status: status.clone(),
            stop: stop_rx,
            hold: hold_rx,
            held_tx,
            committed_tx,
            pauses: PauseStats::new(1024),
            epochs_started: None,
            first_consistent: None,
            stateless_since: None,
            last_error: None,
            fenced_retries: 0,
            instance: new_instance(),
            sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            disk_failure: None,
            progress: (0, Instant::now()),
            last_failure: None,
        };
        let task = tokio::spawn(engine.run());
        let hold = EpochHold {
            hold_tx: Arc::new(hold_tx),
            held,
            status: status.clone(),
        };
        Primary {
            status,
            stop_tx,
            hold,
            committed,
            task,
        }
    }

    pub fn status(&self) -> FtStatus {
        self.status.lock().clone()
    }

    /// The last committed epoch, updated in order as the backup commits.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// See [`EpochHold::hold`].
    pub async fn hold_epochs(&self, bound: Duration) -> Result<u64, HoldError> {
        self.hold.hold(bound).await
    }

    /// See [`EpochHold::release`].
    pub fn release_epochs(&self) {
        self.hold.release();
    }

    /// Whether checkpoints are held.
    pub fn is_holding(&self) -> bool {
        self.hold.is_holding()
    }

    /// A handle that holds and releases this protection's checkpoints.
    pub fn epoch_hold(&self) -> EpochHold {
        self.hold.clone()
    }

    /// Ends this protection because the VM now runs on another host, a
    /// newer generation that has taken the replica over from this one (it
    /// has committed there). Nothing is said to the backup: a `Bye` would
    /// disarm the new primary's replica. The guest here is paused and
    /// about to be removed, so nothing is fenced or resumed either.
    pub fn handed_over(self) {
        self.task.abort();
    }

    /// Ends the protection as a crash of tandemd would: every task stops
    /// at once, nothing is said to the backup, and the guest is left under
    /// whatever lease it had (the simulation's primary-host crash).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn abort(self) {
        self.task.abort();
    }

    /// Ends protection: tells the backup (so it does not take over) and
    /// waits for the loop to finish.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.task.await;
    }
}

struct Engine<G: Guest> {
    port: G,
    cfg: PrimaryConfig,
    disks: Vec<Arc<dyn DiskSource>>,
    status: Arc<Mutex<FtStatus>>,
    stop: watch::Receiver<bool>,
    hold: watch::Receiver<bool>,
    held_tx: watch::Sender<Option<u64>>,
    committed_tx: watch::Sender<u64>,
    pauses: PauseStats,
    epochs_started: Option<(Instant, u64)>,
    /// The first epoch of this connection that carries device state: once
    /// it commits, the backup can resume the guest.
    first_consistent: Option<u64>,
    /// The first epoch without device state sent since the last one with
    /// it: once the backup commits it, its replica is not resumable.
    stateless_since: Option<u64>,
    /// Why the previous connection failed, shown until protection is back.
    last_error: Option<String>,
    /// Reconnection attempts since the guest was fenced (backs off).
    fenced_retries: u32,
    /// The last epoch handed to the link in this session (acks beyond it
    /// are refused).
    sent: Arc<std::sync::atomic::AtomicU64>,
    /// This protection's instance, in every hello: the backup lets a
    /// reconnect of the same instance replace its old connection, and
    /// refuses another instance while this one is alive.
    instance: u64,
    /// A disk whose log lost writes, as last checked: shown until the disk
    /// has been copied again.
    disk_failure: Option<crate::DiskFailure>,
    /// The newest commit seen and when it was seen: how long the backup has
    /// gone without committing (the degrade policy's clock).
    progress: (u64, Instant),
    /// Why the last session with the backup failed (its own words where it
    /// gave them): named when protection degrades on a stall.
    last_failure: Option<String>,
}

/// A random instance number (the process's hasher keys are random; the
/// time makes two protections of one process differ).
fn new_instance() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::collections::hash_map::RandomState::new().hash_one(now)
}

/// How one connection ended.
enum Ended {
    /// Protection ends; whether the backup confirmed `Bye`.
    Stopped {
        bye_confirmed: bool,
    },
    Fenced,
    Lost(String),
    /// The backup answers but has committed nothing for the degrade
    /// timeout.
    Stalled(String),
    GuestGone,
}

impl<G: Guest> Engine<G> {
    fn heartbeats_only_when_idle(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.heartbeats_only_when_idle;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_unconfirmed_bye(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.unconfirmed_bye;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_degrade_without_bye(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.degrade_without_bye;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn one_way_liveness(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.one_way_liveness;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn set(&self, f: impl FnOnce(&mut FtStatus)) {
        f(&mut self.status.lock());
    }

    async fn run(mut self) {
        let ram = match RamMap::open(self.port.ram_file(), self.port.ram_size()) {
            Ok(r) => r,
            Err(e) => {
                self.set(|s| {
                    s.state = FtState::Stopped;
                    s.detail = format!("cannot map guest RAM: {e}");
                });
                return;
            }
        };
        let pages = (self.port.ram_size() / PAGE_SIZE as u64) as usize;
        let ctx = TrackerContext {
            uffd_socket: self.port.uffd_socket(),
            qemu_pid: self.port.qemu_pid(),
            ram_file: ram.file(),
            pages,
            external_writers: self.cfg.external_writers,
        };
        let mut tracker = match tracker::choose(self.cfg.tracker, &ctx) {
            Ok((t, note)) => {
                info!(vm = %self.port.name(), tracker = %note, "dirty-page tracker");
                self.set(|s| s.tracker = note);
                t
            }
            Err(e) => {
                self.set(|s| {
                    s.state = FtState::Stopped;
                    s.detail = e.to_string();
                });
                return;
            }
        };
        let contact = Arc::new(Contact::new(self.cfg.clock.clone()));
        let watchdog = tokio::spawn(fence_watchdog(
            self.port.clone(),
            contact.clone(),
            self.cfg.fence_timeout,
            self.status.clone(),
        ));
        let _watchdog = AbortOnDrop(watchdog);
        // Whether the backup confirmed `Bye` on the way out.
        let mut confirmed = false;
        loop {
            if *self.stop.borrow() {
                break;
            }
            let ended = match self.cfg.backup.connect().await {
                Ok(conn) => self.session(conn, &ram, &mut tracker, &contact).await,
                Err(e) => Ended::Lost(format!("cannot reach the backup {}: {e}", self.cfg.backup)),
            };
            match ended {
                Ended::Stopped { bye_confirmed } => {
                    confirmed = bye_confirmed;
                    break;
                }
                Ended::GuestGone => {
                    if let Some(o) = &self.cfg.observer {
                        o.abandoned();
                    }
                    self.port.clear_lease();
                    self.set(|s| {
                        s.state = FtState::Stopped;
                        s.detail = "the guest's QEMU is gone".into();
                    });
                    return;
                }
                Ended::Fenced => {
                    if !self.after_fence(&contact).await {
                        break;
                    }
                }
                Ended::Lost(_) if contact.is_fenced() => {
                    if !self.after_fence(&contact).await {
                        break;
                    }
                }
                Ended::Stalled(why) => {
                    let why = match &self.last_failure {
                        Some(f) => format!("{why}; before that: {f}"),
                        None => why,
                    };
                    if !self.degrade(why, &contact).await {
                        break;
                    }
                }
                Ended::Lost(why) if self.stalled() => {
                    self.last_failure = Some(why.clone());
                    if !self.degrade(why, &contact).await {
                        break;
                    }
                }
                Ended::Lost(why) => {
                    self.last_failure = Some(why.clone());
                    for d in &self.disks {
                        d.resync_all();
                    }
                    warn!(vm = %self.port.name(), "protection degraded: {why}");
                    self.last_error = Some(why.clone());
                    self.set(|s| {
                        s.state = FtState::Degraded;
                        s.detail = why.clone();
                    });
                    let owner_gone = tokio::select! {
                        _ = tokio::time::sleep(self.cfg.heartbeat) => false,
                        r = self.stop.changed() => r.is_err(),
                    };
                    if owner_gone {
                        // The Primary handle was dropped (tandemd exiting):
                        // nobody can stop this loop any more, so end it.
                        break;
                    }
                }
            }
        }
        self.end_protection(confirmed, &contact).await;
    }

    /// Protection ends (asked to, or tandemd is going away). The guest may
    /// run on unprotected only if the backup cannot resume it: it has
    /// confirmed `Bye` (and disarmed), or it never held anything
    /// resumable. Otherwise the guest stays fenced, as it would for a
    /// silent backup, and its held output is dropped: the backup may take
    /// over from the last commit. (Releasing the guest unconfirmed was a
    /// split brain the simulation found: an unprotect during a partition,
    /// then the backup's takeover.)
    async fn end_protection(&mut self, confirmed: bool, contact: &Arc<Contact>) {
        let confirmed =
            confirmed || self.fault_unconfirmed_bye() || self.confirm_bye(contact).await;
        if confirmed {
            if contact.fence() == (fence::Fence::Fenced { paused: true }) {
                if let Err(e) = self.port.unfence().await {
                    warn!(vm = %self.port.name(), "resuming the guest after protection ended: {e}");
                }
            }
            contact.disarm();
            self.port.clear_lease();
            if let Some(o) = &self.cfg.observer {
                o.ended();
            }
            self.set(|s| {
                s.state = FtState::Stopped;
                s.detail = "protection ended".into();
            });
            return;
        }
        if let Some(o) = &self.cfg.observer {
            o.abandoned();
        }
        if matches!(contact.fence(), fence::Fence::Fenced { .. }) {
            // Paused through QMP: the shim's lease is not needed for it.
            self.port.clear_lease();
        }
        let why = self
            .last_error
            .clone()
            .unwrap_or_else(|| "no answer".into());
        warn!(vm = %self.port.name(), "protection ended without the backup's confirmation ({why}); the guest stays fenced");
        self.set(|s| {
            s.state = FtState::Stopped;
            s.detail = format!(
                "protection ended, but the backup did not confirm it ({why}) and may take over: the guest stays paused; resume it (`tandem vm resume {name}`) only once it does not run on the backup",
                name = self.port.name()
            );
        });
    }

    /// Tells the backup that protection ends, over a connection of its
    /// own, until it confirms or the guest is fenced (the watchdog fences
    /// a backup that stays silent, as during protection).
    async fn confirm_bye(&mut self, contact: &Arc<Contact>) -> bool {
        if contact.fence() == fence::Fence::Disarmed {
            // Nothing the backup holds is resumable.
            return true;
        }
        let give_up = Instant::now() + self.cfg.fence_timeout * 4;
        loop {
            if contact.fence() == fence::Fence::Frozen {
                return false;
            }
            match tokio::time::timeout(self.cfg.fence_timeout, self.cfg.backup.connect()).await {
                Ok(Ok(conn)) => match self.say_bye(conn, contact).await {
                    Ok(()) => return true,
                    Err(why) => self.last_error = Some(why),
                },
                Ok(Err(e)) => self.last_error = Some(format!("cannot reach the backup: {e}")),
                Err(_) => self.last_error = Some("cannot reach the backup: timed out".into()),
            }
            if contact.is_fenced() {
                return false;
            }
            if Instant::now() >= give_up {
                // A backup that answers but never confirms: fence here
                // rather than let the guest run beside a possible takeover.
                if contact.begin_fence() {
                    let outcome = match self.port.fence("protection ended unconfirmed").await {
                        Ok(paused) => fence::Fence::Fenced { paused },
                        Err(_) => fence::Fence::Frozen,
                    };
                    contact.fenced(outcome);
                }
                return false;
            }
            tokio::time::sleep(self.cfg.heartbeat).await;
        }
    }

    /// Whether the backup has gone without committing for the degrade
    /// timeout.
    fn stalled(&self) -> bool {
        self.cfg
            .degrade_after
            .is_some_and(|after| self.progress.1.elapsed() >= after)
    }

    /// Notes the backup's newest commit (the degrade policy's clock).
    fn note_progress(&mut self, committed: u64) {
        if committed != self.progress.0 {
            self.progress = (committed, Instant::now());
            // Commits again: an older failure explains no later stall.
            self.last_failure = None;
        }
    }

    /// The degrade policy: the backup has committed nothing for the degrade
    /// timeout. Once it confirms `Bye` it holds nothing it could resume, so
    /// nothing the guest says can be contradicted by a failover: held
    /// output goes out and the guest runs on, unprotected, while
    /// protection is tried again from a full copy. A backup that does not
    /// confirm is handled as a silent one (the guest is fenced). Returns
    /// whether to keep trying.
    async fn degrade(&mut self, why: String, contact: &Arc<Contact>) -> bool {
        let after = self.cfg.degrade_after.unwrap_or_default();
        if !self.fault_degrade_without_bye() && !self.confirm_bye(contact).await {
            return self.after_fence(contact).await;
        }
        contact.disarm();
        for d in &self.disks {
            d.resync_all();
        }
        if let Some(o) = &self.cfg.observer {
            o.unprotected();
        }
        let detail = format!(
            "unprotected: the backup committed nothing for {:.1} s ({why}); output is no longer held, and protection is being retried",
            after.as_secs_f64()
        );
        warn!(vm = %self.port.name(), "{detail}");
        self.last_error = Some(detail.clone());
        self.set(|s| {
            s.state = FtState::Degraded;
            s.detail = detail;
        });
        self.progress.1 = Instant::now();
        // Retry no sooner than a heartbeat, and no more than once per
        // degrade timeout: each retry is a full copy.
        let owner_gone = tokio::select! {
            _ = tokio::time::sleep(after.max(self.cfg.heartbeat)) => false,
            r = self.stop.changed() => r.is_err(),
        };
        !owner_gone && !*self.stop.borrow()
    }

    /// The guest is fenced and the session over: held output is dropped
    /// (its epochs will never commit from here) and every disk must be
    /// resent. A fence that paused the guest cleanly is not the end: the
    /// loop keeps reconnecting, and a backup that accepts the connection
    /// (it has not taken over, and restarts its silence clock under the
    /// lock its takeover takes) grants the resume (see `session`). Returns
    /// whether to keep trying.
    async fn after_fence(&mut self, contact: &Contact) -> bool {
        if let Some(o) = &self.cfg.observer {
            o.abandoned();
        }
        if contact.fence() == fence::Fence::Frozen {
            return false;
        }
        for d in &self.disks {
            d.resync_all();
        }
        // A backup that took over refuses every attempt: back off (up to
        // 32 heartbeats) rather than knock every heartbeat forever.
        let wait = self.cfg.heartbeat * (1u32 << self.fenced_retries.min(5));
        self.fenced_retries = self.fenced_retries.saturating_add(1);
        let owner_gone = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            r = self.stop.changed() => r.is_err(),
        };
        !owner_gone && !*self.stop.borrow()
    }
}
