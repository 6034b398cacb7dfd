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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_api::{FtRole, FtStatus};
use tandem_supervisor::GuestPort;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::link::{self, BoxStream, Endpoint};
use crate::ram::RamMap;
use crate::stats::PauseStats;
use crate::tracker::{self, DirtyTracker, RamView, ScanTracker, TrackerChoice, TrackerContext};
use crate::wire::{self, Frame, FrameKind, Hello, HelloDisk, PAGE_SIZE};
use crate::{assembler::EpochBuilder, DiskSource, EpochObserver};

#[derive(Clone)]
pub struct PrimaryConfig {
    pub backup: Endpoint,
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
}

impl std::fmt::Debug for PrimaryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryConfig")
            .field("backup", &self.backup)
            .field("epoch", &self.epoch)
            .field("heartbeat", &self.heartbeat)
            .field("fence_timeout", &self.fence_timeout)
            .field("max_inflight", &self.max_inflight)
            .field("observer", &self.observer.is_some())
            .field("tracker", &self.tracker)
            .field("external_writers", &self.external_writers)
            .field("external_log", &self.external_log.is_some())
            .finish()
    }
}

impl PrimaryConfig {
    pub fn new(backup: Endpoint) -> Self {
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
        }
    }
}

/// A running protection of one VM.
pub struct Primary {
    status: Arc<Mutex<FtStatus>>,
    stop_tx: watch::Sender<bool>,
    committed: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Primary {
    pub fn spawn(port: GuestPort, cfg: PrimaryConfig, disks: Vec<Arc<dyn DiskSource>>) -> Self {
        let status = Arc::new(Mutex::new(FtStatus {
            vm: port.name().to_string(),
            role: Some(FtRole::Primary),
            state: "connecting".into(),
            peer: cfg.backup.to_string(),
            epoch_ms: cfg.epoch.as_millis() as u64,
            tracker: cfg.tracker.to_string(),
            ..Default::default()
        }));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (committed_tx, committed) = watch::channel(0);
        let engine = Engine {
            port,
            cfg,
            disks,
            status: status.clone(),
            stop: stop_rx,
            committed_tx,
            pauses: PauseStats::new(1024),
            epochs_started: None,
            first_consistent: None,
            last_error: None,
            fenced_retries: 0,
        };
        let task = tokio::spawn(engine.run());
        Primary {
            status,
            stop_tx,
            committed,
            task,
        }
    }

    pub fn status(&self) -> FtStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last committed epoch, updated in order as the backup commits.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Ends protection: tells the backup (so it does not take over) and
    /// waits for the loop to finish.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.task.await;
    }
}

struct Engine {
    port: GuestPort,
    cfg: PrimaryConfig,
    disks: Vec<Arc<dyn DiskSource>>,
    status: Arc<Mutex<FtStatus>>,
    stop: watch::Receiver<bool>,
    committed_tx: watch::Sender<u64>,
    pauses: PauseStats,
    epochs_started: Option<(Instant, u64)>,
    /// The first epoch of this connection that carries device state: once
    /// it commits, the backup can resume the guest.
    first_consistent: Option<u64>,
    /// Why the previous connection failed, shown until protection is back.
    last_error: Option<String>,
    /// Reconnection attempts since the guest was fenced (backs off).
    fenced_retries: u32,
}

/// How one connection ended.
enum Ended {
    Stopped,
    Fenced,
    Lost(String),
    GuestGone,
}

/// Liveness of the backup as the primary sees it, shared between the
/// reader, the fencing watchdog and the epoch loop.
struct Contact {
    /// Unix ms of the last ack or heartbeat from the backup.
    last_ms: AtomicU64,
    /// The guest is fenced (paused for lack of word from the backup).
    fenced: AtomicBool,
    /// The fence cannot be undone here: QMP stop failed and the shim's
    /// lease freezes QEMU instead.
    fence_final: AtomicBool,
    /// The fence paused a running guest, so a granted resume continues it.
    fence_paused: AtomicBool,
    /// The backup may hold a consistent replica, so it may take over: set
    /// before the first epoch with device state is sent (the backup can
    /// only arm itself with an epoch the primary sent), or when a session
    /// finds epochs committed by an earlier one. Until then losing the
    /// backup cannot cause a split brain, and pausing the guest would only
    /// take it down: an initial copy that stalls, or a backup that never
    /// answers, leaves protection degraded and the guest running.
    armed: AtomicBool,
}

