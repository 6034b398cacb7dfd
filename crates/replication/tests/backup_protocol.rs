//! The backup's side of the protocol over a real socket, driven by a
//! scripted primary: valid epochs commit; corrupt, truncated, duplicated
//! and out-of-order ones are answered with RESYNC and never applied; the
//! primary reconnects and protection resumes from the last commit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_replication::assembler::EpochBuilder;
use tandem_replication::backup::{read_identity, Activate, ActivateError, Backup, BackupConfig};
use tandem_replication::link::{self, Endpoint, Listener};
use tandem_replication::replica::{ReplicaStore, RAM_FILE};
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
        let mut s = link::connect(ep).await.unwrap();
        let hello = Hello {
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
        };
        let f = Frame::new(FrameKind::Hello, 0, 0, serde_json::to_vec(&hello).unwrap());
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
