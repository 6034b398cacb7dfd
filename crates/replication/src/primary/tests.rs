//! The primary's epoch loop against a fake guest and a scripted backup,
//! on a paused tokio clock: every timeout is stepped, none is slept.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_api::FtState;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::epoch::next_schedule;
use super::io::differing_pages;
use super::*;
use crate::assembler::EpochAssembler;
use crate::clock::Clock;
use crate::link::{BoxFuture, BoxStream, Connect};
use crate::tracker::RamView;
use crate::wire::{self, Frame, FrameKind, Hello, PAGE_SIZE};

const PAGES: u64 = 16;
const FENCE: Duration = Duration::from_millis(300);
const HEARTBEAT: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------- the guest

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Stopped,
    Resumed,
    Fenced { paused: bool },
    Unfenced,
    LeaseCleared,
}

#[derive(Default)]
struct FakeState {
    running: bool,
    events: Vec<Event>,
    lease: Option<u64>,
    exit: Option<GuestExit>,
    closed: bool,
    fenced_at: Option<Instant>,
    /// QEMU is dying: QMP fails, but the monitor's close is not noticed yet.
    dying: bool,
}

#[derive(Clone)]
struct FakeGuest {
    ram: PathBuf,
    state: Arc<Mutex<FakeState>>,
    _dir: Arc<tempfile::TempDir>,
}

impl FakeGuest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        let f = std::fs::File::create(&ram).unwrap();
        f.set_len(PAGES * PAGE_SIZE as u64).unwrap();
        FakeGuest {
            ram,
            state: Arc::new(Mutex::new(FakeState {
                running: true,
                ..Default::default()
            })),
            _dir: Arc::new(dir),
        }
    }
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock())
    }
    fn events(&self) -> Vec<Event> {
        self.with(|s| s.events.clone())
    }
    fn fences(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Fenced { .. }))
            .count()
    }
    fn running(&self) -> bool {
        self.with(|s| s.running)
    }
    /// QEMU ends: its monitor closes and its exit is recorded.
    fn exits(&self, how: GuestExit) {
        self.with(|s| {
            s.closed = true;
            s.running = false;
            s.exit = Some(how);
        })
    }
}

struct FakeWindow {
    guest: FakeGuest,
    was_running: bool,
}

impl CheckpointWindow for FakeWindow {
    fn spawn_device_state(&self, _timeout: Duration) -> DeviceStateSave {
        Box::pin(async { Ok(vec![0xd5; 512]) })
    }
    async fn resume(self) -> Result<(), GuestError> {
        if self.was_running {
            self.guest.with(|s| {
                s.running = true;
                s.events.push(Event::Resumed);
            });
        }
        Ok(())
    }
}

impl Guest for FakeGuest {
    type Window<'a> = FakeWindow;

    fn name(&self) -> &str {
        "web"
    }
    fn uuid(&self) -> String {
        "5d0c3f0e-8a43-4d2b-9b7e-2f5b8f0e1a01".into()
    }
    fn ram_file(&self) -> &Path {
        &self.ram
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
        self.with(|s| s.closed)
    }
    fn exit(&self) -> Option<GuestExit> {
        self.with(|s| s.exit)
    }
    async fn stop_for_checkpoint(&self) -> Result<FakeWindow, GuestError> {
        let was_running = self.with(|s| {
            if s.closed {
                return Err(GuestError::Other("QEMU is gone".into()));
            }
            if s.dying {
                return Err(GuestError::Other("QMP I/O error: Broken pipe".into()));
            }
            let r = s.running;
            if r {
                s.running = false;
                s.events.push(Event::Stopped);
            }
            Ok(r)
        })?;
        Ok(FakeWindow {
            guest: self.clone(),
            was_running,
        })
    }
    fn renew_lease(&self, deadline_lease_ms: u64) -> std::io::Result<()> {
        self.with(|s| s.lease = Some(deadline_lease_ms));
        Ok(())
    }
    fn clear_lease(&self) {
        self.with(|s| {
            if s.lease.take().is_some() {
                s.events.push(Event::LeaseCleared);
            }
        })
    }
    async fn fence(&self, _why: &str) -> Result<bool, GuestError> {
        Ok(self.with(|s| {
            let paused = s.running;
            s.running = false;
            s.fenced_at = Some(Instant::now());
            s.events.push(Event::Fenced { paused });
            paused
        }))
    }
    async fn unfence(&self) -> Result<(), GuestError> {
        self.with(|s| {
            s.running = true;
            s.events.push(Event::Unfenced);
        });
        Ok(())
    }
}

