//! A memory-churning workload whose own memory proves it was replicated
//! whole.
//!
//! A thread keeps rewriting random pages of a buffer. Each page carries its
//! index, a generation number, and content derived from both; a separate
//! table records the generation last written to each page. After a failover
//! the guest resumes from a snapshot of its memory taken at one instant, so
//! every page must agree with the table — except the one page being written
//! at that instant, which is recorded too. A page the replication engine
//! failed to copy shows up as a page older than its table entry.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PAGE: usize = 4096;

pub struct Churn {
    state: Mutex<Option<Running>>,
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Buffer>,
}

/// The churned memory. `busy` names the page being rewritten, if any.
struct Buffer {
    data: Vec<u8>,
    table: Vec<u64>,
    busy: Option<usize>,
    writes: u64,
}

fn fill(page: &mut [u8], index: usize, generation: u64) {
    page[..8].copy_from_slice(&generation.to_le_bytes());
    page[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    let mut x = generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index as u64 ^ 1;
    for chunk in page[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

impl Buffer {
    fn new(pages: usize) -> Buffer {
        let mut b = Buffer {
            data: vec![0; pages * PAGE],
            table: vec![0; pages],
            busy: None,
            writes: 0,
        };
        for i in 0..pages {
            fill(&mut b.data[i * PAGE..(i + 1) * PAGE], i, 0);
        }
        b
    }

    fn write(&mut self, i: usize) {
        let generation = self.table[i] + 1;
        self.busy = Some(i);
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        fill(&mut self.data[i * PAGE..(i + 1) * PAGE], i, generation);
        self.table[i] = generation;
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        self.busy = None;
        self.writes += 1;
    }

    /// `Err(page, why)` for the first page that disagrees with the table.
    fn verify(&self) -> Result<usize, (usize, String)> {
        let mut expect = vec![0u8; PAGE];
        for (i, &generation) in self.table.iter().enumerate() {
            if self.busy == Some(i) {
                continue;
            }
            fill(&mut expect, i, generation);
            let page = &self.data[i * PAGE..(i + 1) * PAGE];
            if page != expect.as_slice() {
                let found = u64::from_le_bytes(page[..8].try_into().unwrap_or_default());
                return Err((i, format!("generation {found}, table says {generation}")));
            }
        }
        Ok(self.table.len())
    }
}

impl Churn {
    pub fn new() -> Churn {
        Churn {
            state: Mutex::new(None),
        }
    }

    /// Starts churning `pages` pages (no-op if already running).
    pub fn start(&self, pages: usize) -> String {
        let mut st = self.state.lock();
        if st.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut b = Buffer::new(pages);
                let mut x: u64 = 0x2545_f491_4f6c_dd1d;
                while !flag.load(Ordering::Relaxed) {
                    // ~2 MiB per 50 ms: enough to dirty many pages per epoch.
                    for _ in 0..512 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        b.write((x % pages as u64) as usize);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                b
            });
            *st = Some(Running { stop, thread });
        }
        format!("CHURNING {pages}")
    }

    /// Stops the churn and checks every page.
    pub fn verify(&self) -> String {
        let Some(run) = self.state.lock().take() else {
            return "ERR not churning".into();
        };
        run.stop.store(true, Ordering::Relaxed);
        let Ok(buf) = run.thread.join() else {
            return "ERR churn thread died".into();
        };
        match buf.verify() {
            Ok(n) => format!("VERIFIED {n} {}", buf.writes),
            Err((page, why)) => format!("CORRUPT page {page}: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_buffer_verifies_and_a_stale_page_is_caught() {
        let mut b = Buffer::new(8);
        for i in [1, 3, 3, 7] {
            b.write(i);
        }
        assert_eq!(b.verify(), Ok(8));
        // A page left at an older generation than the table: a lost copy.
        let old = b.data[3 * PAGE..4 * PAGE].to_vec();
        b.write(3);
        b.data[3 * PAGE..4 * PAGE].copy_from_slice(&old);
        assert!(matches!(b.verify(), Err((3, _))));
        // Unless that page was the one being written at the snapshot.
        b.busy = Some(3);
        assert_eq!(b.verify(), Ok(8));
    }
}