impl Contact {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::SeqCst);
    }
    fn silent_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::SeqCst)))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Extra time the shim's lease allows beyond the engine's own fencing, so
/// the clean path (QMP stop) normally wins and the shim's SIGSTOP is only
/// the backstop for a dead or stuck tandemd.
const LEASE_GRACE: Duration = Duration::from_millis(200);

/// The shim's lease deadline (unix ms) after contact at `last_ms`.
fn lease_deadline(last_ms: u64, fence_timeout: Duration) -> u64 {
    last_ms + (fence_timeout + LEASE_GRACE).as_millis() as u64
}

impl Engine {
    fn set(&self, f: impl FnOnce(&mut FtStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn run(mut self) {
        let ram = match RamMap::open(self.port.ram_file(), self.port.ram_size()) {
            Ok(r) => r,
            Err(e) => {
                self.set(|s| {
                    s.state = "stopped".into();
                    s.detail = format!("cannot map guest RAM: {e}");
                });
                return;
            }
        };
        let pages = (self.port.ram_size() / PAGE_SIZE as u64) as usize;
        let ctx = TrackerContext {
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
                    s.state = "stopped".into();
                    s.detail = e;
                });
                return;
            }
        };
        let contact = Arc::new(Contact {
            last_ms: AtomicU64::new(now_ms()),
            fenced: AtomicBool::new(false),
            fence_final: AtomicBool::new(false),
            fence_paused: AtomicBool::new(false),
            armed: AtomicBool::new(false),
        });
        let watchdog = tokio::spawn(fence_watchdog(
            self.port.clone(),
            contact.clone(),
            self.cfg.fence_timeout,
            self.status.clone(),
            self.stop.clone(),
        ));
        let _watchdog = AbortOnDrop(watchdog);
        loop {
            if *self.stop.borrow() {
                break;
            }
            let ended = match link::connect(&self.cfg.backup).await {
                Ok(conn) => self.session(conn, &ram, &mut tracker, &contact).await,
                Err(e) => Ended::Lost(format!("cannot reach the backup {}: {e}", self.cfg.backup)),
            };
            match ended {
                Ended::Stopped => break,
                Ended::GuestGone => {
                    if let Some(o) = &self.cfg.observer {
                        o.abandoned();
                    }
                    self.port.clear_lease();
                    self.set(|s| {
                        s.state = "stopped".into();
                        s.detail = "the guest's QEMU is gone".into();
                    });
                    return;
                }
                Ended::Fenced => {
                    if !self.after_fence(&contact).await {
                        return;
                    }
                }
                Ended::Lost(_) if contact.fenced.load(Ordering::SeqCst) => {
                    if !self.after_fence(&contact).await {
                        return;
                    }
                }
                Ended::Lost(why) => {
                    for d in &self.disks {
                        d.resync_all();
                    }
                    warn!(vm = %self.port.name(), "protection degraded: {why}");
                    self.last_error = Some(why.clone());
                    self.set(|s| {
                        s.state = "degraded".into();
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
        self.port.clear_lease();
        if let Some(o) = &self.cfg.observer {
            o.ended();
        }
        self.set(|s| {
            s.state = "stopped".into();
            s.detail = "protection ended".into();
        });
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
        if contact.fence_final.load(Ordering::SeqCst) {
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

    async fn session(
        &mut self,
        conn: BoxStream,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        contact: &Arc<Contact>,
    ) -> Ended {
        let (rd, wr) = tokio::io::split(conn);
        let mut wr = BufWriter::with_capacity(4 << 20, wr);
        let hello = Hello {
            vm: self.port.name().to_string(),
            ram_size: self.port.ram_size(),
            page_size: PAGE_SIZE as u64,
            spec_toml: self.port.spec_toml(),
            disks: self
                .disks
                .iter()
                .map(|d| HelloDisk {
                    name: d.name().to_string(),
                    size: d.size(),
                })
                .collect(),
        };
        let payload = serde_json::to_vec(&hello).unwrap_or_default();
        let write_bound = self.cfg.fence_timeout;
        if let Err(e) = send(
            &mut wr,
            &Frame::new(FrameKind::Hello, 0, 0, payload),
            write_bound,
        )
        .await
        {
            return Ended::Lost(format!("sending hello: {e}"));
        }
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Result<Frame, String>>();
        let reader = tokio::spawn(read_loop(
            rd,
            ack_tx,
            contact.clone(),
            self.committed_tx.clone(),
            self.cfg.observer.clone(),
        ));
        let _reader_guard = AbortOnDrop(reader);
        // The backup answers hello with the epoch it has committed (0: none).
        let base = match tokio::time::timeout(self.cfg.fence_timeout, ack_rx.recv()).await {
            Ok(Some(Ok(f))) if f.kind == FrameKind::Committed => f.epoch,
            Ok(Some(Ok(f))) if f.kind == FrameKind::Resync => {
                let why =
                    String::from_utf8_lossy(&f.payload[..f.payload.len().min(512)]).into_owned();
                return Ended::Lost(format!("backup refused the replica: {why}"));
            }
            Ok(Some(Ok(f))) => return Ended::Lost(format!("backup answered hello with {f:?}")),
            Ok(Some(Err(e))) => return Ended::Lost(e),
            Ok(None) => return Ended::Lost("backup closed the connection".into()),
            Err(_) => return Ended::Lost("backup did not answer hello".into()),
        };
        info!(vm = %self.port.name(), base, "connected to backup");
        if contact.fenced.load(Ordering::SeqCst) {
            // The backup took this connection, so it had not taken over,
            // and it has restarted its silence clock: it cannot take over
            // before we are silent for its takeover timeout again, and our
            // own fencing (restarted now) comes first. Resume.
            // The shim's lease goes back first: a tandemd that dies right
            // after the resume must not leave the guest running unfenced.
            contact.touch();
            let deadline = lease_deadline(now_ms(), self.cfg.fence_timeout);
            if let Err(e) = self.port.renew_lease(deadline) {
                return Ended::Lost(format!("renewing the fence lease before resuming: {e}"));
            }
            if contact.fence_paused.load(Ordering::SeqCst) {
                if let Err(e) = self.port.unfence().await {
                    // Still fenced, and paused: the shim must not freeze
                    // QEMU for good when that lease runs out.
                    self.port.clear_lease();
                    return Ended::Lost(format!("resuming after the fence: {e}"));
                }
            }
            contact.touch();
            self.fenced_retries = 0;
            contact.fenced.store(false, Ordering::SeqCst);
            warn!(vm = %self.port.name(), base, "the backup answered again: fence lifted");
        }
        if base > 0 {
            // An earlier session's commits: they may be consistent, and the
            // backup may be armed on them.
            contact.armed.store(true, Ordering::SeqCst);
        }
        let mut epoch = base + 1;
        self.first_consistent = None;
        // The running copy is not consistent; the first consistent epoch
        // is the one after it.
        self.set(|s| s.open_epoch = s.open_epoch.max(epoch + 1));
        if let Some(o) = &self.cfg.observer {
            o.session_started(base, epoch + 1);
        }
        // The backup follows its answer with a digest of its replica RAM.
        let pages = (self.port.ram_size() / PAGE_SIZE as u64) as usize;
        let digest = match receive_digest(&mut ack_rx, pages).await {
            Ok(d) => d,
            Err(e) => return Ended::Lost(e),
        };
        // A new connection starts from a full copy: what the backup holds
        // beyond its last commit is unknown (the digest then trims it to
        // the pages that differ).
        tracker.mark_all_dirty();
        for d in &self.disks {
            d.resync_all();
        }
        let last_error = self.last_error.clone();
        self.set(|s| {
            match last_error {
                // Still failing: stay visibly degraded while retrying.
                Some(e) => {
                    s.state = "degraded".into();
                    s.detail = format!("{e}; resending from epoch {base}");
                }
                None => {
                    s.state = "syncing".into();
                    s.detail = "initial copy".into();
                }
            }
            s.last_committed = base;
        });

        // Initial copy while the guest runs: pages are copied first and
        // hashed as copied, so later changes show up in the next scan.
        if let Err(e) = self
            .send_running_copy(&mut wr, ram, tracker, epoch, digest)
            .await
        {
            return Ended::Lost(e);
        }
        epoch += 1;

        let mut next_epoch = Instant::now();
        let mut last_send = Instant::now();
        loop {
            if let Ok(msg) = ack_rx.try_recv() {
                match msg {
                    Ok(f) if f.kind == FrameKind::Resync => {
                        let why = String::from_utf8_lossy(&f.payload[..f.payload.len().min(512)])
                            .into_owned();
                        return Ended::Lost(format!(
                            "backup resyncs from epoch {}: {why}",
                            f.epoch
                        ));
                    }
                    Ok(f) => return Ended::Lost(format!("unexpected {f:?} from backup")),
                    Err(e) => return Ended::Lost(e),
                }
            }
            if contact.fenced.load(Ordering::SeqCst) {
                return Ended::Fenced;
            }
            if *self.stop.borrow() {
                let _ = send(
                    &mut wr,
                    &Frame::new(FrameKind::Bye, 0, 0, vec![]),
                    write_bound,
                )
                .await;
                return Ended::Stopped;
            }
            if self.port.is_closed() {
                return self.guest_gone(&mut wr, write_bound).await;
            }
            let committed = *self.committed_tx.borrow();
            // Once the backup has committed this session's running copy,
            // and no epoch with device state has been sent since, it holds
            // nothing it could resume (it disarmed on that commit): a
            // fence would only pause the guest for nothing.
            if committed > base
                && self.first_consistent.is_none()
                && contact.armed.swap(false, Ordering::SeqCst)
            {
                info!(vm = %self.port.name(), "the backup holds only the running copy: fencing disarmed until the next epoch with device state");
            }
            let inflight = (epoch - 1).saturating_sub(committed);
            let consistent = self.first_consistent.is_some_and(|e| committed >= e);
            if consistent {
                self.last_error = None;
            }
            let syncing_disks = self.disks.iter().filter(|d| !d.is_synced()).count();
            self.set(|s| {
                s.last_committed = committed;
                s.lag_epochs = inflight;
                if consistent {
                    s.state = "protected".into();
                    s.detail.clear();
                } else if s.state == "degraded" {
                    // Keep the failure visible until protection is back.
                } else if syncing_disks > 0 {
                    s.detail = format!("initial copy of {syncing_disks} disk(s)");
                }
            });
            let now = Instant::now();
            if now < next_epoch || inflight >= self.cfg.max_inflight {
                if last_send.elapsed() >= self.cfg.heartbeat {
                    let hb = Frame::new(FrameKind::Heartbeat, 0, 0, vec![]);
                    if let Err(e) = send(&mut wr, &hb, write_bound).await {
                        return Ended::Lost(format!("heartbeat: {e}"));
                    }
                    last_send = Instant::now();
                }
                let wake = if inflight >= self.cfg.max_inflight {
                    now + Duration::from_millis(2)
                } else {
                    next_epoch.min(now + self.cfg.heartbeat)
                };
                let owner_gone = tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => false,
                    r = self.stop.changed() => r.is_err(),
                };
                if owner_gone {
                    return Ended::Stopped;
                }
                continue;
            }
            // Epochs start on a fixed schedule, so timer slack does not add
            // up (`now + epoch` lost ~1 ms per epoch: 19.5 instead of 20
            // epochs/s at 50 ms). One that starts more than an epoch late
            // (the backup held us back) restarts the schedule instead of
            // bursting to catch up.
            next_epoch = next_schedule(next_epoch, now, self.cfg.epoch);
            match self
                .epoch(&mut wr, ram, tracker, epoch, write_bound, contact)
                .await
            {
                Ok(()) => {}
                Err(EpochError::Guest(e)) => {
                    if self.port.is_closed() {
                        return self.guest_gone(&mut wr, write_bound).await;
                    }
                    if contact.fenced.load(Ordering::SeqCst) {
                        return Ended::Fenced;
                    }
                    return Ended::Lost(format!("epoch {epoch}: {e}"));
                }
                Err(EpochError::Link(e)) => {
                    // The backup may have said why before it hung up.
                    let why = backup_reason(&mut ack_rx).await;
                    return Ended::Lost(why.unwrap_or_else(|| format!("epoch {epoch}: {e}")));
                }
            }
            last_send = Instant::now();
            epoch += 1;
        }
    }

    /// The guest's QMP connection closed. Once the supervisor has recorded
    /// how QEMU ended (bounded wait), tell the backup: after a crash nothing
    /// runs the guest here, so it may take over at once instead of waiting
    /// out its takeover timeout; after a shutdown (the guest powered off, or
    /// a stop was asked for) it must not take over at all. Unrecorded: say
    /// nothing, and the backup decides by silence as for any failure.
    async fn guest_gone<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        bound: Duration,
    ) -> Ended {
        let noticed = Instant::now();
        let deadline = noticed + Duration::from_secs(2);
        let crashed = loop {
            if let Some(c) = self.port.ended_in_crash() {
                break Some(c);
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let vm = self.port.name();
        match crashed {
            Some(true) => {
                let ms = noticed.elapsed().as_millis() as u64;
                let lost = Frame::new(FrameKind::GuestLost, 0, 0, ms.to_le_bytes().to_vec());
                match send(wr, &lost, bound).await {
                    Ok(()) => warn!(%vm, "QEMU crashed: the backup is told to take over now"),
                    Err(e) => {
                        warn!(%vm, "QEMU crashed; telling the backup failed ({e}): it takes over by silence")
                    }
                }
            }
            Some(false) => {
                let _ = send(wr, &Frame::new(FrameKind::Bye, 0, 0, vec![]), bound).await;
                info!(%vm, "the guest shut down: the backup is told not to take over");
            }
            None => warn!(
                %vm,
                "QEMU's monitor closed but its exit is not recorded; the backup decides by silence"
            ),
        }
        Ended::GuestGone
    }

    async fn send_running_copy<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        epoch: u64,
        digest: Option<Vec<u64>>,
    ) -> Result<(), String> {
        let t = Instant::now();
        if let Some(log) = &self.cfg.external_log {
            // Everything is copied now; marks from before are moot.
            let _ = log.drain();
        }
        let (snapshot, dirty) = if tracker.tracks_moments() {
            // Every write after this collect is caught by the next one; the
            // copy, taken after it, holds every write before.
            let data = ram.data_pages();
            let dirty = tracker
                .collect(RamView {
                    bytes: ram.live(),
                    data: data.as_ref(),
                })
                .map_err(|e| e.to_string())?;
            (ram.snapshot(), dirty)
        } else {
            let snapshot = ram.snapshot();
            let dirty = tracker
                .collect(RamView::dense(&snapshot))
                .map_err(|e| e.to_string())?;
            (snapshot, dirty)
        };
        let collected = dirty.len();
        let dirty = match &digest {
            Some(replica) => differing_pages(RamView::dense(&snapshot), dirty, replica),
            None => dirty,
        };
        let pages = copy_pages(&snapshot, &dirty);
        drop(snapshot);
        let disk_writes: Vec<Vec<u8>> = self.disks.iter().map(|d| d.take_writes()).collect();
        let frames = EpochBuilder::build(
            self.port.ram_size(),
            epoch,
            &dirty,
            &pages,
            &[],
            &disk_writes,
        );
        // A full copy may take a while to ship; it is bounded by its size,
        // not by the fencing timeout (acks and heartbeats keep flowing).
        let bound = Duration::from_secs(600);
        let bytes = write_frames(wr, &frames, bound)
            .await
            .map_err(|e| e.to_string())?;
        info!(
            vm = %self.port.name(),
            pages = dirty.len(),
            of = collected,
            digest = digest.is_some(),
            bytes,
            ms = t.elapsed().as_millis() as u64,
            "initial copy sent"
        );
        self.set(|s| {
            s.detail = match &digest {
                Some(_) => format!(
                    "initial copy: {} of {collected} pages differed from the replica",
                    dirty.len()
                ),
                None => format!("initial copy: {} pages", dirty.len()),
            }
        });
        Ok(())
    }

    async fn epoch<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        epoch: u64,
        write_bound: Duration,
        contact: &Contact,
    ) -> Result<(), EpochError> {
        let started = Instant::now();
        let ds_timeout = self.cfg.device_state_timeout;
        let disks = self.disks.clone();
        let status = self.status.clone();
        let observer = self.cfg.observer.clone();
        let name = self.port.name().to_string();
        let external_log = self.cfg.external_log.clone();
        let captured = self
            .port
            .with_stopped(async |g| {
                // From here on the guest's activity belongs to the next epoch.
                status.lock().unwrap_or_else(|p| p.into_inner()).open_epoch = epoch + 1;
                if let Some(o) = &observer {
                    o.epoch_opened(epoch + 1);
                }
                let stopped_at = Instant::now();
                // Until every disk's initial copy is done, an epoch is RAM
                // only: resuming it would find an incomplete disk.
                let with_state = disks.iter().all(|d| d.is_synced());
                // QEMU saving its devices beside the scan could, in
                // principle, write guest RAM. A content scan catches that
                // (it copies after hashing, and re-reports next epoch a
                // page whose hash it took before the write); a moment
                // tracker (soft-dirty) could lose a write landing between
                // reading the bits and clearing them, so it collects first.
                let overlap = !tracker.tracks_moments();
                let mut device_state =
                    (with_state && overlap).then(|| g.spawn_device_state(ds_timeout));
                let live = ram.live();
                if let Some(log) = &external_log {
                    match log.drain() {
                        Ok(pages) => tracker.note_external_writes(&mut pages.into_iter()),
                        Err(_) => {
                            warn!(vm = %name, "a switch write could not be placed in the RAM file: copying all of RAM");
                            tracker.mark_all_dirty();
                        }
                    }
                }
                let collect = || {
                    let data = ram.data_pages();
                    let view = RamView {
                        bytes: live,
                        data: data.as_ref(),
                    };
                    tracker.collect(view).map_err(|e| (e, data))
                };
                let collected = off_the_runtime(collect);
                let dirty = match collected {
                    Ok(d) => d,
                    Err((e, data)) => {
                        // The tracker can no longer vouch for anything:
                        // copy all of RAM in this pause and scan from now on.
                        warn!(vm = %name, "dirty tracking failed, falling back to scan: {e}");
                        let mut scan = ScanTracker::new(live.len() / PAGE_SIZE, 0);
                        let d = scan.scan(RamView {
                            bytes: live,
                            data: data.as_ref(),
                        });
                        *tracker = Box::new(scan);
                        status.lock().unwrap_or_else(|p| p.into_inner()).tracker =
                            format!("scan (soft-dirty failed: {e})");
                        d
                    }
                };
                if with_state && device_state.is_none() {
                    device_state = Some(g.spawn_device_state(ds_timeout));
                }
                let pages = copy_pages(live, &dirty);
                let scanned_at = Instant::now();
                let state = match device_state {
                    Some(job) => job.finish().await,
                    None => Ok(Vec::new()),
                };
                let writes: Vec<Vec<u8>> = disks.iter().map(|d| d.take_writes()).collect();
                tracing::debug!(
                    epoch,
                    stop_us = (stopped_at - started).as_micros() as u64,
                    scan_us = (scanned_at - stopped_at).as_micros() as u64,
                    device_state_wait_us = scanned_at.elapsed().as_micros() as u64,
                    "epoch captured"
                );
                (dirty, pages, state, writes)
            })
            .await
            .map_err(|e| EpochError::Guest(e.to_string()))?;
        let pause = started.elapsed();
        let (dirty, pages, state, writes) = captured;
        let state = state.map_err(|e| EpochError::Guest(e.to_string()))?;
        if !state.is_empty() && self.first_consistent.is_none() {
            self.first_consistent = Some(epoch);
        }
        if !state.is_empty() && !contact.armed.swap(true, Ordering::SeqCst) {
            info!(vm = %self.port.name(), epoch, "first consistent epoch: fencing armed");
        }
        self.pauses.record(pause);
        let frames =
            EpochBuilder::build(self.port.ram_size(), epoch, &dirty, &pages, &state, &writes);
        let bytes = write_frames(wr, &frames, write_bound)
            .await
            .map_err(|e| EpochError::Link(e.to_string()))?;
        let (p50, p99) = self.pauses.p50_p99();
        let rate = {
            let (t0, n0) = *self.epochs_started.get_or_insert((Instant::now(), epoch));
            let dt = t0.elapsed().as_secs_f64();
            if dt > 0.5 {
                (epoch - n0) as f64 / dt
            } else {
                0.0
            }
        };
        self.set(|s| {
            s.last_sent = epoch;
            s.pause_p50_ms = p50;
            s.pause_p99_ms = p99;
            s.bytes_per_epoch = bytes;
            s.dirty_pages_last = dirty.len() as u64;
            s.epochs_per_s = rate;
        });
        Ok(())
    }
}

/// Runs CPU-bound work (a RAM scan) from async code without starving the
/// runtime: on a multi-threaded runtime the worker's other tasks, among
/// them the device-state save started just before (which a fresh spawn
/// leaves in this worker's unstealable LIFO slot), move to another thread
/// meanwhile. Elsewhere (a current-thread runtime in a test) it just runs.
fn off_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Renews the shim's fence lease while the backup answers, and fences the
/// guest (QMP stop) the moment it has been silent for the fencing timeout.
/// Runs beside the epoch loop so a blocked send cannot delay fencing.
async fn fence_watchdog(
    port: GuestPort,
    contact: Arc<Contact>,
    timeout: Duration,
    status: Arc<Mutex<FtStatus>>,
    stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut lease_written = 0u64;
    loop {
        tick.tick().await;
        if *stop.borrow() {
            return;
        }
        if contact.fenced.load(Ordering::SeqCst) {
            // Until the engine lifts the fence (or for good).
            lease_written = 0;
            continue;
        }
        if !contact.armed.load(Ordering::SeqCst) {
            // Nothing the backup holds can run: no lease, no fencing (and
            // a lease from when it could must not freeze the guest later).
            if lease_written != 0 {
                port.clear_lease();
                lease_written = 0;
            }
            continue;
        }
        let last = contact.last_ms.load(Ordering::SeqCst);
        let deadline = lease_deadline(last, timeout);
        if deadline != lease_written {
            if let Err(e) = port.renew_lease(deadline) {
                warn!(vm = %port.name(), "cannot renew the fence lease: {e}");
            }
            lease_written = deadline;
        }
        let silent = contact.silent_for();
        if silent >= timeout {
            contact.fenced.store(true, Ordering::SeqCst);
            let why = format!("no word from the backup for {silent:?}");
            warn!(vm = %port.name(), "{why}; fencing");
            let detail = match port.fence(&why).await {
                Ok(paused) => {
                    // Paused cleanly: QEMU stays responsive to the operator
                    // rather than frozen by the shim, and the fence can be
                    // lifted if the backup answers before taking over.
                    port.clear_lease();
                    contact.fence_paused.store(paused, Ordering::SeqCst);
                    format!("{why}; resumes if the backup answers before it takes over")
                }
                Err(e) => {
                    contact.fence_final.store(true, Ordering::SeqCst);
                    format!("{why}; QMP stop failed ({e}), the shim's lease freezes QEMU")
                }
            };
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.state = "fenced".into();
            s.detail = detail;
        }
    }
}

enum EpochError {
    Guest(String),
    Link(String),
}

fn copy_pages(ram: &[u8], dirty: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dirty.len() * PAGE_SIZE);
    for &p in dirty {
        let off = p as usize * PAGE_SIZE;
        out.extend_from_slice(&ram[off..off + PAGE_SIZE]);
    }
    out
}

/// When the epoch after one due at `due` (and starting at `now`) is due.
fn next_schedule(due: Instant, now: Instant, epoch: Duration) -> Instant {
    if now.saturating_duration_since(due) >= epoch {
        now + epoch
    } else {
        due + epoch
    }
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
    bound: Duration,
) -> std::io::Result<()> {
    write_frames(w, std::slice::from_ref(f), bound)
        .await
        .map(|_| ())
}

/// Writes frames, giving up after `bound`: a backup that stopped reading
/// must not hold the epoch loop forever.
async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Frame],
    bound: Duration,
) -> std::io::Result<u64> {
    let io = async {
        let mut bytes = 0u64;
        for f in frames {
            let enc = f.encode();
            bytes += enc.len() as u64;
            w.write_all(&enc).await?;
        }
        w.flush().await?;
        Ok(bytes)
    };
    tokio::time::timeout(bound, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "send timed out"))?
}

