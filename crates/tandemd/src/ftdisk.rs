//! Disk replication on the primary: each protected disk is mirrored by
//! QEMU (`blockdev-mirror`, `sync=full`, `copy-mode=write-blocking`) to an
//! NBD export served here, so every guest write is seen — and logged for
//! its epoch — before the guest is told it completed.
//!
//! That holds only while the mirror does. [`MirroredDisk::check`], called by
//! the epoch loop with the guest stopped before its device state is taken,
//! says whether the disk's log holds every write the guest has had
//! acknowledged: the NBD export's own record of its client (a refused
//! write, the connection closing, a second client: no I/O, a lock), then
//! one `query-block-jobs` (shared by the VM's disks in one stop window)
//! for what the export cannot see: the job cancelled, failed, or no longer
//! actively synced. A failed check makes that epoch carry no device state,
//! and a keeper task per disk restarts the mirror (a new job, a full copy;
//! the log is resynced as by [`DiskSource::resync_all`]) with bounded
//! retries and backoff, so protection comes back by itself.
//!
//! The export's log is capped in bytes (audit M14): past the cap it is
//! dropped and the disk is resent whole at the next epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tandem_nbd::{ClientToken, DiskWrite, Export, ServerHandle};
use tandem_replication::link::BoxFuture;
use tandem_replication::{disklog, DiskFailure, DiskSource};
use tandem_supervisor::{GuestPort, SupervisorError};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

/// The mirror job's chunk size: the smallest QEMU allows, so that every
/// guest write is mirrored before it completes. Costs one bit per 512
/// bytes of disk (2 MiB of bitmap per 8 GiB).
const MIRROR_GRANULARITY: u64 = 512;

/// Restarts of a failed mirror, in a row, before the disk is given up on
/// (until the VM is protected again). A restart counts as done once its
/// job has finished copying.
const RESTART_ATTEMPTS: u32 = 8;
/// Wait before the second restart attempt; doubled for each later one.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long ending a job may take (cancel, conclude, dismiss).
const JOB_END_TIMEOUT: Duration = Duration::from_secs(5);

/// How the disks of a protection are mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorSettings {
    /// Cap on a disk's write log between two epochs, in bytes. The
    /// effective cap is this or the disk's size, whichever is smaller: a
    /// log larger than the disk costs more than resending the disk.
    pub log_cap: u64,
}

impl MirrorSettings {
    /// The cap for a disk of `disk_size` bytes: a log larger than the disk
    /// costs more than resending the disk.
    fn cap_for(&self, disk_size: u64) -> u64 {
        self.log_cap.min(disk_size.max(1 << 20))
    }
}

impl Default for MirrorSettings {
    fn default() -> Self {
        MirrorSettings {
            log_cap: tandem_nbd::DEFAULT_LOG_CAP,
        }
    }
}

/// One protected disk: its NBD export, the QEMU job that mirrors into it,
/// and what is known about whether the export's log is whole.
pub struct MirroredDisk {
    name: String,
    /// The guest disk's block node: the mirror's source.
    source: String,
    sock: PathBuf,
    export: Arc<Export>,
    server: Mutex<Option<ServerHandle>>,
    port: GuestPort,
    jobs: Arc<JobQuery>,
    synced: AtomicBool,
    /// The next take must send the whole disk.
    resync: AtomicBool,
    /// A whole-disk copy for the next take, taken by a restart (the guest
    /// running, the export idle) or by `check` (the guest stopped); the
    /// writes since are in the export's log.
    stash: Mutex<Option<Vec<u8>>>,
    mirror: Mutex<Mirror>,
    /// Wakes the keeper: a failure to recover from, or the end.
    wake: Arc<Notify>,
    ended: AtomicBool,
    /// Restarts and the final teardown, one at a time.
    ops: tokio::sync::Mutex<()>,
    stats: Mutex<CheckStats>,
}

/// The current mirror job and its health.
struct Mirror {
    /// Names the job and its target node; bumped by every restart attempt.
    generation: u32,
    /// The NBD client (QEMU's target node) this generation connected.
    client: ClientToken,
    /// What of this generation exists in QEMU, so a teardown removes only
    /// what tandemd made.
    node_added: bool,
    job_started: bool,
    health: Health,
    /// Restart attempts since the mirror last finished a copy.
    attempts: u32,
    /// The job query this disk last used (see [`JobQuery`]).
    seen_query: u64,
}

