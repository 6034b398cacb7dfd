//! The backup's durable replica of one VM, updated one whole epoch at a time.
//!
//! Directory layout:
//! - `ram` — the replica of guest RAM (a file of the guest's RAM size, its
//!   blocks allocated up front, as are the disks': see [`reserve`])
//! - `disk-<name>.raw` — one replica per replicated disk
//! - `device-state` — QEMU's device state as of the committed epoch
//! - `committed.json` — `{epoch, device_state_len, device_state_crc}`;
//!   `device_state_len` 0 means the committed epoch had no device state
//!   (a running copy): the replica is not resumable until one that has
//!   commits
//! - `staging/epoch-N.journal` + `staging/epoch-N.ready` — the redo journal
//!
//! Applying an epoch is crash-safe by redo: (a) the whole epoch is written
//! to a journal with a trailing crc32c and made durable, then a `ready`
//! marker is made durable — that marker is the commit point; (b) the epoch
//! is applied in place (RAM pages, disk writes, device state via rename,
//! commit record via rename) and synced; (c) the journal is removed.
//! On open, a journal with a marker and a valid checksum is re-applied
//! (applying is idempotent); anything else in `staging/` is discarded.
//! A failure in (a) — a full disk, say — leaves the replica exactly at the
//! previous epoch; a failure in (b) leaves the journal, so the next open or
//! apply completes it. Nothing partial is ever visible as committed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::assembler::CompleteEpoch;
use crate::disklog;
use crate::wire::{HelloDisk, PAGE_SIZE};

pub const RAM_FILE: &str = "ram";
pub const DEVICE_STATE_FILE: &str = "device-state";
pub const COMMIT_FILE: &str = "committed.json";
const STAGING: &str = "staging";
const JOURNAL_MAGIC: &[u8; 8] = b"TDEMJRN1";

pub fn disk_file_name(disk: &str) -> String {
    format!("disk-{disk}.raw")
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("epoch {got} cannot follow committed epoch {committed}")]
    Sequence { committed: u64, got: u64 },
    #[error("epoch {epoch}: {why}")]
    Invalid { epoch: u64, why: String },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io { op, path, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub epoch: u64,
    pub device_state_len: u64,
    pub device_state_crc: u32,
}

/// Test hook: where [`ReplicaStore::apply`] pretends the disk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    None,
    /// ENOSPC while writing the journal (before the commit point).
    JournalWrite,
    /// A crash right after the commit point (journal + marker durable).
    AfterCommitPoint,
}