// ----------------------------------------------------------------- a disk

/// A disk whose initial copy completes, and whose mirror fails, when the
/// test says so.
struct FakeDisk {
    synced: AtomicBool,
    failed: AtomicBool,
}

impl FakeDisk {
    fn new(synced: bool) -> Arc<FakeDisk> {
        Arc::new(FakeDisk {
            synced: AtomicBool::new(synced),
            failed: AtomicBool::new(false),
        })
    }
}

impl crate::DiskSource for FakeDisk {
    fn name(&self) -> &str {
        "data"
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn take_writes(&self) -> Vec<u8> {
        Vec::new()
    }
    fn resync_all(&self) {}
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
    fn check(&self) -> BoxFuture<'_, Result<(), crate::DiskFailure>> {
        let failed = self.failed.load(Ordering::SeqCst);
        Box::pin(async move {
            if failed {
                return Err(crate::DiskFailure {
                    disk: "data".into(),
                    reason: "the mirror job was cancelled".into(),
                });
            }
            Ok(())
        })
    }
}

// --------------------------------------------------------------- the link

/// Each connect hands the test the backup's end of a fresh pipe.
struct Pipe {
    accepted: mpsc::UnboundedSender<DuplexStream>,
}

impl std::fmt::Display for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pipe")
    }
}

impl Connect for Pipe {
    fn connect(&self) -> BoxFuture<'_, std::io::Result<BoxStream>> {
        let (primary, backup) = tokio::io::duplex(4 << 20);
        let sent = self.accepted.send(backup);
        Box::pin(async move {
            sent.map_err(|_| std::io::Error::other("no backup"))?;
            Ok(Box::pin(primary) as BoxStream)
        })
    }
}

/// The wall clock the shim's lease is written in: a fixed origin plus the
/// paused monotonic clock.
struct TestClock {
    origin: Instant,
}

impl Clock for TestClock {
    fn lease_ms(&self) -> u64 {
        1_000_000 + Instant::now().duration_since(self.origin).as_millis() as u64
    }
}

// ------------------------------------------------------------- the backup

/// The backup's end of one connection, driven step by step by the test.
/// A task reads every frame the primary sends (so its writes never block,
/// whether or not the test answers); the test takes them from a channel.
struct Backup {
    frames: mpsc::UnboundedReceiver<Frame>,
    wr: Arc<tokio::sync::Mutex<tokio::io::WriteHalf<DuplexStream>>>,
    /// Echoes of the primary's heartbeats stop (a silent backup).
    mute: Arc<AtomicBool>,
    /// The primary→backup direction is cut: nothing it sends is read from
    /// here on (the reader drops it), but this side still talks.
    deaf: Arc<AtomicBool>,
    asm: EpochAssembler,
    last_committed: u64,
}

impl Backup {
    async fn accept(rx: &mut mpsc::UnboundedReceiver<DuplexStream>) -> DuplexStream {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the primary connects")
            .expect("link open")
    }

    /// Reads hello, answers with `base` and an empty digest.
    async fn handshake(conn: DuplexStream, base: u64) -> Backup {
        Backup::handshake_slowly(conn, base, Duration::ZERO).await.0
    }