/// Reads the backup's frames: acks and heartbeats are handled here (so
/// liveness is seen even while the loop is busy sending); the hello answer,
/// resync requests and errors go to the loop.
async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::UnboundedSender<Result<Frame, String>>,
    contact: Arc<Contact>,
    committed: watch::Sender<u64>,
    observer: Option<Arc<dyn EpochObserver>>,
) {
    let mut first = true;
    loop {
        let msg = match wire::read_frame(&mut rd).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err("backup closed the connection".to_string()),
            Err(e) => Err(format!("reading from backup: {e}")),
        };
        if let Ok(f) = &msg {
            match f.kind {
                FrameKind::Heartbeat => {
                    contact.touch();
                    continue;
                }
                FrameKind::Committed if !first => {
                    contact.touch();
                    let newer = committed.send_if_modified(|c| {
                        let newer = f.epoch > *c;
                        if newer {
                            *c = f.epoch;
                        }
                        newer
                    });
                    if newer {
                        if let Some(o) = &observer {
                            o.committed(f.epoch);
                        }
                    }
                    continue;
                }
                FrameKind::Committed => {
                    first = false;
                    contact.touch();
                    committed.send_replace(f.epoch);
                }
                _ => {}
            }
        }
        let end = msg.is_err();
        if tx.send(msg).is_err() || end {
            return;
        }
    }
}

