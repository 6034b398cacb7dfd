//! The soft-dirty tracker: the kernel's per-PTE soft-dirty bit for QEMU's
//! mapping of the RAM file (`CONFIG_MEM_SOFT_DIRTY`).
//!
//! Per epoch, with the guest stopped: read `/proc/PID/maps` for the areas
//! that map the RAM file, read their `/proc/PID/pagemap` entries, decide,
//! then write `4` to `/proc/PID/clear_refs` so the next write to any page
//! faults and sets the bit again.
//!
//! The bit lives in the page table entry, and an entry can be torn down
//! and rebuilt between two collects (QEMU punching a discarded page out of
//! the file, THP collapse, swap), which loses the bit. So ([`Decider`]):
//!
//! - a page QEMU has no entry for is decided by content: a hole in the file
//!   reads as zero; a page with data is hashed and compared with its hash
//!   from the last time it was decided by content (a page reported through
//!   its bit invalidates that hash, so a stale hash never vouches for it);
//! - a page whose entry now points at another page frame than at the last
//!   collect is dirty, bit or no bit: its entry was rebuilt over new memory;
//! - a punch (QEMU discarding pages: balloon, virtio-mem) can be faulted
//!   straight back in by a read, over a fresh zero page that may well reuse
//!   the old frame (seen in the guest check). So in an epoch that may have
//!   seen a punch, every mapped page without its bit that reads as all
//!   zeroes is reported unless the replica already holds zeroes there (a
//!   zero test stops at the first non-zero 256-byte block). That is a pass
//!   over all mapped RAM, so which epochs count matters ([`PunchWatch`]):
//!   an inotify `IN_MODIFY` watch on the file reports `fallocate` punches,
//!   `MADV_REMOVE` and truncation, and not mapped writes. Only a file with
//!   no path (a memfd, whose events the kernel suppresses) falls back to
//!   the file's ctime, which every write fault on a shared mapping also
//!   moves: there, nearly every epoch pays the pass.
//!
//! What remains unseen is an entry dropped and rebuilt over the *same*
//! frame after a write within one epoch. That needs the page to survive
//! unmapped: in the swap cache (so the tracker refuses to run while swap is
//! configured) or an explicit `MADV_DONTNEED` of shared guest RAM without a
//! punch (QEMU always punches shared RAM it discards). Frame numbers need
//! `CAP_SYS_ADMIN`; without it the tracker refuses to run.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::stat::{major, minor};
use nix::sys::sysinfo::sysinfo;

use crate::procfs::{mappings_of, pagemap_entries};
use crate::{DirtyTracker, PageSet, RamView, TrackError, PAGE_SIZE};

/// Why this host cannot track dirty pages by soft-dirty bits.
#[derive(Debug, thiserror::Error)]
pub enum SoftDirtyUnsupported {
    #[error("mmap: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("/proc/self/pagemap: {0}")]
    Pagemap(#[source] std::io::Error),
    #[error("no /proc/self/clear_refs")]
    NoClearRefs,
    #[error("a written page shows no soft-dirty bit (kernel built without CONFIG_MEM_SOFT_DIRTY)")]
    NoSoftDirtyBit,
    #[error("pagemap hides page frame numbers (needs CAP_SYS_ADMIN)")]
    HiddenFrames,
    #[error("sysinfo: {0}")]
    Sysinfo(#[source] std::io::Error),
    #[error("swap is configured (a swapped page can lose its soft-dirty bit)")]
    Swap,
}

/// Whether this kernel keeps soft-dirty bits: a page this process just
/// wrote must show bit 55 in its own pagemap. `Err` says why not.
pub fn soft_dirty_support() -> Result<(), SoftDirtyUnsupported> {
    let len = NonZeroUsize::new(PAGE_SIZE).expect("a page is not empty");
    // SAFETY: a fresh private anonymous page at an address the kernel
    // picks, so it overlaps nothing; unmapped below; no other code sees it.
    let page = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    }
    .map_err(|e| SoftDirtyUnsupported::Mmap(e.into()))?;
    // SAFETY: the page is ours, writable and PAGE_SIZE long.
    unsafe { std::ptr::write_volatile(page.as_ptr().cast::<u8>(), 1) };
    let entry = File::open("/proc/self/pagemap").and_then(|f| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, (page.as_ptr() as u64 / PAGE_SIZE as u64) * 8)?;
        Ok(u64::from_ne_bytes(b))
    });
    // SAFETY: unmapping the page mapped above, used no more.
    let _ = unsafe { munmap(page, PAGE_SIZE) };
    let entry = entry.map_err(SoftDirtyUnsupported::Pagemap)?;
    if !std::path::Path::new("/proc/self/clear_refs").exists() {
        return Err(SoftDirtyUnsupported::NoClearRefs);
    }
    if entry & (1 << 55) == 0 {
        return Err(SoftDirtyUnsupported::NoSoftDirtyBit);
    }
    if entry & ((1 << 55) - 1) == 0 {
        return Err(SoftDirtyUnsupported::HiddenFrames);
    }
    swap_free()
}

