//! The backup side: receives epochs, commits them atomically, watches the
//! primary, and takes over when it is gone.
//!
//! One [`Backup`] serves every VM replicated to this host. Each VM has a
//! replica directory `<root>/<vm>/` (RAM file, device state, disks, commit
//! record). A connection from a primary is handled by [`Backup::serve`];
//! epochs are assembled, checked, and applied only when whole and valid —
//! anything else is answered with `RESYNC` and the connection is dropped,
//! so the primary reconnects and resends from the last commit.
//!
//! Takeover: a watchdog per replica fires when nothing (epoch data or
//! heartbeat) has arrived for the takeover timeout. The primary fences
//! itself after a shorter timeout, so by then it has stopped its guest.
//! A primary that ends protection on purpose says `BYE`, which disarms the
//! watchdog.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Instant;

use tandem_api::{FailoverReport, FtRole, FtState, FtStatus};
use tandem_supervisor::util::atomic_write_json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::assembler::{CompleteEpoch, EpochAssembler};
use crate::authority::PeerIdentity;
use crate::link::BoxStream;
use crate::replica::{self, check_layout, ReplicaError, ReplicaStore, StoreFaults};
use crate::wire::{self, Frame, FrameKind, Hello, WireError, OLDEST_ANSWERED, PAGE_SIZE, VERSION};

#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub root: PathBuf,
    pub heartbeat: Duration,
    /// Silence from the primary after which this host takes over. Must be
    /// longer than the primary's fencing timeout (the margin is what keeps
    /// split brain out).
    pub takeover_timeout: Duration,
    /// Silence after which the primary is suspected: the failure is
    /// detected here, and the rest of `takeover_timeout` is the wait until
    /// the primary has certainly fenced itself. tandemd uses the primary's
    /// fencing timeout. Reported as detection and fence wait.
    pub suspect_after: Duration,
    /// Take over automatically; when false, only `tandem failover` does.
    pub auto_failover: bool,
    /// Which peers may replicate which VMs here, checked at hello before
    /// the replica is touched (see [`crate::authority`]).
    pub authority: Arc<dyn crate::authority::Authority>,
    #[cfg(feature = "fault-injection")]
    pub faults: BackupFaults,
}

impl BackupConfig {
    pub fn new(root: PathBuf) -> Self {
        BackupConfig {
            root,
            heartbeat: Duration::from_millis(100),
            takeover_timeout: Duration::from_millis(2500),
            suspect_after: Duration::from_millis(1500),
            auto_failover: true,
            authority: Arc::new(crate::authority::Unrestricted),
            #[cfg(feature = "fault-injection")]
            faults: BackupFaults::default(),
        }
    }
}

/// What the host does to run a VM from its replica. tandemd implements it
/// with its supervisor.
pub trait Activate: Send + Sync + 'static {
    /// Starts `vm` from the consistent checkpoint in `dir`.
    fn activate(
        &self,
        vm: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>;
}

/// Why the host could not run a VM from its replica (the implementer's
/// own error, kept whole for the log and the API).
pub type ActivateError = Box<dyn std::error::Error + Send + Sync>;

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no replica of `{0}` on this host")]
    NoReplica(String),
    /// The automatic path only: the primary spoke before the decision.
    #[error("the primary of `{0}` was heard again")]
    PrimaryHeard(String),
    #[error("`{vm}` is already {state}")]
    AlreadyRunning { vm: String, state: FtState },
    #[error("the replica of `{vm}` has no consistent epoch yet ({state})")]
    NotConsistent { vm: String, state: FtState },
    #[error("takeover of `{vm}` failed: {source}")]
    Activate {
        vm: String,
        #[source]
        source: ActivateError,
    },
}

/// The failure detector's verdict on one silence of the primary.
#[derive(Clone, Copy)]
struct Suspicion {
    /// The `last_heard` it is about; a newer one makes it stale.
    heard: Instant,
    /// When the watchdog noticed, and how long the silence was then.
    at: Instant,
    silence: Duration,
}

struct Replica {
    status: FtStatus,
    last_heard: Instant,
    suspected: Option<Suspicion>,
    armed: bool,
    /// Bumped per connection, so a stale handler cannot disarm a new one,
    /// and by a takeover, after which no connection may touch the replica.
    conn_id: u64,
    /// The primary instance of the current (or last) connection.
    instance: u64,
    /// The generation that connection's hello carried: a live primary is
    /// superseded only by a newer one (a migration's destination).
    generation: u64,
    active_conn: bool,
    /// An epoch is being applied: the connection is not read meanwhile,
    /// so the primary's silence is not counted (its heartbeats wait in the
    /// socket; the backup's own keep flowing to it).
    applying: bool,
    /// Held while the replica's files are opened, recovered, read or
    /// written (a connection's open and applies, its digest, the scan at
    /// start) and by a takeover before it starts the VM, so no two of
    /// them touch the replica at once.
    store_lock: Arc<tokio::sync::Mutex<()>>,
    /// An apply failed after its commit point: the files are torn until
    /// the journal is finished, which a takeover does first.
    needs_recovery: bool,
    /// Found on disk at start: armed (for automatic takeover) only once
    /// the primary is heard again.
    rearm_when_heard: bool,
    /// Takeovers that failed since the last one that succeeded (or the
    /// last connection): the watchdog retries an armed replica after a
    /// backoff that grows with them.
    takeover_failures: u32,
    /// No automatic takeover before this (the backoff after a failure).
    retry_at: Option<Instant>,
}

impl Replica {
    fn new(vm: &str) -> Self {
        Replica {
            status: FtStatus {
                vm: vm.to_string(),
                role: Some(FtRole::Backup),
                state: FtState::Syncing,
                tracker: "-".into(),
                ..Default::default()
            },
            last_heard: Instant::now(),
            suspected: None,
            armed: false,
            conn_id: 0,
            instance: 0,
            generation: 0,
            active_conn: false,
            applying: false,
            store_lock: Arc::new(tokio::sync::Mutex::new(())),
            needs_recovery: false,
            rearm_when_heard: false,
            takeover_failures: 0,
            retry_at: None,
        }
    }
}

pub struct Backup {
    cfg: BackupConfig,
    activate: Arc<dyn Activate>,
    replicas: Mutex<BTreeMap<String, Replica>>,
}

impl Backup {
    pub fn new(cfg: BackupConfig, activate: Arc<dyn Activate>) -> Arc<Self> {
        let b = Arc::new(Backup {
            cfg,
            activate,
            replicas: Mutex::new(BTreeMap::new()),
        });
        let w = b.clone();
        tokio::spawn(async move { w.watchdog().await });
        b
    }

