//! One drill round, step by step: bring up the hosts and boot the guest,
//! protect it, drive the workload, choose the moment and kill host A,
//! await B's takeover and the client being served again, then check the
//! invariants against the resumed guest and the replica's disk.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use tandem_api::{FailoverReport, FtStatus, VmInfo};

use crate::checker::{self, Delivered, Violation};
use crate::topology::{self, Topology, GUEST_IP};
use crate::{
    block_on, bring_up, exchange, ft_backup, ft_primary, host_state, protect, tail, wait_for,
    DrillOptions, Host, KillMode, Rng, RoundReport, Site,
};

/// Pages of guest memory the churn workload keeps rewriting (16 MiB).
const CHURN_PAGES: usize = 4096;

pub(crate) fn run_round(
    opts: &DrillOptions,
    round: u32,
    kill: KillMode,
    rng: &mut Rng,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<RoundReport> {
    let tag = format!("{}{}", std::process::id() % 100_000, round);
    // Dropped in reverse: B and A (with their QEMUs) before the namespaces.
    let Site {
        work,
        topo,
        mut a,
        b,
        repl,
    } = bring_up(opts, &tag)?;
    let api_a = a.api();
    protect(&a, &b, &repl, opts, opts.epoch_ms)?;
    say(&format!("  protected; client workload from {}", topo.c));
    start_churn(&topo, &api_a)?;
    let workload = Workload::start(&topo, round)?;
    let moment = choose_kill_moment(&a, &api_a, &workload, rng)?;
    let at_kill = kill_host_a(kill, &moment, &topo, &mut a, &workload)?;
    say(&format!(
        "  killed {kill:?} after {} replies",
        moment.delivered_before
    ));
    let failover = await_takeover(&b)?;
    let served = await_client_served(&topo, at_kill.at)?;
    let done = workload.finish(&topo, at_kill.upload_acked, say)?;
    let resumed = verify_resumed_vm(&topo, &done.delivered, round)?;
    let mut violations = checker::check_vm(&done.delivered, &resumed.answers, resumed.last);
    violations.extend(check_disks(&b, &work, &done.delivered, at_kill.delivered)?);
    let mut violations: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
    if !resumed.memory.starts_with("VERIFIED") {
        violations.push(format!(
            "the resumed guest's memory is inconsistent: {}",
            resumed.memory
        ));
    }
    let upload_received = check_upload(&done, at_kill.upload_acked, &mut violations);
    if resumed.continued < 3 {
        violations.push(format!(
            "the client could not continue: {}/3 writes after failover",
            resumed.continued
        ));
    }
    drop(a);
    drop(b);
    drop(topo);
    if violations.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        // Keep the evidence: daemon logs, the replica, the VM records.
        let _ = std::fs::write(work.join("diagnostics.txt"), &moment.diagnostics);
        say(&format!("  evidence kept in {}", work.display()));
    }
    Ok(RoundReport {
        round,
        kill: Some(kill),
        kill_after_replies: moment.delivered_before,
        replies_delivered: done.delivered.len(),
        replies_discarded: done.discarded,
        epochs_committed: moment.before.last_committed,
        pause_p50_ms: moment.before.pause_p50_ms,
        pause_p99_ms: moment.before.pause_p99_ms,
        detection_ms: failover.detection_ms,
        fence_wait_ms: failover.fence_wait_ms,
        restore_ms: failover.restore_ms,
        client_served_ms: served.as_secs_f64() * 1e3,
        continued_records: resumed.continued,
        upload_acked: done.acked_at_check,
        upload_received,
        memory_check: resumed.memory,
        passed: violations.is_empty(),
        violations,
    })
}

/// Memory churn in the guest: after failover it checks that every page it
/// wrote came across whole (a missed dirty page shows up as stale).
fn start_churn(topo: &Topology, api_a: &tandem_api::Client) -> anyhow::Result<()> {
    let churn = topology::spawn_in_ns(&topo.c, || {
        exchange(&format!("CHURN {CHURN_PAGES}"), Duration::from_secs(5))
    })?
    .join()
    .map_err(|_| anyhow!("churn thread panicked"))??
    .map_err(|e| anyhow!("starting the memory churn: {e}\n{}", host_state(api_a)))?;
    if !churn.starts_with("CHURNING") {
        bail!("guest refused the memory churn: {churn}");
    }
    Ok(())
}