/// Of the pages a running copy would send, those whose content differs
/// from the replica's (by the backup's per-page hashes): the rest are
/// already there.
fn differing_pages(ram: RamView<'_>, dirty: Vec<u64>, replica: &[u64]) -> Vec<u64> {
    dirty
        .into_iter()
        .filter(|&p| replica.get(p as usize) != Some(&ram.page_hash(p as usize)))
        .collect()
}

/// The backup's digest of its replica RAM, which follows its answer to
/// hello: `None` when it offers none (send everything). Bounded in time;
/// a digest for another RAM size ends the session.
async fn receive_digest(
    rx: &mut mpsc::UnboundedReceiver<Result<Frame, String>>,
    pages: usize,
) -> Result<Option<Vec<u64>>, String> {
    // Hashing a large replica takes the backup a while (~0.3 s per GiB).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut collector = wire::DigestCollector::default();
    loop {
        let f = match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("backup closed the connection before its digest".into()),
            Err(_) => return Err("backup sent no replica digest within 120 s".into()),
        };
        if f.kind != FrameKind::ReplicaDigest {
            return Err(format!("expected the replica digest, got {f:?}"));
        }
        let d = wire::ReplicaDigest::decode(&f.payload).map_err(|e| e.to_string())?;
        if d.total != 0 && d.total != pages as u64 {
            return Err(format!(
                "the backup's replica has {} pages, this VM {pages}",
                d.total
            ));
        }
        if collector.push(d).map_err(|e| e.to_string())? {
            let hashes = collector.into_hashes();
            return Ok((!hashes.is_empty()).then_some(hashes));
        }
    }
}