    fn replicas(&self) -> parking_lot::MutexGuard<'_, BTreeMap<String, Replica>> {
        self.replicas.lock()
    }

    pub fn status(&self) -> Vec<FtStatus> {
        self.replicas().values().map(|r| r.status.clone()).collect()
    }

    pub fn replica_dir(&self, vm: &str) -> PathBuf {
        self.cfg.root.join(vm)
    }

    /// Finds the replicas a previous run of this backup left under its
    /// root, finishes any epoch a crash left in a journal, and registers
    /// each, so `ft status` shows it and `tandem failover` can start it
    /// before its primary reconnects (a primary lost while this host
    /// restarted). Call once at start, before serving connections. Returns
    /// how many replicas were registered.
    ///
    /// A replica found this way is armed for a manual failover only: this
    /// process has not heard its primary, so it cannot tell how long the
    /// primary has been silent, or whether it ended protection (`BYE`)
    /// while nobody listened. It arms for automatic takeover once the
    /// primary is heard again. A replica this host took over before (its
    /// identity's generation is past its hello's) is listed as stopped.
    pub async fn recover_replicas(self: &Arc<Self>) -> usize {
        if self.fault_skip_replica_scan() {
            return 0;
        }
        let root = self.cfg.root.clone();
        let found = tokio::task::spawn_blocking(move || list_replicas(&root))
            .await
            .unwrap_or_default();
        let mut registered = 0;
        for vm in found {
            let (lock, conn_id) = {
                let mut reps = self.replicas();
                let r = reps.entry(vm.clone()).or_insert_with(|| Replica::new(&vm));
                if r.active_conn {
                    continue; // its primary got here first: it opened it
                }
                (r.store_lock.clone(), r.conn_id)
            };
            let _scanning = lock.lock_owned().await;
            let dir = self.replica_dir(&vm);
            let scanned = tokio::task::spawn_blocking(move || scan_replica(&dir))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            let mut reps = self.replicas();
            let Some(r) = reps.get_mut(&vm).filter(|r| r.conn_id == conn_id) else {
                continue;
            };
            registered += 1;
            r.armed = false;
            match scanned {
                Ok(Scanned::Owned { owner }) => {
                    r.status.state = FtState::FailedOver;
                    r.status.detail = format!(
                        "taken over by this host before it restarted: VM `{}` runs from this directory (its RAM and disk base), not a replica any more",
                        owner.vm
                    );
                }
                Ok(Scanned::TakenOver { generation }) => {
                    r.status.state = FtState::Stopped;
                    r.status.detail = format!(
                        "taken over by this host before it restarted (generation {generation})"
                    );
                }
                Ok(Scanned::Replica { epoch, consistent }) => {
                    r.status.last_committed = epoch;
                    if consistent {
                        r.status.state = FtState::Standby;
                        r.rearm_when_heard = true;
                        r.status.detail = format!(
                            "found at start at epoch {epoch}: manual failover only until the primary is heard again"
                        );
                    } else {
                        r.status.state = FtState::Syncing;
                        r.status.detail =
                            format!("found at start at epoch {epoch}, which is not resumable");
                    }
                }
                Err(e) => {
                    r.status.state = FtState::Syncing;
                    r.status.detail = format!("found at start, but cannot be opened: {e}");
                }
            }
            info!(%vm, state = %r.status.state.as_str(), "replica found at start: {}", r.status.detail);
        }
        registered
    }

    /// Handles one connection from a primary until it ends: hello, the
    /// replica opened and its digest sent, then epochs applied in order
    /// until the link ends; a crash report ends in a takeover.
    pub async fn serve(self: Arc<Self>, conn: BoxStream, peer: String) {
        let who = if peer.starts_with("unix:") {
            PeerIdentity::Local(peer)
        } else {
            PeerIdentity::Unauthenticated(peer)
        };
        self.serve_peer(conn, who).await
    }

    /// [`Backup::serve`] for a peer authenticated by the listener
    /// ([`crate::link::authenticate`]): the authority decides at hello
    /// whether it may replicate the VM it names here.
    pub async fn serve_peer(self: Arc<Self>, conn: BoxStream, who: PeerIdentity) {
        let peer = who.to_string();
        let (mut rd, mut wr) = tokio::io::split(conn);
        let Some(hello) = read_hello_frame(&mut rd, &mut wr, &peer).await else {
            return;
        };
        let vm = hello.vm.clone();
        if !self.fault_skip_authority() {
            if let Err(why) = self.cfg.authority.admit_primary(&who, &hello) {
                warn!(%peer, %vm, "refusing replica: {why}");
                refuse(&mut wr, VERSION, &why).await;
                return;
            }
        }
        let admitted = match self.admit(&hello).await {
            Ok(id) => self.register_conn(&hello, &peer).map(|c| (c, id)),
            Err(refusal) => Err(refusal),
        };
        let (conn_id, stored) = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                warn!(%peer, %vm, "refusing replica: {refusal}");
                refuse(&mut wr, VERSION, &refusal.to_string()).await;
                return;
            }
        };
        let store = match self.open_replica(&hello, stored, conn_id).await {
            Ok(s) => s,
            Err(e) => {
                warn!(%vm, "{e}");
                // Say why before hanging up, so the primary can report it
                // (a full disk, say) instead of a bare closed connection.
                refuse(&mut wr, VERSION, &e).await;
                self.end_conn(&vm, conn_id, false, e);
                return;
            }
        };
        let base = store.committed_epoch().unwrap_or(0);
        let echo = Arc::new(AtomicU64::new(0));
        let (out_tx, writer) = spawn_writer(wr, self.cfg.heartbeat, echo.clone());
        let _ = out_tx.send(Frame::new(FrameKind::Committed, base, 0, vec![]));
        let (frames, reader) = self
            .clone()
            .spawn_reader(rd, &vm, conn_id, echo, out_tx.clone());
        info!(%vm, %peer, base, "replica connected");
        let Some(store) = self.send_digest(&vm, conn_id, store, base, &out_tx).await else {
            return;
        };
        let mut conn = Conn {
            vm: vm.clone(),
            conn_id,
            store: store.into(),
            out: out_tx,
            ram_size: hello.ram_size,
            disk_limit: disk_limit(&hello),
        };
        let ended = self.receive_epochs(frames, &mut conn, base).await;
        reader.abort();
        if ended.bye {
            // Disarmed before the primary hears it: from the ack on, its
            // guest may run on without a fence.
            self.end_conn(&vm, conn_id, true, ended.reason.clone());
            let _ = conn.out.send(Frame::new(FrameKind::ByeAck, 0, 0, vec![]));
        }
        drop(conn.out);
        let mut writer = writer;
        if tokio::time::timeout(Duration::from_secs(1), &mut writer)
            .await
            .is_err()
        {
            // A primary that stopped reading must not pin the task (and
            // its socket) forever.
            writer.abort();
        }
        info!(%vm, "replica connection ended: {}", ended.reason);
        self.end_conn(&vm, conn_id, ended.bye, ended.reason.clone());
        if let Some(noticed) = ended.guest_lost {
            self.after_guest_lost(&vm, conn_id, noticed, &ended.reason)
                .await;
        }
    }

    /// Registers a connection for `vm`: a new connection id supersedes any
    /// older connection of the same primary instance.
    fn register_conn(&self, hello: &Hello, peer: &str) -> Result<u64, Refusal> {
        let vm = hello.vm.as_str();
        let mut reps = self.replicas();
        let r = reps
            .entry(vm.to_string())
            .or_insert_with(|| Replica::new(vm));
        if r.status.state == FtState::FailedOver && !self.replica_dir(vm).exists() {
            // The VM that took it over was deleted here, and its directory
            // with it: a new replica, from scratch; connection ids go on
            // counting.
            let conn_id = r.conn_id;
            *r = Replica::new(vm);
            r.conn_id = conn_id;
        }
        if r.status.state.is_taken_over() {
            return Err(Refusal::Running { vm: vm.to_string() });
        }
        // Another primary instance for the same VM while the first is
        // connected and alive: one of them is not the VM's primary.
        // A newer generation is the VM's next primary (a live migration
        // hands the VM over while its old primary, paused, still
        // heartbeats): it supersedes the live one, whose connection this
        // bump makes stale. The watchdog then counts the new primary's
        // silence, and the replica stays armed on its last commit.
        let live =
            r.active_conn && (r.applying || r.last_heard.elapsed() < self.cfg.takeover_timeout);
        let newer = hello.generation > r.generation;
        if live && r.instance != hello.instance && !newer && !self.fault_second_primary() {
            return Err(Refusal::SecondPrimary {
                vm: vm.to_string(),
                peer: r.status.peer.clone(),
            });
        }
        if live && r.instance != hello.instance && newer {
            info!(
                %vm,
                old = %r.status.peer,
                new = %peer,
                generation = hello.generation,
                "a primary of a newer generation supersedes the connected one (the VM was handed over)"
            );
        }
        r.conn_id += 1;
        r.instance = hello.instance;
        r.generation = hello.generation;
        r.active_conn = true;
        // A primary that answers is alive: a failed takeover's backoff is
        // over (the next silence is a new failure, taken over at once).
        r.takeover_failures = 0;
        r.retry_at = None;
        r.last_heard = Instant::now();
        r.status.peer = peer.to_string();
        r.status.detail.clear();
        Ok(r.conn_id)
    }

    fn fault_skip_authority(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.skip_authority;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_ignore_identity(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.ignore_identity;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    /// The silence after which the watchdog takes over: the takeover
    /// timeout, or (the fault hook) as soon as the primary is suspected,
    /// without waiting for its fence.
    fn takeover_after(&self) -> Duration {
        #[cfg(feature = "fault-injection")]
        if self.cfg.faults.take_over_on_suspicion {
            return self.cfg.suspect_after;
        }
        self.cfg.takeover_timeout
    }

    fn fault_second_primary(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.allow_second_primary;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_open_outside_store_lock(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.open_outside_store_lock;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_keep_armed_on_apply_error(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.keep_armed_on_apply_error;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_disarm_on_failed_takeover(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.disarm_on_failed_takeover;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_skip_replica_scan(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.skip_replica_scan;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn fault_resize_on_hello(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.resize_on_hello;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn store_faults(&self) -> StoreFaults {
        #[cfg(feature = "fault-injection")]
        return self.cfg.faults.store;
        #[cfg(not(feature = "fault-injection"))]
        StoreFaults::default()
    }

    /// Whether `hello` may write the replica of its VM here: its identity
    /// must be the replica's, and its generation not older. Read only: a
    /// refused hello opens no replica file for writing.
    async fn admit(&self, hello: &Hello) -> Result<Option<ReplicaIdentity>, Refusal> {
        if hello.uuid.is_empty() {
            return Err(Refusal::NoIdentity);
        }
        // Disk names become file names, sizes file lengths and sums.
        if let Err(e) = check_layout(hello.ram_size, &hello.disks) {
            let escapes =
                matches!(&e, ReplicaError::Layout(why) if why.contains("not a valid disk name"));
            if !(escapes && self.store_faults().any_disk_name) {
                return Err(Refusal::Layout {
                    vm: hello.vm.clone(),
                    why: e.to_string(),
                });
            }
        }
        let dir = self.replica_dir(&hello.vm);
        let h = hello.clone();
        let (owner, stored, space) = tokio::task::spawn_blocking(move || {
            (
                tandem_supervisor::dir_owner(&dir),
                read_identity(&dir),
                space_check(&dir, &h),
            )
        })
        .await
        .map_err(|e| Refusal::Io(e.to_string()))?;
        // The directory a VM took over here is that VM's live RAM and disk
        // base: never a replica again, whoever asks.
        match owner {
            Ok(None) => {}
            Ok(Some(o)) => {
                return Err(Refusal::Owned {
                    vm: hello.vm.clone(),
                    owner: o.vm,
                    uuid: o.uuid,
                })
            }
            Err(e) => return Err(Refusal::Io(format!("reading its owner: {e}"))),
        }
        let stored = stored.map_err(|e| Refusal::Io(e.to_string()))?;
        let Some(id) = stored else {
            space?;
            return Ok(None);
        };
        if id.uuid != hello.uuid && !self.fault_ignore_identity() {
            return Err(Refusal::OtherVm {
                vm: hello.vm.clone(),
                replica: id.uuid,
                primary: hello.uuid.clone(),
            });
        }
        if hello.generation < id.generation && !self.fault_ignore_identity() {
            return Err(Refusal::Stale {
                vm: hello.vm.clone(),
                primary: hello.generation,
                replica: id.generation,
            });
        }
        space?;
        Ok(Some(id))
    }

    /// Creates or opens the replica directory for `hello` (off the runtime,
    /// under the replica's lock), finishing an epoch a crash or a failed
    /// apply left half done, and records the hello and identity there when
    /// they are new (or newer). A replica of another shape (the VM was
    /// re-defined) is discarded first: it could never be resumed as the
    /// VM now is, and resizing it under its commit would pair the commit's
    /// device state with RAM and disks it never saw.
    async fn open_replica(
        &self,
        hello: &Hello,
        stored: Option<ReplicaIdentity>,
        conn_id: u64,
    ) -> Result<ReplicaStore, String> {
        let vm = hello.vm.clone();
        let superseded = || "superseded by a newer connection".to_string();
        // The store lock keeps a superseded connection's apply (or a
        // takeover) out while this one recovers the journal and reads the
        // commit: two stores must never work on one replica at once.
        let guard = if self.fault_open_outside_store_lock() {
            None
        } else {
            let lock = self.begin_apply(&vm, conn_id).ok_or_else(superseded)?;
            let guard = lock.lock_owned().await;
            if !self.is_current(&vm, conn_id) {
                self.end_apply(&vm, conn_id);
                return Err(superseded());
            }
            Some(guard)
        };
        let dir = self.replica_dir(&vm);
        let h = hello.clone();
        let resize = self.fault_resize_on_hello();
        let faults = self.store_faults();
        let opened =
            tokio::task::spawn_blocking(move || prepare_replica(&dir, &h, stored, resize, faults))
                .await;
        if guard.is_some() {
            self.end_apply(&vm, conn_id);
        }
        drop(guard);
        let (store, fresh) = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("cannot open replica: {e}")),
            Err(e) => return Err(format!("replica task failed: {e}")),
        };
        let committed = store.committed_epoch().unwrap_or(0);
        let consistent = store.is_consistent();
        if let Some(why) = &fresh {
            warn!(%vm, "{why}");
        }
        self.update(&vm, |r| {
            if r.conn_id != conn_id {
                return;
            }
            r.status.last_committed = committed;
            let recovered = std::mem::take(&mut r.needs_recovery);
            if let Some(why) = fresh {
                r.armed = false;
                r.rearm_when_heard = false;
                r.status.state = FtState::Syncing;
                r.status.detail = why;
            } else if !consistent {
                r.armed = false;
                r.rearm_when_heard = false;
                r.status.state = FtState::Syncing;
            } else if recovered {
                // Finished from the journal: resumable again, and armed
                // once this primary is heard.
                r.status.state = FtState::Standby;
                r.rearm_when_heard = true;
            }
        });
        Ok(store)
    }

    /// What the replica RAM holds, page by page, so the primary's running
    /// copy sends only what differs. Reading it is not the primary's
    /// silence, and a takeover waits for it (the store lock). Hands the
    /// store back, or `None` when the connection is over.
    async fn send_digest(
        &self,
        vm: &str,
        conn_id: u64,
        store: ReplicaStore,
        base: u64,
        out: &mpsc::UnboundedSender<Frame>,
    ) -> Option<ReplicaStore> {
        let Some(store_lock) = self.begin_apply(vm, conn_id) else {
            self.end_conn(vm, conn_id, false, "superseded".into());
            return None;
        };
        let _reading = store_lock.lock().await;
        if !self.is_current(vm, conn_id) {
            self.end_apply(vm, conn_id);
            self.end_conn(vm, conn_id, false, "superseded".into());
            return None;
        }
        let t = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let d = store.ram_digest();
            (d, store)
        })
        .await;
        self.end_apply(vm, conn_id);
        let Ok((digest, store)) = joined else {
            self.end_conn(vm, conn_id, false, "digest task failed".into());
            return None;
        };
        let digest = match digest {
            Ok(d) => {
                info!(%vm, pages = d.len(), ms = t.elapsed().as_millis() as u64, "replica digest sent");
                d
            }
            Err(e) => {
                // Not fatal: the primary then sends everything.
                warn!(%vm, "cannot read the replica for its digest: {e}");
                Vec::new()
            }
        };
        for f in wire::ReplicaDigest::frames(base, &digest) {
            let _ = out.send(f);
        }
        Some(store)
    }

    /// Reads the connection in its own task, so the primary is heard (and
    /// its heartbeat stamps echoed at once) while this side digests or
    /// applies; the other frames come through a short queue, which is what
    /// pushes back on the primary when applying falls behind.
    fn spawn_reader<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        self: Arc<Self>,
        mut rd: R,
        vm: &str,
        conn_id: u64,
        echo: Arc<AtomicU64>,
        out: mpsc::UnboundedSender<Frame>,
    ) -> (mpsc::Receiver<Incoming>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(READ_AHEAD_FRAMES);
        let vm = vm.to_string();
        let idle = (self.cfg.takeover_timeout * 8).max(Duration::from_secs(30));
        let task = tokio::spawn(async move {
            loop {
                let end = match tokio::time::timeout(idle, wire::read_frame(&mut rd)).await {
                    // Not even a heartbeat: whatever is on the other end
                    // is not a working primary; free the connection.
                    Err(_) => Incoming::Lost(format!("nothing from the primary for {idle:?}")),
                    Ok(Ok(None)) => Incoming::Lost("primary closed the connection".into()),
                    // A frame failed its checks (checksum, magic, size):
                    // the stream cannot be trusted past it.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Other => {
                        Incoming::Corrupt(e.to_string())
                    }
                    Ok(Err(e)) => Incoming::Lost(format!("replication link: {e}")),
                    Ok(Ok(Some(f))) => {
                        self.heard(&vm, conn_id);
                        if f.kind == FrameKind::Heartbeat {
                            // The echo is what keeps the primary from
                            // fencing: it proves this side heard it.
                            let newest = echo.fetch_max(f.epoch, Ordering::SeqCst).max(f.epoch);
                            let _ = out.send(Frame::new(FrameKind::Heartbeat, newest, 0, vec![]));
                            continue;
                        }
                        if tx.send(Incoming::Frame(f)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let _ = tx.send(end).await;
                return;
            }
        });
        (rx, AbortOnDrop(task))
    }

    /// Applies each whole epoch the reader hands over until the link ends.
    async fn receive_epochs(
        &self,
        mut frames: mpsc::Receiver<Incoming>,
        conn: &mut Conn,
        base: u64,
    ) -> ConnEnd {
        let vm = conn.vm.clone();
        let mut asm = EpochAssembler::new(base + 1, conn.ram_size).with_disk_limit(conn.disk_limit);
        loop {
            let f = match frames.recv().await {
                Some(Incoming::Frame(f)) => f,
                Some(Incoming::Corrupt(e)) => {
                    // Ask for a resend from the last commit.
                    warn!(%vm, "corrupt frame: {e}");
                    return conn.resync(format!("corrupt frame: {e}"));
                }
                Some(Incoming::Lost(why)) => return ConnEnd::lost(why),
                None => return ConnEnd::lost("the connection's reader ended".into()),
            };
            match f.kind {
                FrameKind::Bye => {
                    return ConnEnd {
                        reason: "primary ended protection".into(),
                        bye: true,
                        guest_lost: None,
                    }
                }
                FrameKind::GuestLost => {
                    let mut ms = [0u8; 8];
                    let n = f.payload.len().min(8);
                    ms[..n].copy_from_slice(&f.payload[..n]);
                    return ConnEnd {
                        reason: "the primary reports its QEMU crashed".into(),
                        bye: false,
                        guest_lost: Some(Duration::from_millis(u64::from_le_bytes(ms).min(60_000))),
                    };
                }
                _ => {}
            }
            match asm.push(f) {
                Ok(None) => {}
                Ok(Some(done)) => {
                    let epoch = done.epoch;
                    if let Err(end) = self.apply_epoch(conn, done).await {
                        return end;
                    }
                    asm = EpochAssembler::new(epoch + 1, conn.ram_size)
                        .with_disk_limit(conn.disk_limit);
                }
                Err(e) => {
                    warn!(%vm, "rejected epoch data: {e}");
                    return conn.resync(format!("rejected epoch data: {e}"));
                }
            }
        }
    }

    /// Applies one whole epoch, durably, then acknowledges it.
    async fn apply_epoch(&self, conn: &mut Conn, done: CompleteEpoch) -> Result<(), ConnEnd> {
        let (vm, conn_id) = (conn.vm.clone(), conn.conn_id);
        let epoch = done.epoch;
        let t = Instant::now();
        // Only the current connection of a replica that has not been taken
        // over may write it; the lock keeps a takeover from starting the VM
        // mid-apply.
        let superseded = || ConnEnd::lost(format!("superseded before applying epoch {epoch}"));
        let Some(store_lock) = self.begin_apply(&vm, conn_id) else {
            return Err(superseded());
        };
        let _applying = store_lock.lock().await;
        if !self.is_current(&vm, conn_id) {
            self.end_apply(&vm, conn_id);
            return Err(superseded());
        }
        let store = conn.store.take();
        let joined = tokio::task::spawn_blocking(move || {
            let mut store = store;
            let r = store.apply(&done);
            (r, store)
        })
        .await;
        self.end_apply(&vm, conn_id);
        let Ok((res, store)) = joined else {
            return Err(ConnEnd::lost(format!(
                "applying epoch {epoch} failed unexpectedly"
            )));
        };
        conn.store = store.into();
        if let Err(e) = res {
            warn!(%vm, epoch, "cannot commit epoch: {e}");
            let torn = conn.store.needs_recovery();
            let mut end = conn.resync(format!("cannot commit epoch {epoch}: {e}"));
            if !self.fault_keep_armed_on_apply_error() {
                // Whatever failed, this replica is not known to be what it
                // was a moment ago: no automatic takeover from it. A failure
                // after the commit point leaves the epoch to finish from its
                // journal, which the next open, or a takeover, does.
                self.update(&vm, |r| {
                    if r.conn_id != conn_id {
                        return;
                    }
                    r.armed = false;
                    r.rearm_when_heard = false;
                    if torn {
                        r.needs_recovery = true;
                        r.status.state = FtState::Syncing;
                    }
                });
                if torn {
                    // The status detail (the connection's end).
                    end.reason.push_str(
                        "; committed but not in place: finished from its journal before any takeover",
                    );
                }
            }
            return Err(end);
        }
        let consistent = conn.store.is_consistent();
        self.update(&vm, |r| {
            // True on disk whatever happened meanwhile.
            r.status.last_committed = r.status.last_committed.max(epoch);
            if r.conn_id != conn_id {
                return;
            }
            if consistent {
                r.armed = self.cfg.auto_failover;
                r.status.state = FtState::Standby;
            } else {
                // Nothing to resume until device state follows (a resync
                // after reconnecting).
                r.armed = false;
                r.status.state = FtState::Syncing;
            }
            r.status.detail = format!("last apply {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        });
        // Acknowledged only once armed or disarmed for it: the primary stops
        // fencing on the ack of a commit that left nothing to resume.
        let _ = conn
            .out
            .send(Frame::new(FrameKind::Committed, epoch, 0, vec![]));
        Ok(())
    }

    /// The primary reported its QEMU crashed: nothing runs the guest there
    /// any more (it checked the process is gone), so there is nothing to
    /// wait for. Everything sent before the report is applied already:
    /// frames are handled in order.
    async fn after_guest_lost(
        self: &Arc<Self>,
        vm: &str,
        conn_id: u64,
        noticed: Duration,
        reason: &str,
    ) {
        let armed = self
            .replicas()
            .get(vm)
            .is_some_and(|r| r.armed && r.conn_id == conn_id);
        if armed {
            let _ = self.failover(vm, noticed, reason).await;
        } else {
            warn!(%vm, "the primary's QEMU crashed, but this replica is not armed (no consistent epoch yet, or auto-failover is off)");
        }
    }

    fn heard(&self, vm: &str, conn_id: u64) {
        let mut reps = self.replicas();
        if let Some(r) = reps.get_mut(vm) {
            if r.conn_id == conn_id {
                r.last_heard = Instant::now();
                if r.suspected.take().is_some() {
                    info!(%vm, "the suspected primary was heard again");
                    r.status.detail.clear();
                }
                if std::mem::take(&mut r.rearm_when_heard) && r.status.state == FtState::Standby {
                    r.armed = self.cfg.auto_failover;
                    r.status.detail.clear();
                    info!(%vm, armed = r.armed, "the primary of a replica found at start is heard again");
                }
            }
        }
    }

    /// Marks an apply as started on `vm`'s replica, if `conn_id` is
    /// still its connection; returns the replica's store lock.
    fn begin_apply(&self, vm: &str, conn_id: u64) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let mut reps = self.replicas();
        let r = reps.get_mut(vm)?;
        if r.conn_id != conn_id {
            return None;
        }
        r.applying = true;
        Some(r.store_lock.clone())
    }

    /// An apply ended: the primary's silence counts again from now.
    fn end_apply(&self, vm: &str, conn_id: u64) {
        let mut reps = self.replicas();
        if let Some(r) = reps.get_mut(vm) {
            if r.conn_id == conn_id {
                r.applying = false;
                r.last_heard = Instant::now();
            }
        }
    }

    fn is_current(&self, vm: &str, conn_id: u64) -> bool {
        self.replicas()
            .get(vm)
            .is_some_and(|r| r.conn_id == conn_id)
    }

    fn update(&self, vm: &str, f: impl FnOnce(&mut Replica)) {
        if let Some(r) = self.replicas().get_mut(vm) {
            f(r);
        }
    }

    fn end_conn(&self, vm: &str, conn_id: u64, bye: bool, why: String) {
        let mut reps = self.replicas();
        if let Some(r) = reps.get_mut(vm) {
            if r.conn_id != conn_id {
                return;
            }
            r.active_conn = false;
            if bye {
                r.armed = false;
                r.status.state = FtState::Stopped;
            }
            r.status.detail = why;
        }
    }

    async fn watchdog(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let mut due: Vec<(String, Duration)> = Vec::new();
            for (vm, r) in self.replicas().iter_mut() {
                if !r.armed || r.applying {
                    continue;
                }
                if r.retry_at.is_some_and(|t| Instant::now() < t) {
                    continue; // backing off after a failed takeover
                }
                let silence = r.last_heard.elapsed();
                let fresh = r.suspected.is_none_or(|s| s.heard != r.last_heard);
                if silence >= self.cfg.suspect_after && fresh {
                    r.suspected = Some(Suspicion {
                        heard: r.last_heard,
                        at: Instant::now(),
                        silence,
                    });
                    r.status.detail = format!(
                        "primary silent for {} ms: suspected; taking over at {} ms of silence (the primary fences itself by then)",
                        silence.as_millis(),
                        self.cfg.takeover_timeout.as_millis()
                    );
                    warn!(%vm, silence_ms = silence.as_millis() as u64, "primary suspected");
                }
                if silence >= self.takeover_after() {
                    due.push((vm.clone(), silence));
                }
            }
            for (vm, silent) in due {
                let b = self.clone();
                let reason = format!("no word from the primary for {silent:?}");
                let quiet = self.takeover_after();
                tokio::spawn(async move {
                    let _ = b.take_over(&vm, silent, &reason, Some(quiet)).await;
                });
            }
        }
    }

    /// Runs the VM here from its last committed epoch. `silent_for` is how
    /// long the primary had been silent when the decision was taken.
    pub async fn failover(
        self: &Arc<Self>,
        vm: &str,
        silent_for: Duration,
        reason: &str,
    ) -> Result<FailoverReport, TakeoverError> {
        self.take_over(vm, silent_for, reason, None).await
    }

    /// [`Backup::failover`], and with `still_silent`, only if the primary
    /// is still armed-for and silent that long when the decision is taken.
    /// The check and the decision happen under the lock that accepting a
    /// primary's connection takes (which restarts the silence clock, and is
    /// what lets a fenced primary resume): a primary that got in first is
    /// never taken over from, and one that comes later is refused.
    async fn take_over(
        self: &Arc<Self>,
        vm: &str,
        silent_for: Duration,
        reason: &str,
        still_silent: Option<Duration>,
    ) -> Result<FailoverReport, TakeoverError> {
        let decided = Instant::now();
        if self.owned(vm) {
            // A VM runs (or ran) from it here: it is nobody's replica.
            return Err(TakeoverError::AlreadyRunning {
                vm: vm.to_string(),
                state: FtState::FailedOver,
            });
        }
        // Detection, and the wait for the primary's fence that followed it.
        let mut detection = silent_for;
        let mut fence_wait = Duration::ZERO;
        let was_armed;
        let store_lock = {
            let mut reps = self.replicas();
            let r = reps
                .get_mut(vm)
                .ok_or_else(|| TakeoverError::NoReplica(vm.to_string()))?;
            if let Some(quiet) = still_silent {
                if !r.armed || r.applying || r.last_heard.elapsed() < quiet {
                    return Err(TakeoverError::PrimaryHeard(vm.to_string()));
                }
                if let Some(s) = r.suspected.filter(|s| s.heard == r.last_heard) {
                    detection = s.silence;
                    fence_wait = decided.saturating_duration_since(s.at);
                }
            }
            if r.status.state.is_taken_over() {
                return Err(TakeoverError::AlreadyRunning {
                    vm: vm.to_string(),
                    state: r.status.state,
                });
            }
            // A torn replica (an apply failed after its commit point) may
            // be resumable once its journal is finished: an operator may
            // try; the watchdog never does (it is disarmed).
            if r.status.state != FtState::Standby && !r.needs_recovery {
                return Err(TakeoverError::NotConsistent {
                    vm: vm.to_string(),
                    state: r.status.state,
                });
            }
            was_armed = r.armed;
            r.armed = false;
            r.retry_at = None;
            r.conn_id += 1; // any live connection is now stale
            r.status.state = FtState::TakingOver;
            r.status.detail = reason.to_string();
            r.store_lock.clone()
        };
        // An apply already under way finishes first (no new one starts: the
        // connection is stale now); then the replica is the VM's alone.
        let _replica = store_lock.lock_owned().await;
        // The VM starts from the files, not from what this process believes
        // of them: finish whatever the journal holds, check the commit is
        // resumable, and write its device state out for the restore.
        let dir = self.replica_dir(vm);
        let skip_recovery = self.fault_keep_armed_on_apply_error();
        let prepared =
            tokio::task::spawn_blocking(move || prepare_takeover(&dir, skip_recovery)).await;
        let epoch = match prepared {
            Ok(Ok(Some(epoch))) => epoch,
            Ok(Ok(None)) => {
                self.update(vm, |r| {
                    r.needs_recovery = false;
                    r.status.state = FtState::Syncing;
                    r.status.detail =
                        "takeover refused: the replica's commit has no device state".into();
                });
                return Err(TakeoverError::NotConsistent {
                    vm: vm.to_string(),
                    state: FtState::Syncing,
                });
            }
            Ok(Err(e)) => {
                return Err(self.takeover_failed(
                    vm,
                    format!("preparing the replica: {e}").into(),
                    was_armed,
                ))
            }
            Err(e) => {
                return Err(self.takeover_failed(
                    vm,
                    format!("replica task failed: {e}").into(),
                    was_armed,
                ))
            }
        };
        self.update(vm, |r| {
            r.needs_recovery = false;
            r.status.last_committed = epoch;
        });
        warn!(%vm, epoch, "taking over: {reason}");
        let dir = self.replica_dir(vm);
        let result = self.activate.activate(vm.to_string(), dir).await;
        let restore_ms = decided.elapsed().as_secs_f64() * 1e3;
        let detection_ms = detection.as_secs_f64() * 1e3;
        let fence_wait_ms = fence_wait.as_secs_f64() * 1e3;
        match result {
            Ok(()) => {
                // A handover: the primary from before it is refused from
                // now on, even after this host restarts.
                let dir = self.replica_dir(vm);
                let bumped = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    if let Some(mut id) = read_identity(&dir)? {
                        id.generation += 1;
                        write_identity(&dir, &id)?;
                    }
                    Ok(())
                })
                .await;
                if !matches!(bumped, Ok(Ok(()))) {
                    warn!(%vm, "could not record the handover in the replica's identity: {bumped:?}");
                }
                let report = FailoverReport {
                    detection_ms,
                    fence_wait_ms,
                    restore_ms,
                    total_ms: detection_ms + fence_wait_ms + restore_ms,
                    epoch,
                    reason: reason.to_string(),
                };
                info!(%vm, epoch, detection_ms, fence_wait_ms, restore_ms, "failed over");
                self.update(vm, |r| {
                    r.status.state = FtState::FailedOver;
                    r.status.failover = Some(report.clone());
                    r.status.detail = "the VM runs here from the replica directory, which is its own now (live RAM and disk base): not a replica any more".into();
                    r.takeover_failures = 0;
                    r.retry_at = None;
                });
                Ok(report)
            }
            Err(e) => Err(self.takeover_failed(vm, e, was_armed)),
        }
    }

    /// A takeover that could not start the VM (audit H9). Unless the guest
    /// ran from the replica before the start failed (the directory has an
    /// owner then, and is not a replica any more), the replica is as it
    /// was (an in-place start writes nothing into it before the guest
    /// runs): back to standby, armed as before, so the watchdog retries an
    /// armed one after a backoff, and an operator may retry any. Said
    /// loudly, in the log and in `ft status`.
    fn takeover_failed(&self, vm: &str, e: ActivateError, was_armed: bool) -> TakeoverError {
        let was_armed = was_armed && !self.fault_disarm_on_failed_takeover();
        let owner = tandem_supervisor::dir_owner(&self.replica_dir(vm));
        let mut detail = String::new();
        self.update(vm, |r| {
            r.takeover_failures += 1;
            let n = r.takeover_failures;
            match &owner {
                Ok(Some(o)) => {
                    r.armed = false;
                    r.status.state = FtState::Stopped;
                    detail = format!(
                        "takeover failed after the guest ran from the replica: {e}; the directory is VM `{}`'s now (its RAM and disk base), not a replica: start the VM by hand",
                        o.vm
                    );
                }
                _ => {
                    r.armed = was_armed;
                    r.status.state = FtState::Standby;
                    if was_armed {
                        let delay = takeover_backoff(n);
                        r.retry_at = Some(Instant::now() + delay);
                        detail = format!(
                            "takeover attempt {n} failed: {e}; the replica is intact and armed: retrying in {} s",
                            delay.as_secs()
                        );
                    } else {
                        detail = format!(
                            "takeover attempt {n} failed: {e}; the replica is intact (not armed: retry with `tandem failover`)"
                        );
                    }
                }
            }
            r.status.detail = detail.clone();
        });
        error!(%vm, "{detail}");
        TakeoverError::Activate {
            vm: vm.to_string(),
            source: e,
        }
    }

    /// Whether `vm`'s replica directory is a VM's own now (see
    /// [`tandem_supervisor::OWNER_FILE`]): never written, opened as a
    /// replica, or offered for a takeover again.
    fn owned(&self, vm: &str) -> bool {
        // Unreadable counts as owned: never write what might be a VM's.
        !matches!(
            tandem_supervisor::dir_owner(&self.replica_dir(vm)),
            Ok(None)
        )
    }
}

/// The wait before the watchdog retries a failed takeover: 1 s, doubling
/// per failure, at most 30 s.
fn takeover_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// What [`Backup::recover_replicas`] found in one replica directory.
enum Scanned {
    /// A VM took it over and owns it: its files are that VM's, never
    /// opened as a replica.
    Owned {
        owner: tandem_supervisor::DirOwner,
    },
    TakenOver {
        generation: u64,
    },
    Replica {
        epoch: u64,
        consistent: bool,
    },
}

/// The replica directories under `root`: a VM's name, with an identity
/// (a directory of a version-1 backup has none, and no way to tell whose
/// it is).
fn list_replicas(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut vms: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|vm| valid_vm_name(vm).is_ok() && root.join(vm).join(IDENTITY_FILE).exists())
        .collect();
    vms.sort();
    vms
}

/// Opens one replica found at start (finishing its journal), or tells it
/// was taken over here.
fn scan_replica(dir: &Path) -> Result<Scanned, String> {
    if let Some(owner) =
        tandem_supervisor::dir_owner(dir).map_err(|e| format!("reading its owner: {e}"))?
    {
        return Ok(Scanned::Owned { owner });
    }
    let hello = read_hello(dir).map_err(|e| format!("reading its hello: {e}"))?;
    let id = read_identity(dir)
        .map_err(|e| format!("reading its identity: {e}"))?
        .ok_or("it has no identity")?;
    // A takeover records generation + 1; a primary's hello since then
    // would carry it.
    if id.generation > hello.generation {
        return Ok(Scanned::TakenOver {
            generation: id.generation,
        });
    }
    let store = ReplicaStore::open(dir, hello.ram_size, &hello.disks).map_err(|e| e.to_string())?;
    Ok(Scanned::Replica {
        epoch: store.committed_epoch().unwrap_or(0),
        consistent: store.is_consistent(),
    })
}

/// Makes the replica in `dir` ready to run from (under its lock): opened
/// with the sizes of its hello, which finishes a journal left by a crash
/// or a failed apply, and its committed device state written out. The
/// committed epoch, or `None` if it is not resumable. `skip_recovery` is
/// the fault hook that reads the files as they are.
fn prepare_takeover(dir: &Path, skip_recovery: bool) -> Result<Option<u64>, String> {
    if skip_recovery {
        return replica::export_device_state_unrecovered(dir).map_err(|e| e.to_string());
    }
    let hello = read_hello(dir).map_err(|e| format!("reading its hello: {e}"))?;
    let store = ReplicaStore::open(dir, hello.ram_size, &hello.disks).map_err(|e| e.to_string())?;
    store.export_device_state().map_err(|e| e.to_string())
}

/// VM names become directory names: keep them to a safe alphabet.
fn valid_vm_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("`{name}` is not a valid VM name"));
    }
    Ok(())
}

