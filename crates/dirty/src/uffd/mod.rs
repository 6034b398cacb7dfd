//! The `uffd` tracker: userfaultfd asynchronous write-protect over QEMU's
//! mapping of the RAM file, read and re-armed with `PAGEMAP_SCAN`.
//!
//! QEMU registers its own mapping (a userfaultfd registration belongs to
//! the process that maps the memory): the preload library
//! `tandem-uffd-preload`, loaded into QEMU by the VM's shim, does it when
//! tandemd asks over the VM's socket, after a probe in QEMU's own context
//! (seccomp filter, user, kernel), and hands back the userfaultfd and
//! QEMU's own `/proc/self/pagemap` ([`request_registration`]). With
//! `UFFD_FEATURE_WP_ASYNC` the kernel resolves every write fault on a
//! write-protected page by itself and remembers the page as written; one
//! `PAGEMAP_SCAN` per epoch (with the guest stopped) lists the written
//! pages of the mapping and write-protects them again, per page table
//! entry, atomically. The cost is a walk of QEMU's page tables for the
//! mapping, not a read of RAM.
//!
//! What the page tables cannot tell ([`Decider`]):
//!
//! - The written state lives in the page table entry. An entry torn down
//!   after a write loses it: a punch (`fallocate(PUNCH_HOLE)`,
//!   `MADV_REMOVE`: QEMU discarding RAM) leaves no entry or a
//!   write-protect marker, and a read faults the page back in as a clean
//!   zero page. The content did change (to zeroes), so in an epoch that
//!   may have seen a punch (the same inotify watch as soft-dirty's,
//!   [`PunchWatch`]) every page that reads as zeroes is reported unless the
//!   replica already holds zeroes there.
//! - A shmem page swapped out after a write loses its entry the same way
//!   (and comes back with its data): so the tracker refuses to run while
//!   swap is configured, checked every epoch.
//! - Writes through another process's mapping (the switch's) are not in
//!   QEMU's page tables: they come in through
//!   [`DirtyTracker::note_external_writes`], as for soft-dirty.

pub mod sys;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::stat::{major, minor};

use crate::softdirty::PunchWatch;
use crate::{data_pages, DirtyTracker, PageSet, RamView, TrackError, PAGE_SIZE};
use sys::{Area, PageRegion, Reply, Request};

/// Why the `uffd` tracker cannot be had for a VM.
#[derive(Debug, thiserror::Error)]
pub enum UffdUnavailable {
    #[error("QEMU was started without tandem's uffd preload (no socket {0})")]
    NoSocket(String),
    #[error("QEMU does not answer on {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to QEMU's uffd preload: {0}")]
    Protocol(String),
    #[error("registration inside QEMU failed: {0}")]
    Refused(String),
    #[error("swap is configured (a swapped-out page loses its written state)")]
    Swap,
    #[error("PAGEMAP_SCAN on QEMU's pagemap: {0}")]
    Scan(#[source] std::io::Error),
}

/// QEMU's registration, as handed over by the preload.
pub struct Registration {
    /// Keeps the registration alive (the preload holds it too).
    pub uffd: OwnedFd,
    /// QEMU's `/proc/self/pagemap`, opened by QEMU.
    pub pagemap: File,
    /// QEMU's shared mappings of the RAM file.
    pub areas: Vec<Area>,
    /// What the preload did, in its words (for `ft status`).
    pub message: String,
    /// The userfaultfd handles user-mode faults only.
    pub user_mode_only: bool,
}

/// Asks the preload in QEMU (listening on `socket`) to register its
/// mappings of `ram_file`. The preload probes first, in QEMU's own context
/// (its user, its seccomp filter), that user-mode, kernel-mode and
/// first-touch writes are all recorded; a failed probe is a refusal.
pub fn request_registration(
    socket: &Path,
    ram_file: &File,
    timeout: Duration,
) -> Result<Registration, UffdUnavailable> {
    let path = socket.display().to_string();
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(UffdUnavailable::NoSocket(path))
        }
        Err(source) => return Err(UffdUnavailable::Connect { path, source }),
    };
    let proto = |e: std::io::Error| UffdUnavailable::Protocol(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(proto)?;
    stream.set_write_timeout(Some(timeout)).map_err(proto)?;
    let meta = ram_file.metadata().map_err(proto)?;
    let req = Request {
        op: sys::OP_REGISTER,
        dev_major: major(meta.dev()) as u32,
        dev_minor: minor(meta.dev()) as u32,
        inode: meta.ino(),
    };
    std::io::Write::write_all(&mut &stream, &req.encode()).map_err(proto)?;
    let mut buf = [0u8; sys::REPLY_LEN];
    let fds = sys::recv_with_fds(stream.as_fd(), &mut buf).map_err(proto)?;
    let reply = Reply::decode(&buf).map_err(UffdUnavailable::Protocol)?;
    check_reply(&reply, fds.len())?;
    let mut fds = fds.into_iter();
    let (Some(uffd), Some(pagemap)) = (fds.next(), fds.next()) else {
        unreachable!("check_reply counted two descriptors");
    };
    Ok(Registration {
        uffd,
        pagemap: File::from(pagemap),
        areas: reply.areas,
        message: reply.message,
        user_mode_only: reply.mode & sys::MODE_USER_ONLY != 0,
    })
}

