//! The export's log of the current epoch, bounded in memory (audit M14).
//!
//! Between two takes the log holds every write the export applied. While
//! its owner is busy or stuck (a long running copy, a stalled link), QEMU's
//! mirror keeps writing, and its whole-disk initial copy would otherwise
//! land here. So the log has a cap in bytes: past it, the log is dropped
//! and the export remembers only that it overflowed. The next take then
//! says so ([`LogOverflow`]) and the owner must resend the whole backing
//! file instead, which holds every write the log would have: a full copy
//! is never larger than the disk, an unbounded log is.

use std::mem::size_of;

use crate::writelog::{DiskWrite, WriteLog};

/// The cap when the owner sets none: 256 MiB of payload and bookkeeping.
pub const DEFAULT_LOG_CAP: u64 = 256 << 20;

/// What one logged write costs beyond its payload: its place in the log.
pub(crate) const RECORD_COST: u64 = size_of::<DiskWrite>() as u64;

/// The log passed its cap and was dropped: the writes since the previous
/// take are no longer known one by one, so the whole disk must be resent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the write log passed its cap of {cap} bytes: {dropped_writes} writes \
     ({dropped_bytes} payload bytes) were not kept, so the whole disk must be resent"
)]
pub struct LogOverflow {
    /// The cap in force when the log overflowed.
    pub cap: u64,
    /// Writes since the previous take that are not in any log.
    pub dropped_writes: u64,
    /// Their payload bytes.
    pub dropped_bytes: u64,
}

/// The writes since the last take, or the fact that they overflowed.
#[derive(Debug)]
pub(crate) struct PendingLog {
    log: WriteLog,
    /// Payload plus [`RECORD_COST`] per write held in `log`.
    cost: u64,
    cap: u64,
    overflow: Option<LogOverflow>,
}

impl PendingLog {
    pub(crate) fn new(cap: u64) -> Self {
        PendingLog {
            log: WriteLog::new(),
            cost: 0,
            cap,
            overflow: None,
        }
    }

    pub(crate) fn cap(&self) -> u64 {
        self.cap
    }

    /// Sets the cap. A log already past the new cap overflows now; the
    /// dropped log is returned so the caller can free it outside its lock.
    pub(crate) fn set_cap(&mut self, cap: u64) -> Option<WriteLog> {
        self.cap = cap;
        if self.overflow.is_none() && self.cost > cap {
            return Some(self.overflow_now(0, 0));
        }
        None
    }

    /// Records a write. Returns the log it dropped when this write took it
    /// past the cap (free it outside the export's lock: a full log can be
    /// hundreds of MiB).
    pub(crate) fn push(&mut self, w: DiskWrite) -> Option<WriteLog> {
        if w.is_empty() {
            return None;
        }
        let payload = w.payload_len();
        if let Some(o) = &mut self.overflow {
            o.dropped_writes += 1;
            o.dropped_bytes += payload;
            return None;
        }
        let cost = payload + RECORD_COST;
        if self.cost.saturating_add(cost) > self.cap {
            return Some(self.overflow_now(1, payload));
        }
        self.cost += cost;
        self.log.push(w);
        None
    }

    fn overflow_now(&mut self, writes: u64, bytes: u64) -> WriteLog {
        let dropped = std::mem::take(&mut self.log);
        self.overflow = Some(LogOverflow {
            cap: self.cap,
            dropped_writes: dropped.len() as u64 + writes,
            dropped_bytes: dropped.bytes() + bytes,
        });
        self.cost = 0;
        dropped
    }

    /// The writes since the previous take (or their overflow), and a fresh,
    /// empty log from now on.
    pub(crate) fn take(&mut self) -> Result<WriteLog, LogOverflow> {
        self.cost = 0;
        let log = std::mem::take(&mut self.log);
        match self.overflow.take() {
            Some(o) => Err(o),
            None => Ok(log),
        }
    }

    /// Writes and payload bytes held (both zero once overflowed).
    pub(crate) fn pending(&self) -> (usize, u64) {
        (self.log.len(), self.log.bytes())
    }

    /// Bytes the log accounts for against its cap.
    #[cfg(test)]
    pub(crate) fn cost(&self) -> u64 {
        self.cost
    }