/// Durably, through a private temp file of its own (two connections of
/// one VM never share one).
fn write_hello(dir: &Path, hello: &Hello) -> std::io::Result<()> {
    atomic_write_json(&dir.join("hello.json"), hello)
}

/// The primary's hello as the backup stored it (spec, disks).
pub fn read_hello(dir: &Path) -> std::io::Result<Hello> {
    let b = std::fs::read(dir.join("hello.json"))?;
    serde_json::from_slice(&b).map_err(std::io::Error::other)
}

/// The blocking part of [`Backup::open_replica`], under the replica's
/// lock. Returns the store, and why the replica was started afresh when it
/// was. With `resize` (the fault hook), a replica of another shape is
/// resized in place as before audit M3.
fn prepare_replica(
    dir: &Path,
    hello: &Hello,
    stored: Option<ReplicaIdentity>,
    resize: bool,
    faults: StoreFaults,
) -> Result<(ReplicaStore, Option<String>), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut fresh = None;
    if !resize {
        if let Some(why) = replica::layout_mismatch(dir, hello.ram_size, &hello.disks)
            .map_err(|e| e.to_string())?
        {
            let had = replica::read_commit_record(dir).ok().flatten();
            replica::discard(dir).map_err(|e| format!("discarding the old replica: {e}"))?;
            if let Some(rec) = had {
                fresh = Some(format!(
                    "the VM was re-defined ({why}): its replica (committed epoch {}) was discarded and is copied afresh",
                    rec.epoch
                ));
            }
        }
    }
    // Only when it changed: every write is a window in which a crash
    // leaves the old one, and the takeover reads it.
    if read_hello(dir).ok().as_ref() != Some(hello) {
        write_hello(dir, hello).map_err(|e| format!("recording its hello: {e}"))?;
    }
    let mut faults = faults;
    faults.resize_committed = resize;
    let store = ReplicaStore::open_with(dir, hello.ram_size, &hello.disks, faults)
        .map_err(|e| e.to_string())?;
    let id = ReplicaIdentity {
        uuid: hello.uuid.clone(),
        generation: hello.generation,
    };
    if stored.as_ref() != Some(&id) {
        write_identity(dir, &id).map_err(|e| format!("recording its identity: {e}"))?;
    }
    Ok((store, fresh))
}