/// A successful reply carries two descriptors, the features asked for, a
/// probe that saw every kind of write, and at least one area.
fn check_reply(reply: &Reply, fds: usize) -> Result<(), UffdUnavailable> {
    if reply.status != 0 {
        return Err(UffdUnavailable::Refused(reply.message.clone()));
    }
    let bad = |why: &str| Err(UffdUnavailable::Protocol(why.into()));
    if fds != 2 {
        return bad(&format!("{fds} descriptors with the reply, expected 2"));
    }
    if reply.features & sys::WP_FEATURES != sys::WP_FEATURES {
        return bad("the registration lacks asynchronous write-protect");
    }
    if reply.probe != sys::PROBE_ALL {
        return bad(&format!(
            "the probe saw writes {:#x} of {:#x}",
            reply.probe,
            sys::PROBE_ALL
        ));
    }
    if reply.areas.is_empty() {
        return bad("no area registered");
    }
    Ok(())
}

/// The pure half of the tracker: given the written set the page tables
/// report, which pages changed. Kept apart from the kernel so it can be
/// tested on any machine.
pub struct Decider {
    pages: usize,
    /// Pages whose content, as last reported, is all zeroes.
    zero: PageSet,
    all_dirty: bool,
    external: Vec<u64>,
}

impl Decider {
    /// A new decider reports everything at its first decision.
    pub fn new(pages: usize) -> Self {
        Decider {
            pages,
            zero: PageSet::new(pages),
            all_dirty: true,
            external: Vec::new(),
        }
    }

    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    /// Whether the next decision reports every page (and so reads all of
    /// RAM's zero-ness).
    pub fn all_pending(&self) -> bool {
        self.all_dirty
    }

    pub fn note_external_writes(&mut self, pages: &mut dyn Iterator<Item = u64>) {
        self.external.extend(pages);
    }

    /// Dirty pages, ascending: the written ones, the external writes, and
    /// after a possible punch every page that reads as zeroes where the
    /// replica may hold something else. Only such an epoch, or one that
    /// reports everything, reads RAM; `ram.data` should be given then: a
    /// hole read through a shared mapping of tmpfs would allocate it.
    pub fn decide(&mut self, ram: RamView<'_>, written: &PageSet, punched: bool) -> Vec<u64> {
        let pages = self.pages.min(ram.bytes.len() / PAGE_SIZE);
        let all = std::mem::take(&mut self.all_dirty);
        let mut dirty = if all {
            PageSet::full(pages)
        } else {
            let mut d = PageSet::new(pages);
            for p in written.iter().take_while(|&p| p < pages) {
                d.insert(p);
            }
            d
        };
        for p in self.external.drain(..) {
            dirty.insert(p as usize);
        }
        if punched {
            for p in 0..pages {
                if !dirty.contains(p) && !self.zero.contains(p) && ram.is_zero_page(p) {
                    dirty.insert(p);
                }
            }
        }
        let out: Vec<u64> = dirty.iter().map(|p| p as u64).collect();
        // `zero` only ever claims what is known: a page is put in it when
        // it is reported and read as zeroes. An ordinary epoch reads no
        // page (that would cost a cache miss per written page) and only
        // takes its reported pages out; a punch epoch (rare) may then
        // re-send a page that is zero on both sides.
        let read = all || punched;
        for &p in &out {
            let p = p as usize;
            if read && ram.is_zero_page(p) {
                self.zero.insert(p);
            } else {
                self.zero.remove(p);
            }
        }
        out
    }
}