    pub(crate) fn overflow(&self) -> Option<LogOverflow> {
        self.overflow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(offset: u64, n: usize) -> DiskWrite {
        DiskWrite::Data {
            offset,
            data: vec![0xa5; n],
        }
    }

    #[test]
    fn under_the_cap_everything_is_kept() {
        let mut p = PendingLog::new(3 * (100 + RECORD_COST));
        for i in 0..3 {
            assert!(p.push(data(i * 100, 100)).is_none());
        }
        assert_eq!(p.pending(), (3, 300));
        assert_eq!(p.cost(), 3 * (100 + RECORD_COST));
        let log = p.take().unwrap();
        assert_eq!(log.len(), 3);
        // A take starts afresh.
        assert_eq!(p.pending(), (0, 0));
        assert_eq!(p.cost(), 0);
        assert!(p.take().unwrap().is_empty());
    }

    #[test]
    fn passing_the_cap_drops_the_log_and_reports_every_write_since_the_take() {
        let mut p = PendingLog::new(2 * (100 + RECORD_COST));
        assert!(p.push(data(0, 100)).is_none());
        assert!(p.push(data(100, 100)).is_none());
        // The third write would pass the cap: the log goes, handed back to
        // be freed outside the lock.
        let dropped = p.push(data(200, 100)).expect("dropped log");
        assert_eq!(dropped.len(), 2);
        assert_eq!(p.pending(), (0, 0));
        assert_eq!(p.cost(), 0);
        // Later writes are counted, not kept; memory stays bounded.
        for i in 0..1000 {
            assert!(p.push(data(i, 4096)).is_none());
        }
        assert_eq!(p.pending(), (0, 0));
        // Zero writes count too (no payload, but they are writes).
        assert!(p
            .push(DiskWrite::Zero {
                offset: 0,
                len: 1 << 30
            })
            .is_none());
        let o = p.take().unwrap_err();
        assert_eq!(
            o,
            LogOverflow {
                cap: 2 * (100 + RECORD_COST),
                dropped_writes: 3 + 1000 + 1,
                dropped_bytes: 300 + 1000 * 4096,
            }
        );
        assert!(o.to_string().contains("whole disk must be resent"), "{o}");
        // The overflow is reported once; the next epoch logs again.
        assert!(p.push(data(0, 10)).is_none());
        assert_eq!(p.take().unwrap().len(), 1);
    }

    #[test]
    fn a_single_write_larger_than_the_cap_overflows() {
        let mut p = PendingLog::new(1000);
        let dropped = p.push(data(0, 2000)).expect("overflow");
        assert!(dropped.is_empty());
        assert_eq!(p.overflow().map(|o| o.dropped_bytes), Some(2000));
    }

    #[test]
    fn lowering_the_cap_below_the_log_overflows_at_once() {
        let mut p = PendingLog::new(1 << 20);
        p.push(data(0, 1000));
        assert!(p.set_cap(1 << 19).is_none());
        let dropped = p.set_cap(10).expect("overflow");
        assert_eq!(dropped.len(), 1);
        assert_eq!(p.cap(), 10);
        assert!(p.take().is_err());
    }

    #[test]
    fn empty_writes_cost_nothing() {
        let mut p = PendingLog::new(0);
        assert!(p.push(data(0, 0)).is_none());
        assert!(p.push(DiskWrite::Zero { offset: 9, len: 0 }).is_none());
        assert!(p.take().unwrap().is_empty());
    }

    proptest! {
        /// Whatever the writes, the log never holds more than its cap, and
        /// a take either returns every write in order or says they were
        /// dropped, counting all of them.
        #[test]
        fn bounded_and_exact(
            cap in 0u64..20_000,
            sizes in proptest::collection::vec(0usize..3000, 0..60),
        ) {
            let mut p = PendingLog::new(cap);
            let mut want = WriteLog::new();
            for (i, n) in sizes.iter().enumerate() {
                let w = data(i as u64 * 4096, *n);
                want.push(w.clone());
                let _ = p.push(w);
                prop_assert!(p.cost() <= cap);
            }
            match p.take() {
                Ok(log) => prop_assert_eq!(log, want),
                Err(o) => {
                    prop_assert_eq!(o.dropped_writes, want.len() as u64);
                    prop_assert_eq!(o.dropped_bytes, want.bytes());
                    prop_assert!(want.bytes() + want.len() as u64 * RECORD_COST > cap);
                }
            }
        }
    }
}