/// Refuses a replica the filesystem has no room for, before any of it is
/// allocated (a half-reserved RAM file would hold the space it got). The
/// reservation itself still fails cleanly if space runs out meanwhile.
fn space_check(dir: &Path, hello: &Hello) -> Result<(), Refusal> {
    let too_big = || Refusal::Layout {
        vm: hello.vm.clone(),
        why: "its RAM and disk sizes add up to more than 2^64 bytes".into(),
    };
    let needed = replica::space_needed(dir, hello.ram_size, &hello.disks).ok_or_else(too_big)?;
    if needed == 0 {
        return Ok(());
    }
    match replica::free_space(dir) {
        Ok(free) if needed > free => Err(Refusal::NoSpace {
            vm: hello.vm.clone(),
            needed,
            free,
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            warn!(vm = %hello.vm, "cannot tell the free space for the replica: {e}");
            Ok(())
        }
    }
}

/// One primary's connection, as the epoch loop of [`Backup::serve`] holds it.
struct Conn {
    vm: String,
    conn_id: u64,
    store: ReplicaHolder,
    out: mpsc::UnboundedSender<Frame>,
    ram_size: u64,
    disk_limit: u64,
}

impl Conn {
    /// Asks the primary to resend from the last commit, and ends.
    fn resync(&self, why: String) -> ConnEnd {
        let _ = self.out.send(Frame::new(
            FrameKind::Resync,
            self.store.committed_epoch().unwrap_or(0),
            0,
            why.clone().into_bytes(),
        ));
        ConnEnd::lost(why)
    }
}

/// Holds the replica store; an apply takes it to a blocking thread and
/// gives it back.
struct ReplicaHolder(Option<ReplicaStore>);

impl ReplicaHolder {
    fn take(&mut self) -> ReplicaStore {
        self.0
            .take()
            .expect("the replica store is held between applies")
    }
}

impl std::ops::Deref for ReplicaHolder {
    type Target = ReplicaStore;
    fn deref(&self) -> &ReplicaStore {
        self.0
            .as_ref()
            .expect("the replica store is held between applies")
    }
}

impl From<ReplicaStore> for ReplicaHolder {
    fn from(s: ReplicaStore) -> Self {
        ReplicaHolder(Some(s))
    }
}

impl std::ops::DerefMut for ReplicaHolder {
    fn deref_mut(&mut self) -> &mut ReplicaStore {
        self.0
            .as_mut()
            .expect("the replica store is held between applies")
    }
}

/// How a connection ended.
struct ConnEnd {
    reason: String,
    /// The primary ended protection on purpose.
    bye: bool,
    /// The primary reported its QEMU crashed, this long after noticing.
    guest_lost: Option<Duration>,
}

impl ConnEnd {
    fn lost(reason: String) -> Self {
        ConnEnd {
            reason,
            bye: false,
            guest_lost: None,
        }
    }
}

/// The hello that opens a connection, checked; `None` (logged) otherwise.
async fn read_hello_frame<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    peer: &str,
) -> Option<Hello> {
    let hello = match tokio::time::timeout(Duration::from_secs(5), wire::read_frame(rd)).await {
        Ok(Ok(Some(f))) if f.kind == FrameKind::Hello => {
            match serde_json::from_slice::<Hello>(&f.payload) {
                Ok(h) => h,
                Err(e) => {
                    warn!(%peer, "malformed hello: {e}");
                    return None;
                }
            }
        }
        Ok(Ok(Some(f))) => {
            warn!(%peer, "expected hello, got {f:?}");
            return None;
        }
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            if let Some(WireError::Version(theirs)) = e.get_ref().and_then(|i| i.downcast_ref()) {
                // Answer in the peer's own version so it can say why.
                let why = format!(
                    "this backup speaks replication protocol version {VERSION}, the primary version {theirs}: upgrade the primary's tandem (docs/replication.md, \"Upgrading a protected pair\")"
                );
                warn!(%peer, "refusing replica: {why}");
                if (OLDEST_ANSWERED..VERSION).contains(theirs) {
                    refuse(wr, *theirs, &why).await;
                }
                return None;
            }
            warn!(%peer, "reading hello: {e}");
            return None;
        }
        Err(_) => {
            warn!(%peer, "no hello within 5 s");
            return None;
        }
    };
    if let Err(why) = valid_vm_name(&hello.vm) {
        warn!(%peer, "refusing replica: {why}");
        return None;
    }
    if hello.page_size != PAGE_SIZE as u64 || hello.ram_size % PAGE_SIZE as u64 != 0 {
        warn!(%peer, vm = %hello.vm, "refusing replica: unsupported page or RAM size");
        return None;
    }
    Some(hello)
}