/// A page in the swap cache can lose its entry and get it back over the
/// same frame, losing the soft-dirty bit unseen; refuse while swap exists.
fn swap_free() -> Result<(), SoftDirtyUnsupported> {
    let si = sysinfo().map_err(|e| SoftDirtyUnsupported::Sysinfo(e.into()))?;
    if si.swap_total() != 0 {
        return Err(SoftDirtyUnsupported::Swap);
    }
    Ok(())
}

/// What the page tables of the process say about each page of the file.
#[derive(Clone, Debug)]
pub struct PteBits {
    /// The process has a page table entry for the page.
    pub present: PageSet,
    /// The entry's soft-dirty bit is set.
    pub soft_dirty: PageSet,
    /// The page frame each present entry points at (0: no entry).
    pub pfn: Vec<u64>,
}

/// The pure half of the tracker: given the page table bits and the RAM,
/// which pages changed. Kept apart from `/proc` so it can be tested on any
/// kernel.
pub struct Decider {
    hashes: Vec<u64>,
    /// Pages whose `hashes` entry matches the content last reported.
    hash_valid: PageSet,
    /// Frame of each page's entry at the last collect (0: none).
    last_pfn: Vec<u64>,
    /// Pages whose content, as last reported, is all zeroes.
    zero: PageSet,
    all_dirty: bool,
    external: BTreeSet<u64>,
}

impl Decider {
    pub fn new(pages: usize) -> Self {
        Decider {
            hashes: vec![0; pages],
            hash_valid: PageSet::new(pages),
            last_pfn: vec![0; pages],
            zero: PageSet::new(pages),
            all_dirty: true,
            external: BTreeSet::new(),
        }
    }

    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    pub fn note_external_writes(&mut self, pages: &mut dyn Iterator<Item = u64>) {
        self.external.extend(pages);
    }

    /// Dirty pages, ascending. Returns also how many were decided by
    /// content (hashed), for the tracker's statistics.
    ///
    /// `punched`: the file may have had pages punched out since the last
    /// collect ([`PunchWatch`]).
    pub fn decide(&mut self, ram: RamView<'_>, bits: &PteBits, punched: bool) -> (Vec<u64>, usize) {
        let pages = self.hashes.len().min(ram.bytes.len() / PAGE_SIZE);
        let all = std::mem::take(&mut self.all_dirty);
        let external = std::mem::take(&mut self.external);
        let mut dirty = Vec::new();
        let mut hashed = 0;
        for p in 0..pages {
            let by_content = !bits.present.contains(p);
            let pfn = if by_content {
                0
            } else {
                bits.pfn.get(p).copied().unwrap_or(0)
            };
            let last_pfn = std::mem::replace(&mut self.last_pfn[p], pfn);
            let changed = if by_content {
                hashed += 1;
                let h = ram.page_hash(p);
                let same = self.hash_valid.contains(p) && self.hashes[p] == h;
                self.hashes[p] = h;
                self.hash_valid.insert(p);
                !same
            } else if bits.soft_dirty.contains(p) {
                true
            } else if punched && !self.zero.contains(p) && ram.is_zero_page(p) {
                // Possibly punched and faulted back in by a read.
                true
            } else if last_pfn == 0 && self.hash_valid.contains(p) {
                // Newly mapped without a write (a read fault): its content
                // was known when it was last decided by content.
                hashed += 1;
                ram.page_hash(p) != self.hashes[p]
            } else {
                // An entry over a different frame than last time was
                // rebuilt over new memory; its bit says nothing.
                last_pfn != pfn
            };
            if !by_content {
                // Decided by the bit from now on; the stored hash no longer
                // says anything about the page's content.
                self.hash_valid.remove(p);
            }
            if all || changed || external.contains(&(p as u64)) {
                dirty.push(p as u64);
                if ram.is_zero_page(p) {
                    self.zero.insert(p);
                } else {
                    self.zero.remove(p);
                }
            }
        }
        (dirty, hashed)
    }
}

