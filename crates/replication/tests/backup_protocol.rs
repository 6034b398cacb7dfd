//! The backup's side of the protocol over a real socket, driven by a
//! scripted primary: valid epochs commit; corrupt, truncated, duplicated
//! and out-of-order ones are answered with RESYNC and never applied; the
//! primary reconnects and protection resumes from the last commit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_replication::assembler::EpochBuilder;
use tandem_replication::backup::{
    read_identity, Activate, ActivateError, Backup, BackupConfig, TakeoverError,
};
use tandem_replication::link::{self, Endpoint, Listener};
use tandem_replication::replica::{
    FailPoint, ReplicaStore, StoreFaults, DEVICE_STATE_FILE, RAM_FILE,
};
use tandem_replication::wire::{self, Frame, FrameKind, Hello, HelloDisk, PAGE_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RAM: u64 = 64 * PAGE_SIZE as u64;
const VM1_UUID: &str = "0b6f3a52-4c1e-4f53-a2d4-6f0e8c1d9a11";

/// Who a test connection claims to be.
struct Primary {
    uuid: &'static str,
    generation: u64,
    instance: u64,
}

/// The primary of vm1 in most tests.
const PRIMARY: Primary = Primary {
    uuid: VM1_UUID,
    generation: 0,
    instance: 1,
};

/// Takeover is disabled in these tests; reaching it is a failure.
struct NeverActivate;
impl Activate for NeverActivate {
    fn activate(
        &self,
        vm: String,
        _dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
    {
        Box::pin(async move { panic!("takeover of {vm} was not expected") })
    }
}

/// A takeover that succeeds without starting anything.
struct NoopActivate;
impl Activate for NoopActivate {
    fn activate(
        &self,
        _vm: String,
        _dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
    {
        Box::pin(async { Ok(()) })
    }
}

struct Rig {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ep: Endpoint,
    backup: Arc<Backup>,
}

async fn rig() -> Rig {
    rig_with(Arc::new(NeverActivate)).await
}

async fn rig_with(activate: Arc<dyn Activate>) -> Rig {
    rig_configured(activate, |cfg| cfg.auto_failover = false).await
}

/// A second backup on `root` (a restarted tandemd on the same replicas).
async fn rig_on(root: &std::path::Path, activate: Arc<dyn Activate>) -> Rig {
    rig_at(Some(root.to_path_buf()), activate, |cfg| {
        cfg.auto_failover = false
    })
    .await
}

async fn rig_configured(activate: Arc<dyn Activate>, set: impl FnOnce(&mut BackupConfig)) -> Rig {
    rig_at(None, activate, set).await
}

/// A backup serving on a socket of its own, its replicas in `root` (a
/// fresh directory when `None`).
async fn rig_at(
    root: Option<PathBuf>,
    activate: Arc<dyn Activate>,
    set: impl FnOnce(&mut BackupConfig),
) -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let root = root.unwrap_or_else(|| tmp.path().join("replicas"));
    let mut cfg = BackupConfig::new(root.clone());
    set(&mut cfg);
    let backup = Backup::new(cfg, activate);
    // As tandemd does at start, before it listens.
    backup.recover_replicas().await;
    let ep = Endpoint::Unix(tmp.path().join("repl.sock"));
    let listener = Listener::bind(&ep).await.unwrap();
    let b = backup.clone();
    tokio::spawn(async move {
        while let Ok((conn, peer)) = listener.accept().await {
            tokio::spawn(b.clone().serve(conn, peer));
        }
    });
    Rig {
        _tmp: tmp,
        root,
        ep,
        backup,
    }
}

struct Conn {
    s: link::BoxStream,
}

impl Conn {
    async fn open(ep: &Endpoint) -> (Conn, u64) {
        let (c, base, _) = Conn::open_with_digest(ep).await;
        (c, base)
    }

    /// Connects, and returns also the backup's digest of its replica RAM.
    async fn open_with_digest(ep: &Endpoint) -> (Conn, u64, Vec<u64>) {
        Conn::open_as(ep, &PRIMARY).await.expect("hello accepted")
    }

    /// Connects as the primary `who`; `Err` with the backup's reason when
    /// the hello is refused.
    async fn open_as(ep: &Endpoint, who: &Primary) -> Result<(Conn, u64, Vec<u64>), String> {
        Conn::open_hello(ep, &hello_of(who)).await
    }

    /// Connects with `hello`; `Err` with the backup's reason when it is
    /// refused.
    async fn open_hello(ep: &Endpoint, hello: &Hello) -> Result<(Conn, u64, Vec<u64>), String> {
        let mut s = link::connect(ep).await.unwrap();
        let f = Frame::new(FrameKind::Hello, 0, 0, serde_json::to_vec(hello).unwrap());
        s.write_all(&f.encode()).await.unwrap();
        let mut c = Conn { s };
        let answer = tokio::time::timeout(Duration::from_secs(5), c.next_any())
            .await
            .expect("the backup answers hello")
            .ok_or("the backup hung up without a word")?;
        match answer.kind {
            FrameKind::Committed => {}
            FrameKind::Resync => return Err(answer.reason()),
            _ => panic!("unexpected answer to hello: {answer:?}"),
        }
        let base = answer.epoch;
        let mut digest = wire::DigestCollector::default();
        loop {
            let f = c.next(FrameKind::ReplicaDigest).await.expect("digest");
            assert_eq!(f.epoch, base);
            if digest
                .push(wire::ReplicaDigest::decode(&f.payload).unwrap())
                .unwrap()
            {
                break;
            }
        }
        Ok((c, base, digest.into_hashes()))
    }

    /// The next frame that is not a heartbeat; None on EOF or an error.
    async fn next_any(&mut self) -> Option<Frame> {
        loop {
            let f = wire::read_frame(&mut self.s).await.ok()??;
            if f.kind != FrameKind::Heartbeat {
                return Some(f);
            }
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        // The backup may already have hung up; that is what some tests want.
        let _ = self.s.write_all(bytes).await;
        let _ = self.s.flush().await;
    }

    async fn send(&mut self, frames: &[Frame]) {
        let mut all = Vec::new();
        for f in frames {
            all.extend(f.encode());
        }
        self.send_raw(&all).await;
    }

    /// The next frame of `kind`, skipping heartbeats; None on EOF/timeout.
    async fn next(&mut self, kind: FrameKind) -> Option<Frame> {
        loop {
            let f = tokio::time::timeout(Duration::from_secs(5), wire::read_frame(&mut self.s))
                .await
                .ok()?
                .ok()??;
            if f.kind == FrameKind::Heartbeat {
                continue;
            }
            assert_eq!(f.kind, kind, "unexpected {f:?}");
            return Some(f);
        }
    }
}

/// The hello of vm1 (64 pages of RAM, a 1 MiB disk `data`) from `who`.
fn hello_of(who: &Primary) -> Hello {
    Hello {
        vm: "vm1".into(),
        uuid: who.uuid.into(),
        generation: who.generation,
        instance: who.instance,
        ram_size: RAM,
        page_size: PAGE_SIZE as u64,
        spec_toml: "name = \"vm1\"".into(),
        disks: vec![HelloDisk {
            name: "data".into(),
            size: 1 << 20,
        }],
    }
}

fn epoch(n: u64, fill: u8) -> Vec<Frame> {
    let pages = [1u64, 7, 63];
    let data = vec![fill; pages.len() * PAGE_SIZE];
    let mut log = Vec::new();
    tandem_replication::disklog::push(&mut log, 4096, &[fill; 512]);
    EpochBuilder::build(
        RAM,
        n,
        &pages,
        &data,
        format!("state-{n}").as_bytes(),
        &[log],
    )
}

fn ram_page(root: &std::path::Path, page: usize) -> u8 {
    std::fs::read(root.join("vm1").join(RAM_FILE)).unwrap()[page * PAGE_SIZE]
}

fn committed(root: &std::path::Path) -> Option<u64> {
    ReplicaStore::open(
        &root.join("vm1"),
        RAM,
        &[HelloDisk {
            name: "data".into(),
            size: 1 << 20,
        }],
    )
    .unwrap()
    .committed_epoch()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_primary_is_suspected_first_and_taken_over_after_the_fence_wait() {
    let suspect = Duration::from_millis(300);
    let takeover = Duration::from_millis(900);
    let r = rig_configured(Arc::new(NoopActivate), |cfg| {
        cfg.heartbeat = Duration::from_millis(100);
        cfg.suspect_after = suspect;
        cfg.takeover_timeout = takeover;
    })
    .await;
    let (mut c, _) = Conn::open(&r.ep).await;
    c.send(&epoch(1, 0x11)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 1);
    // From here the primary says nothing (its connection stays open).
    let mut saw_suspicion = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = r.backup.status().remove(0);
        if st.state == "standby" && st.detail.contains("suspected") {
            saw_suspicion = true;
        }
        if st.state == "failed-over" || std::time::Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(st.state, "failed-over", "{st:?}");
    assert!(saw_suspicion, "no suspicion was shown before the takeover");
    let f = st.failover.expect("a failover report");
    // Detected once the silence reached the suspicion timeout, taken over
    // only after the rest of the takeover timeout.
    assert!(
        f.detection_ms >= suspect.as_millis() as f64
            && f.detection_ms < takeover.as_millis() as f64,
        "{f:?}"
    );
    assert!(
        f.detection_ms + f.fence_wait_ms >= takeover.as_millis() as f64 - 1.0,
        "taken over before the takeover timeout: {f:?}"
    );
    assert_eq!(f.epoch, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_primary_gets_a_digest_of_the_committed_replica() {
    let r = rig().await;
    let (mut c, base, digest) = Conn::open_with_digest(&r.ep).await;
    assert_eq!(base, 0);
    // A fresh replica reads as zeroes.
    let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_SIZE]);
    assert_eq!(digest.len() as u64, RAM / PAGE_SIZE as u64);
    assert!(digest.iter().all(|&h| h == zero));
    c.send(&epoch(1, 0x11)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 1);
    // An epoch that never commits must not show in the next digest.
    c.send(&epoch(2, 0x22)[..2]).await;
    drop(c);

    let (_c, base, digest) = Conn::open_with_digest(&r.ep).await;
    assert_eq!(base, 1);
    let filled = xxhash_rust::xxh3::xxh3_64(&[0x11u8; PAGE_SIZE]);
    for (page, h) in digest.iter().enumerate() {
        let want = if [1, 7, 63].contains(&page) {
            filled
        } else {
            zero
        };
        assert_eq!(*h, want, "page {page}");
    }
}

/// An epoch without device state: a new session's running copy, or RAM
/// while a disk is still being copied.
fn ram_only_epoch(n: u64, fill: u8) -> Vec<Frame> {
    let pages = [1u64, 7, 63];
    let data = vec![fill; pages.len() * PAGE_SIZE];
    EpochBuilder::build(RAM, n, &pages, &data, &[], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ram_only_epoch_leaves_nothing_to_resume_until_device_state_follows() {
    let r = rig_with(Arc::new(NoopActivate)).await;
    let (mut c, _) = Conn::open(&r.ep).await;
    c.send(&epoch(1, 0x11)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 1);
    assert_eq!(r.backup.status()[0].state, "standby");
    drop(c);

    // The primary reconnects (a lifted fence, a restarted backup) and
    // starts over with a running copy of RAM, taken while the guest runs.
    let (mut c, base) = Conn::open(&r.ep).await;
    assert_eq!(base, 1);
    c.send(&ram_only_epoch(2, 0x22)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 2);
    // That RAM belongs to no device state the replica holds: resuming it
    // with epoch 1's would run a guest that never existed.
    let st = r.backup.status().remove(0);
    assert_ne!(st.state, "standby", "{st:?}");
    let refused = r.backup.failover("vm1", Duration::ZERO, "test").await;
    assert!(
        refused.is_err(),
        "took over from RAM-only epoch 2: {refused:?}"
    );

    // The next epoch with device state makes it resumable again.
    c.send(&epoch(3, 0x33)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 3);
    assert_eq!(r.backup.status()[0].state, "standby");
    let report = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    assert_eq!(report.epoch, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_takeover_the_old_connection_never_writes_the_replica() {
    let r = rig_with(Arc::new(NoopActivate)).await;
    let (mut c, _) = Conn::open(&r.ep).await;
    c.send(&epoch(1, 0x11)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 1);

    // Taken over while the primary's connection is still open (a primary
    // that was slow, not dead).
    let report = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    assert_eq!(report.epoch, 1);

    // Whatever that connection still delivers never reaches the replica,
    // which is the running VM's now, and never re-arms the backup.
    c.send(&epoch(2, 0x22)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ram_page(&r.root, 7),
        0x11,
        "a superseded connection wrote RAM"
    );
    assert_eq!(committed(&r.root), Some(1));
    let st = r.backup.status();
    assert_eq!(st[0].state, "failed-over", "{st:?}");

    // And a new connection from the old primary is refused.
    let mut s = link::connect(&r.ep).await.unwrap();
    let hello = Hello {
        vm: "vm1".into(),
        uuid: VM1_UUID.into(),
        generation: 0,
        instance: 1,
        ram_size: RAM,
        page_size: PAGE_SIZE as u64,
        spec_toml: String::new(),
        disks: vec![],
    };
    let f = Frame::new(FrameKind::Hello, 0, 0, serde_json::to_vec(&hello).unwrap());
    s.write_all(&f.encode()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), wire::read_frame(&mut s))
        .await
        .expect("the backup hangs up");
    // Refused: told why (a RESYNC naming the reason) or hung up on.
    let refused = match &answer {
        Ok(Some(f)) => {
            f.kind == FrameKind::Resync
                && (f.reason().contains("already runs") || f.reason().contains("stale primary"))
        }
        Ok(None) | Err(_) => true,
    };
    assert!(refused, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_epochs_are_never_applied_and_protection_resumes() {
    let r = rig().await;
    let (mut c, base) = Conn::open(&r.ep).await;
    assert_eq!(base, 0);
    c.send(&epoch(1, 0x11)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 1);

    // A flipped payload byte in the middle of epoch 2: the frame checksum
    // fails, the backup resyncs from 1 and hangs up.
    let mut bytes: Vec<u8> = epoch(2, 0x22).iter().flat_map(|f| f.encode()).collect();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    c.send_raw(&bytes).await;
    let rs = c
        .next(FrameKind::Resync)
        .await
        .expect("resync after corruption");
    assert_eq!(rs.epoch, 1);
    assert!(
        c.next(FrameKind::Committed).await.is_none(),
        "connection should close"
    );
    assert_eq!(
        ram_page(&r.root, 7),
        0x11,
        "a corrupt epoch touched the replica"
    );

    // Reconnect: the handshake names epoch 1. A truncated epoch 2 (no end)
    // followed by a hang-up leaves nothing applied either.
    let (mut c, base) = Conn::open(&r.ep).await;
    assert_eq!(base, 1);
    let e2 = epoch(2, 0x22);
    c.send(&e2[..e2.len() - 1]).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Duplicated epoch 1 is refused.
    let (mut c, base) = Conn::open(&r.ep).await;
    assert_eq!(base, 1);
    c.send(&epoch(1, 0x33)).await;
    assert_eq!(c.next(FrameKind::Resync).await.unwrap().epoch, 1);
    assert_eq!(ram_page(&r.root, 7), 0x11);

    // A frame of epoch 2 delivered out of order is refused.
    let (mut c, _) = Conn::open(&r.ep).await;
    let mut e2 = epoch(2, 0x22);
    e2.swap(1, 2);
    c.send(&e2).await;
    assert!(c.next(FrameKind::Resync).await.is_some());

    // And a valid epoch 2 on a fresh connection commits.
    let (mut c, base) = Conn::open(&r.ep).await;
    assert_eq!(base, 1);
    c.send(&epoch(2, 0x22)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 2);
    assert_eq!(ram_page(&r.root, 7), 0x22);
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(committed(&r.root), Some(2));
    let disk = std::fs::read(r.root.join("vm1/disk-data.raw")).unwrap();
    assert_eq!(disk[4096], 0x22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_hello_is_refused_without_touching_disk() {
    let r = rig().await;
    let mut s = link::connect(&r.ep).await.unwrap();
    // Path traversal in the VM name must not create anything outside root.
    let hello = serde_json::json!({"vm": "../../etc", "ram_size": RAM, "page_size": 4096});
    let f = Frame::new(FrameKind::Hello, 0, 0, serde_json::to_vec(&hello).unwrap());
    s.write_all(&f.encode()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), wire::read_frame(&mut s))
        .await
        .unwrap();
    assert!(
        matches!(got, Ok(None) | Err(_)),
        "expected a hang-up, got {got:?}"
    );
    assert!(!r.root.exists() || std::fs::read_dir(&r.root).unwrap().count() == 0);

    // Garbage instead of a frame: hang-up, nothing created.
    let mut s = link::connect(&r.ep).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n garbage garbage garbage")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), wire::read_frame(&mut s))
        .await
        .unwrap();
    assert!(matches!(got, Ok(None) | Err(_)));
    assert!(!r.root.exists() || std::fs::read_dir(&r.root).unwrap().count() == 0);
}

// ------------------------------------------------- one VM identity per replica

/// What the replica's files hold, to compare before and after.
fn replica_fingerprint(root: &std::path::Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let dir = root.join("vm1");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let meta = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
                meta.modified().unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// vm1's primary commits epochs 1 and 2 and hangs up; then a primary of
/// another VM that is also called vm1 says hello. Returns its answer and
/// whether the first VM's replica was touched.
async fn same_name_other_vm(ignore_identity: bool) -> (Result<u64, String>, bool) {
    let r = rig_configured(Arc::new(NeverActivate), |cfg| {
        cfg.auto_failover = false;
        cfg.faults.ignore_identity = ignore_identity;
    })
    .await;
    let (mut a, base) = Conn::open(&r.ep).await;
    assert_eq!(base, 0);
    for n in 1..=2 {
        a.send(&epoch(n, 0x40 + n as u8)).await;
        assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, n);
    }
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = replica_fingerprint(&r.root);

    let other = Primary {
        uuid: "9a1f7c2e-0000-4000-8000-00000000bad1",
        generation: 0,
        instance: 7,
    };
    let answer = match Conn::open_as(&r.ep, &other).await {
        Ok((mut b, base, _)) => {
            // Accepted: it replicates its own VM into the replica.
            b.send(&epoch(base + 1, 0xee)).await;
            let _ = b.next(FrameKind::Committed).await;
            Ok(base)
        }
        Err(why) => Err(why),
    };
    let after = replica_fingerprint(&r.root);
    (answer, before != after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_vm_with_the_same_name_never_touches_the_replica() {
    let (answer, touched) = same_name_other_vm(false).await;
    let why = answer.expect_err("refused");
    assert!(why.contains("belongs to VM"), "{why}");
    assert!(!touched, "the refused hello changed the replica's files");
}

/// The same test with the identity check switched off (the version-1
/// behaviour): it must see the damage, or it could not catch the bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_identity_check_the_same_name_test_sees_the_damage() {
    let (answer, touched) = same_name_other_vm(true).await;
    assert_eq!(answer, Ok(2), "accepted at vm1's last commit");
    assert!(touched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_vm_continues_and_its_replica_is_its_own() {
    let r = rig().await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x51)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    let other = Primary {
        uuid: "9a1f7c2e-0000-4000-8000-00000000bad1",
        generation: 0,
        instance: 7,
    };
    let why = Conn::open_as(&r.ep, &other).await.err().expect("refused");
    assert!(why.contains("belongs to VM"), "{why}");
    // vm1's own connection was never disturbed.
    a.send(&epoch(2, 0x52)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 2);
    assert_eq!(ram_page(&r.root, 7), 0x52);
    let id = read_identity(&r.root.join("vm1")).unwrap().unwrap();
    assert_eq!(id.uuid, VM1_UUID);
}

/// Returns the answer of a second primary instance of vm1 that connects
/// while the first is alive.
async fn second_primary(allow: bool) -> Result<u64, String> {
    let r = rig_configured(Arc::new(NeverActivate), |cfg| {
        cfg.auto_failover = false;
        cfg.faults.allow_second_primary = allow;
    })
    .await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x61)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    let second = Primary {
        instance: 2,
        ..PRIMARY
    };
    let answer = Conn::open_as(&r.ep, &second).await.map(|(_, base, _)| base);
    drop(a);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_primary_is_refused_while_the_first_is_alive() {
    let why = second_primary(false).await.expect_err("refused");
    assert!(why.contains("another primary"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_check_a_second_primary_supersedes_the_first() {
    assert_eq!(second_primary(true).await, Ok(1));
}

/// A live migration hands a protected VM to a new primary of the next
/// generation while the old one (paused) still heartbeats: the newer
/// generation supersedes it, continues the replica from its last commit
/// (digest, no full copy), and the old primary can never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_generation_supersedes_a_live_primary_and_the_old_one_stays_out() {
    let r = rig_configured(Arc::new(NeverActivate), |cfg| cfg.auto_failover = false).await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x71)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    let migrated = Primary {
        instance: 99,
        generation: PRIMARY.generation + 1,
        ..PRIMARY
    };
    let (mut b, base, digest) = Conn::open_as(&r.ep, &migrated)
        .await
        .expect("the next generation is admitted while the old primary is alive");
    assert_eq!(base, 1, "the replica goes on from the old primary's commit");
    assert_eq!(
        digest.len() as u64,
        RAM / PAGE_SIZE as u64,
        "a digest to resync by"
    );
    b.send(&epoch(2, 0x72)).await;
    assert_eq!(b.next(FrameKind::Committed).await.unwrap().epoch, 2);
    assert_eq!(ram_page(&r.root, 7), 0x72);
    // The old connection is stale: what it still sends is never applied.
    a.send(&epoch(2, 0x7f)).await;
    assert!(a.next(FrameKind::Committed).await.is_none());
    assert_eq!(ram_page(&r.root, 7), 0x72);
    // Nor may the old primary reconnect, live or not.
    let again = Primary {
        instance: 100,
        ..PRIMARY
    };
    let why = Conn::open_as(&r.ep, &again).await.err().expect("refused");
    assert!(
        why.contains("another primary") || why.contains("stale"),
        "{why}"
    );
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let why = Conn::open_as(&r.ep, &again).await.err().expect("refused");
    assert!(why.contains("stale"), "{why}");
    let id = read_identity(&r.root.join("vm1")).unwrap().unwrap();
    assert_eq!(id.generation, PRIMARY.generation + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_bumps_the_generation_and_the_old_primary_stays_refused() {
    let r = rig_with(Arc::new(NoopActivate)).await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x71)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    drop(a);
    r.backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    let id = read_identity(&r.root.join("vm1")).unwrap().unwrap();
    assert_eq!(id.generation, PRIMARY.generation + 1);

    // A backup restarted on the same directory forgets the takeover in
    // memory, but not the generation on disk.
    let restarted = rig_on(&r.root, Arc::new(NeverActivate)).await;
    let why = Conn::open_as(&restarted.ep, &PRIMARY)
        .await
        .err()
        .expect("the old primary is refused");
    assert!(why.contains("stale primary"), "{why}");
    // The new primary (this host's takeover, one generation on) is not.
    let new_primary = Primary {
        generation: 1,
        instance: 9,
        ..PRIMARY
    };
    assert!(Conn::open_as(&restarted.ep, &new_primary).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_of_the_previous_protocol_is_told_both_versions() {
    let r = rig().await;
    let mut s = link::connect(&r.ep).await.unwrap();
    let hello = Frame::new(FrameKind::Hello, 0, 0, br#"{"vm":"vm1"}"#.to_vec());
    s.write_all(&hello.encode_as(1)).await.unwrap();
    // The answer is a version-1 frame, which this side's reader refuses:
    // read it by hand.
    let mut header = [0u8; wire::HEADER_LEN];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut header))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(u16::from_le_bytes([header[4], header[5]]), 1);
    assert_eq!(
        u16::from_le_bytes([header[6], header[7]]),
        FrameKind::Resync as u16
    );
    let len = u32::from_le_bytes(header[20..24].try_into().unwrap()) as usize;
    let mut why = vec![0u8; len];
    s.read_exact(&mut why).await.unwrap();
    let why = String::from_utf8(why).unwrap();
    assert!(
        why.contains(&format!("version {}", wire::VERSION)) && why.contains("version 1"),
        "{why}"
    );
    assert!(!r.root.join("vm1").exists(), "nothing was created for it");
}

// ------------------------------------------------- the replica store's driving

/// What a takeover resumed: the bytes of RAM pages 1, 7 and 63 and the
/// device state, as the replica directory held them when the VM started.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resumed {
    pages: [u8; 3],
    state: Vec<u8>,
}

/// A takeover that starts nothing but records what it would resume.
#[derive(Default, Clone)]
struct Recorder(Arc<std::sync::Mutex<Vec<Resumed>>>);

impl Recorder {
    fn resumed(&self) -> Vec<Resumed> {
        self.0.lock().unwrap().clone()
    }
}

impl Activate for Recorder {
    fn activate(
        &self,
        _vm: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
    {
        let me = self.clone();
        Box::pin(async move {
            let ram = std::fs::read(dir.join(RAM_FILE))?;
            let state = std::fs::read(dir.join(DEVICE_STATE_FILE))?;
            let pages = [1, 7, 63].map(|p: usize| ram[p * PAGE_SIZE]);
            me.0.lock().unwrap().push(Resumed { pages, state });
            Ok(())
        })
    }
}

/// Short timeouts for the tests that wait for (or out) a takeover.
fn quick(cfg: &mut BackupConfig) {
    cfg.auto_failover = true;
    cfg.heartbeat = Duration::from_millis(50);
    cfg.suspect_after = Duration::from_millis(200);
    cfg.takeover_timeout = Duration::from_millis(500);
}

fn data_disk() -> Vec<HelloDisk> {
    vec![HelloDisk {
        name: "data".into(),
        size: 1 << 20,
    }]
}

/// The replica of vm1 in `root`, reopened (which finishes a journal):
/// committed epoch, pages 1, 7, 63, device state.
fn reopened(root: &std::path::Path) -> (Option<u64>, [u8; 3], Option<Vec<u8>>) {
    let s = ReplicaStore::open(&root.join("vm1"), RAM, &data_disk()).unwrap();
    let pages = [1, 7, 63].map(|p| ram_page(root, p));
    (s.committed_epoch(), pages, s.read_device_state().unwrap())
}

/// Connection A's apply of epoch 2 stalls just before its commit point
/// (journal durable, marker not yet), then crashes after writing one RAM
/// page in place; meanwhile its primary reconnects as B. Returns B's base
/// and the replica as reopened afterwards.
async fn reconnect_during_an_apply(
    open_outside_lock: bool,
) -> (u64, (Option<u64>, [u8; 3], Option<Vec<u8>>)) {
    let r = rig_configured(Arc::new(NeverActivate), |cfg| {
        cfg.auto_failover = false;
        cfg.faults.open_outside_store_lock = open_outside_lock;
        cfg.faults.store = StoreFaults {
            fail: FailPoint::MidApply,
            epoch: 2,
            stall_before_commit_point: Some(Duration::from_millis(800)),
            ..StoreFaults::default()
        };
    })
    .await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x11)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    a.send(&epoch(2, 0x22)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (b, base) = Conn::open(&r.ep).await;
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    (base, reopened(&r.root))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_waits_for_the_apply_under_way_and_finishes_its_journal() {
    let (base, (committed, pages, state)) = reconnect_during_an_apply(false).await;
    // B opened only once A's apply had ended, and finished epoch 2 from
    // its journal (committed before A's crash).
    assert_eq!(base, 2);
    assert_eq!(committed, Some(2));
    assert_eq!(pages, [0x22; 3]);
    assert_eq!(state.as_deref(), Some(&b"state-2"[..]));
}

/// The same without the store lock around the new connection's open (the
/// behaviour before audit H4): its recovery discards A's journal, A then
/// reaches its commit point and crashes half-applied, and the replica says
/// epoch 1 over RAM that is partly epoch 2's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_store_lock_a_reconnect_leaves_a_torn_replica() {
    let (base, (committed, pages, state)) = reconnect_during_an_apply(true).await;
    assert_eq!(base, 1);
    assert_eq!(committed, Some(1));
    assert_eq!(
        pages,
        [0x22, 0x11, 0x11],
        "epoch 2's RAM under epoch 1's commit"
    );
    assert_eq!(state.as_deref(), Some(&b"state-1"[..]));
}

/// Epoch 1 commits; epoch 2's device state needs room the disk does not
/// have. Then the primary goes silent. Returns the RESYNC reason, what
/// was resumed automatically, and the backup's status after the wait.
async fn full_disk_at_the_device_state(
    layout_1: bool,
) -> (String, Recorder, Rig, tandem_api::FtStatus) {
    let rec = Recorder::default();
    let r = rig_configured(Arc::new(rec.clone()), |cfg| {
        quick(cfg);
        cfg.faults.keep_armed_on_apply_error = layout_1;
        cfg.faults.store = StoreFaults {
            fail: FailPoint::NoSpaceForDeviceState,
            epoch: 2,
            allocate_after_commit_point: layout_1,
            ..StoreFaults::default()
        };
    })
    .await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x11)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    a.send(&epoch(2, 0x22)).await;
    let why = a.next(FrameKind::Resync).await.unwrap().reason();
    drop(a);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = r.backup.status().remove(0);
    (why, rec, r, st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_the_device_state_rejects_the_epoch_and_disarms() {
    let (why, rec, r, st) = full_disk_at_the_device_state(false).await;
    assert!(why.contains("No space left"), "{why}");
    // Rejected before its commit point: epoch 1 stands, whole, and is
    // still resumable by hand; but no automatic takeover followed.
    assert!(rec.resumed().is_empty(), "taken over from a failed apply");
    assert_eq!(st.state, "standby", "{st:?}");
    assert!(st.detail.contains("cannot commit epoch 2"), "{st:?}");
    let report = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    assert_eq!(report.epoch, 1);
    assert_eq!(
        rec.resumed(),
        [Resumed {
            pages: [0x11; 3],
            state: b"state-1".to_vec()
        }]
    );
}

/// The same with layout 1's order (device state allocated after the
/// commit point), a replica left armed after the failure and a takeover
/// that does not recover first: the VM is resumed from epoch 2's RAM under
/// epoch 1's device state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocating_after_the_commit_point_resumes_a_torn_replica() {
    let (why, rec, _r, st) = full_disk_at_the_device_state(true).await;
    assert!(why.contains("No space left"), "{why}");
    assert_eq!(st.state, "failed-over", "{st:?}");
    assert_eq!(
        rec.resumed(),
        [Resumed {
            pages: [0x22; 3],
            state: b"state-1".to_vec()
        }]
    );
}

/// Epoch 2's apply fails after its commit point, one RAM page in place
/// (an I/O error, say). Then the primary goes silent.
async fn apply_fails_after_the_commit_point(
    keep_armed: bool,
) -> (Recorder, Rig, tandem_api::FtStatus) {
    let rec = Recorder::default();
    let r = rig_configured(Arc::new(rec.clone()), |cfg| {
        quick(cfg);
        cfg.faults.keep_armed_on_apply_error = keep_armed;
        cfg.faults.store = StoreFaults {
            fail: FailPoint::MidApply,
            epoch: 2,
            ..StoreFaults::default()
        };
    })
    .await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x11)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    a.send(&epoch(2, 0x22)).await;
    assert!(a.next(FrameKind::Resync).await.is_some());
    drop(a);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = r.backup.status().remove(0);
    (rec, r, st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_disarms_and_a_takeover_finishes_the_epoch_first() {
    let (rec, r, st) = apply_fails_after_the_commit_point(false).await;
    assert!(rec.resumed().is_empty(), "taken over from a torn replica");
    assert_eq!(st.state, "syncing", "{st:?}");
    assert!(st.detail.contains("journal"), "{st:?}");
    // By hand: epoch 2 is finished from its journal, then resumed whole.
    let report = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    assert_eq!(report.epoch, 2);
    assert_eq!(
        rec.resumed(),
        [Resumed {
            pages: [0x22; 3],
            state: b"state-2".to_vec()
        }]
    );
}

/// The same with the replica left armed and no recovery before the
/// takeover (before audit H5): the watchdog resumes the torn files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_disarm_and_recovery_a_failed_apply_is_resumed_torn() {
    let (rec, _r, st) = apply_fails_after_the_commit_point(true).await;
    assert_eq!(st.state, "failed-over", "{st:?}");
    assert_eq!(
        rec.resumed(),
        [Resumed {
            pages: [0x22, 0x11, 0x11],
            state: b"state-1".to_vec()
        }]
    );
}

/// vm1 commits epoch 1, and epoch 2 up to its commit point (the backup
/// "crashes" there); then the backup restarts on the same directory, and
/// its primary never comes back. Returns the restarted backup.
async fn restart_after_a_crash(skip_scan: bool, rec: Recorder) -> Rig {
    let r = rig_configured(Arc::new(NeverActivate), |cfg| {
        cfg.auto_failover = false;
        cfg.faults.store = StoreFaults {
            fail: FailPoint::AfterCommitPoint,
            epoch: 2,
            ..StoreFaults::default()
        };
    })
    .await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x11)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    a.send(&epoch(2, 0x22)).await;
    assert!(a.next(FrameKind::Resync).await.is_some());
    drop(a);
    let root = r.root.clone();
    // The test's temp dir lives as long as the first rig: keep it.
    std::mem::forget(r);
    rig_at(Some(root), Arc::new(rec), |cfg| {
        quick(cfg);
        cfg.faults.skip_replica_scan = skip_scan;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_backup_knows_its_replicas_and_fails_over_by_hand() {
    let rec = Recorder::default();
    let r = restart_after_a_crash(false, rec.clone()).await;
    let st = r.backup.status();
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(st[0].state, "standby", "{st:?}");
    assert_eq!(st[0].last_committed, 2, "the journal was finished at start");
    assert!(st[0].detail.contains("manual failover only"), "{st:?}");
    // Not armed: a primary this process never heard is not taken over
    // automatically, however long it stays silent.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(rec.resumed().is_empty());
    let report = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    assert_eq!(report.epoch, 2);
    assert_eq!(
        rec.resumed(),
        [Resumed {
            pages: [0x22; 3],
            state: b"state-2".to_vec()
        }]
    );
}

/// Without the scan at start (before audit M2) the restarted backup knows
/// nothing of the replica until its primary reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_scan_a_restarted_backup_cannot_fail_over() {
    let rec = Recorder::default();
    let r = restart_after_a_crash(true, rec.clone()).await;
    assert!(r.backup.status().is_empty());
    let err = r.backup.failover("vm1", Duration::ZERO, "test").await;
    assert!(matches!(err, Err(TakeoverError::NoReplica(_))), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_found_at_start_is_armed_once_its_primary_is_heard() {
    let r = rig().await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x11)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rec = Recorder::default();
    let restarted = rig_at(Some(r.root.clone()), Arc::new(rec.clone()), quick).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        rec.resumed().is_empty(),
        "armed before the primary was heard"
    );
    // The primary reconnects, says one heartbeat, and falls silent.
    let (mut b, base) = Conn::open(&restarted.ep).await;
    assert_eq!(base, 1);
    b.send(&[Frame::new(FrameKind::Heartbeat, 1, 0, vec![])])
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rec.resumed().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rec.resumed(),
        [Resumed {
            pages: [0x11; 3],
            state: b"state-1".to_vec()
        }]
    );
}

/// vm1 commits epoch 1 (standby); then its primary says hello with twice
/// the RAM (the VM was re-defined). Returns the answer and what the
/// backup holds then.
async fn redefined_vm(resize: bool) -> (u64, tandem_api::FtStatus, u64, bool) {
    let r = rig_configured(Arc::new(NoopActivate), |cfg| {
        cfg.auto_failover = false;
        cfg.faults.resize_on_hello = resize;
    })
    .await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x11)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut hello = hello_of(&PRIMARY);
    hello.ram_size = 2 * RAM;
    let (_b, base, _) = Conn::open_hello(&r.ep, &hello).await.unwrap();
    let st = r.backup.status().remove(0);
    let ram = std::fs::metadata(r.root.join("vm1").join(RAM_FILE))
        .unwrap()
        .len();
    let resumable = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .is_ok();
    (base, st, ram, resumable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redefined_vm_gets_a_fresh_replica_not_a_resized_armed_one() {
    let (base, st, ram, resumable) = redefined_vm(false).await;
    assert_eq!(base, 0, "started afresh");
    assert_eq!(st.state, "syncing", "{st:?}");
    assert!(st.detail.contains("re-defined"), "{st:?}");
    assert_eq!(ram, 2 * RAM);
    assert!(!resumable, "a fresh replica is not resumable");
}

/// The same with the replica resized in place (before audit M3): it stays
/// in standby at epoch 1, and a takeover would resume epoch 1's device
/// state over RAM of another size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resizing_on_hello_keeps_an_armed_replica_that_no_longer_fits() {
    let (base, st, ram, resumable) = redefined_vm(true).await;
    assert_eq!(base, 1);
    assert_eq!(st.state, "standby", "{st:?}");
    assert_eq!(ram, 2 * RAM);
    assert!(resumable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_hello_is_not_written_again() {
    use std::os::unix::fs::MetadataExt;
    let r = rig().await;
    let (a, _) = Conn::open(&r.ep).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let inode = |f: &str| std::fs::metadata(r.root.join("vm1").join(f)).unwrap().ino();
    let before = (inode("hello.json"), inode("identity.json"));
    let (_a, _) = Conn::open(&r.ep).await;
    assert_eq!((inode("hello.json"), inode("identity.json")), before);
    // A changed one is.
    let mut hello = hello_of(&PRIMARY);
    hello.spec_toml = "name = \"vm1\"\nvcpus = 2".into();
    drop(_a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _b = Conn::open_hello(&r.ep, &hello).await.unwrap();
    assert_ne!(inode("hello.json"), before.0);
}

/// A hello whose disk name climbs out of the replica directory (a
/// `disk-..` directory there makes the path resolve). Returns the answer
/// and whether a file appeared in the replica root, outside any replica.
async fn disk_name_escape(any_name: bool) -> (Result<u64, String>, bool) {
    let r = rig_configured(Arc::new(NeverActivate), |cfg| {
        cfg.auto_failover = false;
        cfg.faults.store.any_disk_name = any_name;
    })
    .await;
    std::fs::create_dir_all(r.root.join("vm1").join("disk-..")).unwrap();
    let mut hello = hello_of(&PRIMARY);
    hello.disks = vec![HelloDisk {
        name: "../../../escape".into(),
        size: 4096,
    }];
    let answer = Conn::open_hello(&r.ep, &hello)
        .await
        .map(|(_, base, _)| base);
    (answer, r.root.join("escape.raw").exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_name_that_is_not_a_file_name_is_refused() {
    let (answer, escaped) = disk_name_escape(false).await;
    let why = answer.expect_err("refused");
    assert!(why.contains("not a valid disk name"), "{why}");
    assert!(!escaped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_check_a_disk_name_escapes_the_replica() {
    let (answer, escaped) = disk_name_escape(true).await;
    assert_eq!(answer, Ok(0));
    assert!(escaped, "no file outside the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_larger_than_the_free_space_is_refused_before_anything_is_created() {
    let r = rig().await;
    let mut hello = hello_of(&PRIMARY);
    hello.ram_size = 1 << 50;
    let why = Conn::open_hello(&r.ep, &hello)
        .await
        .err()
        .expect("refused");
    assert!(
        why.contains("No space left on device") && why.contains("needs"),
        "{why}"
    );
    assert!(!r.root.join("vm1").join(RAM_FILE).exists());
    // Sizes that overflow any sum are refused too, not wrapped.
    hello.ram_size = RAM;
    hello.disks = vec![
        HelloDisk {
            name: "a".into(),
            size: i64::MAX as u64,
        },
        HelloDisk {
            name: "b".into(),
            size: i64::MAX as u64,
        },
        HelloDisk {
            name: "c".into(),
            size: i64::MAX as u64,
        },
    ];
    let why = Conn::open_hello(&r.ep, &hello)
        .await
        .err()
        .expect("refused");
    assert!(why.contains("2^64"), "{why}");
}

// ------------------------------------------------- takeover failures (audit H9)

/// A takeover whose first `fail` attempts fail (a QEMU that would not
/// start), then succeed; each attempt records what the replica held when
/// it began. A success marks the directory the VM's own, as the
/// supervisor's in-place restore does just before the guest runs.
#[derive(Clone)]
struct Flaky {
    fail: usize,
    #[allow(clippy::type_complexity)]
    seen: Arc<std::sync::Mutex<Vec<Vec<(String, Vec<u8>, ())>>>>,
}

impl Flaky {
    fn new(fail: usize) -> Flaky {
        Flaky {
            fail,
            seen: Default::default(),
        }
    }
    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Activate for Flaky {
    fn activate(
        &self,
        vm: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
    {
        let me = self.clone();
        Box::pin(async move {
            let root = dir.parent().unwrap().to_path_buf();
            let n = {
                let mut seen = me.seen.lock().unwrap();
                seen.push(takeover_fingerprint(&root));
                seen.len()
            };
            if n <= me.fail {
                return Err(format!("QEMU for `{vm}` failed to start (attempt {n})").into());
            }
            own(&dir, &vm);
            Ok(())
        })
    }
}

/// What the replica's files hold, as each takeover finds them. Times are
/// left out: every takeover opens the store again, which re-reserves the
/// files' space (`fallocate` stamps them) and exports the committed
/// device state anew (`device-state`, same bytes, a new file).
fn takeover_fingerprint(root: &std::path::Path) -> Vec<(String, Vec<u8>, ())> {
    replica_fingerprint(root)
        .into_iter()
        .map(|(name, bytes, _)| (name, bytes, ()))
        .collect()
}

/// The names of the files that differ between two fingerprints.
fn diff_names<B: PartialEq, T: PartialEq + std::fmt::Debug>(
    a: &[(String, B, T)],
    b: &[(String, B, T)],
) -> Vec<String> {
    let mut names: Vec<String> = a.iter().chain(b).map(|f| f.0.clone()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| {
            let x = a.iter().find(|f| &f.0 == n);
            let y = b.iter().find(|f| &f.0 == n);
            match (x, y) {
                (Some(x), Some(y)) => x.1 != y.1 || x.2 != y.2,
                _ => true,
            }
        })
        .collect()
}

/// Marks `dir` as VM `vm`'s own, as the supervisor does.
fn own(dir: &std::path::Path, vm: &str) {
    let owner = tandem_supervisor::DirOwner {
        vm: vm.into(),
        uuid: VM1_UUID.into(),
        since: 1,
    };
    tandem_supervisor::util::atomic_write_json(&dir.join(tandem_supervisor::OWNER_FILE), &owner)
        .unwrap();
}

/// vm1 commits epoch 1, then its primary falls silent; the watchdog takes
/// over with `activate`. Returns the rig (and keeps the connection open).
async fn silent_after_epoch_1(activate: Arc<dyn Activate>, disarm_on_failure: bool) -> (Rig, Conn) {
    let r = rig_configured(activate, |cfg| {
        quick(cfg);
        cfg.faults.disarm_on_failed_takeover = disarm_on_failure;
    })
    .await;
    let (mut c, _) = Conn::open(&r.ep).await;
    c.send(&epoch(1, 0x31)).await;
    assert_eq!(c.next(FrameKind::Committed).await.unwrap().epoch, 1);
    (r, c)
}

async fn wait_status(
    r: &Rig,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&tandem_api::FtStatus) -> bool,
) -> tandem_api::FtStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let st = r.backup.status().remove(0);
        if pred(&st) {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not within {timeout:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Audit H9: a takeover that fails leaves the replica armed and as it was,
/// says so, and is retried after a backoff until it succeeds. Every
/// attempt finds the replica exactly as the first did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_takeover_is_retried_with_the_replica_armed_and_intact() {
    let flaky = Flaky::new(2);
    let (r, _c) = silent_after_epoch_1(Arc::new(flaky.clone()), false).await;
    let st = wait_status(&r, "the first failure", Duration::from_secs(5), |s| {
        s.detail.contains("attempt 1 failed")
    })
    .await;
    assert_eq!(st.state, "standby", "{st:?}");
    assert!(
        st.detail.contains("(attempt 1)")
            && st.detail.contains("intact and armed: retrying in 1 s"),
        "{st:?}"
    );
    let st = wait_status(&r, "the second failure", Duration::from_secs(5), |s| {
        s.detail.contains("attempt 2 failed")
    })
    .await;
    assert!(st.detail.contains("retrying in 2 s"), "{st:?}");
    let st = wait_status(&r, "the takeover", Duration::from_secs(5), |s| {
        s.state == "failed-over"
    })
    .await;
    assert_eq!(st.failover.as_ref().unwrap().epoch, 1, "{st:?}");
    assert_eq!(flaky.attempts(), 3);
    let seen = flaky.seen.lock().unwrap().clone();
    for f in &seen[1..] {
        assert!(
            f == &seen[0],
            "the replica changed between attempts: {:?}",
            diff_names(&seen[0], f)
        );
    }
    assert_eq!(ram_page(&r.root, 7), 0x31);
}

/// The twin (before audit H9): the failed takeover disarms the replica,
/// and the VM stays down however long the primary is silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_rearm_a_failed_takeover_is_never_retried() {
    let flaky = Flaky::new(1);
    let (r, _c) = silent_after_epoch_1(Arc::new(flaky.clone()), true).await;
    wait_status(&r, "the first failure", Duration::from_secs(5), |s| {
        s.detail.contains("attempt 1 failed")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(flaky.attempts(), 1, "retried");
    assert_eq!(r.backup.status()[0].state, "standby");
}

/// A manual failover that fails is reported to the operator, leaves an
/// unarmed replica unarmed (no automatic retry) and intact, and can be
/// run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_manual_failover_can_be_run_again() {
    let flaky = Flaky::new(1);
    let r = rig_with(Arc::new(flaky.clone())).await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x41)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed to start"), "{err}");
    let st = r.backup.status().remove(0);
    assert_eq!(st.state, "standby", "{st:?}");
    assert!(st.detail.contains("retry with `tandem failover`"), "{st:?}");
    let report = r
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    assert_eq!(report.epoch, 1);
    let seen = flaky.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0] == seen[1],
        "the replica changed between attempts: {:?}",
        diff_names(&seen[0], &seen[1])
    );
}

/// Once a VM runs from the replica directory it is that VM's RAM and disk
/// base: no primary may write it again, whatever its generation, no
/// takeover may start from it, and a restarted backup lists it as taken
/// over without opening it as a replica. When the VM is deleted (its
/// directory with it), the name is free for a new replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_a_vm_runs_from_is_never_written_or_offered_again() {
    let r = rig_with(Arc::new(Flaky::new(0))).await;
    let (mut a, _) = Conn::open(&r.ep).await;
    a.send(&epoch(1, 0x51)).await;
    assert_eq!(a.next(FrameKind::Committed).await.unwrap().epoch, 1);
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.backup
        .failover("vm1", Duration::ZERO, "test")
        .await
        .unwrap();
    let before = replica_fingerprint(&r.root);
    // The VM that took over here, protected from elsewhere since (a newer
    // generation), is refused: this directory is not a replica.
    let newer = Primary {
        generation: 5,
        instance: 9,
        ..PRIMARY
    };
    let check = |why: String| {
        assert!(why.contains("live RAM and disk base of VM `vm1`"), "{why}");
        assert!(why.contains("tandem vm destroy vm1"), "{why}");
    };
    let why = Conn::open_as(&r.ep, &newer).await.err().expect("refused");
    check(why);
    let again = r.backup.failover("vm1", Duration::ZERO, "test").await;
    assert!(
        matches!(again, Err(TakeoverError::AlreadyRunning { .. })),
        "{again:?}"
    );
    // A restarted backup: listed as taken over, not opened, still refused.
    let restarted = rig_on(&r.root, Arc::new(NeverActivate)).await;
    let st = restarted.backup.status().remove(0);
    assert_eq!(st.state, "failed-over", "{st:?}");
    assert!(st.detail.contains("runs from this directory"), "{st:?}");
    let why = Conn::open_as(&restarted.ep, &newer)
        .await
        .err()
        .expect("refused");
    check(why);
    let again = restarted
        .backup
        .failover("vm1", Duration::ZERO, "test")
        .await;
    assert!(
        matches!(again, Err(TakeoverError::AlreadyRunning { .. })),
        "{again:?}"
    );
    assert!(
        replica_fingerprint(&r.root) == before,
        "the VM's files changed"
    );

    // The VM is deleted here, its base with it: the backup takes a new
    // replica again.
    std::fs::remove_dir_all(r.root.join("vm1")).unwrap();
    let (mut b, base, _) = Conn::open_as(&r.ep, &newer).await.expect("accepted");
    assert_eq!(base, 0);
    b.send(&epoch(1, 0x52)).await;
    assert_eq!(b.next(FrameKind::Committed).await.unwrap().epoch, 1);
    drop(b);
}

/// A takeover that failed after its guest ran (the directory has an owner
/// by then) leaves nothing to retry: the replica is consumed, and it says
/// so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_failed_after_the_guest_ran_is_not_retried() {
    struct RanThenFailed(Arc<std::sync::atomic::AtomicUsize>);
    impl Activate for RanThenFailed {
        fn activate(
            &self,
            vm: String,
            dir: PathBuf,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
        {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                own(&dir, &vm);
                Err("persisting the record failed after cont".into())
            })
        }
    }
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, _c) = silent_after_epoch_1(Arc::new(RanThenFailed(calls.clone())), false).await;
    let st = wait_status(&r, "the failure", Duration::from_secs(5), |s| {
        s.state == "stopped"
    })
    .await;
    assert!(st.detail.contains("after the guest ran"), "{st:?}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}