/// An epoch carries at most every disk once over (a resync), plus the
/// log's per-record overhead.
fn disk_limit(hello: &Hello) -> u64 {
    // Sizes come from the peer: saturate rather than wrap (or panic).
    hello.disks.iter().fold(1 << 20, |sum: u64, d| {
        sum.saturating_add(d.size.saturating_mul(2))
    })
}

/// Frames the reader may queue ahead of the apply.
const READ_AHEAD_FRAMES: usize = 8;

/// What the connection's reader hands the apply loop.
enum Incoming {
    Frame(Frame),
    /// A frame failed its checks: resync from the last commit.
    Corrupt(String),
    /// The link is gone.
    Lost(String),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn abort(&self) {
        self.0.abort();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends queued frames, and between them a heartbeat every `heartbeat`
/// carrying `echo` (the newest of the primary's stamps read), until the
/// sender is dropped or the link fails.
fn spawn_writer<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(
    mut wr: W,
    heartbeat: Duration,
    echo: Arc<AtomicU64>,
) -> (mpsc::UnboundedSender<Frame>, tokio::task::JoinHandle<()>) {
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            let f = tokio::select! {
                f = out_rx.recv() => match f { Some(f) => f, None => return },
                _ = tick.tick() => Frame::new(FrameKind::Heartbeat, echo.load(Ordering::SeqCst), 0, vec![]),
            };
            if wr.write_all(&f.encode()).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    (out_tx, writer)
}

/// Tells a primary why it is refused (a `RESYNC` in protocol `version`),
/// then gives it a moment to read it.
async fn refuse<W: tokio::io::AsyncWrite + Unpin>(wr: &mut W, version: u16, why: &str) {
    let f = Frame::new(FrameKind::Resync, 0, 0, why.as_bytes().to_vec());
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = wr.write_all(&f.encode_as(version)).await;
        let _ = wr.flush().await;
    })
    .await;
}