pub struct ReplicaStore {
    dir: PathBuf,
    ram_size: u64,
    ram: File,
    disks: Vec<(HelloDisk, File)>,
    committed: Option<CommitRecord>,
    fail: FailPoint,
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica in `dir`, finishing or
    /// discarding any epoch a crash left in the journal.
    pub fn open(dir: &Path, ram_size: u64, disks: &[HelloDisk]) -> Result<Self, ReplicaError> {
        std::fs::create_dir_all(dir.join(STAGING)).map_err(io("creating", dir))?;
        let ram_path = dir.join(RAM_FILE);
        let ram = open_sized(&ram_path, ram_size)?;
        let mut ds = Vec::new();
        for d in disks {
            let p = dir.join(disk_file_name(&d.name));
            ds.push((d.clone(), open_sized(&p, d.size)?));
        }
        let committed = match std::fs::read(dir.join(COMMIT_FILE)) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| ReplicaError::Io {
                op: "parsing",
                path: dir.join(COMMIT_FILE),
                source: std::io::Error::other(e),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading", &dir.join(COMMIT_FILE))(e)),
        };
        let mut store = ReplicaStore {
            dir: dir.to_path_buf(),
            ram_size,
            ram,
            disks: ds,
            committed,
            fail: FailPoint::None,
        };
        store.recover()?;
        Ok(store)
    }

    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed.map(|c| c.epoch)
    }

    /// Whether the committed epoch can be resumed (it has device state; the
    /// initial RAM-only copy does not).
    pub fn is_consistent(&self) -> bool {
        self.committed.is_some_and(|c| c.device_state_len > 0)
    }

    /// The xxh3-64 hash of every page of the replica RAM, as committed
    /// (holes read as zeroes), for a new session's delta copy. The same
    /// hash the scan tracker keeps, so both sides agree on equal pages.
    pub fn ram_digest(&self) -> Result<Vec<u64>, ReplicaError> {
        let path = self.ram_path();
        let pages = (self.ram_size / PAGE_SIZE as u64) as usize;
        let mut hashes = Vec::with_capacity(pages);
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut page = 0usize;
        while page < pages {
            let n = (pages - page).min(256);
            let chunk = &mut buf[..n * PAGE_SIZE];
            self.ram
                .read_exact_at(chunk, (page * PAGE_SIZE) as u64)
                .map_err(io("reading", &path))?;
            hashes.extend(
                chunk
                    .chunks_exact(PAGE_SIZE)
                    .map(xxhash_rust::xxh3::xxh3_64),
            );
            page += n;
        }
        Ok(hashes)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ram_path(&self) -> PathBuf {
        self.dir.join(RAM_FILE)
    }

    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join(DEVICE_STATE_FILE)
    }

    #[doc(hidden)]
    pub fn set_fail_point(&mut self, f: FailPoint) {
        self.fail = f;
    }

    fn check(&self, e: &CompleteEpoch) -> Result<(), ReplicaError> {
        let committed = self.committed_epoch().unwrap_or(0);
        if e.epoch != committed + 1 {
            return Err(ReplicaError::Sequence {
                committed,
                got: e.epoch,
            });
        }
        let pages = self.ram_size / PAGE_SIZE as u64;
        let invalid = |why: String| ReplicaError::Invalid {
            epoch: e.epoch,
            why,
        };
        if e.page_data.len() != e.pages.len() * PAGE_SIZE {
            return Err(invalid("page data does not match the page list".into()));
        }
        if let Some(p) = e.pages.iter().find(|&&p| p >= pages) {
            return Err(invalid(format!("page {p} outside RAM")));
        }
        for (i, log) in e.disk_writes.iter().enumerate() {
            if log.is_empty() {
                continue;
            }
            let (d, _) = self
                .disks
                .get(i)
                .ok_or_else(|| invalid(format!("writes for unknown disk {i}")))?;
            disklog::parse(log, d.size)
                .map_err(|err| invalid(format!("disk {}: {err}", d.name)))?;
        }
        Ok(())
    }

    /// Makes epoch `e` the committed state, atomically and durably.
    pub fn apply(&mut self, e: &CompleteEpoch) -> Result<(), ReplicaError> {
        self.check(e)?;
        let journal = self.journal_path(e.epoch);
        let ready = self.ready_path(e.epoch);
        if let Err(err) = self.write_journal(e, &journal, &ready) {
            let _ = std::fs::remove_file(&ready);
            let _ = std::fs::remove_file(&journal);
            return Err(err);
        }
        if self.fail == FailPoint::AfterCommitPoint {
            return Err(ReplicaError::Io {
                op: "simulated crash after",
                path: ready,
                source: std::io::Error::other("fail point"),
            });
        }
        self.apply_in_place(e)?;
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&journal);
        Ok(())
    }

    fn journal_path(&self, epoch: u64) -> PathBuf {
        self.dir
            .join(STAGING)
            .join(format!("epoch-{epoch}.journal"))
    }

    fn ready_path(&self, epoch: u64) -> PathBuf {
        self.dir.join(STAGING).join(format!("epoch-{epoch}.ready"))
    }

    fn write_journal(
        &self,
        e: &CompleteEpoch,
        journal: &Path,
        ready: &Path,
    ) -> Result<(), ReplicaError> {
        let bytes = encode_journal(e);
        let mut f = File::create(journal).map_err(io("creating", journal))?;
        if self.fail == FailPoint::JournalWrite {
            // Half the journal reaches the disk, then the disk is full.
            let _ = f.write_all(&bytes[..bytes.len() / 2]);
            return Err(ReplicaError::Io {
                op: "writing",
                path: journal.to_path_buf(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        f.write_all(&bytes).map_err(io("writing", journal))?;
        f.sync_all().map_err(io("syncing", journal))?;
        sync_dir(&self.dir.join(STAGING))?;
        let m = File::create(ready).map_err(io("creating", ready))?;
        m.sync_all().map_err(io("syncing", ready))?;
        sync_dir(&self.dir.join(STAGING))
    }

    fn apply_in_place(&mut self, e: &CompleteEpoch) -> Result<(), ReplicaError> {
        let ram_path = self.ram_path();
        for (i, page) in e.pages.iter().enumerate() {
            let data = &e.page_data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            self.ram
                .write_all_at(data, page * PAGE_SIZE as u64)
                .map_err(io("writing", &ram_path))?;
        }
        for (i, log) in e.disk_writes.iter().enumerate() {
            if log.is_empty() {
                continue;
            }
            let Some((d, file)) = self.disks.get(i) else {
                continue; // rejected by check() before the commit point
            };
            let path = self.dir.join(disk_file_name(&d.name));
            let writes = disklog::parse(log, d.size).map_err(|err| ReplicaError::Invalid {
                epoch: e.epoch,
                why: err.to_string(),
            })?;
            for w in writes {
                match w {
                    disklog::Record::Data(off, data) => {
                        file.write_all_at(data, off).map_err(io("writing", &path))?
                    }
                    disklog::Record::Zero(off, len) => {
                        write_zeroes(file, off, len).map_err(io("zeroing", &path))?
                    }
                }
            }
            file.sync_data().map_err(io("syncing", &path))?;
        }
        self.ram.sync_data().map_err(io("syncing", &ram_path))?;
        let mut rec = self.committed.unwrap_or(CommitRecord {
            epoch: 0,
            device_state_len: 0,
            device_state_crc: 0,
        });
        if e.device_state.is_empty() {
            // RAM (and disk) from a moment no device state belongs to: a
            // new session's running copy, or epochs while a disk is being
            // copied. The replica is not resumable again until an epoch
            // with device state commits; keeping the older device state
            // would pair it with RAM it never saw.
            rec.device_state_len = 0;
            rec.device_state_crc = 0;
        } else {
            let p = self.device_state_path();
            write_durable(&p, &e.device_state)?;
            rec.device_state_len = e.device_state.len() as u64;
            rec.device_state_crc = crc32c::crc32c(&e.device_state);
        }
        rec.epoch = e.epoch;
        let body = serde_json::to_vec(&rec).unwrap_or_default();
        write_durable(&self.dir.join(COMMIT_FILE), &body)?;
        sync_dir(&self.dir)?;
        self.committed = Some(rec);
        Ok(())
    }

    fn recover(&mut self) -> Result<(), ReplicaError> {
        let staging = self.dir.join(STAGING);
        let entries = std::fs::read_dir(&staging).map_err(io("listing", &staging))?;
        let mut journals: Vec<u64> = entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("epoch-")?
                    .strip_suffix(".journal")?
                    .parse()
                    .ok()
            })
            .collect();
        journals.sort_unstable();
        for epoch in journals {
            let journal = self.journal_path(epoch);
            let ready = self.ready_path(epoch);
            let redo = ready.exists() && self.committed_epoch().unwrap_or(0) + 1 >= epoch;
            if redo {
                match std::fs::read(&journal)
                    .ok()
                    .and_then(|b| decode_journal(&b))
                {
                    Some(e) if e.epoch == epoch => {
                        info!(epoch, dir = %self.dir.display(), "finishing an epoch committed before a crash");
                        // Re-applying is idempotent; the sequence check is
                        // skipped because the epoch may already be in place.
                        self.apply_in_place(&e)?;
                    }
                    _ => warn!(epoch, "discarding a corrupt journal"),
                }
            } else {
                info!(
                    epoch,
                    "discarding an epoch that never reached its commit point"
                );
            }
            let _ = std::fs::remove_file(&ready);
            let _ = std::fs::remove_file(&journal);
        }
        // Markers without journals are leftovers of the cleanup step.
        if let Ok(entries) = std::fs::read_dir(&staging) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }
}

fn open_sized(path: &Path, size: u64) -> Result<File, ReplicaError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("opening", path))?;
    let len = f.metadata().map_err(io("stat", path))?.len();
    if len != size {
        f.set_len(size).map_err(io("sizing", path))?;
    }
    reserve(&f, size).map_err(io("reserving space for", path))?;
    Ok(f)
}