enum Health {
    /// The job runs (copying for the first time, or synced) and nothing
    /// has gone wrong.
    Running,
    /// Restarted after `cause`; copying the disk again.
    Recopying { cause: String },
    /// The log may lack writes since `cause`; the keeper restarts the
    /// mirror. `retry` says how the last attempt ended.
    Failed {
        cause: String,
        retry: Option<String>,
    },
    /// Every restart attempt failed; the last with `error`.
    GaveUp { cause: String, error: String },
}

impl Health {
    fn describe(&self) -> String {
        match self {
            Health::Running => "mirroring".into(),
            Health::Recopying { cause } => {
                format!("{cause}; the mirror was restarted and is copying the disk again")
            }
            Health::Failed { cause, retry: None } => format!("{cause}; restarting the mirror"),
            Health::Failed {
                cause,
                retry: Some(r),
            } => format!("{cause}; {r}"),
            Health::GaveUp { cause, error } => format!(
                "{cause}; the mirror could not be restarted ({RESTART_ATTEMPTS} attempts, the last: \
                 {error}): unprotect and protect the VM again"
            ),
        }
    }
}

/// What `query-block-jobs` says of one mirror job.
#[derive(Debug, PartialEq)]
enum JobState {
    /// Copying the disk; writes are mirrored but the target is not whole.
    Copying { done: u64, len: u64 },
    /// Ready and actively synced: every completed write is on the target.
    Synced,
    /// Ready, but writes are pending for the background copy (a transient
    /// state; nothing is lost, the log is just not whole yet).
    Lagging,
    /// The job is gone, failed, or ending: writes may be missing for good.
    Broken(String),
}

/// Judges a job from `query-block-jobs`' answer.
fn assess(jobs: &Value, id: &str) -> JobState {
    let Some(j) = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["device"] == id))
    else {
        return JobState::Broken(format!(
            "QEMU has no mirror job {id} any more (cancelled, or it failed)"
        ));
    };
    if let Some(e) = j.get("error").and_then(Value::as_str) {
        return JobState::Broken(format!("the mirror job {id} failed: {e}"));
    }
    let io = j.get("io-status").and_then(Value::as_str).unwrap_or("ok");
    if io != "ok" {
        return JobState::Broken(format!("the mirror job {id} has I/O status {io}"));
    }
    let status = j.get("status").and_then(Value::as_str).unwrap_or("");
    let ready = j.get("ready") == Some(&Value::Bool(true));
    match status {
        "created" | "running" | "paused" if !ready => JobState::Copying {
            done: j["offset"].as_u64().unwrap_or(0),
            len: j["len"].as_u64().unwrap_or(0),
        },
        // `actively-synced` (QEMU 8.2+): false while written data waits
        // for the background copy. Older QEMUs do not say; ready is then
        // all there is.
        "ready" | "standby" if ready => match j.get("actively-synced") {
            Some(Value::Bool(false)) => JobState::Lagging,
            _ => JobState::Synced,
        },
        "concluded" | "null" => JobState::Broken(format!(
            "the mirror job {id} has ended (someone cancelled or completed it)"
        )),
        other => JobState::Broken(format!("the mirror job {id} is ending (status {other})")),
    }
}

/// One `query-block-jobs` per stop window for all of a VM's disks: the
/// epoch loop checks every disk once per window, in turn, so a disk reuses
/// the latest answer if it has not used it yet (a disk earlier in this
/// window asked after the stop), and asks again otherwise (it is the first
/// disk of a new window).
struct JobQuery {
    port: GuestPort,
    last: tokio::sync::Mutex<(u64, Result<Arc<Value>, String>)>,
}

impl JobQuery {
    async fn fresh(&self, seen: u64) -> (u64, Result<Arc<Value>, String>) {
        let mut last = self.last.lock().await;
        if last.0 == 0 || last.0 == seen {
            let r = self
                .port
                .qmp("query-block-jobs", json!({}))
                .await
                .map(Arc::new)
                .map_err(|e| e.to_string());
            *last = (last.0 + 1, r);
        }
        (last.0, last.1.clone())
    }
}

