use std::collections::BTreeSet;

use crate::{DirtyTracker, RamView, TrackError, PAGE_SIZE};

/// Hash-compare tracker. Memory cost: 8 bytes per 4 KiB page (0.2%).
///
/// It must read every page that may hold data while the guest is stopped,
/// so its pause is bounded by memory bandwidth; holes in the RAM file are
/// skipped (they read as zero, so only their stored hash is checked).
pub struct ScanTracker {
    hashes: Vec<u64>,
    all_dirty: bool,
    external: BTreeSet<u64>,
    threads: usize,
    /// Below this many pages, threads cost more than they save.
    min_pages_per_thread: usize,
}

impl ScanTracker {
    /// `threads == 0` picks the machine's parallelism (at most 4).
    pub fn new(pages: usize, threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4)
        } else {
            threads
        };
        ScanTracker {
            hashes: vec![0; pages],
            all_dirty: true,
            external: BTreeSet::new(),
            threads,
            min_pages_per_thread: 2048,
        }
    }

    pub fn pages(&self) -> usize {
        self.hashes.len()
    }

    /// Collects without reporting the hole pages that were already zero;
    /// the same as [`DirtyTracker::collect`], which never fails for a scan.
    pub fn scan(&mut self, ram: RamView<'_>) -> Vec<u64> {
        let pages = self.hashes.len().min(ram.bytes.len() / PAGE_SIZE);
        let bytes = &ram.bytes[..pages * PAGE_SIZE];
        let all = std::mem::take(&mut self.all_dirty);
        let per = pages.div_ceil(self.threads.max(1)).max(1);
        let hashes = &mut self.hashes[..pages];
        let view = RamView { bytes, ..ram };
        let mut dirty: Vec<u64> = if self.threads <= 1 || per < self.min_pages_per_thread {
            scan_chunk(view, hashes, 0, all)
        } else {
            std::thread::scope(|s| {
                let workers: Vec<_> = hashes
                    .chunks_mut(per)
                    .enumerate()
                    .map(|(n, h)| s.spawn(move || scan_chunk(view, h, n * per, all)))
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_default())
                    .collect()
            })
        };
        if !self.external.is_empty() {
            dirty.extend(
                std::mem::take(&mut self.external)
                    .into_iter()
                    .filter(|&p| (p as usize) < pages),
            );
            dirty.sort_unstable();
            dirty.dedup();
        }
        dirty
    }
}

/// Checks pages `first..first + hashes.len()` of `ram` against `hashes`,
/// updating them, and returns the pages that changed (all, when `all`).
fn scan_chunk(ram: RamView<'_>, hashes: &mut [u64], first: usize, all: bool) -> Vec<u64> {
    let mut dirty = Vec::new();
    for (i, h) in hashes.iter_mut().enumerate() {
        let page = first + i;
        let new = ram.page_hash(page);
        if all || new != *h {
            *h = new;
            dirty.push(page as u64);
        }
    }
    dirty
}

impl DirtyTracker for ScanTracker {
    fn name(&self) -> &'static str {
        "scan"
    }

    fn collect(&mut self, ram: RamView<'_>) -> Result<Vec<u64>, TrackError> {
        Ok(self.scan(ram))
    }

    fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    fn note_external_writes(&mut self, pages: &mut dyn Iterator<Item = u64>) {
        self.external.extend(pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PageSet;
    use proptest::prelude::*;

    #[test]
    fn first_collect_reports_everything_then_nothing() {
        let ram = vec![7u8; 16 * PAGE_SIZE];
        let mut t = ScanTracker::new(16, 1);
        assert_eq!(t.scan(RamView::dense(&ram)).len(), 16);
        assert!(t.scan(RamView::dense(&ram)).is_empty());
        t.mark_all_dirty();
        assert_eq!(t.scan(RamView::dense(&ram)).len(), 16);
    }

    #[test]
    fn writes_and_external_writes_are_reported() {
        let mut ram = vec![0u8; 16 * PAGE_SIZE];
        let mut t = ScanTracker::new(16, 2);
        t.scan(RamView::dense(&ram));
        ram[3 * PAGE_SIZE + 17] = 1;
        ram[9 * PAGE_SIZE] = 1;
        t.note_external_writes(&mut [5u64, 9, 99].into_iter());
        assert_eq!(t.scan(RamView::dense(&ram)), [3, 5, 9]);
        assert!(t.scan(RamView::dense(&ram)).is_empty());
    }

    #[test]
    fn a_page_that_becomes_a_hole_is_reported_once() {
        let mut ram = vec![0u8; 8 * PAGE_SIZE];
        ram[2 * PAGE_SIZE] = 9;
        let mut t = ScanTracker::new(8, 1);
        t.scan(RamView::dense(&ram));
        // Page 2 is punched out of the file: it reads as zero now.
        ram[2 * PAGE_SIZE] = 0;
        let mut data = PageSet::full(8);
        data.remove(2);
        let view = RamView {
            bytes: &ram,
            data: Some(&data),
        };
        assert_eq!(t.scan(view), [2]);
        assert!(t.scan(view).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn thread_count_does_not_change_the_answer(
            writes in proptest::collection::vec((0usize..67, any::<u8>()), 0..40),
            holes in proptest::collection::vec(0usize..67, 0..30),
            threads in 1usize..5,
        ) {
            let pages = 67;
            let mut ram = vec![0u8; pages * PAGE_SIZE];
            let mut one = ScanTracker::new(pages, 1);
            let mut many = ScanTracker::new(pages, threads);
            many.min_pages_per_thread = 1;
            one.scan(RamView::dense(&ram));
            many.scan(RamView::dense(&ram));
            let orig = ram.clone();
            for (page, v) in writes {
                ram[page * PAGE_SIZE + (v as usize * 13) % PAGE_SIZE] = v;
            }
            // Holes read as zero, as a punched file would.
            let mut data = PageSet::full(pages);
            for h in holes {
                data.remove(h);
                ram[h * PAGE_SIZE..(h + 1) * PAGE_SIZE].fill(0);
            }
            let view = RamView { bytes: &ram, data: Some(&data) };
            let expect: Vec<u64> = (0..pages)
                .filter(|p| {
                    let r = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
                    ram[r.clone()] != orig[r]
                })
                .map(|p| p as u64)
                .collect();
            let a = one.scan(view);
            let b = many.scan(view);
            prop_assert_eq!(&a, &b);
            // Hash collisions aside, exactly the changed pages are dirty.
            prop_assert_eq!(a, expect);
        }
    }
}