/// What the client thread shares with the drill.
#[derive(Default)]
struct ClientShared {
    delivered: Mutex<Vec<Delivered>>,
    discarded: Mutex<usize>,
    killed: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

#[derive(Default)]
struct UploadShared {
    acked: AtomicU64,
    written: AtomicU64,
    ended: Mutex<Option<String>>,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

/// The client workload, running in the client namespace: numbered
/// durable writes, and an upload stream.
struct Workload {
    shared: Arc<ClientShared>,
    client: JoinHandle<anyhow::Result<()>>,
    upload: Arc<UploadShared>,
    uploader: JoinHandle<anyhow::Result<()>>,
}

/// What the workload saw, once stopped after the failover.
struct WorkloadDone {
    delivered: Vec<Delivered>,
    discarded: usize,
    /// Upload bytes acknowledged when the client was served again.
    acked_at_check: u64,
    /// The resumed guest's (bytes received, mismatches) of the upload.
    upload_check: anyhow::Result<(u64, u64)>,
    /// The upload stream could not start.
    upload_error: Option<String>,
}

impl Workload {
    fn start(topo: &Topology, round: u32) -> anyhow::Result<Workload> {
        let shared = Arc::new(ClientShared::default());
        let client = {
            let shared = shared.clone();
            topology::spawn_in_ns(&topo.c, move || client_loop(&shared, round))?
        };
        let upload = Arc::new(UploadShared::default());
        let uploader = {
            let upload = upload.clone();
            topology::spawn_in_ns(&topo.c, move || upload_loop(&upload))?
        };
        Ok(Workload {
            shared,
            client,
            upload,
            uploader,
        })
    }