/// How long checks take (they run inside the guest's pause).
#[derive(Default)]
struct CheckStats {
    count: u64,
    /// The most recent durations, in µs.
    recent: Vec<u32>,
}

impl CheckStats {
    const KEEP: usize = 1024;

    fn record(&mut self, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        if self.recent.len() < Self::KEEP {
            self.recent.push(us);
        } else {
            self.recent[(self.count as usize) % Self::KEEP] = us;
        }
        self.count += 1;
    }

    /// (p50, p99, max) in µs over the recent checks.
    fn summary(&self) -> (u32, u32, u32) {
        let mut v = self.recent.clone();
        v.sort_unstable();
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        (
            at(0.5).unwrap_or(0),
            at(0.99).unwrap_or(0),
            v.last().copied().unwrap_or(0),
        )
    }
}

impl MirroredDisk {
    fn job_id(&self, generation: u32) -> String {
        format!("ft-{}-{generation}", self.name)
    }
    fn target_node(&self, generation: u32) -> String {
        format!("ftm-{}-{generation}", self.name)
    }
    fn vm(&self) -> &str {
        self.port.name()
    }

    /// The check, with reasons as plain text.
    async fn check_now(&self) -> Result<(), String> {
        let (generation, client, recopying, seen) = {
            let m = self.mirror.lock();
            let recopying = match &m.health {
                Health::Running => None,
                Health::Recopying { cause } => Some(cause.clone()),
                Health::Failed { .. } | Health::GaveUp { .. } => return Err(m.health.describe()),
            };
            (m.generation, m.client, recopying, m.seen_query)
        };
        // The export's side first: instant, and it sees what QEMU may not
        // have reported yet (a refused write, a dropped connection).
        if let Err(f) = self.export.client_check(client) {
            return Err(self.fail(generation, f.to_string()));
        }
        // QEMU's side: a cancel leaves the NBD connection up.
        let (seq, jobs) = self.jobs.fresh(seen).await;
        self.mirror.lock().seen_query = seq;
        let jobs = jobs.map_err(|e| format!("cannot ask QEMU about the mirror job: {e}"))?;
        let id = self.job_id(generation);
        match assess(&jobs, &id) {
            JobState::Copying { done, len } => match recopying {
                // The initial copy: epochs carry no device state until it
                // is done (`is_synced`), and nothing is missing meanwhile.
                None => Ok(()),
                Some(cause) => Err(format!(
                    "{cause}; the mirror was restarted and is copying the disk again ({}%)",
                    (done * 100).checked_div(len).unwrap_or(0)
                )),
            },
            JobState::Lagging => Err(format!(
                "the mirror job {id} is not actively synced (writes wait for its background copy)"
            )),
            JobState::Broken(why) => Err(self.fail(generation, why)),
            JobState::Synced => {
                self.copied(generation);
                self.prepare_resync()
            }
        }
    }

    /// The job of `generation` has finished copying and is synced.
    fn copied(&self, generation: u32) {
        let mut m = self.mirror.lock();
        if m.generation != generation {
            return;
        }
        if let Health::Recopying { cause } = &m.health {
            info!(vm = %self.vm(), disk = %self.name, "disk copied again after: {cause}; its epochs carry device state again");
            m.health = Health::Running;
        }
        m.attempts = 0;
        if !self.synced.swap(true, Ordering::SeqCst) {
            info!(vm = %self.vm(), disk = %self.name, job = %self.job_id(generation), "disk copy complete");
        }
    }

    /// With a synced job and the guest stopped: if the log was dropped
    /// (overflow, `resync_all`), copy the whole disk now, so an epoch with
    /// device state never goes out without it (a copy failing here fails
    /// the check; failing in `take_writes` could not stop the epoch).
    fn prepare_resync(&self) -> Result<(), String> {
        if !self.resync.load(Ordering::SeqCst) && self.export.overflow().is_none() {
            return Ok(());
        }
        // Cut the log first: every write before the cut is in the file
        // read below, every later one in the next log.
        if let Err(o) = self.export.take_writes() {
            info!(vm = %self.vm(), disk = %self.name, "{o}");
        }
        self.resync.store(false, Ordering::SeqCst);
        let mut out = Vec::new();
        match full_copy(self.export.path(), self.export.size(), &mut out) {
            Ok(()) => {
                *self.stash.lock() = Some(out);
                Ok(())
            }
            Err(e) => {
                self.resync.store(true, Ordering::SeqCst);
                Err(format!(
                    "reading the mirror target for a full copy failed: {e}"
                ))
            }
        }
    }