/// Why a primary's hello is refused. Nothing of the replica is written.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the primary does not identify its VM (no UUID in its hello)")]
    NoIdentity,
    #[error("the replica `{vm}` here belongs to VM {replica}, not to this primary's VM {primary}: a different VM with the same name (rename one, or remove the old replica with the VM it belongs to)")]
    OtherVm {
        vm: String,
        replica: String,
        primary: String,
    },
    #[error("stale primary for `{vm}`: its generation is {primary}, the replica's {replica} (the VM was handed over since)")]
    Stale {
        vm: String,
        primary: u64,
        replica: u64,
    },
    #[error("another primary for `{vm}` is connected and alive (from {peer})")]
    SecondPrimary { vm: String, peer: String },
    #[error("this host already runs `{vm}`")]
    Running { vm: String },
    #[error("the replica directory of `{vm}` here is the live RAM and disk base of VM `{owner}` (uuid {uuid}), which took it over on this host: it is never written as a replica again. Delete that VM on this host (`tandem vm destroy {owner}`; it is a stale copy if the VM runs elsewhere now) to make this host a backup of `{vm}` again")]
    Owned {
        vm: String,
        owner: String,
        uuid: String,
    },
    #[error("the primary's replica of `{vm}` cannot be laid out here: {why}")]
    Layout { vm: String, why: String },
    #[error("No space left on device for the replica of `{vm}`: it needs {needed} more bytes, the backup has {free} free")]
    NoSpace { vm: String, needed: u64, free: u64 },
    #[error("reading the replica's identity: {0}")]
    Io(String),
}

