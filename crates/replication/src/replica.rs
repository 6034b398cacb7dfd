//! The backup's durable replica of one VM, updated one whole epoch at a time.
//!
//! Directory layout (version 2):
//! - `ram` — the replica of guest RAM (a file of the guest's RAM size, its
//!   blocks allocated up front, as are the disks': see [`reserve`])
//! - `disk-<name>.raw` — one replica per replicated disk; `<name>` is a
//!   [`is_safe_name`] (it becomes part of a file name)
//! - `device-state.a`, `device-state.b` — two slots for QEMU's device
//!   state: the commit record names the one that holds the committed
//!   epoch's; the next epoch's goes into the other
//! - `commit-record` — two fixed 4 KiB slots, each holding one record
//!   (`seq`, epoch, device-state length, crc32c and slot, and a crc32c of
//!   the record), written in place, alternately: the valid record with the
//!   higher `seq` is the commit. A device-state length of 0 means the
//!   committed epoch had none (a running copy): the replica is not
//!   resumable until one that has commits
//! - `staging/epoch-N.journal` + `staging/epoch-N.ready` — the redo journal
//! - `device-state` — only while a VM is started from the replica: the
//!   committed device state, whole, for the restore to read
//!   ([`ReplicaStore::export_device_state`])
//!
//! Applying an epoch is crash-safe by redo: (a) the whole epoch is written
//! to a journal with a trailing crc32c and made durable, its device state
//! is written into the spare slot (grown first if it is too small) and
//! made durable, then a `ready` marker is made durable — that marker is the
//! commit point; (b) the epoch is applied in place (RAM pages, disk writes)
//! and synced, then the commit record is written over the older of its two
//! slots and synced; (c) the journal is removed.
//! Step (b) writes only blocks the filesystem has already handed out: RAM
//! and disks are allocated when the replica is opened, the slot in (a),
//! the commit record's file when it is created. So a full disk can fail
//! only (a), which leaves the replica exactly at the previous epoch. (Up to
//! layout 1 the device state and the commit record went to new temp files
//! renamed into place after the marker: a full disk there left a replica
//! whose RAM was half the next epoch's under the previous device state, and
//! a journal no open could finish — audit H5.)
//! On open, a journal with a marker and a valid checksum for the epoch
//! after the committed one is re-applied (applying is idempotent); anything
//! else in `staging/` is discarded. A failure in (b) leaves the journal, and
//! the store re-applies it before anything else ([`ReplicaStore::apply`],
//! or the next open). Nothing partial is ever visible as committed.
//!
//! A replica of layout 1 (`device-state` and `committed.json`, both renamed
//! into place) is migrated when opened: its device state is checked against
//! its record and copied into a slot, and a commit record replaces
//! `committed.json`.
//!
//! One writer at a time: the backup opens, recovers and applies a replica
//! only under that replica's lock, so the fixed names in `staging/` and the
//! slots are never written by two stores at once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::assembler::{CompleteEpoch, MAX_DISKS};
use crate::disklog;
use crate::wire::{HelloDisk, PAGE_SIZE};

pub const RAM_FILE: &str = "ram";
/// The committed device state as a whole file, written for a takeover (the
/// supervisor's restore reads it by this name).
pub const DEVICE_STATE_FILE: &str = "device-state";
/// The commit record of layout 2.
pub const COMMIT_RECORD_FILE: &str = "commit-record";
/// The commit record of layout 1 (JSON, renamed into place); read only to
/// migrate a replica.
pub const COMMIT_FILE: &str = "committed.json";
const SLOT_FILES: [&str; 2] = ["device-state.a", "device-state.b"];
const STAGING: &str = "staging";
const JOURNAL_MAGIC: &[u8; 8] = b"TDEMJRN1";
const RECORD_MAGIC: &[u8; 8] = b"TDEMCMT2";
/// One record per 4 KiB block, so a torn write of one never touches the
/// block of the other.
const RECORD_SLOT: u64 = 4096;
const RECORD_LEN: usize = 44;
/// Slots grow in steps of this, so a device state a few bytes larger than
/// the last does not allocate every epoch.
const SLOT_STEP: u64 = 1 << 20;

pub fn disk_file_name(disk: &str) -> String {
    format!("disk-{disk}.raw")
}

/// Whether `name` may become (part of) a file name in a replica root: a
/// VM's directory, a disk's file. The alphabet keeps out `/`, `..`, hidden
/// files and anything a shell would trip over.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
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
    /// The replica's files or the layout asked for do not fit together.
    #[error("{0}")]
    Layout(String),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io { op, path, source }
}

/// What is committed, as `committed.json` held it in layout 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub epoch: u64,
    pub device_state_len: u64,
    pub device_state_crc: u32,
}

