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

use nix::errno::Errno;
use nix::sys::statfs::{fstatfs, TMPFS_MAGIC};
use nix::sys::sysinfo::sysinfo;
use nix::unistd::{lseek, Whence};

use crate::{PageSet, PAGE_SIZE};

/// Pages of `map` (a shared mapping of all of `file`, from offset 0) that
/// may hold data. Errors leave the caller to treat every page as data.
pub fn data_pages(file: &File, map: &[u8]) -> std::io::Result<PageSet> {
    data_pages_at(file, map.as_ptr(), map.len())
}

/// [`data_pages`] for a mapping known only by its address and length (a
/// raw mapping that is never turned into a slice, because others write
/// it). `addr` must be where `file` is mapped, from offset 0, for `len`
/// bytes; any other address only makes the answer wrong (or an error),
/// since `mincore(2)` reads nothing at it.
pub fn data_pages_at(file: &File, addr: *const u8, len: usize) -> std::io::Result<PageSet> {
    let pages = len / PAGE_SIZE;
    if on_tmpfs(file)? && no_swap()? {
        return resident_pages(addr, pages);
    }
    extents(file, pages)
}

fn on_tmpfs(file: &File) -> std::io::Result<bool> {
    Ok(fstatfs(file)?.filesystem_type() == TMPFS_MAGIC)
}

fn no_swap() -> std::io::Result<bool> {
    Ok(sysinfo()?.swap_total() == 0)
}

fn resident_pages(addr: *const u8, pages: usize) -> std::io::Result<PageSet> {
    let mut vec = vec![0u8; pages];
    if pages > 0 {
        // libc, not nix: nix has no mincore(2).
        // SAFETY: mincore only asks the kernel about the address range; it
        // never dereferences it in this process, and fails (ENOMEM, EINVAL)
        // on a range that is not mapped or not page-aligned. The one
        // buffer it writes, `vec`, has one byte per page, which is what
        // mincore writes.
        let rc = unsafe {
            libc::mincore(
                addr as *mut libc::c_void,
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
        let data = match lseek(fd, off, Whence::SeekData) {
            Ok(data) => data,
            Err(Errno::ENXIO) => break, // no data past `off`
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = lseek(fd, data, Whence::SeekHole)?;
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
    use nix::fcntl::{fallocate, FallocateFlags};
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
    use std::num::NonZeroUsize;
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
        let len = 256 * PAGE_SIZE;
        // SAFETY: a private test file mapped read-only at an address the
        // kernel picks, never truncated while mapped.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                &f,
                0,
            )
        }
        .expect("mmap");
        // SAFETY: the mapping is `len` readable bytes until unmapped below.
        let map = unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), len) };
        let by_seek = extents(&f, 256).unwrap();
        assert_eq!(by_seek.iter().collect::<Vec<_>>(), written);
        let by_mincore = resident_pages(map.as_ptr(), 256).unwrap();
        assert_eq!(by_mincore.iter().collect::<Vec<_>>(), written);
        let chosen = data_pages(&f, map).unwrap();
        assert_eq!(chosen.iter().collect::<Vec<_>>(), written);
        // SAFETY: unmapping the mapping made above; `map` is not used after.
        unsafe { munmap(ptr, len) }.expect("munmap");
    }

    #[test]
    fn a_punched_page_becomes_a_hole() {
        let f = sparse_file(16, &[3, 4, 5]);
        let rc = fallocate(
            f.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (4 * PAGE_SIZE) as i64,
            PAGE_SIZE as i64,
        );
        assert_eq!(rc, Ok(()));
        assert_eq!(extents(&f, 16).unwrap().iter().collect::<Vec<_>>(), [3, 5]);
    }
}