    /// Records that the log of `generation` may lack writes, and wakes the
    /// keeper. Returns the reason to report.
    fn fail(&self, generation: u32, why: String) -> String {
        let mut m = self.mirror.lock();
        if m.generation == generation
            && matches!(m.health, Health::Running | Health::Recopying { .. })
        {
            warn!(vm = %self.vm(), disk = %self.name, "the disk's write log may lack writes: {why}; restarting its mirror");
            self.synced.store(false, Ordering::SeqCst);
            m.health = Health::Failed {
                cause: why,
                retry: None,
            };
            self.wake.notify_one();
        }
        m.health.describe()
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Makes QEMU connect a new target node and start a new job on it.
    async fn attach(&self, generation: u32) -> Result<(), SupervisorError> {
        let node = self.target_node(generation);
        self.port
            .qmp(
                "blockdev-add",
                json!({
                    "driver": "nbd",
                    "node-name": node,
                    "server": {"type": "unix", "path": self.sock},
                    "export": self.name,
                }),
            )
            .await?;
        self.mirror.lock().node_added = true;
        self.port
            .qmp(
                "blockdev-mirror",
                json!({
                    "job-id": self.job_id(generation),
                    "device": self.source,
                    "target": node,
                    "sync": "full",
                    "copy-mode": "write-blocking",
                    // Write-blocking mode copies a guest write to the target
                    // before completing it, but QEMU tracks the job in
                    // granularity chunks (default: the target's cluster
                    // size, 64 KiB for NBD), and parts of a write that do
                    // not cover whole chunks may be left to the background
                    // copy. Every virtio-blk write is 512-aligned, so with
                    // 512-byte chunks nothing is.
                    "granularity": MIRROR_GRANULARITY,
                    // A failed job stays (concluded, with its error) until
                    // tandemd dismisses it, so the reason can be reported.
                    "auto-dismiss": false,
                }),
            )
            .await?;
        self.mirror.lock().job_started = true;
        Ok(())
    }

    /// Removes the current generation's job and target node, as far as
    /// tandemd made them.
    async fn detach(&self) {
        let (generation, job, node) = {
            let m = self.mirror.lock();
            (m.generation, m.job_started, m.node_added)
        };
        if job {
            end_job(&self.port, &self.job_id(generation)).await;
            self.mirror.lock().job_started = false;
        }
        if node {
            let node = self.target_node(generation);
            if let Err(e) = self
                .port
                .qmp("blockdev-del", json!({"node-name": node}))
                .await
            {
                debug!(vm = %self.vm(), %node, "blockdev-del: {e}");
            }
            self.mirror.lock().node_added = false;
        }
    }

    /// One restart attempt: the old job and node go, the log is resynced,
    /// a new generation is attached.
    async fn restart(&self) -> Result<(), SupervisorError> {
        let _op = self.ops.lock().await;
        if self.ended() {
            return Ok(());
        }
        self.detach().await;
        self.synced.store(false, Ordering::SeqCst);
        self.restart_log().await;
        let client = self.export.expect_client();
        let generation = {
            let mut m = self.mirror.lock();
            m.generation += 1;
            m.client = client;
            m.generation
        };
        if let Err(e) = self.attach(generation).await {
            self.detach().await;
            return Err(e);
        }
        let mut m = self.mirror.lock();
        if let Health::Failed { cause, .. } = &m.health {
            m.health = Health::Recopying {
                cause: cause.clone(),
            };
        }
        info!(vm = %self.vm(), disk = %self.name, job = %self.job_id(generation), "disk mirror restarted: copying the disk again");
        Ok(())
    }

    /// Starts the replica's disk over (`resync_all` semantics) while the
    /// guest runs: the log is cut and the whole target copied, for the
    /// next take to send before the later writes (the new job's full copy
    /// among them). Between `detach` and `attach` nothing writes to the
    /// export, so the copy is exactly the target at the cut. Were the copy
    /// to fail, the next take copies instead (in the guest's pause).
    async fn restart_log(&self) {
        *self.stash.lock() = None;
        if let Err(o) = self.export.take_writes() {
            debug!(vm = %self.vm(), disk = %self.name, "{o}");
        }
        let (path, size) = (self.export.path().to_path_buf(), self.export.size());
        let copied = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            full_copy(&path, size, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match copied {
            Ok(out) => {
                *self.stash.lock() = Some(out);
                self.resync.store(false, Ordering::SeqCst);
            }
            Err(e) => {
                warn!(vm = %self.vm(), disk = %self.name, "copying the mirror target failed: {e}; the next epoch copies it");
                self.resync.store(true, Ordering::SeqCst);
            }
        }
    }

    fn log_stats(&self, why: &str) {
        let s = self.stats.lock();
        if s.count == 0 {
            return;
        }
        let (p50, p99, max) = s.summary();
        info!(vm = %self.vm(), disk = %self.name, checks = s.count, p50_us = p50, p99_us = p99, max_us = max, "disk checks ({why})");
    }
}

/// Restarts a disk's mirror whenever a check finds it failed, with bounded
/// retries and backoff. Holds the disk weakly: it ends when the disk goes.
async fn keep(disk: Weak<MirroredDisk>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(d) = disk.upgrade() else { return };
        if d.ended() {
            return;
        }
        if !matches!(d.mirror.lock().health, Health::Failed { .. }) {
            continue;
        }
        loop {
            let attempt = {
                let mut m = d.mirror.lock();
                m.attempts += 1;
                m.attempts
            };
            if attempt > 1 {
                let wait = RESTART_BACKOFF
                    .saturating_mul(1 << (attempt - 2).min(16))
                    .min(RESTART_BACKOFF_MAX);
                tokio::time::sleep(wait).await;
                if d.ended() {
                    return;
                }
            }
            let Err(e) = d.restart().await else { break };
            let mut m = d.mirror.lock();
            let Health::Failed { cause, .. } = &m.health else {
                break;
            };
            let cause = cause.clone();
            if attempt >= RESTART_ATTEMPTS {
                error!(vm = %d.vm(), disk = %d.name, "giving up on the disk's mirror after {attempt} restart attempts: {e}");
                m.health = Health::GaveUp {
                    cause,
                    error: e.to_string(),
                };
                break;
            }
            let next = RESTART_BACKOFF
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(RESTART_BACKOFF_MAX);
            warn!(vm = %d.vm(), disk = %d.name, attempt, "restarting the disk's mirror failed: {e}; retrying in {} s", next.as_secs());
            m.health = Health::Failed {
                cause,
                retry: Some(format!(
                    "restart attempt {attempt} of {RESTART_ATTEMPTS} failed ({e}); retrying in {} s",
                    next.as_secs()
                )),
            };
        }
    }
}

/// Ends job `id` if QEMU has it: cancels it, waits for it to conclude, and
/// dismisses it.
async fn end_job(port: &GuestPort, id: &str) {
    let deadline = Instant::now() + JOB_END_TIMEOUT;
    let mut cancelled = false;
    loop {
        let jobs = port
            .qmp("query-block-jobs", json!({}))
            .await
            .unwrap_or(Value::Null);
        let Some(job) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == id))
        else {
            return;
        };
        match job["status"].as_str().unwrap_or("") {
            "concluded" => {
                let _ = port.qmp("job-dismiss", json!({"id": id})).await;
            }
            "null" | "aborting" | "waiting" | "pending" => {}
            _ if !cancelled => {
                let _ = port
                    .qmp("block-job-cancel", json!({"device": id, "force": true}))
                    .await;
                cancelled = true;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            warn!(vm = %port.name(), job = %id, "the mirror job did not end within {JOB_END_TIMEOUT:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl DiskSource for MirroredDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.export.size()
    }
    fn take_writes(&self) -> Vec<u8> {
        let taken = self.export.take_writes();
        let stash = self.stash.lock().take();
        if self.resync.swap(false, Ordering::SeqCst) || taken.is_err() {
            if let Err(o) = &taken {
                info!(vm = %self.vm(), disk = %self.name, "{o}");
            }
            // The whole disk as the target holds it now; writes racing
            // with this read are also in the next log, and replaying them
            // is harmless.
            let mut out = Vec::new();
            if let Err(e) = full_copy(self.export.path(), self.export.size(), &mut out) {
                warn!(disk = %self.name, "full disk copy failed: {e}; will retry");
                self.resync.store(true, Ordering::SeqCst);
                out.clear();
            }
            return out;
        }
        // A copy `check` took in this window, then what followed it.
        let mut out = stash.unwrap_or_default();
        if let Ok(log) = taken {
            for w in log.into_writes() {
                match w {
                    DiskWrite::Data { offset, data } => disklog::push(&mut out, offset, &data),
                    DiskWrite::Zero { offset, len } => disklog::push_zero(&mut out, offset, len),
                }
            }
        }
        out
    }
    fn resync_all(&self) {
        let _ = self.export.take_writes();
        *self.stash.lock() = None;
        self.resync.store(true, Ordering::SeqCst);
    }
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
    fn check(&self) -> BoxFuture<'_, Result<(), DiskFailure>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.check_now().await;
            let n = {
                let mut s = self.stats.lock();
                s.record(t.elapsed());
                s.count
            };
            if n % 1200 == 0 {
                self.log_stats("every 1200");
            }
            r.map_err(|reason| DiskFailure {
                disk: self.name.clone(),
                reason,
            })
        })
    }
}