/// Where the last collect's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdTiming {
    /// The `PAGEMAP_SCAN` walk (read and re-arm).
    pub scan: Duration,
    /// The decision, including a zero pass after a punch.
    pub decide: Duration,
    /// Pages the page tables reported written.
    pub written: usize,
    /// The epoch may have seen a punch.
    pub punched: bool,
}

/// Tracking of QEMU's mapping of the RAM file by userfaultfd
/// write-protect.
pub struct UffdTracker {
    reg: Registration,
    pages: usize,
    decider: Decider,
    punches: PunchWatch,
    ram_file: File,
    buf: Vec<PageRegion>,
    pub last_timing: UffdTiming,
}

impl UffdTracker {
    /// Tracks the registration of `ram_file` (`pages` pages). Arms it at
    /// once (a first scan, whose result is moot: the first collect reports
    /// everything), which also proves the scan works from here.
    pub fn new(reg: Registration, ram_file: &File, pages: usize) -> Result<Self, TrackError> {
        let mut t = UffdTracker {
            reg,
            pages,
            decider: Decider::new(pages),
            punches: PunchWatch::new(ram_file),
            ram_file: ram_file.try_clone().map_err(TrackError::io("RAM file"))?,
            buf: Vec::with_capacity(1024),
            last_timing: UffdTiming::default(),
        };
        t.written()?;
        Ok(t)
    }

    /// [`request_registration`] then [`UffdTracker::new`].
    pub fn connect(socket: &Path, ram_file: &File, pages: usize) -> Result<Self, TrackError> {
        let reg = request_registration(socket, ram_file, Duration::from_secs(5))?;
        Self::new(reg, ram_file, pages)
    }

    /// What the preload reported when it registered.
    pub fn registration(&self) -> &str {
        &self.reg.message
    }

    pub fn user_mode_only(&self) -> bool {
        self.reg.user_mode_only
    }

    /// How punches are noticed: `inotify` or `ctime` (see [`PunchWatch`]).
    pub fn punch_detection(&self) -> &'static str {
        self.punches.kind()
    }

    /// The written pages of the file since the last call, re-armed.
    fn written(&mut self) -> Result<PageSet, TrackError> {
        if nix::sys::sysinfo::sysinfo()
            .map(|s| s.swap_total() != 0)
            .unwrap_or(true)
        {
            return Err(UffdUnavailable::Swap.into());
        }
        let mut written = PageSet::new(self.pages);
        let pages = self.pages as u64;
        for a in &self.reg.areas {
            let first = a.offset / PAGE_SIZE as u64;
            sys::scan_written(
                self.reg.pagemap.as_fd(),
                a.start,
                a.end,
                true,
                &mut self.buf,
                |s, e| {
                    let (s, e) = (file_page(a, s, first), file_page(a, e, first));
                    written.insert_range(s.min(pages) as usize, e.min(pages) as usize);
                },
            )
            .map_err(UffdUnavailable::Scan)?;
        }
        Ok(written)
    }
}

/// The file page at address `addr` of area `a` (whose first file page is
/// `first`).
fn file_page(a: &Area, addr: u64, first: u64) -> u64 {
    first + (addr.saturating_sub(a.start)) / PAGE_SIZE as u64
}

impl DirtyTracker for UffdTracker {
    fn name(&self) -> &'static str {
        "uffd"
    }

    fn collect(&mut self, ram: RamView<'_>) -> Result<Vec<u64>, TrackError> {
        // Before the scan: a punch after this point either shows in the
        // scan or is seen at the next collect.
        let punched = self.punches.since_last(&self.ram_file)?;
        let t0 = Instant::now();
        let written = self.written()?;
        let t1 = Instant::now();
        let computed;
        let data = match ram.data {
            Some(d) => Some(d),
            None if punched || self.decider.all_pending() => {
                computed = data_pages(&self.ram_file, ram.bytes)
                    .map_err(TrackError::io("finding the RAM file's holes"))?;
                Some(&computed)
            }
            None => None,
        };
        let view = RamView {
            bytes: ram.bytes,
            data,
        };
        let dirty = self.decider.decide(view, &written, punched);
        self.last_timing = UffdTiming {
            scan: t1 - t0,
            decide: t1.elapsed(),
            written: written.count(),
            punched,
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

    /// Only a collect after a punch, or one that reports everything,
    /// reads zero-ness; it finds the holes itself then.
    fn wants_data_pages(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