/// Allocates every block of the file now, so that applying a committed
/// epoch in place never needs new space: only staging can run out, before
/// the commit point, which leaves the replica as it was. (Without this, a
/// full disk during the in-place write wedged the replica on a journal it
/// could never finish.) A filesystem that cannot preallocate is left sparse.
fn reserve(f: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(());
    }
    // SAFETY: fallocate(2) on a descriptor we own; mode 0 only allocates
    // (the file already has this size, so its contents do not change).
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

fn write_zeroes(file: &File, mut off: u64, mut len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), ReplicaError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))
}

fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_journal(e: &CompleteEpoch) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(64 + e.page_data.len() + e.pages.len() * 8 + e.device_state.len());
    out.extend_from_slice(JOURNAL_MAGIC);
    out.extend_from_slice(&e.epoch.to_le_bytes());
    out.extend_from_slice(&(e.pages.len() as u64).to_le_bytes());
    for p in &e.pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    put_bytes(&mut out, &e.page_data);
    put_bytes(&mut out, &e.device_state);
    out.extend_from_slice(&(e.disk_writes.len() as u64).to_le_bytes());
    for d in &e.disk_writes {
        put_bytes(&mut out, d);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses a journal; `None` if it is torn or corrupt in any way.
fn decode_journal(b: &[u8]) -> Option<CompleteEpoch> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut r = Reader { b: body, at: 0 };
    if r.take(8)? != JOURNAL_MAGIC {
        return None;
    }
    let epoch = r.u64()?;
    let n = usize::try_from(r.u64()?).ok()?;
    let mut pages = Vec::with_capacity(n.min(body.len() / 8));
    for _ in 0..n {
        pages.push(r.u64()?);
    }
    let page_data = r.bytes()?.to_vec();
    let device_state = r.bytes()?.to_vec();
    let disks = usize::try_from(r.u64()?).ok()?;
    let mut disk_writes = Vec::new();
    for _ in 0..disks.min(64) {
        disk_writes.push(r.bytes()?.to_vec());
    }
    (r.at == body.len()).then_some(CompleteEpoch {
        epoch,
        pages,
        page_data,
        device_state,
        disk_writes,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 16 * PAGE_SIZE as u64;

    fn disks() -> Vec<HelloDisk> {
        vec![HelloDisk {
            name: "data".into(),
            size: 1 << 20,
        }]
    }

    fn epoch(n: u64, fill: u8, ds: &[u8]) -> CompleteEpoch {
        let mut log = Vec::new();
        disklog::push(&mut log, 4096 * n, &[fill; 100]);
        CompleteEpoch {
            epoch: n,
            pages: vec![1, 5],
            page_data: vec![fill; 2 * PAGE_SIZE],
            device_state: ds.to_vec(),
            disk_writes: vec![log],
        }
    }

    fn ram_byte(dir: &Path, page: u64) -> u8 {
        std::fs::read(dir.join(RAM_FILE)).unwrap()[page as usize * PAGE_SIZE]
    }

    #[test]
    fn apply_then_reopen() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), None);
        s.apply(&epoch(1, 7, b"")).unwrap();
        assert!(!s.is_consistent(), "RAM-only epoch is not resumable");
        s.apply(&epoch(2, 9, b"state")).unwrap();
        drop(s);
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(2));
        assert!(s.is_consistent());
        assert_eq!(ram_byte(t.path(), 5), 9);
        assert_eq!(std::fs::read(s.device_state_path()).unwrap(), b"state");
        let disk = std::fs::read(t.path().join(disk_file_name("data"))).unwrap();
        assert_eq!(disk[4096 * 2], 9);
        assert_eq!(disk[4096], 7);
    }

    #[test]
    fn out_of_sequence_epochs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"a")).unwrap();
        for bad in [1, 3] {
            assert!(matches!(
                s.apply(&epoch(bad, 2, b"b")),
                Err(ReplicaError::Sequence { .. })
            ));
        }
        assert_eq!(s.committed_epoch(), Some(1));
    }

    #[test]
    fn disk_full_before_the_commit_point_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        s.set_fail_point(FailPoint::JournalWrite);
        let err = s.apply(&epoch(2, 2, b"two")).unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(s.committed_epoch(), Some(1));
        assert_eq!(ram_byte(t.path(), 5), 1);
        assert_eq!(std::fs::read(s.device_state_path()).unwrap(), b"one");
        assert_eq!(
            std::fs::read_dir(t.path().join(STAGING)).unwrap().count(),
            0
        );
        // And the next attempt, with space, succeeds.
        s.set_fail_point(FailPoint::None);
        s.apply(&epoch(2, 2, b"two")).unwrap();
        assert_eq!(s.committed_epoch(), Some(2));
    }

    #[test]
    fn crash_after_the_commit_point_is_finished_on_open() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        s.set_fail_point(FailPoint::AfterCommitPoint);
        assert!(s.apply(&epoch(2, 2, b"two")).is_err());
        drop(s);
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(2));
        assert_eq!(ram_byte(t.path(), 1), 2);
        assert_eq!(std::fs::read(s.device_state_path()).unwrap(), b"two");
    }

    #[test]
    fn journals_without_marker_or_with_bad_checksum_are_discarded() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        s.set_fail_point(FailPoint::AfterCommitPoint);
        assert!(s.apply(&epoch(2, 2, b"two")).is_err());
        drop(s);
        // Corrupt the committed-but-unapplied journal.
        let j = t.path().join(STAGING).join("epoch-2.journal");
        let mut b = std::fs::read(&j).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(&j, b).unwrap();
        // And leave a torn journal with no marker for epoch 3.
        std::fs::write(t.path().join(STAGING).join("epoch-3.journal"), b"torn").unwrap();
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(1));
        assert_eq!(ram_byte(t.path(), 1), 1);
        assert_eq!(
            std::fs::read_dir(t.path().join(STAGING)).unwrap().count(),
            0
        );
    }

    #[test]
    fn journal_codec_round_trips_and_rejects_truncation() {
        let e = epoch(4, 3, b"dev");
        let b = encode_journal(&e);
        assert_eq!(decode_journal(&b), Some(e));
        for cut in [0, 1, 4, b.len() / 2, b.len() - 1] {
            assert_eq!(decode_journal(&b[..cut]), None, "cut at {cut}");
        }
    }
}
