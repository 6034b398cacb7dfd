//! Which pages of a RAM file hold data.
//!
//! A page QEMU's guest has never touched is a hole in the RAM file (tmpfs
//! and memfd allocate on first write or fault) and reads as zero; a scan
//! need not hash it. Two ways to find the holes, both taken while the guest
//! is stopped so that no page is allocated meanwhile:
//!
//! - `mincore(2)` on the mapping: one call for all of RAM. Used only on
//!   tmpfs with no swap configured: there a page that is not resident is a
//!   hole, because shmem pages leave memory only by swapping.
//! - `lseek(SEEK_DATA/SEEK_HOLE)` on the file: correct everywhere (swapped
//!   shmem pages count as data; filesystems without hole tracking report
//!   everything as data), but one pair of calls per extent.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::{PageSet, PAGE_SIZE};

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Pages of `map` (a shared mapping of all of `file`, from offset 0) that
/// may hold data. Errors leave the caller to treat every page as data.
pub fn data_pages(file: &File, map: &[u8]) -> std::io::Result<PageSet> {
    let pages = map.len() / PAGE_SIZE;
    if on_tmpfs(file)? && no_swap()? {
        return resident_pages(map, pages);
    }
    extents(file, pages)
}

fn on_tmpfs(file: &File) -> std::io::Result<bool> {
    // SAFETY: fstatfs writes into the zeroed struct we own; the fd is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

fn no_swap() -> std::io::Result<bool> {
    // SAFETY: sysinfo writes into the zeroed struct we own.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(si.totalswap == 0)
}

fn resident_pages(map: &[u8], pages: usize) -> std::io::Result<PageSet> {
    let mut vec = vec![0u8; pages];
    if pages > 0 {
        // SAFETY: `map` is a live mapping of at least `pages` pages starting
        // at a page boundary (mmap returns page-aligned addresses), and `vec`
        // has one byte per page, which is what mincore writes.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                pages * PAGE_SIZE,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut set = PageSet::new(pages);
    for (p, v) in vec.iter().enumerate() {
        if v & 1 != 0 {
            set.insert(p);
        }
    }
    Ok(set)
}

fn extents(file: &File, pages: usize) -> std::io::Result<PageSet> {
    let size = (pages * PAGE_SIZE) as i64;
    let fd = file.as_raw_fd();
    let mut set = PageSet::new(pages);
    let mut off: i64 = 0;
    // Each round moves `off` forward by at least one byte, and there are at
    // most `pages` extents.
    for _ in 0..=pages {
        if off >= size {
            break;
        }
        // SAFETY: lseek on an open fd has no memory effects.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `off`
            }
            return Err(e);
        }
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = hole.min(size).max(data + 1);
        set.insert_range(
            data as usize / PAGE_SIZE,
            (hole as usize).div_ceil(PAGE_SIZE),
        );
        off = hole;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn sparse_file(pages: usize, written: &[usize]) -> File {
        // /dev/shm is tmpfs: the case tandem runs in.
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.set_len((pages * PAGE_SIZE) as u64).unwrap();
        for &p in written {
            f.write_all_at(&[1], (p * PAGE_SIZE + 5) as u64).unwrap();
        }
        f
    }

    #[test]
    fn both_methods_find_the_written_pages() {
        let written = [0usize, 1, 2, 7, 64, 65, 200, 255];
        let f = sparse_file(256, &written);
        // SAFETY: a private test file mapped read-only and never truncated.
        let map = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                256 * PAGE_SIZE,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::slice::from_raw_parts(p as *const u8, 256 * PAGE_SIZE)
        };
        let by_seek = extents(&f, 256).unwrap();
        assert_eq!(by_seek.iter().collect::<Vec<_>>(), written);
        let by_mincore = resident_pages(map, 256).unwrap();
        assert_eq!(by_mincore.iter().collect::<Vec<_>>(), written);
        let chosen = data_pages(&f, map).unwrap();
        assert_eq!(chosen.iter().collect::<Vec<_>>(), written);
        // SAFETY: unmapping the mapping made above; `map` is not used after.
        unsafe { libc::munmap(map.as_ptr() as *mut libc::c_void, 256 * PAGE_SIZE) };
    }

    #[test]
    fn a_punched_page_becomes_a_hole() {
        let f = sparse_file(16, &[3, 4, 5]);
        // SAFETY: fallocate on our own test file.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (4 * PAGE_SIZE) as i64,
                PAGE_SIZE as i64,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(extents(&f, 16).unwrap().iter().collect::<Vec<_>>(), [3, 5]);
    }
}