    /// Stops the client, checks the upload stream against the resumed
    /// guest, stops the uploader, and collects what the client saw.
    fn finish(
        self,
        topo: &Topology,
        upload_acked_at_kill: u64,
        say: &mut impl FnMut(&str),
    ) -> anyhow::Result<WorkloadDone> {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.client.join();
        // Every byte the client saw acknowledged must reach the resumed
        // guest: the stream continues on B from the committed state, so the
        // guest's count must pass what the client was told, with no gap.
        let upload = &self.upload;
        let acked_at_check = upload.acked.load(Ordering::SeqCst);
        say(&format!(
            "  upload: {} bytes written, {} acknowledged at the kill, {} now{}",
            upload.written.load(Ordering::SeqCst),
            upload_acked_at_kill,
            acked_at_check,
            upload
                .ended
                .lock()
                .clone()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
        let upload_check = upload_progress(topo, acked_at_check)?;
        upload.stop.store(true, Ordering::SeqCst);
        let _ = self.uploader.join();
        let upload_error = upload.error.lock().clone();
        let delivered = self.shared.delivered.lock().clone();
        let discarded = *self.shared.discarded.lock();
        Ok(WorkloadDone {
            delivered,
            discarded,
            acked_at_check,
            upload_check,
            upload_error,
        })
    }
}

/// The resumed guest's upload count (`UPSTAT`): bytes received and
/// mismatches, once it has passed `acked` (or shows a gap, or 20 s pass).
/// The outer error is the drill's; the inner one, the check's.
fn upload_progress(topo: &Topology, acked: u64) -> anyhow::Result<anyhow::Result<(u64, u64)>> {
    topology::spawn_in_ns(&topo.c, move || -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = exchange("UPSTAT", Duration::from_secs(2))?;
            let mut it = r.split_whitespace().skip(1).map(|n| n.parse::<u64>());
            let (Some(Ok(got)), Some(Ok(bad))) = (it.next(), it.next()) else {
                bail!("bad UPSTAT reply {r:?}");
            };
            if (got >= acked && bad == 0) || bad > 0 || Instant::now() > deadline {
                return Ok((got, bad));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })?
    .join()
    .map_err(|_| anyhow!("upload check panicked"))?
}

/// The moment chosen to kill host A, and what was seen just before it.
struct KillMoment {
    delivered_before: usize,
    /// Host A's protection status just before the kill.
    before: FtStatus,
    /// Host A's QEMU.
    pid: u32,
    /// Host A's view just before the kill, kept for a failed round.
    diagnostics: String,
}

/// Waits for a random number of client replies and a random delay, then
/// for the upload's next acknowledgement.
fn choose_kill_moment(
    a: &Host,
    api_a: &tandem_api::Client,
    w: &Workload,
    rng: &mut Rng,
) -> anyhow::Result<KillMoment> {
    let kill_after = 5 + rng.below(15) as usize;
    let delivered_before = wait_for("client replies", Duration::from_secs(120), || {
        if let Some(e) = w.shared.error.lock().clone() {
            return Some(Err(e));
        }
        let n = w.shared.delivered.lock().len();
        (n >= kill_after).then_some(Ok(n))
    })
    .map_err(|e| anyhow!("{e}\n{}", host_state(api_a)))?
    .map_err(|e| anyhow!("client: {e}"))?;
    std::thread::sleep(Duration::from_millis(rng.below(300)));
    let before = ft_primary(a).unwrap_or_default();
    let pid = block_on(api_a.get::<VmInfo>("/v1/vms/drill"))?
        .pid
        .ok_or_else(|| anyhow!("no QEMU pid on A"))?;
    let diagnostics = format!("host A before the kill:\n{}", host_state(api_a));
    // The adversarial moment: right after the client has seen new upload
    // bytes acknowledged. With clamping, acknowledgements only move when an
    // epoch commits, so they are safe; an acknowledgement released early
    // is then almost certainly for bytes no commit holds yet.
    let seen = w.upload.acked.load(Ordering::SeqCst);
    // The upload can stall for a while (a busy TCG guest); a kill during a
    // stall would find everything acknowledged long since committed.
    let watch_until = Instant::now() + Duration::from_secs(20);
    while w.upload.acked.load(Ordering::SeqCst) == seen && Instant::now() < watch_until {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(KillMoment {
        delivered_before,
        before,
        pid,
        diagnostics,
    })
}

/// What the client had at the kill.
struct AtKill {
    at: Instant,
    upload_acked: u64,
    delivered: usize,
}

fn kill_host_a(
    kill: KillMode,
    moment: &KillMoment,
    topo: &Topology,
    a: &mut Host,
    w: &Workload,
) -> anyhow::Result<AtKill> {
    let at = Instant::now();
    match kill {
        KillMode::Qemu => {
            // Host A's QEMU, started by this drill; already gone is fine.
            let _ = send_signal(Pid::from_raw(moment.pid as i32), Signal::SIGKILL);
        }
        KillMode::Network => topo.isolate_a()?,
        KillMode::Tandemd => a.kill(),
    }
    w.shared.killed.store(true, Ordering::SeqCst);
    // Replies from here on can only come from B: a request A took in but
    // never answered is answered by the resumed guest after failover.
    Ok(AtKill {
        at,
        upload_acked: w.upload.acked.load(Ordering::SeqCst),
        delivered: w.shared.delivered.lock().len(),
    })
}

fn await_takeover(b: &Host) -> anyhow::Result<FailoverReport> {
    let st = wait_for("takeover on B", Duration::from_secs(60), || {
        let s = ft_backup(b).ok()?;
        (s.state.as_str() == "failed-over").then_some(s)
    })
    .with_context(|| format!("B's log:\n{}", tail(&b.log, 15)))?;
    Ok(st.failover.clone().unwrap_or_default())
}

/// The client reconnects to the guest, now on B: the time from the kill.
fn await_client_served(topo: &Topology, t_kill: Instant) -> anyhow::Result<Duration> {
    wait_for("client served by B", Duration::from_secs(60), || {
        let r =
            topology::spawn_in_ns(&topo.c, || exchange("PING", Duration::from_millis(500))).ok()?;
        match r.join().ok()?.ok()? {
            Ok(l) if l == "PONG" => Some(t_kill.elapsed()),
            _ => None,
        }
    })
}

/// What the resumed guest answered.
struct Resumed {
    /// Its answer to `GET seq` for every delivered reply.
    answers: BTreeMap<u64, String>,
    /// Its last sequence number.
    last: u64,
    /// Writes that succeeded after failover (of 3).
    continued: usize,
    /// Its own check of the churned memory.
    memory: String,
}

/// The resumed VM must know every delivered reply, and the client must be
/// able to continue against the new primary.
fn verify_resumed_vm(
    topo: &Topology,
    delivered: &[Delivered],
    round: u32,
) -> anyhow::Result<Resumed> {
    let delivered = delivered.to_vec();
    topology::spawn_in_ns(&topo.c, move || -> anyhow::Result<_> {
        let memory = exchange("VERIFY", Duration::from_secs(30))?;
        let mut answers = BTreeMap::new();
        for d in &delivered {
            answers.insert(
                d.seq,
                exchange(&format!("GET {}", d.seq), Duration::from_secs(5))?,
            );
        }
        let last: u64 = exchange("LAST", Duration::from_secs(5))?
            .strip_prefix("LAST ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("bad LAST reply"))?;
        let mut continued = 0;
        for n in 0..3 {
            let r = exchange(
                &format!("PUT after-failover-{round}-{n}"),
                Duration::from_secs(5),
            )?;
            if r.starts_with("OK ") {
                continued += 1;
            }
        }
        Ok(Resumed {
            answers,
            last,
            continued,
            memory,
        })
    })?
    .join()
    .map_err(|_| anyhow!("verification thread panicked"))??
}

/// Every acknowledged record must be on the replica disk as committed.
/// Records acknowledged before the kill must be in the replica exactly as
/// committed; those B acknowledged after failover, on the disk the resumed
/// guest runs on: a qcow2 overlay backed by the replica (the takeover runs
/// the VM in place), read as a whole through `qemu-img convert`.
fn check_disks(
    b: &Host,
    work: &Path,
    delivered: &[Delivered],
    delivered_at_kill: usize,
) -> anyhow::Result<Vec<Violation>> {
    let mut violations = Vec::new();
    let (before_kill, after_kill) = delivered.split_at(delivered_at_kill.min(delivered.len()));
    let replica_disk = b.state.join("replicas/drill/disk-data.raw");
    match read_records(&replica_disk, work) {
        Ok(log) => violations.extend(checker::check_disk(before_kill, &log)),
        Err(e) => bail!("reading the replica disk: {e:#}"),
    }
    if !after_kill.is_empty() {
        let overlay = find_file(&b.state.join("vms"), "overlay-data.qcow2").ok_or_else(|| {
            anyhow!(
                "B's running disk (an overlay on the replica) is not under {}",
                b.state.display()
            )
        })?;
        let live = work.join("b-running-disk.raw");
        let converted = Command::new("qemu-img")
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
            .arg(&overlay)
            .arg(&live)
            .output()
            .context("running qemu-img convert")?;
        if !converted.status.success() {
            bail!(
                "reading B's running disk {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&converted.stderr).trim()
            );
        }
        let read = read_records(&live, work);
        let _ = std::fs::remove_file(&live);
        match read {
            Ok(log) => violations.extend(checker::check_disk(after_kill, &log)),
            Err(e) => bail!("reading B's running disk: {e:#}"),
        }
    }
    Ok(violations)
}

/// No byte the client saw acknowledged may be lost: adds the upload's
/// violations and returns the bytes the resumed guest received.
fn check_upload(done: &WorkloadDone, acked_at_kill: u64, violations: &mut Vec<String>) -> u64 {
    let acked = done.acked_at_check;
    match (&done.upload_error, &done.upload_check) {
        (Some(e), _) => {
            violations.push(format!("the upload stream could not start: {e}"));
            0
        }
        (None, Ok((got, bad))) => {
            if acked_at_kill == 0 {
                violations.push(
                    "the upload stream made no progress before the kill, so it proves nothing"
                        .to_string(),
                );
            }
            if *bad > 0 {
                violations.push(format!(
                    "the resumed guest saw a gap or corruption in the upload stream ({bad} mismatch)"
                ));
            } else if *got < acked {
                violations.push(format!(
                    "the client saw {acked} upload bytes acknowledged; the resumed guest has only {got} and the stream does not recover"
                ));
            }
            *got
        }
        (None, Err(e)) => {
            violations.push(format!("checking the upload stream: {e:#}"));
            0
        }
    }
}

/// The client: numbered durable writes. Host A's switch holds each reply
/// until the epoch that produced it is committed (output commit); what
/// arrives here is what a real client would have been told.
fn client_loop(shared: &ClientShared, round: u32) {
    let mut n = 0u64;
    let started = Instant::now();
    while !shared.killed.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
        if started.elapsed() > Duration::from_secs(300) {
            break;
        }
        n += 1;
        let text = format!("r{round}-{n}");
        let reply = match exchange(&format!("PUT {text}"), Duration::from_secs(5)) {
            Ok(r) => r,
            Err(_) => {
                *shared.discarded.lock() += 1;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(seq) = reply
            .strip_prefix("OK ")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        shared.delivered.lock().push(Delivered { seq, text });
    }
}

// TIOCOUTQ: the bytes a socket still holds unacknowledged. nix has no
// wrapper of its own for this ioctl; its macro makes one, over the request
// number from libc (as re-exported by nix).
nix::ioctl_read_bad!(tiocoutq, nix::libc::TIOCOUTQ, std::ffi::c_int);

/// The upload client: streams the guest service's upload pattern to port
/// 7071 and records how many bytes its own TCP stack has seen
/// acknowledged (bytes written minus what is still queued unacknowledged).
/// The guest answers with progress lines on the same connection: `pass`
/// segments under `bulk-tcp`, carrying acknowledgements that output commit
/// must clamp.
fn upload_loop(shared: &UploadShared) {
    use std::os::fd::AsRawFd;
    let addr: SocketAddr = match format!("{GUEST_IP}:7071").parse() {
        Ok(a) => a,
        Err(_) => return,
    };
    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            *shared.error.lock() = Some(e.to_string());
            return;
        }
    };
    let _ = s.set_nonblocking(true);
    let mut written: u64 = 0;
    let mut chunk = vec![0u8; 2048];
    let mut sink = [0u8; 4096];
    let started = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(600) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = tandem_guest_pattern(written + i as u64);
        }
        match (&s).write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                *shared.ended.lock() = Some(format!("write failed after {written} bytes: {e}"));
                break;
            }
        }
        shared.written.store(written, Ordering::SeqCst);
        // Progress lines are only there to carry acknowledgements.
        while let Ok(n) = (&s).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        let mut queued: std::ffi::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int, into `queued`, for the socket
        // `s` owns and keeps open across the call.
        if unsafe { tiocoutq(s.as_raw_fd(), &mut queued) }.is_ok() {
            let acked = written.saturating_sub(queued.max(0) as u64);
            shared.acked.fetch_max(acked, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The guest service's upload pattern (`proto::upload_byte` there).
fn tandem_guest_pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// The first file called `name` under `dir` (bounded depth).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == name) {
                return Some(p);
            }
            if depth < 4 && p.is_dir() {
                stack.push((p, depth + 1));
            }
        }
    }
    None
}

/// The record log on an ext4 disk image, read without mounting: a copy is
/// made, its journal replayed (`e2fsck`), and the file read with `debugfs`.
fn read_records(disk: &Path, work: &Path) -> anyhow::Result<String> {
    let copy = work.join("replica-check.raw");
    std::fs::copy(disk, &copy).with_context(|| format!("copying {}", disk.display()))?;
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .output()
        .context("running e2fsck")?;
    // 0: clean, 1: errors corrected (journal replayed); more is a damaged fs.
    if fsck.status.code().is_none_or(|c| c > 1) {
        bail!(
            "e2fsck found the replica filesystem damaged: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let out = Command::new("debugfs")
        .args(["-R", "cat /records.log"])
        .arg(&copy)
        .output()
        .context("running debugfs")?;
    let _ = std::fs::remove_file(&copy);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