/// One record of `commit-record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    /// Bumped by every write; picks the newer of the two records.
    seq: u64,
    epoch: u64,
    device_state_len: u64,
    device_state_crc: u32,
    /// The device-state slot (0 or 1) holding the committed epoch's.
    slot: u32,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..8].copy_from_slice(RECORD_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.device_state_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.device_state_crc.to_le_bytes());
        b[36..40].copy_from_slice(&self.slot.to_le_bytes());
        let crc = crc32c::crc32c(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` for a slot never written, torn or corrupt.
    fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..RECORD_LEN)?;
        let u64_at = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
        let u32_at = |at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
        if &b[..8] != RECORD_MAGIC || crc32c::crc32c(&b[..40]) != u32_at(40)? {
            return None;
        }
        let r = Record {
            seq: u64_at(8)?,
            epoch: u64_at(16)?,
            device_state_len: u64_at(24)?,
            device_state_crc: u32_at(32)?,
            slot: u32_at(36)?,
        };
        (r.slot <= 1).then_some(r)
    }

    fn public(&self) -> CommitRecord {
        CommitRecord {
            epoch: self.epoch,
            device_state_len: self.device_state_len,
            device_state_crc: self.device_state_crc,
        }
    }
}

/// Test hook: where [`ReplicaStore::apply`] pretends the disk failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailPoint {
    #[default]
    None,
    /// ENOSPC while writing the journal (before the commit point).
    JournalWrite,
    /// ENOSPC when the device state needs its slot to grow.
    NoSpaceForDeviceState,
    /// A crash right after the commit point (journal + marker durable).
    AfterCommitPoint,
    /// A crash after the commit point, with the epoch's first RAM page
    /// written in place and the rest not.
    MidApply,
}

/// Test hooks of a store (see [`FailPoint`]); the default is none.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreFaults {
    pub fail: FailPoint,
    /// The only epoch `fail` and `stall_before_commit_point` apply to; 0
    /// for every epoch.
    pub epoch: u64,
    /// Sleep between the durable journal and the marker: the window in
    /// which another store could discard the journal (audit H4).
    pub stall_before_commit_point: Option<Duration>,
    /// Layout 1's order: the device state is written (and its slot grown)
    /// after the commit point (audit H5).
    pub allocate_after_commit_point: bool,
    /// Layout 1's open: a committed replica's files are resized to the
    /// sizes asked for (audit M3).
    pub resize_committed: bool,
    /// Take any disk name for a file name (before audit L3).
    pub any_disk_name: bool,
}

pub struct ReplicaStore {
    dir: PathBuf,
    ram_size: u64,
    ram: File,
    disks: Vec<(HelloDisk, File)>,
    record_file: File,
    slots: [File; 2],
    committed: Option<Record>,
    /// An apply failed after its commit point: the journal must be
    /// re-applied before anything else is.
    torn: bool,
    faults: StoreFaults,
}

/// Checks what [`ReplicaStore::open`] is asked to lay out: disk names that
/// are file names, each once, no more disks than an epoch can carry (the
/// journal holds at most that many), sizes a file offset can hold.
pub fn check_layout(ram_size: u64, disks: &[HelloDisk]) -> Result<(), ReplicaError> {
    let bad = |why: String| Err(ReplicaError::Layout(why));
    if disks.len() > MAX_DISKS as usize {
        return bad(format!(
            "{} disks, at most {MAX_DISKS} are replicated",
            disks.len()
        ));
    }
    if ram_size > i64::MAX as u64 {
        return bad(format!("a RAM size of {ram_size} bytes"));
    }
    for (i, d) in disks.iter().enumerate() {
        if !is_safe_name(&d.name) {
            return bad(format!(
                "`{}` is not a valid disk name (1-64 letters, digits, '-', '_', '.', not starting with '.')",
                d.name.escape_debug()
            ));
        }
        if disks[..i].iter().any(|o| o.name == d.name) {
            return bad(format!("disk `{}` is named twice", d.name));
        }
        if d.size > i64::MAX as u64 {
            return bad(format!("disk `{}` of {} bytes", d.name, d.size));
        }
    }
    Ok(())
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica in `dir`, finishing or
    /// discarding any epoch a crash left in the journal. A replica with a
    /// commit is never resized: files of other sizes are an error.
    pub fn open(dir: &Path, ram_size: u64, disks: &[HelloDisk]) -> Result<Self, ReplicaError> {
        Self::open_with(dir, ram_size, disks, StoreFaults::default())
    }

    /// [`ReplicaStore::open`] with test hooks.
    #[doc(hidden)]
    pub fn open_with(
        dir: &Path,
        ram_size: u64,
        disks: &[HelloDisk],
        faults: StoreFaults,
    ) -> Result<Self, ReplicaError> {
        if !faults.any_disk_name {
            check_layout(ram_size, disks)?;
        }
        std::fs::create_dir_all(dir.join(STAGING)).map_err(io("creating", dir))?;
        let record_path = dir.join(COMMIT_RECORD_FILE);
        let record_file = open_rw(&record_path)?;
        let len = record_file
            .metadata()
            .map_err(io("stat", &record_path))?
            .len();
        if len < 2 * RECORD_SLOT {
            record_file
                .set_len(2 * RECORD_SLOT)
                .map_err(io("sizing", &record_path))?;
        }
        reserve(&record_file, 2 * RECORD_SLOT).map_err(io("reserving space for", &record_path))?;
        let slots = [
            open_rw(&dir.join(SLOT_FILES[0]))?,
            open_rw(&dir.join(SLOT_FILES[1]))?,
        ];
        let mut committed = read_records(&record_file, &record_path)?;
        if committed.is_none() {
            committed = migrate_layout_1(dir, &record_file, &slots)?;
        }
        // Layout 1's files (migrated now, or before a crash cut the cleanup
        // short), its temp files, and the copy of a past takeover.
        let mut stale = vec![
            COMMIT_FILE,
            DEVICE_STATE_FILE,
            "device-state.tmp",
            "committed.tmp",
        ];
        stale.retain(|f| dir.join(f).exists());
        if !stale.is_empty() {
            for f in &stale {
                let p = dir.join(f);
                std::fs::remove_file(&p).map_err(io("removing", &p))?;
            }
            sync_dir(dir)?;
        }
        let keep = committed.is_some() && !faults.resize_committed;
        let ram = open_sized(&dir.join(RAM_FILE), ram_size, keep)?;
        let mut ds = Vec::new();
        for d in disks {
            let p = dir.join(disk_file_name(&d.name));
            ds.push((d.clone(), open_sized(&p, d.size, keep)?));
        }
        let mut store = ReplicaStore {
            dir: dir.to_path_buf(),
            ram_size,
            ram,
            disks: ds,
            record_file,
            slots,
            committed,
            torn: false,
            faults,
        };
        store.recover()?;
        Ok(store)
    }

    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed.map(|c| c.epoch)
    }

    pub fn commit_record(&self) -> Option<CommitRecord> {
        self.committed.map(|r| r.public())
    }

    /// Whether the committed epoch can be resumed (it has device state; the
    /// initial RAM-only copy does not).
    pub fn is_consistent(&self) -> bool {
        self.committed.is_some_and(|c| c.device_state_len > 0)
    }

    /// An apply failed after its commit point and the epoch is not in place
    /// yet: the files are torn until [`ReplicaStore::recover`] (or the
    /// next apply, or the next open) finishes it from the journal.
    pub fn needs_recovery(&self) -> bool {
        self.torn
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

    /// Where [`ReplicaStore::export_device_state`] puts the device state.
    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join(DEVICE_STATE_FILE)
    }

    /// The committed epoch's device state, checked against its record;
    /// `None` when the replica is not resumable.
    pub fn read_device_state(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        match self.committed {
            Some(rec) if rec.device_state_len > 0 => {
                read_slot(&self.dir, &self.slots, &rec).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Writes the committed device state to [`DEVICE_STATE_FILE`] (durably,
    /// by rename) for a VM started from the replica; the epoch it belongs
    /// to, or `None` when the replica is not resumable. This allocates, but
    /// outside any commit: a failure leaves the replica as it was.
    pub fn export_device_state(&self) -> Result<Option<u64>, ReplicaError> {
        let Some(state) = self.read_device_state()? else {
            return Ok(None);
        };
        let path = self.device_state_path();
        tandem_supervisor::util::atomic_write(&path, &state).map_err(io("writing", &path))?;
        Ok(self.committed_epoch())
    }

    #[doc(hidden)]
    pub fn set_fail_point(&mut self, f: FailPoint) {
        self.faults.fail = f;
        self.faults.epoch = 0;
    }

    #[doc(hidden)]
    pub fn set_faults(&mut self, f: StoreFaults) {
        self.faults = f;
    }

    /// The hooks that apply to `epoch`.
    fn faults_for(&self, epoch: u64) -> StoreFaults {
        if self.faults.epoch == 0 || self.faults.epoch == epoch {
            self.faults
        } else {
            StoreFaults {
                fail: FailPoint::None,
                stall_before_commit_point: None,
                ..self.faults
            }
        }
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

    /// Makes epoch `e` the committed state, atomically and durably. A
    /// store left torn by an earlier failure finishes that epoch first.
    pub fn apply(&mut self, e: &CompleteEpoch) -> Result<(), ReplicaError> {
        if self.torn {
            self.recover()?;
        }
        self.check(e)?;
        let faults = self.faults_for(e.epoch);
        let journal = self.journal_path(e.epoch);
        let ready = self.ready_path(e.epoch);
        if let Err(err) = self.stage(e, &journal, &ready, faults) {
            let _ = std::fs::remove_file(&ready);
            let _ = std::fs::remove_file(&journal);
            return Err(err);
        }
        if faults.fail == FailPoint::AfterCommitPoint {
            self.torn = true;
            return Err(ReplicaError::Io {
                op: "simulated crash after",
                path: ready,
                source: std::io::Error::other("fail point"),
            });
        }
        if let Err(err) = self.apply_in_place(e, !faults.allocate_after_commit_point, faults) {
            self.torn = true;
            return Err(err);
        }
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

    /// The device-state slot the next epoch writes: the one the commit
    /// does not name.
    fn spare_slot(&self) -> usize {
        self.committed.map_or(1, |r| 1 - r.slot as usize)
    }

    /// Everything before and up to the commit point: the durable journal,
    /// the device state in its slot, the durable marker.
    fn stage(
        &self,
        e: &CompleteEpoch,
        journal: &Path,
        ready: &Path,
        faults: StoreFaults,
    ) -> Result<(), ReplicaError> {
        let bytes = encode_journal(e);
        let mut f = File::create(journal).map_err(io("creating", journal))?;
        if faults.fail == FailPoint::JournalWrite {
            // Half the journal reaches the disk, then the disk is full.
            let _ = f.write_all(&bytes[..bytes.len() / 2]);
            return Err(no_space("writing", journal));
        }
        f.write_all(&bytes).map_err(io("writing", journal))?;
        f.sync_all().map_err(io("syncing", journal))?;
        sync_dir(&self.dir.join(STAGING))?;
        if !e.device_state.is_empty() && !faults.allocate_after_commit_point {
            self.write_slot(self.spare_slot(), &e.device_state, faults)?;
        }
        if let Some(d) = faults.stall_before_commit_point {
            std::thread::sleep(d);
        }
        let m = File::create(ready).map_err(io("creating", ready))?;
        m.sync_all().map_err(io("syncing", ready))?;
        sync_dir(&self.dir.join(STAGING))
    }

    /// Writes `state` at the start of slot `slot`, durably, growing the
    /// slot first if it is too small.
    fn write_slot(
        &self,
        slot: usize,
        state: &[u8],
        faults: StoreFaults,
    ) -> Result<(), ReplicaError> {
        let path = self.dir.join(SLOT_FILES[slot]);
        let f = &self.slots[slot];
        let need = state.len() as u64;
        let have = f.metadata().map_err(io("stat", &path))?.len();
        if have < need {
            if faults.fail == FailPoint::NoSpaceForDeviceState {
                return Err(no_space("growing", &path));
            }
            let size = need.div_ceil(SLOT_STEP) * SLOT_STEP;
            f.set_len(size).map_err(io("growing", &path))?;
            reserve(f, size).map_err(io("reserving space for", &path))?;
        }
        f.write_all_at(state, 0).map_err(io("writing", &path))?;
        f.sync_data().map_err(io("syncing", &path))
    }

    /// Step (b): RAM and disks in place, then the commit record. With
    /// `state_in_slot` the device state is in its slot already (step a);
    /// a recovery writes it again from the journal (same bytes, same
    /// blocks).
    fn apply_in_place(
        &mut self,
        e: &CompleteEpoch,
        state_in_slot: bool,
        faults: StoreFaults,
    ) -> Result<(), ReplicaError> {
        let ram_path = self.ram_path();
        for (i, page) in e.pages.iter().enumerate() {
            let data = &e.page_data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            self.ram
                .write_all_at(data, page * PAGE_SIZE as u64)
                .map_err(io("writing", &ram_path))?;
            if faults.fail == FailPoint::MidApply {
                return Err(ReplicaError::Io {
                    op: "simulated crash while writing",
                    path: ram_path,
                    source: std::io::Error::other("fail point"),
                });
            }
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
        let prev = self.committed.unwrap_or(Record {
            seq: 0,
            epoch: 0,
            device_state_len: 0,
            device_state_crc: 0,
            slot: 0,
        });
        let mut rec = Record {
            seq: prev.seq + 1,
            epoch: e.epoch,
            ..prev
        };
        if e.device_state.is_empty() {
            // RAM (and disk) from a moment no device state belongs to: a
            // new session's running copy, or epochs while a disk is being
            // copied. The replica is not resumable again until an epoch
            // with device state commits; keeping the older device state
            // would pair it with RAM it never saw.
            rec.device_state_len = 0;
            rec.device_state_crc = 0;
        } else {
            let slot = self.spare_slot();
            if !state_in_slot {
                self.write_slot(slot, &e.device_state, faults)?;
            }
            rec.slot = slot as u32;
            rec.device_state_len = e.device_state.len() as u64;
            rec.device_state_crc = crc32c::crc32c(&e.device_state);
        }
        write_record(&self.record_file, &self.dir.join(COMMIT_RECORD_FILE), &rec)?;
        self.committed = Some(rec);
        Ok(())
    }

    /// Finishes an epoch whose commit point was reached but whose apply
    /// was not (a crash, an I/O error), and clears `staging/` of the rest.
    /// The backup runs it under the replica's lock: it removes journals.
    pub fn recover(&mut self) -> Result<(), ReplicaError> {
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
            let committed = self.committed_epoch().unwrap_or(0);
            if !ready.exists() {
                info!(
                    epoch,
                    "discarding an epoch that never reached its commit point"
                );
            } else if epoch <= committed {
                // The commit record is written last: the epoch is in place.
            } else if epoch == committed + 1 {
                match std::fs::read(&journal)
                    .ok()
                    .and_then(|b| decode_journal(&b))
                {
                    Some(e) if e.epoch == epoch => {
                        info!(epoch, dir = %self.dir.display(), "finishing an epoch committed before a crash");
                        // Re-applying is idempotent; the sequence check is
                        // skipped because the epoch may be partly in place.
                        self.apply_in_place(&e, false, StoreFaults::default())?;
                    }
                    _ => warn!(epoch, "discarding a corrupt journal"),
                }
            } else {
                warn!(
                    epoch,
                    committed, "discarding a journal that does not follow the commit"
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
        self.torn = false;
        Ok(())
    }
}

/// The commit of the replica in `dir` as its files say, without opening it
/// for writing or finishing a journal (layout 2, else layout 1).
pub fn read_commit_record(dir: &Path) -> Result<Option<CommitRecord>, ReplicaError> {
    let path = dir.join(COMMIT_RECORD_FILE);
    match File::open(&path) {
        Ok(f) => {
            if let Some(r) = read_records(&f, &path)? {
                return Ok(Some(r.public()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("opening", &path)(e)),
    }
    read_layout_1_record(dir)
}

/// The committed device state of the replica in `dir` as its files hold
/// it, without finishing a journal first: what a takeover that skipped
/// recovery would resume (the test hook of audit H5's twin).
#[doc(hidden)]
pub fn export_device_state_unrecovered(dir: &Path) -> Result<Option<u64>, ReplicaError> {
    let path = dir.join(COMMIT_RECORD_FILE);
    let f = File::open(&path).map_err(io("opening", &path))?;
    let Some(rec) = read_records(&f, &path)?.filter(|r| r.device_state_len > 0) else {
        return Ok(None);
    };
    let slots = [
        File::open(dir.join(SLOT_FILES[0])).map_err(io("opening", &dir.join(SLOT_FILES[0])))?,
        File::open(dir.join(SLOT_FILES[1])).map_err(io("opening", &dir.join(SLOT_FILES[1])))?,
    ];
    let state = read_slot(dir, &slots, &rec)?;
    let out = dir.join(DEVICE_STATE_FILE);
    tandem_supervisor::util::atomic_write(&out, &state).map_err(io("writing", &out))?;
    Ok(Some(rec.epoch))
}

/// Why the replica files in `dir` cannot hold a VM of `ram_size` and
/// `disks` (another definition of the VM); `None` when they can, or when
/// there are none. Read only.
pub fn layout_mismatch(
    dir: &Path,
    ram_size: u64,
    disks: &[HelloDisk],
) -> Result<Option<String>, ReplicaError> {
    let size_of = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("stat", p)(e)),
    };
    let mut have_disks = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(name) = n.strip_prefix("disk-").and_then(|n| n.strip_suffix(".raw")) {
                    have_disks.push(name.to_string());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("listing", dir)(e)),
    }
    let ram = size_of(&dir.join(RAM_FILE))?;
    if ram.is_none() && have_disks.is_empty() {
        return Ok(None);
    }
    let mut why = Vec::new();
    match ram {
        Some(n) if n == ram_size => {}
        Some(n) => why.push(format!("RAM {n} → {ram_size} bytes")),
        None => why.push("no RAM file".into()),
    }
    for d in disks {
        match size_of(&dir.join(disk_file_name(&d.name)))? {
            Some(n) if n == d.size => {}
            Some(n) => why.push(format!("disk `{}` {n} → {} bytes", d.name, d.size)),
            None => why.push(format!("disk `{}` is new", d.name)),
        }
    }
    for name in have_disks {
        if !disks.iter().any(|d| d.name == name) {
            why.push(format!("disk `{name}` is gone"));
        }
    }
    Ok((!why.is_empty()).then(|| why.join(", ")))
}

/// Removes the replica's data (RAM, disks, device state, commit, journal),
/// leaving its identity and hello: the replica starts afresh.
pub fn discard(dir: &Path) -> Result<(), ReplicaError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let data = n == RAM_FILE
            || n == COMMIT_RECORD_FILE
            || n == COMMIT_FILE
            || n == DEVICE_STATE_FILE
            || SLOT_FILES.contains(&n.as_str())
            || n.ends_with(".tmp")
            || (n.starts_with("disk-") && n.ends_with(".raw"));
        if data {
            std::fs::remove_file(e.path()).map_err(io("removing", &e.path()))?;
        }
    }
    let staging = dir.join(STAGING);
    if let Ok(entries) = std::fs::read_dir(&staging) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path()).map_err(io("removing", &e.path()))?;
        }
    }
    sync_dir(dir)
}

/// Bytes the replica of `ram_size` and `disks` in `dir` still has to
/// allocate (what its files have already is counted off); `None` if the
/// sum does not fit in 64 bits.
pub fn space_needed(dir: &Path, ram_size: u64, disks: &[HelloDisk]) -> Option<u64> {
    let missing = |name: &str, size: u64| {
        let have = std::fs::metadata(dir.join(name))
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0);
        size.saturating_sub(have)
    };
    disks
        .iter()
        .try_fold(missing(RAM_FILE, ram_size), |acc, d| {
            acc.checked_add(missing(&disk_file_name(&d.name), d.size))
        })
}

/// Bytes an unprivileged writer may still allocate on the filesystem of
/// `path`, or of its nearest existing ancestor (statvfs `f_bavail`).
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c =
        std::ffi::CString::new(existing.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // points to writable memory of the struct statvfs(3) fills.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the whole struct.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits wide on some targets.
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn no_space(op: &'static str, path: &Path) -> ReplicaError {
    ReplicaError::Io {
        op,
        path: path.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    }
}

/// The newer valid record of `commit-record`, if any.
fn read_records(f: &File, path: &Path) -> Result<Option<Record>, ReplicaError> {
    let mut buf = vec![0u8; (2 * RECORD_SLOT) as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading", path)(e)),
        }
    }
    let a = Record::decode(&buf[..RECORD_SLOT as usize]);
    let b = Record::decode(&buf[RECORD_SLOT as usize..]);
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
        (a, b) => a.or(b),
    })
}

/// Writes `rec` over the older record (the one `rec.seq` alternates to),
/// in place and durably: the newer one stays whole whatever happens to
/// this write.
fn write_record(f: &File, path: &Path, rec: &Record) -> Result<(), ReplicaError> {
    let at = (rec.seq % 2) * RECORD_SLOT;
    f.write_all_at(&rec.encode(), at)
        .map_err(io("writing", path))?;
    f.sync_data().map_err(io("syncing", path))
}

fn read_slot(dir: &Path, slots: &[File; 2], rec: &Record) -> Result<Vec<u8>, ReplicaError> {
    let path = dir.join(SLOT_FILES[rec.slot as usize]);
    let len = usize::try_from(rec.device_state_len)
        .map_err(|_| ReplicaError::Layout(format!("{}: too large", path.display())))?;
    let mut state = vec![0u8; len];
    slots[rec.slot as usize]
        .read_exact_at(&mut state, 0)
        .map_err(io("reading", &path))?;
    if crc32c::crc32c(&state) != rec.device_state_crc {
        return Err(ReplicaError::Layout(format!(
            "{}: the device state of epoch {} does not match its checksum",
            path.display(),
            rec.epoch
        )));
    }
    Ok(state)
}

fn read_layout_1_record(dir: &Path) -> Result<Option<CommitRecord>, ReplicaError> {
    let path = dir.join(COMMIT_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io("parsing", &path)(std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", &path)(e)),
    }
}

/// Turns a layout-1 commit (`committed.json`, `device-state`) into a
/// layout-2 one: the device state into slot 0, a commit record naming it.
/// The old files are removed by the caller once this is durable.
fn migrate_layout_1(
    dir: &Path,
    record_file: &File,
    slots: &[File; 2],
) -> Result<Option<Record>, ReplicaError> {
    let Some(old) = read_layout_1_record(dir)? else {
        return Ok(None);
    };
    let mut rec = Record {
        seq: 1,
        epoch: old.epoch,
        device_state_len: 0,
        device_state_crc: 0,
        slot: 0,
    };
    if old.device_state_len > 0 {
        let path = dir.join(DEVICE_STATE_FILE);
        match std::fs::read(&path) {
            Ok(state)
                if state.len() as u64 == old.device_state_len
                    && crc32c::crc32c(&state) == old.device_state_crc =>
            {
                let slot = dir.join(SLOT_FILES[0]);
                let size = (state.len() as u64).div_ceil(SLOT_STEP) * SLOT_STEP;
                slots[0].set_len(size).map_err(io("growing", &slot))?;
                reserve(&slots[0], size).map_err(io("reserving space for", &slot))?;
                slots[0]
                    .write_all_at(&state, 0)
                    .map_err(io("writing", &slot))?;
                slots[0].sync_data().map_err(io("syncing", &slot))?;
                rec.device_state_len = old.device_state_len;
                rec.device_state_crc = old.device_state_crc;
            }
            // Layout 1 renamed a temp file whose checksum it took from
            // memory: a torn one (audit H4) shows here. Nothing to resume.
            other => warn!(
                dir = %dir.display(),
                epoch = old.epoch,
                "the layout-1 device state does not match its commit record ({}): the replica is not resumable until the next epoch with device state",
                match other {
                    Ok(s) => format!("{} bytes", s.len()),
                    Err(e) => e.to_string(),
                }
            ),
        }
    }
    write_record(record_file, &dir.join(COMMIT_RECORD_FILE), &rec)?;
    info!(dir = %dir.display(), epoch = rec.epoch, "replica migrated to layout 2");
    Ok(Some(rec))
}

fn open_rw(path: &Path) -> Result<File, ReplicaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("opening", path))
}

/// Opens a RAM or disk replica of `size` bytes, allocated in full. With
/// `keep` (a replica with a commit) a file of another size is an error,
/// not something to resize: its contents belong to the commit.
fn open_sized(path: &Path, size: u64, keep: bool) -> Result<File, ReplicaError> {
    let f = open_rw(path)?;
    let len = f.metadata().map_err(io("stat", path))?.len();
    if len != size {
        if keep {
            return Err(ReplicaError::Layout(format!(
                "{} is {len} bytes, the committed replica's is {size}",
                path.display()
            )));
        }
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
    let len =
        libc::off_t::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate(2) on a descriptor we own; mode 0 only allocates
    // (the file already has this size, so its contents do not change).
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
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

    fn state(s: &ReplicaStore) -> Vec<u8> {
        s.read_device_state().unwrap().expect("resumable")
    }

    fn staged(dir: &Path) -> usize {
        std::fs::read_dir(dir.join(STAGING)).unwrap().count()
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
        assert_eq!(state(&s), b"state");
        let disk = std::fs::read(t.path().join(disk_file_name("data"))).unwrap();
        assert_eq!(disk[4096 * 2], 9);
        assert_eq!(disk[4096], 7);
        assert_eq!(
            read_commit_record(t.path()).unwrap(),
            s.commit_record(),
            "read without opening"
        );
    }

    #[test]
    fn device_states_alternate_between_the_two_slots() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        for n in 1..=5u64 {
            let ds = format!("state of epoch {n}").repeat(n as usize);
            s.apply(&epoch(n, n as u8, ds.as_bytes())).unwrap();
            assert_eq!(state(&s), ds.as_bytes());
        }
        drop(s);
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(state(&s), "state of epoch 5".repeat(5).as_bytes());
        assert_eq!(s.export_device_state().unwrap(), Some(5));
        assert_eq!(
            std::fs::read(s.device_state_path()).unwrap(),
            "state of epoch 5".repeat(5).as_bytes()
        );
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
        assert_eq!(state(&s), b"one");
        assert_eq!(staged(t.path()), 0);
        // And the next attempt, with space, succeeds.
        s.set_fail_point(FailPoint::None);
        s.apply(&epoch(2, 2, b"two")).unwrap();
        assert_eq!(s.committed_epoch(), Some(2));
    }

    /// Epoch 1 commits with a small device state; epoch 2's needs its
    /// (empty) slot to grow, and the disk is full.
    fn no_space_for_the_second_device_state(old_order: bool) -> (tempfile::TempDir, ReplicaError) {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        s.set_faults(StoreFaults {
            fail: FailPoint::NoSpaceForDeviceState,
            allocate_after_commit_point: old_order,
            ..StoreFaults::default()
        });
        let err = s.apply(&epoch(2, 2, b"two")).unwrap_err();
        (t, err)
    }

    #[test]
    fn a_full_disk_at_the_device_state_fails_before_the_commit_point() {
        let (t, err) = no_space_for_the_second_device_state(false);
        assert!(err.to_string().contains("No space left"), "{err}");
        // Exactly epoch 1, nothing staged, nothing to finish.
        assert_eq!(ram_byte(t.path(), 1), 1);
        assert_eq!(staged(t.path()), 0);
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(1));
        assert_eq!(state(&s), b"one");
        assert_eq!(ram_byte(t.path(), 1), 1);
    }

    /// The same with layout 1's order (device state allocated after the
    /// commit point): the failure comes after RAM was written in place, so
    /// the files hold epoch 2's RAM under epoch 1's commit.
    #[test]
    fn allocating_after_the_commit_point_tears_the_replica() {
        let (t, err) = no_space_for_the_second_device_state(true);
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(
            read_commit_record(t.path()).unwrap().map(|r| r.epoch),
            Some(1)
        );
        assert_eq!(
            ram_byte(t.path(), 1),
            2,
            "epoch 2's RAM under epoch 1's commit"
        );
        assert!(staged(t.path()) > 0, "a journal only an open can finish");
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
        assert_eq!(state(&s), b"two");
    }

    #[test]
    fn a_failed_apply_is_finished_before_the_next_one() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        s.set_fail_point(FailPoint::MidApply);
        assert!(s.apply(&epoch(2, 2, b"two")).is_err());
        assert!(s.needs_recovery());
        assert_eq!(ram_byte(t.path(), 5), 1, "the second page was not written");
        s.set_fail_point(FailPoint::None);
        // Epoch 2 is committed (its marker is durable): 3 follows it.
        s.apply(&epoch(3, 3, b"three")).unwrap();
        assert!(!s.needs_recovery());
        assert_eq!(s.committed_epoch(), Some(3));
        let disk = std::fs::read(t.path().join(disk_file_name("data"))).unwrap();
        assert_eq!(disk[4096 * 2], 2, "epoch 2's disk write was finished");
        assert_eq!(state(&s), b"three");
    }

    #[test]
    fn a_torn_commit_record_falls_back_to_the_previous_one() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        s.apply(&epoch(2, 2, b"two")).unwrap();
        s.apply(&epoch(3, 3, b"three")).unwrap();
        drop(s);
        // Power lost while epoch 3's record was written: its journal is
        // still there, its record (seq 3, block 1) torn.
        let j = t.path().join(STAGING);
        std::fs::write(
            j.join("epoch-3.journal"),
            encode_journal(&epoch(3, 3, b"three")),
        )
        .unwrap();
        std::fs::write(j.join("epoch-3.ready"), b"").unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(t.path().join(COMMIT_RECORD_FILE))
            .unwrap();
        f.write_all_at(&[0xff; 8], RECORD_SLOT + 20).unwrap();
        drop(f);
        let rec = read_commit_record(t.path()).unwrap().unwrap();
        assert_eq!(rec.epoch, 2, "the older record stands");
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(3), "and the journal finishes 3");
        assert_eq!(state(&s), b"three");
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
        assert_eq!(staged(t.path()), 0);
    }

    /// Writes a replica as layout 1 left it: `committed.json` and
    /// `device-state` beside RAM and disk.
    fn layout_1(dir: &Path, state: &[u8], record_crc: u32) {
        let mut s = ReplicaStore::open(dir, RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"")).unwrap();
        drop(s);
        for f in [COMMIT_RECORD_FILE, SLOT_FILES[0], SLOT_FILES[1]] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        std::fs::write(dir.join(DEVICE_STATE_FILE), state).unwrap();
        let rec = CommitRecord {
            epoch: 7,
            device_state_len: state.len() as u64,
            device_state_crc: record_crc,
        };
        std::fs::write(dir.join(COMMIT_FILE), serde_json::to_vec(&rec).unwrap()).unwrap();
    }

    #[test]
    fn a_layout_1_replica_is_migrated_on_open() {
        let t = tempfile::tempdir().unwrap();
        layout_1(t.path(), b"old state", crc32c::crc32c(b"old state"));
        assert_eq!(
            read_commit_record(t.path()).unwrap().map(|r| r.epoch),
            Some(7)
        );
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(7));
        assert_eq!(state(&s), b"old state");
        assert_eq!(ram_byte(t.path(), 1), 1);
        for gone in [COMMIT_FILE, DEVICE_STATE_FILE] {
            assert!(!t.path().join(gone).exists(), "{gone} left behind");
        }
        // It carries on in layout 2.
        s.apply(&epoch(8, 8, b"new state")).unwrap();
        drop(s);
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(8));
        assert_eq!(state(&s), b"new state");
    }

    #[test]
    fn a_layout_1_device_state_that_does_not_match_its_record_is_not_resumable() {
        let t = tempfile::tempdir().unwrap();
        layout_1(t.path(), b"torn\0\0\0\0\0", crc32c::crc32c(b"old state"));
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(7));
        assert!(!s.is_consistent());
    }

    #[test]
    fn a_layout_1_journal_is_finished_after_migrating() {
        let t = tempfile::tempdir().unwrap();
        layout_1(t.path(), b"old state", crc32c::crc32c(b"old state"));
        let j = t.path().join(STAGING);
        std::fs::write(
            j.join("epoch-8.journal"),
            encode_journal(&epoch(8, 8, b"eight")),
        )
        .unwrap();
        std::fs::write(j.join("epoch-8.ready"), b"").unwrap();
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), Some(8));
        assert_eq!(state(&s), b"eight");
        assert_eq!(ram_byte(t.path(), 5), 8);
    }

    #[test]
    fn a_committed_replica_is_never_resized() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        drop(s);
        let err = ReplicaStore::open(t.path(), 2 * RAM, &disks())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("committed replica"), "{err}");
        assert_eq!(
            std::fs::metadata(t.path().join(RAM_FILE)).unwrap().len(),
            RAM
        );
        let mismatch = layout_mismatch(t.path(), 2 * RAM, &disks()).unwrap();
        assert!(mismatch.unwrap().contains("RAM"));
        assert_eq!(layout_mismatch(t.path(), RAM, &disks()).unwrap(), None);
        let other = [HelloDisk {
            name: "other".into(),
            size: 1 << 20,
        }];
        let why = layout_mismatch(t.path(), RAM, &other).unwrap().unwrap();
        assert!(
            why.contains("`other` is new") && why.contains("`data` is gone"),
            "{why}"
        );
    }

    #[test]
    fn discard_leaves_an_empty_replica() {
        let t = tempfile::tempdir().unwrap();
        let mut s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        s.apply(&epoch(1, 1, b"one")).unwrap();
        drop(s);
        std::fs::write(t.path().join("identity.json"), b"{}").unwrap();
        discard(t.path()).unwrap();
        assert_eq!(read_commit_record(t.path()).unwrap(), None);
        assert!(t.path().join("identity.json").exists());
        let s = ReplicaStore::open(t.path(), 2 * RAM, &disks()).unwrap();
        assert_eq!(s.committed_epoch(), None);
    }

    #[test]
    fn disk_names_must_be_file_names() {
        let t = tempfile::tempdir().unwrap();
        for bad in ["", "../escape", "a/b", ".hidden", "x y"] {
            let d = [HelloDisk {
                name: bad.into(),
                size: 4096,
            }];
            let err = ReplicaStore::open(t.path(), RAM, &d).err().expect(bad);
            assert!(err.to_string().contains("not a valid disk name"), "{err}");
        }
        let twice = [disks(), disks()].concat();
        let err = ReplicaStore::open(t.path(), RAM, &twice).err().unwrap();
        assert!(err.to_string().contains("named twice"), "{err}");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    #[test]
    fn space_needed_counts_what_is_not_allocated_yet() {
        let t = tempfile::tempdir().unwrap();
        let want = RAM + (1 << 20);
        assert_eq!(space_needed(t.path(), RAM, &disks()), Some(want));
        let s = ReplicaStore::open(t.path(), RAM, &disks()).unwrap();
        drop(s);
        // Allocated now (where the filesystem preallocates).
        assert!(space_needed(t.path(), RAM, &disks()).unwrap() < want);
        let huge = [
            HelloDisk {
                name: "a".into(),
                size: u64::MAX,
            },
            HelloDisk {
                name: "b".into(),
                size: u64::MAX,
            },
        ];
        assert_eq!(space_needed(t.path(), RAM, &huge), None);
        assert!(free_space(&t.path().join("not/yet")).unwrap() > 0);
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

    #[test]
    fn commit_records_reject_any_damage() {
        let r = Record {
            seq: 9,
            epoch: 4,
            device_state_len: 3,
            device_state_crc: 77,
            slot: 1,
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b), Some(r));
        for i in 0..RECORD_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            assert_eq!(Record::decode(&bad), None, "byte {i}");
        }
        assert_eq!(Record::decode(&[0u8; RECORD_LEN]), None);
    }
}
