//! Read-only access to a guest's RAM file (QEMU's shared memory backend).
//!
//! The memory is written concurrently by others: QEMU's vCPUs and device
//! threads, and the switch through its own mapping. In Rust's model a
//! `&[u8]` promises that nobody changes the bytes while it lives, so the
//! mapping is kept raw ([`memmap2::MmapRaw`]) and read by copying out with
//! `ptr::copy_nonoverlapping` into buffers tandem owns ([`RamMap::snapshot`],
//! [`RamMap::copy_pages`], [`RamMap::read_page`]): the compiler assumes
//! nothing about the source across such a copy, and a page torn by a
//! concurrent writer is only a torn copy (caught by the next epoch), never
//! undefined behaviour in tandem. This is vm-memory's `VolatileSlice`
//! model, without the dependency.
//!
//! [`RamMap::live`] is the one exception, kept for the epoch's stop window
//! (see its documentation).

use std::fs::File;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};

use crate::wire::PAGE_SIZE;

/// The guest's RAM, mapped shared and read-only, never as a slice except
/// through [`RamMap::live`].
pub struct RamMap {
    file: File,
    map: MmapRaw,
}

impl RamMap {
    pub fn open(path: &Path, size: u64) -> std::io::Result<RamMap> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            return Err(std::io::Error::other(format!(
                "{} is {len} bytes, the guest has {size}",
                path.display()
            )));
        }
        let size = usize::try_from(size).map_err(std::io::Error::other)?;
        let map = MmapOptions::new().len(size).map_raw_read_only(&file)?;
        Ok(RamMap { file, map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The mapped bytes as a slice, for trackers and copies inside the
    /// epoch's stop window.
    ///
    /// Only sound while nothing writes guest RAM: the guest is stopped
    /// (QMP `stop` halts the vCPUs, drains block I/O and stops vhost-user
    /// rings, so the switch does not write either) and stays stopped for
    /// as long as the slice is used. Anywhere else, copy out with
    /// [`RamMap::snapshot`], [`RamMap::copy_pages`] or
    /// [`RamMap::read_page`], which never form a reference to the shared
    /// memory.
    pub fn live(&self) -> &[u8] {
        if self.map.len() == 0 {
            return &[];
        }
        // SAFETY: the mapping is `len` readable bytes (PROT_READ, shared)
        // that stay mapped for as long as `self`, which the slice borrows;
        // the file is never truncated while the VM exists (QEMU would lose
        // its RAM too). The caller's contract (documented above) is that
        // no one writes the memory while the slice is used.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// The file QEMU's RAM lives in.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Pages that may hold data (the rest are holes and read as zero);
    /// `None` when the file cannot say, and every page must be read.
    /// Exact only while the guest is stopped; otherwise a page the guest
    /// touches afterwards may be reported as a hole.
    pub fn data_pages(&self) -> Option<tandem_dirty::PageSet> {
        match tandem_dirty::data_pages_at(&self.file, self.map.as_ptr(), self.map.len()) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!("cannot find the RAM file's holes: {e}");
                None
            }
        }
    }

    /// A private copy of all of RAM, taken while the guest may be running
    /// (a page written meanwhile may be torn; the next epoch resends it).
    ///
    /// Only the pages that hold data are read; holes stay zero in the copy.
    /// Reading a hole of a tmpfs file through a shared mapping is a page
    /// fault that *allocates* the page (audit M9): a copy of every byte
    /// would turn a sparse guest's RAM file into a fully allocated one (the
    /// guest's whole size, in `/dev/shm`, at every protection start) and,
    /// with `/dev/shm` full, kill tandemd with SIGBUS. The copy's own
    /// buffer is zeroed memory from the allocator, which the kernel backs
    /// only when written, so holes cost nothing on either side. If the
    /// holes cannot be found, every page is read.
    pub fn snapshot(&self) -> Vec<u8> {
        let len = self.map.len();
        let mut out = vec![0u8; len];
        let pages = len / PAGE_SIZE;
        let mut copy = |start: usize, end: usize| {
            // SAFETY: `start..end` lies within the mapping (callers clip it
            // to `len`) and within `out`, which has `len` bytes; the two do
            // not overlap (one is our heap buffer, the other a file
            // mapping). The source is read through a raw pointer only.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.map.as_ptr().add(start),
                    out.as_mut_ptr().add(start),
                    end - start,
                )
            }
        };
        match self.data_pages() {
            Some(data) => {
                // Runs of consecutive data pages, each copied at once.
                let mut run: Option<(usize, usize)> = None;
                for p in data.iter().filter(|&p| p < pages) {
                    run = match run {
                        Some((first, last)) if last + 1 == p => Some((first, p)),
                        Some((first, last)) => {
                            copy(first * PAGE_SIZE, (last + 1) * PAGE_SIZE);
                            Some((p, p))
                        }
                        None => Some((p, p)),
                    };
                }
                if let Some((first, last)) = run {
                    copy(first * PAGE_SIZE, (last + 1) * PAGE_SIZE);
                }
                // A partial page at the end (never, for a guest's RAM).
                if !len.is_multiple_of(PAGE_SIZE) {
                    copy(pages * PAGE_SIZE, len);
                }
            }
            None => copy(0, len),
        }
        out
    }

    /// Copies page `page` into `out`; `false` (and `out` untouched) when
    /// the page is past the end of RAM.
    pub fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        let Some(off) = self.page_offset(page) else {
            return false;
        };
        // SAFETY: `off..off + PAGE_SIZE` is inside the mapping (checked by
        // `page_offset`), `out` is PAGE_SIZE bytes of our own, and the two
        // do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), out.as_mut_ptr(), PAGE_SIZE)
        };
        true
    }

    /// The pages `pages` (indices), copied one after another into a new
    /// buffer; a page past the end of RAM reads as zeroes.
    pub fn copy_pages(&self, pages: &[u64]) -> Vec<u8> {
        let mut out = vec![0u8; pages.len() * PAGE_SIZE];
        for (chunk, &p) in out.chunks_exact_mut(PAGE_SIZE).zip(pages) {
            if let Some(off) = self.page_offset(p) {
                // SAFETY: `off..off + PAGE_SIZE` is inside the mapping
                // (`page_offset`), `chunk` is PAGE_SIZE bytes of `out`, and
                // the two do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.map.as_ptr().add(off),
                        chunk.as_mut_ptr(),
                        PAGE_SIZE,
                    )
                };
            }
        }
        out
    }

    /// The byte offset of a whole page inside the mapping.
    fn page_offset(&self, page: u64) -> Option<usize> {
        let off = usize::try_from(page).ok()?.checked_mul(PAGE_SIZE)?;
        (off.checked_add(PAGE_SIZE)? <= self.map.len()).then_some(off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// A sparse RAM file on tmpfs (where QEMU's RAM lives): `pages` pages,
    /// data only in `written`, each page filled with [`fill`].
    fn sparse_ram(pages: usize, written: &[usize]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        f.as_file().set_len((pages * PAGE_SIZE) as u64).unwrap();
        for &p in written {
            f.as_file()
                .write_all_at(&[fill(p); PAGE_SIZE], (p * PAGE_SIZE) as u64)
                .unwrap();
        }
        f
    }

    /// A data page's byte: never zero, so a page read as a hole shows.
    fn fill(page: usize) -> u8 {
        (page % 250) as u8 + 1
    }

    fn expected(pages: usize, written: &[usize]) -> Vec<u8> {
        let mut v = vec![0u8; pages * PAGE_SIZE];
        for &p in written {
            v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(fill(p));
        }
        v
    }

    /// The copy is exact, holes read as zero, and copying does not
    /// allocate the holes (the file's allocated blocks do not change):
    /// copying every byte through the mapping (`map.to_vec()`, before)
    /// faulted each hole in and allocated the whole file.
    #[test]
    fn snapshot_copies_data_and_leaves_holes_unallocated() {
        let pages = 512;
        let written = [0usize, 1, 2, 7, 64, 65, 200, 511];
        let f = sparse_ram(pages, &written);
        let blocks = |f: &tempfile::NamedTempFile| f.as_file().metadata().unwrap().blocks();
        let before = blocks(&f);
        assert!(
            before < (pages * PAGE_SIZE / 512) as u64 / 4,
            "the test file is not sparse ({before} blocks)"
        );
        let ram = RamMap::open(f.path(), (pages * PAGE_SIZE) as u64).unwrap();
        assert_eq!(ram.len(), pages * PAGE_SIZE);
        let snap = ram.snapshot();
        assert!(snap == expected(pages, &written), "the copy differs");
        assert_eq!(blocks(&f), before, "the copy allocated holes of the file");

        // Single pages and page lists, holes and past-the-end included.
        let mut page = [0xffu8; PAGE_SIZE];
        assert!(ram.read_page(7, &mut page));
        assert!(page.iter().all(|&b| b == 8));
        assert!(!ram.read_page(pages as u64, &mut page));
        assert!(!ram.read_page(u64::MAX, &mut page));
        let copied = ram.copy_pages(&[200, 0, 511, u64::MAX]);
        assert_eq!(copied.len(), 4 * PAGE_SIZE);
        assert!(copied[..PAGE_SIZE].iter().all(|&b| b == 201));
        assert!(copied[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 1));
        assert!(copied[2 * PAGE_SIZE..3 * PAGE_SIZE]
            .iter()
            .all(|&b| b == fill(511)));
        assert!(copied[3 * PAGE_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(blocks(&f), before, "page copies allocated holes");

        let data = ram.data_pages().unwrap();
        assert_eq!(data.iter().collect::<Vec<_>>(), written);

        // The slice for the stop window sees the same bytes; but reading
        // every byte through the mapping, as the snapshot did before,
        // allocates the holes: what the test above would have caught.
        assert!(ram.live() == snap.as_slice());
        assert!(
            blocks(&f) > before,
            "reading holes through the mapping no longer allocates them: the test above proves nothing"
        );
    }

    /// A writer through another mapping (QEMU, the switch) is seen by the
    /// next copy; an earlier copy is the caller's own and does not change.
    #[test]
    fn copies_are_private_and_see_later_writes() {
        let f = sparse_ram(4, &[1]);
        let ram = RamMap::open(f.path(), 4 * PAGE_SIZE as u64).unwrap();
        let first = ram.snapshot();
        f.as_file()
            .write_all_at(&[9; PAGE_SIZE], 3 * PAGE_SIZE as u64)
            .unwrap();
        let second = ram.snapshot();
        assert!(first[3 * PAGE_SIZE..].iter().all(|&b| b == 0));
        assert!(second[3 * PAGE_SIZE..].iter().all(|&b| b == 9));
        assert!(second[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 2));
    }

    #[test]
    fn a_short_file_is_refused() {
        let f = sparse_ram(2, &[]);
        let e = RamMap::open(f.path(), 3 * PAGE_SIZE as u64).err().unwrap();
        assert!(e.to_string().contains("the guest has"), "{e}");
    }
}