    /// [`Backup::handshake`], with the digest `delay` late (hashing a large
    /// replica takes a backup a while); also returns how many heartbeats
    /// the primary sent meanwhile.
    async fn handshake_slowly(conn: DuplexStream, base: u64, delay: Duration) -> (Backup, usize) {
        let (mut rd, wr) = tokio::io::split(conn);
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let (mute, deaf) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (tx, mut frames) = mpsc::unbounded_channel();
        let (echo_wr, echo_mute, echo_deaf) = (wr.clone(), mute.clone(), deaf.clone());
        tokio::spawn(async move {
            while let Ok(Some(f)) = wire::read_frame(&mut rd).await {
                if echo_deaf.load(Ordering::SeqCst) {
                    continue;
                }
                if f.kind == FrameKind::Heartbeat && !echo_mute.load(Ordering::SeqCst) {
                    // As a real backup does: the echo proves we heard it.
                    let echo = Frame::new(FrameKind::Heartbeat, f.epoch, 0, vec![]);
                    let _ = echo_wr.lock().await.write_all(&echo.encode()).await;
                }
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        let hello = recv(&mut frames).await.expect("hello");
        assert_eq!(hello.kind, FrameKind::Hello);
        let hello: Hello = serde_json::from_slice(&hello.payload).unwrap();
        assert_eq!(hello.vm, "web");
        let answer = Frame::new(FrameKind::Committed, base, 0, vec![]);
        wr.lock().await.write_all(&answer.encode()).await.unwrap();
        let mut heartbeats = 0;
        let end = Instant::now() + delay;
        while let Ok(Some(f)) = tokio::time::timeout_at(end, frames.recv()).await {
            assert_eq!(
                f.kind,
                FrameKind::Heartbeat,
                "nothing but heartbeats before the digest"
            );
            heartbeats += 1;
        }
        for f in wire::ReplicaDigest::frames(base, &[]) {
            wr.lock().await.write_all(&f.encode()).await.unwrap();
        }
        let backup = Backup {
            frames,
            wr,
            mute,
            deaf,
            asm: EpochAssembler::new(base + 1, PAGES * PAGE_SIZE as u64),
            last_committed: base,
        };
        (backup, heartbeats)
    }

    /// Assembles `f`; `Ok(Some((epoch, has device state)))` when it
    /// completes an epoch, `Err(f)` for a last word (bye, guest lost).
    fn push(&mut self, f: Frame) -> Result<Option<(u64, bool)>, Frame> {
        match f.kind {
            FrameKind::Heartbeat => return Ok(None),
            FrameKind::Bye | FrameKind::GuestLost => return Err(f),
            _ => {}
        }
        let done = self.asm.push(f).expect("a well-formed epoch");
        Ok(done.map(|done| {
            self.asm = EpochAssembler::new(done.epoch + 1, PAGES * PAGE_SIZE as u64);
            (done.epoch, !done.device_state.is_empty())
        }))
    }

    /// The next whole epoch; `Err(Some(f))` for a last word, `Err(None)`
    /// when the primary hung up.
    async fn epoch(&mut self) -> Result<(u64, bool), Option<Frame>> {
        loop {
            let f = recv(&mut self.frames).await.ok_or(None)?;
            if let Some(e) = self.push(f).map_err(Some)? {
                return Ok(e);
            }
        }
    }

    /// Reads without answering for `d`; the epochs that arrived meanwhile.
    async fn silent_for(&mut self, d: Duration) -> Vec<(u64, bool)> {
        self.mute.store(true, Ordering::SeqCst);
        let _unmute = Unmute(self.mute.clone());
        let end = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(f)) = tokio::time::timeout_at(end, self.frames.recv()).await {
            if let Ok(Some(e)) = self.push(f) {
                got.push(e);
            }
        }
        got
    }

    async fn commit(&mut self, epoch: u64) {
        let f = Frame::new(FrameKind::Committed, epoch, 0, vec![]);
        self.wr.lock().await.write_all(&f.encode()).await.unwrap();
        self.last_committed = epoch;
    }

    /// Reads (and commits) epochs until one with device state commits.
    async fn commit_until_consistent(&mut self) -> u64 {
        for _ in 0..50 {
            let (epoch, consistent) = self.epoch().await.expect("an epoch");
            self.commit(epoch).await;
            if consistent {
                return epoch;
            }
        }
        panic!("no consistent epoch within 50");
    }
}

struct Unmute(Arc<AtomicBool>);
impl Drop for Unmute {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

async fn recv(frames: &mut mpsc::UnboundedReceiver<Frame>) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(60), frames.recv())
        .await
        .expect("the primary keeps talking")
}

fn config(link: Arc<Pipe>) -> PrimaryConfig {
    let mut cfg = PrimaryConfig::over(link);
    cfg.fence_timeout = FENCE;
    cfg.heartbeat = HEARTBEAT;
    cfg.tracker = TrackerChoice::Scan;
    cfg.clock = Arc::new(TestClock {
        origin: Instant::now(),
    });
    cfg
}

fn start(
    guest: &FakeGuest,
    disks: Vec<Arc<dyn DiskSource>>,
) -> (Primary, mpsc::UnboundedReceiver<DuplexStream>) {
    start_with(guest, disks, |_| {})
}

fn start_with(
    guest: &FakeGuest,
    disks: Vec<Arc<dyn DiskSource>>,
    set: impl FnOnce(&mut PrimaryConfig),
) -> (Primary, mpsc::UnboundedReceiver<DuplexStream>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut cfg = config(Arc::new(Pipe { accepted: tx }));
    set(&mut cfg);
    let p = Primary::spawn(guest.clone(), cfg, disks);
    (p, rx)
}

/// Waits (in stepped time) until `cond` holds; panics after `limit`.
async fn until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test(start_paused = true)]
async fn fencing_is_armed_only_by_the_first_consistent_epoch() {
    let guest = FakeGuest::new();
    let disk = FakeDisk::new(false);
    let (primary, mut accepted) = start(&guest, vec![disk.clone()]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    // The disk's initial copy is under way: epochs carry no device state,
    // so nothing the backup holds could run. It says nothing for ten
    // fencing timeouts: the guest must run on.
    let got = backup.silent_for(FENCE * 10).await;
    assert!(!got.is_empty(), "epochs were sent");
    assert!(got.iter().all(|&(_, consistent)| !consistent));
    assert_eq!(
        guest.fences(),
        0,
        "fenced with nothing resumable: {:?}",
        guest.events()
    );
    assert!(guest.running());
    assert_eq!(guest.with(|s| s.lease), None, "no lease while disarmed");

    // The disk is synced: the next epoch carries device state and arms the
    // fence before it is sent. The backup commits up to it, then falls
    // silent.
    disk.synced.store(true, Ordering::SeqCst);
    for &(e, _) in &got {
        backup.commit(e).await;
    }
    let mut last_word = Instant::now();
    loop {
        let (e, consistent) = backup.epoch().await.expect("epochs keep coming");
        if consistent {
            break;
        }
        backup.commit(e).await;
        last_word = Instant::now();
    }
    // Armed: the watchdog's next look sets the shim's lease.
    until(Duration::from_millis(50), || {
        guest.with(|s| s.lease).is_some()
    })
    .await;
    backup.silent_for(FENCE * 3).await;
    assert_eq!(guest.fences(), 1, "{:?}", guest.events());
    assert!(!guest.running());
    assert_eq!(primary.status().state, FtState::Fenced);
    let after = guest.with(|s| s.fenced_at).unwrap() - last_word;
    assert!(
        after >= FENCE && after <= FENCE + Duration::from_millis(60),
        "fenced after {after:?} of silence (timeout {FENCE:?})"
    );
    primary.stop().await;
}

#[tokio::test(start_paused = true)]
async fn silence_fences_and_an_answer_before_takeover_lifts_the_fence() {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start(&guest, vec![]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    until(FENCE, || primary.status().state == FtState::Protected).await;
    // Keep committing for a while: acks are contact, nothing fences.
    for _ in 0..20 {
        let (e, _) = backup.epoch().await.expect("an epoch");
        backup.commit(e).await;
    }
    assert_eq!(guest.fences(), 0);

    // The backup stops answering (it still reads, so sends never block).
    let silent_from = Instant::now();
    backup.silent_for(FENCE * 2).await;
    assert_eq!(guest.fences(), 1, "{:?}", guest.events());
    let after = guest.with(|s| s.fenced_at).unwrap() - silent_from;
    assert!(after >= FENCE, "fenced after only {after:?} of silence");
    // A clean pause, after which the shim's lease is not needed.
    let events = guest.events();
    let fenced = events
        .iter()
        .position(|e| matches!(e, Event::Fenced { .. }));
    assert_eq!(
        fenced.map(|i| &events[i]),
        Some(&Event::Fenced { paused: true })
    );
    assert_eq!(events[fenced.unwrap() + 1..], [Event::LeaseCleared]);
    assert!(!guest.running());
    assert_eq!(primary.status().state, FtState::Fenced);

    // The backup answers on a new connection before taking over: it still
    // holds its replica (base = its last commit). The guest resumes, and
    // protection comes back.
    let base = backup.last_committed;
    drop(backup);
    let conn = Backup::accept(&mut accepted).await;
    let mut backup = Backup::handshake(conn, base).await;
    backup.commit_until_consistent().await;
    until(FENCE, || primary.status().state == FtState::Protected).await;
    assert!(guest.running());
    let unfenced = guest
        .events()
        .iter()
        .filter(|e| **e == Event::Unfenced)
        .count();
    assert_eq!(unfenced, 1);
    // The old silence is forgotten: answered epochs do not fence again.
    for _ in 0..20 {
        let (e, _) = backup.epoch().await.expect("an epoch");
        backup.commit(e).await;
    }
    assert_eq!(guest.fences(), 1);
    primary.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backup_that_is_never_reached_never_fences() {
    let guest = FakeGuest::new();
    let (tx, rx) = mpsc::unbounded_channel();
    drop(rx); // every connect fails
    let primary = Primary::spawn(
        guest.clone(),
        config(Arc::new(Pipe { accepted: tx })),
        vec![],
    );
    tokio::time::sleep(FENCE * 20).await;
    assert_eq!(guest.fences(), 0);
    assert!(guest.running());
    let st = primary.status();
    assert_eq!(st.state, FtState::Degraded);
    assert!(
        st.detail.contains("cannot reach the backup"),
        "{}",
        st.detail
    );
    primary.stop().await;
}

async fn guest_ends(how: GuestExit) -> Frame {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start(&guest, vec![]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    guest.exits(how);
    let told = loop {
        match backup.epoch().await {
            Ok((e, _)) => backup.commit(e).await,
            Err(Some(f)) => break f,
            Err(None) => panic!("the primary hung up without saying why"),
        }
    };
    until(FENCE, || primary.is_finished()).await;
    assert_eq!(primary.status().state, FtState::Stopped);
    assert_eq!(guest.fences(), 0);
    told
}

#[tokio::test(start_paused = true)]
async fn a_crash_is_reported_as_a_crash() {
    let told = guest_ends(GuestExit::Crashed).await;
    assert_eq!(told.kind, FrameKind::GuestLost, "{told:?}");
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_tells_the_backup_not_to_take_over() {
    let told = guest_ends(GuestExit::ShutDown).await;
    assert_eq!(told.kind, FrameKind::Bye, "{told:?}");
}

#[tokio::test(start_paused = true)]
async fn unprotect_says_bye_and_clears_the_lease() {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start(&guest, vec![]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    until(FENCE, || guest.with(|s| s.lease.is_some())).await;
    let reader = tokio::spawn(async move {
        loop {
            match backup.epoch().await {
                Ok((e, _)) => backup.commit(e).await,
                Err(f) => {
                    if f.as_ref().is_some_and(|f| f.kind == FrameKind::Bye) {
                        let ack = Frame::new(FrameKind::ByeAck, 0, 0, vec![]);
                        backup
                            .wr
                            .lock()
                            .await
                            .write_all(&ack.encode())
                            .await
                            .unwrap();
                    }
                    return f;
                }
            }
        }
    });
    primary.stop().await;
    let told = reader.await.unwrap().expect("a last word");
    assert_eq!(told.kind, FrameKind::Bye);
    assert_eq!(guest.with(|s| s.lease), None);
    assert!(guest.running());
    assert_eq!(guest.fences(), 0);
}

/// Unprotect while the backup is armed but does not confirm `Bye` (it
/// reads, but nothing comes back): it may take over, so the guest must
/// not run on. It ends fenced, as for any silence, and says why.
#[tokio::test(start_paused = true)]
async fn an_unconfirmed_unprotect_leaves_the_guest_fenced() {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start(&guest, vec![]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    until(FENCE, || primary.status().state == FtState::Protected).await;
    backup.deaf.store(true, Ordering::SeqCst);
    backup.mute.store(true, Ordering::SeqCst);
    let status = primary.status.clone();
    primary.stop().await;
    assert_eq!(guest.fences(), 1, "{:?}", guest.events());
    assert!(!guest.running());
    let s = status.lock().clone();
    assert_eq!(s.state, FtState::Stopped);
    assert!(s.detail.contains("did not confirm"), "{}", s.detail);
    drop(backup);
}

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

#[tokio::test(start_paused = true)]
async fn a_disk_that_lost_writes_stops_consistent_epochs_and_says_so() {
    let guest = FakeGuest::new();
    let disk = FakeDisk::new(true);
    let (primary, mut accepted) = start(&guest, vec![disk.clone()]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    until(FENCE, || primary.status().state == FtState::Protected).await;

    // The mirror fails: from the next stop on, no epoch carries device
    // state, and the status says why.
    disk.failed.store(true, Ordering::SeqCst);
    let stateless = loop {
        let (e, consistent) = backup.epoch().await.expect("an epoch");
        backup.commit(e).await;
        if !consistent {
            break e;
        }
    };
    for _ in 0..5 {
        let (e, consistent) = backup.epoch().await.expect("an epoch");
        assert!(
            !consistent,
            "epoch {e} carried device state past a failed disk"
        );
        backup.commit(e).await;
    }
    let st = primary.status();
    assert_eq!(st.state, FtState::Degraded, "{st:?}");
    assert!(
        st.detail.contains("mirror job was cancelled"),
        "{}",
        st.detail
    );
    assert!(st.last_committed >= stateless);
    // The backup has committed a stateless epoch: it can resume nothing,
    // so its silence must not pause the guest.
    let unanswered = backup.silent_for(FENCE * 4).await;
    assert_eq!(guest.fences(), 0, "{:?}", guest.events());

    // The disk is whole again: device state returns, and so does
    // protection (and with it, fencing).
    disk.failed.store(false, Ordering::SeqCst);
    if let Some(&(e, _)) = unanswered.last() {
        backup.commit(e).await;
    }
    loop {
        let (e, consistent) = backup.epoch().await.expect("an epoch");
        backup.commit(e).await;
        if consistent {
            break;
        }
    }
    until(FENCE, || primary.status().state == FtState::Protected).await;
    until(Duration::from_millis(50), || {
        guest.with(|s| s.lease).is_some()
    })
    .await;
    primary.stop().await;
}

/// Heartbeats the primary sends while the backup takes ten heartbeat
/// intervals to send its digest (the loop is waiting, not idle).
async fn heartbeats_during_a_slow_digest(only_when_idle: bool) -> usize {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start_with(&guest, vec![], |cfg| {
        cfg.faults.heartbeats_only_when_idle = only_when_idle;
    });
    let conn = Backup::accept(&mut accepted).await;
    let (_backup, heartbeats) = Backup::handshake_slowly(conn, 0, HEARTBEAT * 10).await;
    primary.stop().await;
    heartbeats
}

#[tokio::test(start_paused = true)]
async fn heartbeats_flow_while_the_loop_waits_for_the_backup() {
    let n = heartbeats_during_a_slow_digest(false).await;
    assert!(n >= 8, "{n} heartbeats in ten intervals");
}

/// The seeded bug: heartbeats only from the idle branch. The test above
/// must see the silence.
#[tokio::test(start_paused = true)]
async fn with_heartbeats_only_when_idle_the_backup_hears_nothing() {
    assert_eq!(heartbeats_during_a_slow_digest(true).await, 0);
}

#[tokio::test(start_paused = true)]
async fn an_ack_for_an_epoch_never_sent_is_not_believed() {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start(&guest, vec![]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    let committed = primary.committed();
    let (first, _) = backup.epoch().await.expect("the running copy");
    backup.commit(first + 1000).await;
    until(FENCE, || primary.status().state == FtState::Degraded).await;
    let st = primary.status();
    assert!(st.detail.contains("only"), "{}", st.detail);
    assert!(*committed.borrow() < first + 1000, "a lie released output");
    primary.stop().await;
}

/// QEMU dies in the middle of a checkpoint: QMP fails before the monitor's
/// close is noticed. That is a crash to report on this connection, not a
/// link failure to resync from (a resync's running copy would leave the
/// backup nothing to resume).
#[tokio::test(start_paused = true)]
async fn qemu_dying_mid_checkpoint_is_reported_as_a_crash_not_a_lost_link() {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start(&guest, vec![]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    guest.with(|s| s.dying = true);
    let g = guest.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        g.exits(GuestExit::Crashed);
    });
    let told = loop {
        match backup.epoch().await {
            Ok((e, _)) => backup.commit(e).await,
            Err(Some(f)) => break f,
            Err(None) => panic!("the primary hung up (to resync) instead of reporting the crash"),
        }
    };
    assert_eq!(told.kind, FrameKind::GuestLost, "{told:?}");
    until(FENCE, || primary.is_finished()).await;
    assert!(accepted.try_recv().is_err(), "the primary reconnected");
}

/// The primary→backup direction is cut while backup→primary works: the
/// backup still sends heartbeats (echoing the last stamp it read) and the
/// primary still reads them. The backup hears nothing and will take over,
/// so the primary must fence within its timeout.
async fn fences_in_an_asymmetric_partition(one_way_liveness: bool) -> bool {
    let guest = FakeGuest::new();
    let (primary, mut accepted) = start_with(&guest, vec![], |cfg| {
        cfg.faults.one_way_liveness = one_way_liveness;
    });
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    until(FENCE, || primary.status().state == FtState::Protected).await;
    backup.deaf.store(true, Ordering::SeqCst);
    let cut_at = Instant::now();
    // What a real backup keeps sending: heartbeats with a stale echo.
    let stale = Frame::new(FrameKind::Heartbeat, 0, 0, vec![]).encode();
    while Instant::now() < cut_at + FENCE * 4 && guest.fences() == 0 {
        backup.wr.lock().await.write_all(&stale).await.unwrap();
        tokio::time::sleep(HEARTBEAT).await;
    }
    let fenced = guest.fences() == 1;
    if fenced {
        let after = guest.with(|s| s.fenced_at).unwrap() - cut_at;
        assert!(
            after <= FENCE + HEARTBEAT * 3,
            "fenced only after {after:?}"
        );
    }
    primary.stop().await;
    fenced
}

#[tokio::test(start_paused = true)]
async fn an_asymmetric_partition_fences_the_primary() {
    assert!(fences_in_an_asymmetric_partition(false).await);
}

/// The seeded bug: any frame from the backup counts as contact. The test
/// above must see the primary run on while the backup hears nothing.
#[tokio::test(start_paused = true)]
async fn with_one_way_liveness_an_asymmetric_partition_does_not_fence() {
    assert!(!fences_in_an_asymmetric_partition(true).await);
}

/// What the primary told output commit, in order.
#[derive(Default)]
struct SeenByOutput(Mutex<Vec<&'static str>>);

impl crate::EpochObserver for SeenByOutput {
    fn epoch_opened(&self, _epoch: u64) {}
    fn session_started(&self, _base: u64, _first: u64) {
        self.0.lock().push("session");
    }
    fn committed(&self, _epoch: u64) {}
    fn abandoned(&self) {
        self.0.lock().push("abandoned");
    }
    fn ended(&self) {
        self.0.lock().push("ended");
    }
    fn unprotected(&self) {
        self.0.lock().push("unprotected");
    }
}

/// A backup that stays reachable (it reads and echoes) but stops
/// committing once protection is established, for two seconds. Returns
/// what output commit was told, the status, and whether the backup was
/// asked to disarm (`Bye` on a new connection, confirmed).
async fn a_backup_that_stops_committing(
    degrade_after: Option<Duration>,
) -> (Vec<&'static str>, tandem_api::FtStatus, bool) {
    let guest = FakeGuest::new();
    let seen = Arc::new(SeenByOutput::default());
    let observer = seen.clone();
    let (primary, mut accepted) = start_with(&guest, vec![], move |cfg| {
        cfg.observer = Some(observer);
        cfg.degrade_after = degrade_after;
    });
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    let base = backup.commit_until_consistent().await;
    until(FENCE, || primary.status().state == FtState::Protected).await;
    // Stuck: epochs are read, none is committed; heartbeats are echoed.
    let stuck = tokio::spawn(async move { while backup.epoch().await.is_ok() {} });
    let end = Instant::now() + Duration::from_secs(2);
    let mut told_bye = false;
    while let Ok(Some(conn)) = tokio::time::timeout_at(end, accepted.recv()).await {
        let mut again = Backup::handshake(conn, base).await;
        if let Err(Some(f)) = again.epoch().await {
            if f.kind == FrameKind::Bye {
                let ack = Frame::new(FrameKind::ByeAck, 0, 0, vec![]);
                again
                    .wr
                    .lock()
                    .await
                    .write_all(&ack.encode())
                    .await
                    .unwrap();
                told_bye = true;
                break;
            }
        }
    }
    // The status once the primary has acted on the answer (or not).
    if told_bye {
        until(FENCE, || seen.0.lock().contains(&"unprotected")).await;
    }
    let status = primary.status();
    assert!(guest.running(), "{:?}", guest.events());
    assert_eq!(guest.fences(), 0, "{:?}", guest.events());
    stuck.abort();
    drop(primary);
    let calls = seen.0.lock().clone();
    (calls, status, told_bye)
}

/// Audit M12: a backup that answers but cannot commit (full disk) would
/// hold the VM's output for ever. After the degrade timeout the primary
/// has the backup disarm, releases the output and says it is unprotected.
#[tokio::test(start_paused = true)]
async fn a_backup_that_stops_committing_ends_protection_after_the_degrade_timeout() {
    let (calls, status, told_bye) =
        a_backup_that_stops_committing(Some(Duration::from_millis(500))).await;
    assert!(told_bye, "the backup is told to disarm first");
    assert!(calls.contains(&"unprotected"), "{calls:?}");
    assert!(!calls.contains(&"abandoned"), "{calls:?}");
    assert_eq!(status.state, FtState::Degraded);
    assert!(status.detail.contains("unprotected"), "{}", status.detail);
}

/// The twin: without the policy, the output stays held as long as the
/// backup answers.
#[tokio::test(start_paused = true)]
async fn without_a_degrade_timeout_a_stuck_backup_holds_output_for_ever() {
    let (calls, _status, told_bye) = a_backup_that_stops_committing(None).await;
    assert!(!told_bye);
    assert!(!calls.contains(&"unprotected"), "{calls:?}");
}

/// A live migration holds checkpoints (QEMU runs one migration at a
/// time): the hold is granted only once every epoch sent is committed,
/// then no checkpoint is taken while heartbeats keep the backup from
/// suspecting the primary; released, epochs go on from the next number.
#[tokio::test(start_paused = true)]
async fn held_epochs_stop_checkpoints_but_not_heartbeats() {
    let guest = FakeGuest::new();
    let disk = FakeDisk::new(true);
    let (primary, mut accepted) = start(&guest, vec![disk]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;

    let held_at = {
        let hold = primary.hold_epochs(Duration::from_secs(5));
        tokio::pin!(hold);
        loop {
            tokio::select! {
                h = &mut hold => break h.expect("the hold is granted"),
                e = backup.epoch() => {
                    let (e, _) = e.expect("epochs until the hold");
                    backup.commit(e).await;
                }
            }
        }
    };
    assert_eq!(
        held_at, backup.last_committed,
        "held before its epochs committed"
    );
    assert!(primary.is_holding());
    let stops = |g: &FakeGuest| g.events().iter().filter(|e| **e == Event::Stopped).count();
    let stopped_before = stops(&guest);
    let end = Instant::now() + FENCE * 10;
    let mut heartbeats = 0;
    while let Ok(Some(f)) = tokio::time::timeout_at(end, backup.frames.recv()).await {
        assert_eq!(
            f.kind,
            FrameKind::Heartbeat,
            "a checkpoint under the hold: {f:?}"
        );
        heartbeats += 1;
    }
    assert!(heartbeats >= 10, "only {heartbeats} heartbeats while held");
    assert_eq!(
        stops(&guest),
        stopped_before,
        "the guest was stopped while held"
    );
    assert_eq!(guest.fences(), 0, "{:?}", guest.events());
    assert!(
        primary.status().detail.contains("held"),
        "{:?}",
        primary.status()
    );

    primary.release_epochs();
    let (next, _) = backup.epoch().await.expect("epochs go on");
    assert_eq!(next, held_at + 1);
    primary.stop().await;
}

/// A hold that the backup cannot grant (it commits nothing) gives up at
/// its bound and lifts itself: checkpoints go on.
#[tokio::test(start_paused = true)]
async fn a_hold_the_backup_cannot_grant_times_out_and_lifts() {
    let guest = FakeGuest::new();
    let disk = FakeDisk::new(true);
    let (primary, mut accepted) = start(&guest, vec![disk]);
    let mut backup = Backup::handshake(Backup::accept(&mut accepted).await, 0).await;
    backup.commit_until_consistent().await;
    // One epoch in flight that is never committed.
    let (_uncommitted, _) = backup.epoch().await.expect("an epoch");
    let e = primary
        .hold_epochs(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, HoldError::Timeout(..)), "{e}");
    assert!(!primary.is_holding());
    primary.stop().await;
}
