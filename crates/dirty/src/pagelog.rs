use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Pages of the RAM file written by someone the tracker cannot see (the
/// vhost-user switch writing through tandemd's own mapping).
///
/// Writers mark *before* they write, so a drain taken while the guest and
/// its rings are stopped holds every write whose bytes it could see.
/// Marks are lock-free; a drain swaps each word out atomically, so a mark
/// racing a drain lands in this drain or the next, never nowhere. A write
/// that cannot be placed in the file (no file behind the memory, an address
/// outside it) poisons the log: the next drain fails and the tracker must
/// then treat everything as dirty.
#[derive(Debug)]
pub struct PageLog {
    words: Vec<AtomicU64>,
    pages: u64,
    poisoned: AtomicBool,
}

/// A drain of a poisoned log: some write is unaccounted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poisoned;

impl PageLog {
    pub fn new(pages: u64) -> Self {
        PageLog {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            poisoned: AtomicBool::new(false),
        }
    }

    /// Records a write of `len` bytes at byte `offset` of the RAM file.
    pub fn mark_bytes(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / crate::PAGE_SIZE as u64;
        let Some(last) = offset
            .checked_add(len - 1)
            .map(|e| e / crate::PAGE_SIZE as u64)
        else {
            self.poison();
            return;
        };
        if last >= self.pages {
            self.poison();
            return;
        }
        for p in first..=last {
            self.words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }

    /// Records a write that cannot be placed.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }

    /// The pages marked since the last drain, ascending, and clears them.
    pub fn drain(&self) -> Result<Vec<u64>, Poisoned> {
        let mut pages = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                pages.push(i as u64 * 64 + b);
            }
        }
        if self.poisoned.swap(false, Ordering::AcqRel) {
            return Err(Poisoned);
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn marks_every_page_a_write_touches_once() {
        let log = PageLog::new(100);
        log.mark_bytes(PAGE_SIZE as u64 - 1, 2); // straddles pages 0 and 1
        log.mark_bytes(70 * PAGE_SIZE as u64, 1);
        log.mark_bytes(70 * PAGE_SIZE as u64 + 9, 3);
        assert_eq!(log.drain().unwrap(), [0, 1, 70]);
        assert!(log.drain().unwrap().is_empty());
    }

    #[test]
    fn a_write_outside_the_file_poisons_one_drain() {
        let log = PageLog::new(10);
        log.mark_bytes(9 * PAGE_SIZE as u64, PAGE_SIZE as u64 + 1);
        assert_eq!(log.drain(), Err(Poisoned));
        log.mark_bytes(u64::MAX - 3, 10);
        assert_eq!(log.drain(), Err(Poisoned));
        log.mark_bytes(0, 1);
        assert_eq!(log.drain().unwrap(), [0]);
    }
}