/// A `RESYNC` the backup sent before closing, if one arrives shortly.
async fn backup_reason(rx: &mut mpsc::UnboundedReceiver<Result<Frame, String>>) -> Option<String> {
    let deadline = Instant::now() + Duration::from_millis(300);
    loop {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(Ok(f))) if f.kind == FrameKind::Resync => {
                let why =
                    String::from_utf8_lossy(&f.payload[..f.payload.len().min(512)]).into_owned();
                return Some(format!("backup resyncs from epoch {}: {why}", f.epoch));
            }
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_the_replica_lacks_are_copied() {
        let mut ram = vec![0u8; 4 * PAGE_SIZE];
        ram[PAGE_SIZE] = 1;
        ram[3 * PAGE_SIZE] = 3;
        let view = RamView::dense(&ram);
        let mut replica: Vec<u64> = (0..4).map(|p| view.page_hash(p)).collect();
        replica[3] ^= 1; // page 3 differs on the backup
        assert_eq!(differing_pages(view, vec![0, 1, 2, 3], &replica), [3]);
        // A digest too short for the RAM vouches for nothing beyond it.
        assert_eq!(
            differing_pages(view, vec![0, 1, 2, 3], &replica[..2]),
            [2, 3]
        );
    }

    #[test]
    fn the_epoch_schedule_does_not_drift_and_does_not_burst() {
        let epoch = Duration::from_millis(50);
        let t0 = Instant::now();
        let mut due = t0;
        // Every epoch starts 1 ms late (timer slack): 100 epochs still take
        // 100 periods, not 100 periods plus 100 ms.
        for _ in 0..100 {
            let started = due + Duration::from_millis(1);
            due = next_schedule(due, started, epoch);
        }
        assert_eq!(due - t0, epoch * 100);
        // Held back by the backup for three periods: the next epoch is one
        // period after the late start, not three catch-up epochs at once.
        let late = due + epoch * 3;
        assert_eq!(next_schedule(due, late, epoch), late + epoch);
    }
}