/// Soft-dirty tracking of one QEMU process's mapping of the RAM file.
pub struct SoftDirtyTracker {
    pid: u32,
    dev: (u32, u32),
    inode: u64,
    pages: usize,
    pagemap: File,
    clear_refs: File,
    decider: Decider,
    punches: PunchWatch,
    ram_file: File,
    /// Pages decided by content in the last collect.
    pub last_hashed: usize,
    /// Where the last collect's time went.
    pub last_timing: CollectTiming,
}

/// The parts of one soft-dirty collect.
#[derive(Clone, Copy, Debug, Default)]
pub struct CollectTiming {
    /// `/proc/PID/maps` and the pagemap entries of the RAM file.
    pub read_bits: std::time::Duration,
    /// The pure decision ([`Decider::decide`]).
    pub decide: std::time::Duration,
    /// `clear_refs`: clearing the bits (and write-protecting every entry).
    pub clear: std::time::Duration,
}

/// How the tracker learns that pages may have been punched out of the RAM
/// file since the last collect.
pub enum PunchWatch {
    /// An inotify `IN_MODIFY` watch on the file's path: `fallocate` (punch,
    /// `MADV_REMOVE`), `truncate` and `write` report; mapped writes do not.
    Inotify(Inotify),
    /// The file's ctime at the last collect. Also moved by every write
    /// fault on a shared mapping of the file, so it over-reports.
    Ctime(CtimeWatch),
}

/// The ctime fallback's state. The kernel stamps ctime from a coarse
/// clock (a jiffy, 4–10 ms; kernels before 6.13 without multigrain
/// stamps on tmpfs), so a punch in the same tick as the change the last
/// read saw leaves the ctime as it was. When the last read's ctime was
/// that recent, the next call answers "maybe" whatever it reads. (Seen in
/// the guest check: one punched-and-read-back page missed in 40 epochs.)
pub struct CtimeWatch {
    last: (i64, i64),
    /// The ctime read last was within a tick of the time it was read.
    recent: bool,
}

/// Longer than any kernel's ctime tick.
const CTIME_TICK: std::time::Duration = std::time::Duration::from_millis(50);

impl CtimeWatch {
    fn read(file: &File) -> Result<CtimeWatch, TrackError> {
        let last = ctime_of(file)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ctime =
            std::time::Duration::new(last.0.max(0) as u64, last.1.clamp(0, 999_999_999) as u32);
        Ok(CtimeWatch {
            last,
            recent: now.saturating_sub(ctime) < CTIME_TICK,
        })
    }
}

impl PunchWatch {
    /// An inotify watch where the file has a path that still names it,
    /// the ctime otherwise.
    pub fn new(file: &File) -> PunchWatch {
        match inotify_watch(file) {
            Some(watch) => PunchWatch::Inotify(watch),
            None => PunchWatch::Ctime(CtimeWatch::read(file).unwrap_or(CtimeWatch {
                last: (0, 0),
                recent: true,
            })),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PunchWatch::Inotify(_) => "inotify",
            PunchWatch::Ctime(_) => "ctime",
        }
    }

    /// Whether the file may have lost pages since the last call.
    pub(crate) fn since_last(&mut self, file: &File) -> Result<bool, TrackError> {
        match self {
            PunchWatch::Ctime(watch) => {
                let now = CtimeWatch::read(file)?;
                let before = std::mem::replace(watch, now);
                Ok(before.recent || before.last != watch.last)
            }
            PunchWatch::Inotify(watch) => {
                let (any, watch_gone) = drain_inotify(watch)?;
                if watch_gone {
                    // The filesystem was unmounted under the watch: no
                    // more events will come; from now on, the ctime.
                    *self = PunchWatch::Ctime(CtimeWatch::read(file)?);
                    return Ok(true);
                }
                Ok(any)
            }
        }
    }
}

fn ctime_of(file: &File) -> Result<(i64, i64), TrackError> {
    let meta = file.metadata().map_err(TrackError::io("RAM file"))?;
    Ok((meta.ctime(), meta.ctime_nsec()))
}

