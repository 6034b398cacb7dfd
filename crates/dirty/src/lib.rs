//! Dirty-page tracking over a guest's RAM file.
//!
//! This crate owns the question "which 4 KiB pages of guest RAM changed
//! since the last checkpoint?". [`DirtyTracker`] is the one interface the
//! epoch loop uses; three trackers sit behind it:
//!
//! - [`ScanTracker`] works everywhere: a 64-bit xxh3 hash per page, compared
//!   in parallel. Pages that are holes in the RAM file ([`PageSet`] from
//!   [`data_pages`]) read as zero and are not hashed, so the scan costs what
//!   the guest has touched, not what it was given.
//! - [`SoftDirtyTracker`] reads the kernel's soft-dirty bits for QEMU's
//!   mapping of the RAM file (`/proc/PID/pagemap`) and clears them
//!   (`/proc/PID/clear_refs`), on kernels with `CONFIG_MEM_SOFT_DIRTY`.
//!   [`soft_dirty_support`] says whether this kernel has it.
//! - [`UffdTracker`] reads and re-arms userfaultfd asynchronous
//!   write-protect over QEMU's mapping with one `PAGEMAP_SCAN` (Linux ≥
//!   6.7, no soft-dirty needed); guest RAM is registered inside QEMU by the
//!   `tandem-uffd-preload` library, which shares [`uffd::sys`] with this
//!   crate.
//!
//! Writes that do not go through QEMU's page tables (a vhost-user backend
//! in another process) are invisible to the page-table trackers; they are
//! reported with [`DirtyTracker::note_external_writes`] and always
//! included.
//!
//! Everything that decides is pure and tested without a kernel feature;
//! [`softdirty`] splits the `/proc` reading from the decision for that
//! reason.

mod pagelog;
mod pageset;
pub mod procfs;
mod residency;
mod scan;
pub mod softdirty;
pub mod uffd;

pub use pagelog::{PageLog, Poisoned};
pub use pageset::PageSet;
pub use residency::{data_pages, data_pages_at};
pub use scan::ScanTracker;
pub use softdirty::{soft_dirty_support, CollectTiming, SoftDirtyTracker, SoftDirtyUnsupported};
pub use uffd::{UffdTracker, UffdUnavailable};

/// Guest pages are tracked at 4 KiB, whatever backs them.
pub const PAGE_SIZE: usize = 4096;

/// Guest RAM as a tracker sees it, inside the epoch's stop window.
#[derive(Clone, Copy)]
pub struct RamView<'a> {
    /// The RAM file's bytes, mapped.
    pub bytes: &'a [u8],
    /// Pages that may hold data. Pages outside it are holes in the RAM file
    /// and read as zero. `None`: every page may hold data.
    pub data: Option<&'a PageSet>,
}

impl<'a> RamView<'a> {
    /// A view in which every page may hold data.
    pub fn dense(bytes: &'a [u8]) -> Self {
        RamView { bytes, data: None }
    }

    fn may_hold_data(&self, page: usize) -> bool {
        self.data.is_none_or(|d| d.contains(page))
    }

    fn page(&self, page: usize) -> &[u8] {
        &self.bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
    }

    /// The page's content hash (xxh3-64 of its bytes; a hole is not
    /// read, and hashes as zeroes do). The backup hashes its replica the
    /// same way, so the two can compare pages without sending them.
    pub fn page_hash(&self, page: usize) -> u64 {
        if self.may_hold_data(page) {
            xxhash_rust::xxh3::xxh3_64(self.page(page))
        } else {
            zero_page_hash()
        }
    }

    /// Whether the page reads as zeroes; a hole is not read.
    fn is_zero_page(&self, page: usize) -> bool {
        !self.may_hold_data(page) || is_zeroed(self.page(page))
    }
}

/// Whether every byte is zero. OR-folds 256-byte blocks (which the
/// compiler turns into vector ORs) and stops at the first non-zero block:
/// a byte-at-a-time early-exit loop does not vectorise, and costs ~100×
/// more where it matters most, under TCG.
pub fn is_zeroed(bytes: &[u8]) -> bool {
    bytes
        .chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("soft-dirty tracking is not available: {0}")]
    Unsupported(#[from] SoftDirtyUnsupported),
    #[error("uffd tracking is not available: {0}")]
    Uffd(#[from] UffdUnavailable),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU (pid {pid}) has no mapping of the RAM file (device {dev}, inode {inode})")]
    NotMapped { pid: u32, dev: String, inode: u64 },
}

impl TrackError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrackError {
        let what = what.into();
        move |source| TrackError::Io { what, source }
    }
}

pub trait DirtyTracker: Send {
    fn name(&self) -> &'static str;
    /// Dirty page indices since the previous call, ascending. Called with
    /// the guest stopped. An error leaves the tracker unable to vouch for
    /// anything: the caller must copy everything (or switch trackers).
    fn collect(&mut self, ram: RamView<'_>) -> Result<Vec<u64>, TrackError>;
    /// Makes the next [`DirtyTracker::collect`] report every page.
    fn mark_all_dirty(&mut self);
    /// Pages written behind the tracker's back (a vhost-user backend's
    /// writes into guest memory).
    fn note_external_writes(&mut self, pages: &mut dyn Iterator<Item = u64>);
    /// Whether the tracker records a moment rather than content. Around a
    /// copy taken while the guest runs, such a tracker must collect
    /// *before* the copy (so writes during it are caught next time); a
    /// content tracker collects over the copy (it remembers what it hashed).
    fn tracks_moments(&self) -> bool {
        false
    }
    /// Whether [`DirtyTracker::collect`] wants [`RamView::data`] (finding
    /// the RAM file's holes costs up to a few ms per GiB). A tracker that
    /// says no finds them itself in the rare collect that needs them.
    fn wants_data_pages(&self) -> bool {
        true
    }
}

/// The hash of an all-zero page: what a hole reads as.
pub(crate) fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_SIZE]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn is_zeroed_agrees_with_a_byte_loop(len in 0usize..9000, at in any::<usize>(), v in any::<u8>()) {
            let mut bytes = vec![0u8; len];
            if len > 0 {
                bytes[at % len] = v;
            }
            prop_assert_eq!(is_zeroed(&bytes), bytes.iter().all(|&b| b == 0));
        }
    }
}