impl Drop for MirroredDisk {
    fn drop(&mut self) {
        // Ends the keeper.
        self.wake.notify_one();
    }
}

/// Encodes the whole backing file: data for non-zero chunks, zero records
/// for the rest (the replica may hold stale data there).
fn full_copy(path: &Path, size: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().all(|&b| b == 0) {
            disklog::push_zero(out, off, n as u64);
        } else {
            disklog::push(out, off, &buf[..n]);
        }
        off += n as u64;
    }
    Ok(())
}

/// Why mirroring a VM's disks could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("creating {}: {source}", path.display())]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] SupervisorError),
    #[error("QEMU does not report block node {0}")]
    NoBlockNode(String),
    #[error(transparent)]
    Nbd(#[from] tandem_nbd::NbdError),
    #[error("mirroring disk {disk}: {source}")]
    Mirror {
        disk: String,
        source: SupervisorError,
    },
}

/// Starts mirroring every writable disk of the VM. On error, whatever was
/// set up is torn down again.
pub async fn start_with(
    port: &GuestPort,
    work: &Path,
    settings: MirrorSettings,
) -> Result<Vec<Arc<MirroredDisk>>, MirrorError> {
    // tandemd's own per-VM directory: the NBD sockets and the mirror
    // copies (whole disks) in it are root's alone, whatever the umask.
    std::fs::create_dir_all(work)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| MirrorError::WorkDir {
            path: work.to_path_buf(),
            source,
        })?;
    let nodes = port
        .qmp("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let jobs = Arc::new(JobQuery {
        port: port.clone(),
        last: tokio::sync::Mutex::new((0, Ok(Arc::new(Value::Null)))),
    });
    let mut disks: Vec<Arc<MirroredDisk>> = Vec::new();
    for d in port.spec().disks.iter().filter(|d| !d.readonly) {
        let node = tandem_vmspec::disk_node_name(&d.name);
        let size = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node.as_str()))
            .and_then(|n| n["image"]["virtual-size"].as_u64())
            .ok_or_else(|| MirrorError::NoBlockNode(node.clone()))?;
        let export = Export::with_name(
            d.name.clone(),
            work.join(format!("mirror-{}.raw", d.name)),
            size,
        )?;
        export.set_log_cap(settings.cap_for(size));
        let sock = work.join(format!("nbd-{}.sock", d.name));
        let server = tandem_nbd::serve_unix(export.clone(), &sock)?;
        let client = export.expect_client();
        let wake = Arc::new(Notify::new());
        let disk = Arc::new(MirroredDisk {
            name: d.name.clone(),
            source: node,
            sock,
            export,
            server: Mutex::new(Some(server)),
            port: port.clone(),
            jobs: jobs.clone(),
            synced: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            stash: Mutex::new(None),
            mirror: Mutex::new(Mirror {
                generation: 1,
                client,
                node_added: false,
                job_started: false,
                health: Health::Running,
                attempts: 0,
                seen_query: 0,
            }),
            wake: wake.clone(),
            ended: AtomicBool::new(false),
            ops: tokio::sync::Mutex::new(()),
            stats: Mutex::new(CheckStats::default()),
        });
        disks.push(disk.clone());
        if let Err(source) = disk.attach(1).await {
            stop(port, &disks).await;
            return Err(MirrorError::Mirror {
                disk: d.name.clone(),
                source,
            });
        }
        tokio::spawn(keep(Arc::downgrade(&disk), wake));
        info!(vm = %port.name(), disk = %d.name, size, log_cap = disk.export.log_cap(), "mirroring disk to the replication export");
    }
    Ok(disks)
}