/// Watches the file through the path `/proc/self/fd` gives for it, if that
/// path names the same inode (not a memfd, not unlinked).
fn inotify_watch(file: &File) -> Option<Inotify> {
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let meta = file.metadata().ok()?;
    let named = std::fs::metadata(&path).ok()?;
    if !path.is_absolute() || named.dev() != meta.dev() || named.ino() != meta.ino() {
        return None;
    }
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    watch.add_watch(&path, AddWatchFlags::IN_MODIFY).ok()?;
    Some(watch)
}

/// Reads every queued event: whether there were any, and whether the
/// watch is gone (`IN_IGNORED`) or events were lost (`IN_Q_OVERFLOW`,
/// reported as "any").
fn drain_inotify(watch: &Inotify) -> Result<(bool, bool), TrackError> {
    let mut buf = [0u8; 4096];
    let (mut any, mut gone) = (false, false);
    // Bounded: the queue holds at most a few thousand events.
    for _ in 0..4096 {
        // Read raw (not `read_events`) so that `inotify_masks`, which the
        // tests check against torn buffers, is what walks the events.
        let n = match nix::unistd::read(watch.as_fd().as_raw_fd(), &mut buf) {
            Ok(n) => n,
            Err(Errno::EAGAIN) => return Ok((any, gone)),
            Err(e) => {
                return Err(TrackError::Io {
                    what: "reading the RAM file's inotify watch".into(),
                    source: e.into(),
                })
            }
        };
        if n == 0 {
            break;
        }
        any = true;
        let ignored = AddWatchFlags::IN_IGNORED.bits();
        gone |= inotify_masks(&buf[..n]).any(|m| m & ignored != 0);
    }
    Ok((any, gone))
}

/// The event masks in a buffer of `struct inotify_event`s (wd, mask,
/// cookie, len, then `len` bytes of name). A truncated tail ends the walk.
pub fn inotify_masks(buf: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let head = buf.get(at..at.checked_add(16)?)?;
        let mask = u32::from_ne_bytes([head[4], head[5], head[6], head[7]]);
        let len = u32::from_ne_bytes([head[12], head[13], head[14], head[15]]) as usize;
        at = at.checked_add(16)?.checked_add(len)?;
        Some(mask)
    })
}

impl SoftDirtyTracker {
    /// Tracks `pid`'s shared mapping of `ram_file` (`pages` pages). Fails
    /// if the kernel has no soft-dirty bits or the process maps no part of
    /// the file.
    pub fn new(pid: u32, ram_file: &File, pages: usize) -> Result<Self, TrackError> {
        soft_dirty_support().map_err(TrackError::Unsupported)?;
        let meta = ram_file.metadata().map_err(TrackError::io("RAM file"))?;
        let dev = meta.dev();
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(TrackError::io(format!("/proc/{pid}/pagemap")))?;
        let clear_refs = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/clear_refs"))
            .map_err(TrackError::io(format!("/proc/{pid}/clear_refs")))?;
        let t = SoftDirtyTracker {
            pid,
            dev: (major(dev) as u32, minor(dev) as u32),
            inode: meta.ino(),
            pages,
            pagemap,
            clear_refs,
            decider: Decider::new(pages),
            punches: PunchWatch::new(ram_file),
            ram_file: ram_file.try_clone().map_err(TrackError::io("RAM file"))?,
            last_hashed: 0,
            last_timing: CollectTiming::default(),
        };
        t.read_bits()?;
        Ok(t)
    }

