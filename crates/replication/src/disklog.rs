//! The encoding of one epoch's disk writes for one disk.
//!
//! A sequence of records `offset u64 | length u32 | data`, little-endian,
//! in the order the guest's writes reached the mirror target. Applying them
//! in order reproduces the disk. A zero-length record list is valid.

/// Largest single write accepted (QEMU's mirror uses far smaller requests).
pub const MAX_WRITE: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskLogError {
    #[error("disk write log truncated at byte {0}")]
    Truncated(usize),
    #[error("disk write at {offset} of {len} bytes is outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("disk write of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Appends one write to an encoded log.
pub fn push(log: &mut Vec<u8>, offset: u64, data: &[u8]) {
    log.extend_from_slice(&offset.to_le_bytes());
    log.extend_from_slice(&(data.len() as u32).to_le_bytes());
    log.extend_from_slice(data);
}

/// Decodes and checks a log against the disk size, without copying data.
pub fn parse(log: &[u8], disk_size: u64) -> Result<Vec<(u64, &[u8])>, DiskLogError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < log.len() {
        if log.len() - at < 12 {
            return Err(DiskLogError::Truncated(at));
        }
        let offset = u64::from_le_bytes(log[at..at + 8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(log[at + 8..at + 12].try_into().unwrap_or_default()) as usize;
        if len > MAX_WRITE {
            return Err(DiskLogError::TooLarge(len));
        }
        let start = at + 12;
        if log.len() - start < len {
            return Err(DiskLogError::Truncated(at));
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > disk_size)
        {
            return Err(DiskLogError::OutOfRange {
                offset,
                len: len as u64,
                size: disk_size,
            });
        }
        out.push((offset, &log[start..start + len]));
        at = start + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_range_check() {
        let mut log = Vec::new();
        push(&mut log, 0, b"abc");
        push(&mut log, 4093, b"xyz");
        let w = parse(&log, 4096).unwrap();
        assert_eq!(w, vec![(0, &b"abc"[..]), (4093, &b"xyz"[..])]);
        assert!(matches!(
            parse(&log, 4095),
            Err(DiskLogError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse(&log[..log.len() - 1], 4096),
            Err(DiskLogError::Truncated(_))
        ));
        assert_eq!(parse(&[], 0).unwrap(), vec![]);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), size in any::<u64>()) {
            let _ = parse(&bytes, size);
        }
    }
}
