//! Making a byte range of a file read as zeroes, cheaply when the file
//! system allows it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Largest buffer of zeroes written when the file system cannot
/// deallocate: big enough to amortise syscalls, small enough that a 4 GiB
/// TRIM does not cost 4 GiB of memory.
const ZERO_CHUNK: u64 = 1 << 20;

/// Makes `[offset, offset + len)` of `file` read as zeroes without changing
/// its size. With `may_punch` the blocks may be deallocated (a hole);
/// without it they stay allocated (NBD_CMD_FLAG_NO_HOLE). Falls back to
/// writing zeroes where `fallocate` modes are unsupported (e.g. tmpfs has
/// no ZERO_RANGE), so the result reads the same on every file system.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, may_punch: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let end = offset
        .checked_add(len)
        .filter(|&e| i64::try_from(e).is_ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range past i64::MAX"))?;
    #[cfg(target_os = "linux")]
    {
        use nix::errno::Errno;
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let punch = [
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep,
            FallocateFlags::FALLOC_FL_ZERO_RANGE | keep,
        ];
        let modes: &[FallocateFlags] = if may_punch { &punch } else { &punch[1..] };
        // Both fit in i64: checked above via `end`.
        let (off, n) = (offset as nix::libc::off_t, len as nix::libc::off_t);
        'modes: for &mode in modes {
            loop {
                // The descriptor is borrowed from `file`, which stays open
                // for the call.
                match fallocate(file.as_raw_fd(), mode, off, n) {
                    Ok(()) => return Ok(()),
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => continue 'modes,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    let buf = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut at = offset;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        file.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn zeroes_exactly_the_range_and_keeps_size() {
        for punch in [true, false] {
            let f = tempfile::tempfile().unwrap();
            f.write_all_at(&[0xffu8; 3 * 4096], 0).unwrap();
            zero_range(&f, 100, 5000, punch).unwrap();
            let mut b = vec![0u8; 3 * 4096];
            f.read_exact_at(&mut b, 0).unwrap();
            assert!(b[..100].iter().all(|&x| x == 0xff));
            assert!(b[100..5100].iter().all(|&x| x == 0));
            assert!(b[5100..].iter().all(|&x| x == 0xff));
            assert_eq!(f.metadata().unwrap().len(), 3 * 4096);
        }
    }

    #[test]
    fn rejects_overflowing_ranges() {
        let f = tempfile::tempfile().unwrap();
        assert!(zero_range(&f, u64::MAX, 2, true).is_err());
        assert!(zero_range(&f, i64::MAX as u64, 1, true).is_err());
        zero_range(&f, u64::MAX, 0, true).unwrap();
    }
}
