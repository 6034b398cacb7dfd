//! The encoding of one epoch's disk writes for one disk.
//!
//! A sequence of records `offset u64 | length u32 | data`, little-endian,
//! in the order the guest's writes reached the mirror target. A length with
//! the top bit set is a zero record: that many bytes read as zeroes, with
//! no data following (TRIM and WRITE_ZEROES may cover a lot of disk).
//! Applying the records in order reproduces the disk. An empty log is valid.

/// Largest single write accepted (QEMU's mirror uses far smaller requests).
pub const MAX_WRITE: usize = 64 * 1024 * 1024;
const ZERO_FLAG: u32 = 1 << 31;

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Data(u64, &'a [u8]),
    Zero(u64, u64),
}

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

/// Appends a zero record (splitting runs longer than a record can say).
pub fn push_zero(log: &mut Vec<u8>, mut offset: u64, mut len: u64) {
    while len > 0 {
        let n = len.min(u64::from(ZERO_FLAG - 1));
        log.extend_from_slice(&offset.to_le_bytes());
        log.extend_from_slice(&(n as u32 | ZERO_FLAG).to_le_bytes());
        offset += n;
        len -= n;
    }
}

/// Decodes and checks a log against the disk size, without copying data.
pub fn parse(log: &[u8], disk_size: u64) -> Result<Vec<Record<'_>>, DiskLogError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < log.len() {
        if log.len() - at < 12 {
            return Err(DiskLogError::Truncated(at));
        }
        let offset = u64::from_le_bytes(log[at..at + 8].try_into().unwrap_or_default());
        let raw = u32::from_le_bytes(log[at + 8..at + 12].try_into().unwrap_or_default());
        if raw & ZERO_FLAG != 0 {
            let len = u64::from(raw & !ZERO_FLAG);
            if offset.checked_add(len).is_none_or(|end| end > disk_size) {
                return Err(DiskLogError::OutOfRange {
                    offset,
                    len,
                    size: disk_size,
                });
            }
            out.push(Record::Zero(offset, len));
            at += 12;
            continue;
        }
        let len = raw as usize;
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
        out.push(Record::Data(offset, &log[start..start + len]));
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
        push_zero(&mut log, 100, 50);
        let w = parse(&log, 4096).unwrap();
        assert_eq!(
            w,
            vec![
                Record::Data(0, &b"abc"[..]),
                Record::Data(4093, &b"xyz"[..]),
                Record::Zero(100, 50)
            ]
        );
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