/// Which VM a replica belongs to, and the generation of its primary.
/// Stored as `identity.json` in the replica directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaIdentity {
    pub uuid: String,
    pub generation: u64,
}

const IDENTITY_FILE: &str = "identity.json";

/// The replica's identity; `None` for a directory that has none (new, or
/// written by a version-1 backup).
pub fn read_identity(dir: &Path) -> std::io::Result<Option<ReplicaIdentity>> {
    match std::fs::read(dir.join(IDENTITY_FILE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records the replica's identity durably (written whole, then renamed).
pub fn write_identity(dir: &Path, id: &ReplicaIdentity) -> std::io::Result<()> {
    atomic_write_json(&dir.join(IDENTITY_FILE), id)
}

/// Test-only switches that restore the behaviour before a fix, so a test
/// can show it would catch the bug (`fault-injection` builds only).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupFaults {
    /// Admit any peer, whatever the authority says (before the cluster
    /// identity): a certified host that is not the VM's recorded primary
    /// writes into its replica.
    pub skip_authority: bool,
    /// Accept any primary's hello whatever its identity or generation (the
    /// version-1 behaviour).
    pub ignore_identity: bool,
    /// Let a second primary instance supersede a live one (the version-1
    /// behaviour).
    pub allow_second_primary: bool,
    /// Take over as soon as the primary is suspected (its fencing
    /// timeout), without waiting for the margin that lets its fence land.
    pub take_over_on_suspicion: bool,
    /// Open and recover a new connection's replica without its lock, while
    /// a superseded connection may still be applying (before audit H4).
    pub open_outside_store_lock: bool,
    /// A failed apply leaves the replica armed and in standby, and a
    /// takeover starts the VM from the files without finishing a journal
    /// first (before audit H5).
    pub keep_armed_on_apply_error: bool,
    /// Resize an existing replica to a hello's sizes instead of checking
    /// them against it (before audit M3).
    pub resize_on_hello: bool,
    /// Leave the replica root unscanned at start: replicas are known only
    /// once their primary reconnects (before audit M2).
    pub skip_replica_scan: bool,
    /// A takeover that fails leaves the replica disarmed and never
    /// retries it (before audit H9).
    pub disarm_on_failed_takeover: bool,
    /// Hooks of every replica store a connection opens.
    pub store: StoreFaults,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_limit_saturates_on_sizes_from_the_peer() {
        let mut hello = Hello {
            vm: "vm".into(),
            uuid: "u".into(),
            generation: 0,
            instance: 0,
            ram_size: 0,
            page_size: PAGE_SIZE as u64,
            spec_toml: String::new(),
            disks: vec![],
        };
        assert_eq!(disk_limit(&hello), 1 << 20);
        hello.disks = ["a", "b"]
            .map(|name| wire::HelloDisk {
                name: name.into(),
                size: u64::MAX / 2,
            })
            .to_vec();
        assert_eq!(disk_limit(&hello), u64::MAX);
    }
}