    /// How punches are noticed: `inotify` or `ctime` (see [`PunchWatch`]).
    pub fn punch_detection(&self) -> &'static str {
        self.punches.kind()
    }

    /// The page table bits of the process for every page of the file.
    pub fn read_bits(&self) -> Result<PteBits, TrackError> {
        let pid = self.pid;
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(TrackError::io(format!("/proc/{pid}/maps")))?;
        let areas = mappings_of(&maps, self.dev.0, self.dev.1, self.inode);
        if areas.is_empty() {
            return Err(TrackError::NotMapped {
                pid,
                dev: format!("{:x}:{:x}", self.dev.0, self.dev.1),
                inode: self.inode,
            });
        }
        swap_free().map_err(TrackError::Unsupported)?;
        let mut bits = PteBits {
            present: PageSet::new(self.pages),
            soft_dirty: PageSet::new(self.pages),
            pfn: vec![0; self.pages],
        };
        let mut buf = Vec::new();
        for a in areas {
            let first = (a.offset / PAGE_SIZE as u64) as usize;
            if first >= self.pages {
                continue;
            }
            let n = (((a.end - a.start) / PAGE_SIZE as u64) as usize).min(self.pages - first);
            buf.resize(n * 8, 0);
            self.pagemap
                .read_exact_at(&mut buf, (a.start / PAGE_SIZE as u64) * 8)
                .map_err(TrackError::io(format!("/proc/{pid}/pagemap")))?;
            for (i, e) in pagemap_entries(&buf).enumerate() {
                if e.present() {
                    bits.present.insert(first + i);
                    bits.pfn[first + i] = e.pfn();
                    if e.soft_dirty() {
                        bits.soft_dirty.insert(first + i);
                    }
                }
            }
        }
        Ok(bits)
    }

    /// Clears the soft-dirty bits of every page of the process.
    fn clear(&mut self) -> Result<(), TrackError> {
        self.clear_refs
            .write_all(b"4")
            .map_err(TrackError::io(format!("/proc/{}/clear_refs", self.pid)))
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn name(&self) -> &'static str {
        "soft-dirty"
    }

    fn collect(&mut self, ram: RamView<'_>) -> Result<Vec<u64>, TrackError> {
        // Before the bits: a punch after this point either shows in them
        // (no entry) or is seen at the next collect.
        let punched = self.punches.since_last(&self.ram_file)?;
        let t0 = std::time::Instant::now();
        let bits = self.read_bits()?;
        let t1 = std::time::Instant::now();
        let (dirty, hashed) = self.decider.decide(ram, &bits, punched);
        let t2 = std::time::Instant::now();
        self.last_hashed = hashed;
        self.clear()?;
        self.last_timing = CollectTiming {
            read_bits: t1 - t0,
            decide: t2 - t1,
            clear: t2.elapsed(),
        };
        Ok(dirty)
    }

    fn mark_all_dirty(&mut self) {
        self.decider.mark_all_dirty();
    }

    fn note_external_writes(&mut self, pages: &mut dyn Iterator<Item = u64>) {
        self.decider.note_external_writes(pages);
    }

    fn tracks_moments(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FallocateFlags;
    use nix::sys::mman::{madvise, mmap, MmapAdvise};
    use proptest::prelude::*;

    /// What can happen to a page between two collects.
    #[derive(Clone, Debug)]
    enum Op {
        /// Write through the tracked mapping: entry present, bit set.
        Write(usize, u8),
        /// Write, then the page moves to a new frame and loses its entry
        /// (THP collapse, migration gone wrong): no bit.
        WriteAndMove(usize, u8),
        /// Touch without writing: entry present (re-created if it was
        /// gone, over the page's current frame), no bit.
        Read(usize),
        /// Punch the page out of the file: reads zero, no entry; a later
        /// fault may get the same frame back.
        Punch(usize),
        /// Written by someone else (the switch), reported explicitly.
        External(usize, u8),
    }

    const PAGES: usize = 24;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..PAGES, 1u8..).prop_map(|(p, v)| Op::Write(p, v)),
            (0..PAGES, 1u8..).prop_map(|(p, v)| Op::WriteAndMove(p, v)),
            (0..PAGES).prop_map(Op::Read),
            (0..PAGES).prop_map(Op::Punch),
            (0..PAGES, 1u8..).prop_map(|(p, v)| Op::External(p, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The replica, updated with only the pages reported dirty, equals
        /// the RAM after every epoch, whatever the page tables went through.
        #[test]
        fn the_replica_never_misses_a_change(epochs in proptest::collection::vec(proptest::collection::vec(op(), 0..12), 1..8)) {
            let mut ram = vec![0u8; PAGES * PAGE_SIZE];
            let mut data = PageSet::new(PAGES);
            let mut present = PageSet::new(PAGES);
            let mut replica = vec![0xAAu8; PAGES * PAGE_SIZE];
            let mut d = Decider::new(PAGES);
            let mut frame: Vec<u64> = (1..=PAGES as u64).collect();
            let mut next_frame = PAGES as u64 + 1;
            // Bits survive across epochs only until a collect clears them.
            for ops in std::iter::once(Vec::new()).chain(epochs) {
                let mut sd = PageSet::new(PAGES);
                let mut external = Vec::new();
                let mut punched = false;
                for op in ops {
                    match op {
                        Op::Write(p, v) => { ram[p * PAGE_SIZE + v as usize] = v; data.insert(p); present.insert(p); sd.insert(p); }
                        Op::WriteAndMove(p, v) => {
                            ram[p * PAGE_SIZE + v as usize] = v; data.insert(p); present.remove(p); sd.remove(p);
                            frame[p] = next_frame; next_frame += 1;
                        }
                        Op::Read(p) => { data.insert(p); present.insert(p); }
                        Op::Punch(p) => {
                            // The fresh page may reuse the old frame.
                            ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(0); data.remove(p); present.remove(p); sd.remove(p);
                            punched = true;
                        }
                        Op::External(p, v) => { ram[p * PAGE_SIZE + 7] = v; data.insert(p); external.push(p as u64); }
                    }
                }
                d.note_external_writes(&mut external.into_iter());
                let pfn = (0..PAGES).map(|p| if present.contains(p) { frame[p] } else { 0 }).collect();
                let bits = PteBits { present: present.clone(), soft_dirty: sd, pfn };
                let (dirty, _) = d.decide(RamView { bytes: &ram, data: Some(&data) }, &bits, punched);
                for p in dirty {
                    let r = p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE;
                    replica[r.clone()].copy_from_slice(&ram[r]);
                }
                prop_assert!(replica == ram);
            }
        }
    }

    #[test]
    fn a_punch_faulted_back_over_the_same_frame_is_reported() {
        let mut ram = vec![0u8; 4 * PAGE_SIZE];
        ram[PAGE_SIZE + 9] = 5;
        let mut d = Decider::new(4);
        let bits = PteBits {
            present: PageSet::full(4),
            soft_dirty: PageSet::new(4),
            pfn: vec![1, 2, 3, 4],
        };
        d.decide(RamView::dense(&ram), &bits, false);
        // Page 1 is punched and read back in: zero, same frame, no bit.
        ram[PAGE_SIZE + 9] = 0;
        assert!(
            d.decide(RamView::dense(&ram), &bits.clone(), false)
                .0
                .is_empty(),
            "unseen without the ctime"
        );
        ram[PAGE_SIZE + 9] = 5;
        let mut d = Decider::new(4);
        d.decide(RamView::dense(&ram), &bits, false);
        ram[PAGE_SIZE + 9] = 0;
        // Pages 0, 2 and 3 were zero all along: the replica has that.
        assert_eq!(d.decide(RamView::dense(&ram), &bits, true).0, [1]);
    }

    #[test]
    fn clean_present_pages_are_not_read() {
        let ram = vec![1u8; 8 * PAGE_SIZE];
        let mut d = Decider::new(8);
        let bits = PteBits {
            present: PageSet::full(8),
            soft_dirty: PageSet::new(8),
            pfn: (1..=8).collect(),
        };
        assert_eq!(
            d.decide(RamView::dense(&ram), &bits, false).0.len(),
            8,
            "first collect reports all"
        );
        let (dirty, hashed) = d.decide(RamView::dense(&ram), &bits, false);
        assert!(dirty.is_empty());
        assert_eq!(hashed, 0);
    }

    #[test]
    fn the_probe_agrees_with_the_kernel_config() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let config = std::process::Command::new("zcat")
            .arg("/proc/config.gz")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .or_else(|| std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok());
        let Some(config) = config else {
            eprintln!("no kernel config to compare with; skipped");
            return;
        };
        let probe = soft_dirty_support();
        if config.contains("# CONFIG_MEM_SOFT_DIRTY is not set")
            || !config.contains("CONFIG_MEM_SOFT_DIRTY")
        {
            let why = probe.expect_err("soft-dirty reported on a kernel built without it");
            assert!(why.to_string().contains("CONFIG_MEM_SOFT_DIRTY"), "{why}");
        } else if swap_free().is_ok() && nix::unistd::geteuid().is_root() {
            probe.expect("kernel has soft-dirty, we are root and swap is off");
        }
    }

    fn event(mask: u32, name: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&1i32.to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&0u32.to_ne_bytes());
        e.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        e.extend_from_slice(name);
        e
    }

    #[test]
    fn inotify_events_are_walked_by_their_lengths() {
        let (modify, ignored) = (
            AddWatchFlags::IN_MODIFY.bits(),
            AddWatchFlags::IN_IGNORED.bits(),
        );
        let mut buf = event(modify, b"");
        buf.extend(event(ignored, b"name\0\0\0\0"));
        buf.extend(event(modify, b""));
        let masks: Vec<u32> = inotify_masks(&buf).collect();
        assert_eq!(masks, [modify, ignored, modify]);
        // A torn tail is not read.
        assert_eq!(inotify_masks(&buf[..buf.len() - 3]).count(), 2);
    }

    proptest! {
        #[test]
        fn inotify_walk_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(inotify_masks(&buf).count() <= buf.len() / 16);
        }
    }

    /// A writable, mappable file on tmpfs (as tandemd's RAM files are).
    fn tmpfs_file(pages: usize) -> (std::path::PathBuf, File) {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/tandem-punchwatch-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len((pages * PAGE_SIZE) as u64).unwrap();
        (path, f)
    }

    fn punch(f: &File, page: usize) {
        // Punches one page of a file this test owns.
        let r = nix::fcntl::fallocate(
            f.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (page * PAGE_SIZE) as i64,
            PAGE_SIZE as i64,
        );
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn mapped_writes_are_not_punches_but_punches_are() {
        let (path, f) = tmpfs_file(4);
        let mut w = PunchWatch::new(&f);
        assert_eq!(w.kind(), "inotify");
        // SAFETY: a shared mapping of the 4 pages of our own file, at an
        // address the kernel picks; unmapped below before the file goes.
        let map = unsafe {
            mmap(
                None,
                NonZeroUsize::new(4 * PAGE_SIZE).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &f,
                0,
            )
        }
        .expect("mmap");
        let before = ctime_of(&f).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        for p in 0..4 {
            // SAFETY: inside the mapping.
            unsafe {
                std::ptr::write_volatile(map.as_ptr().cast::<u8>().add(p * PAGE_SIZE + 5), 9)
            };
        }
        assert!(
            !w.since_last(&f).unwrap(),
            "mapped writes counted as a punch"
        );
        // The reason for the watch: the same writes moved the ctime.
        assert_ne!(ctime_of(&f).unwrap(), before);
        punch(&f, 2);
        assert!(w.since_last(&f).unwrap());
        assert!(!w.since_last(&f).unwrap(), "one punch, reported once");
        // MADV_REMOVE is a punch too.
        // SAFETY: one page of our own mapping; its data goes, as intended.
        let r = unsafe { madvise(map.byte_add(PAGE_SIZE), PAGE_SIZE, MmapAdvise::MADV_REMOVE) };
        assert_eq!(r, Ok(()));
        assert!(w.since_last(&f).unwrap());
        // SAFETY: the mapping made above, used no more.
        unsafe { munmap(map, 4 * PAGE_SIZE) }.expect("munmap");
        // The watch is on the inode: unlinking the path loses nothing.
        std::fs::remove_file(&path).unwrap();
        let _ = w.since_last(&f).unwrap();
        punch(&f, 3);
        assert!(w.since_last(&f).unwrap());
        assert_eq!(w.kind(), "inotify");
    }

    #[test]
    fn a_file_without_a_path_falls_back_to_the_ctime() {
        let fd = nix::sys::memfd::memfd_create(
            c"tandem-punchwatch",
            nix::sys::memfd::MemFdCreateFlag::empty(),
        )
        .expect("memfd_create");
        let f = File::from(fd);
        f.set_len((2 * PAGE_SIZE) as u64).unwrap();
        let mut w = PunchWatch::new(&f);
        assert_eq!(w.kind(), "ctime");
        // The file changed (set_len) just now: a punch in the same clock
        // tick could not be told apart, so the answer is "maybe" until
        // a read sees a ctime older than a tick.
        assert!(w.since_last(&f).unwrap());
        std::thread::sleep(CTIME_TICK);
        let _ = w.since_last(&f).unwrap();
        assert!(!w.since_last(&f).unwrap(), "quiet and old: no punch");
        punch(&f, 1);
        assert!(w.since_last(&f).unwrap());
        // Right after, the punch's own tick is still open: "maybe" once
        // more, even though the ctime has not moved since.
        assert!(w.since_last(&f).unwrap());
    }
}