/// Ends mirroring: stops the keepers, cancels the jobs, removes the NBD
/// nodes, stops serving.
pub async fn stop(_port: &GuestPort, disks: &[Arc<MirroredDisk>]) {
    for d in disks {
        d.ended.store(true, Ordering::SeqCst);
        d.wake.notify_one();
    }
    for d in disks {
        // Waits for a restart under way, then removes what it made.
        let _op = d.ops.lock().await;
        d.detach().await;
        if let Some(s) = d.server.lock().take() {
            s.shutdown();
        }
        d.log_stats("protection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(v: Value) -> Value {
        Value::Array(vec![v])
    }

    #[test]
    fn a_job_is_synced_only_ready_and_actively_synced() {
        let id = "ft-data-1";
        let ready = json!({"device": id, "type": "mirror", "status": "ready", "ready": true,
            "io-status": "ok", "offset": 10, "len": 10, "actively-synced": true});
        assert_eq!(assess(&jobs(ready.clone()), id), JobState::Synced);
        // A paused ready job still mirrors writes synchronously.
        let mut standby = ready.clone();
        standby["status"] = json!("standby");
        assert_eq!(assess(&jobs(standby), id), JobState::Synced);
        // An older QEMU without the field: ready is all there is.
        let mut old = ready.clone();
        old.as_object_mut().unwrap().remove("actively-synced");
        assert_eq!(assess(&jobs(old), id), JobState::Synced);
        let mut lag = ready.clone();
        lag["actively-synced"] = json!(false);
        assert_eq!(assess(&jobs(lag), id), JobState::Lagging);
        let copying = json!({"device": id, "status": "running", "ready": false,
            "io-status": "ok", "offset": 5, "len": 20});
        assert_eq!(
            assess(&jobs(copying), id),
            JobState::Copying { done: 5, len: 20 }
        );
    }

    #[test]
    fn a_missing_failed_or_ending_job_is_broken_and_says_why() {
        let id = "ft-data-1";
        let broken = |v: Value| match assess(&v, id) {
            JobState::Broken(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(broken(json!([])).contains("no mirror job ft-data-1"));
        // Another disk's job is not this one.
        assert!(broken(jobs(
            json!({"device": "ft-other-1", "status": "ready", "ready": true})
        ))
        .contains("no mirror job"));
        let failed = json!({"device": id, "status": "concluded", "ready": true,
            "io-status": "ok", "error": "No space left on device"});
        assert!(broken(jobs(failed)).contains("failed: No space left on device"));
        let nospace =
            json!({"device": id, "status": "ready", "ready": true, "io-status": "nospace"});
        assert!(broken(jobs(nospace)).contains("nospace"));
        let concluded =
            json!({"device": id, "status": "concluded", "ready": true, "io-status": "ok"});
        assert!(broken(jobs(concluded)).contains("has ended"));
        for s in ["aborting", "waiting", "pending"] {
            let v = json!({"device": id, "status": s, "ready": true, "io-status": "ok"});
            assert!(broken(jobs(v)).contains(s));
        }
    }

    #[test]
    fn the_log_cap_is_never_above_the_disk() {
        let s = MirrorSettings::default();
        assert_eq!(s.cap_for(64 << 20), 64 << 20);
        assert_eq!(s.cap_for(8 << 30), tandem_nbd::DEFAULT_LOG_CAP);
        // A tiny disk still gets room for a few writes.
        assert_eq!(s.cap_for(4096), 1 << 20);
    }

    #[test]
    fn check_stats_summarise_recent_checks() {
        let mut s = CheckStats::default();
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(s.summary(), (51, 99, 100));
        for _ in 0..CheckStats::KEEP {
            s.record(Duration::from_micros(7));
        }
        assert_eq!(s.summary(), (7, 7, 7));
        assert_eq!(s.count, 100 + CheckStats::KEEP as u64);
    }
}
