//! userfaultfd asynchronous write-protect and `PAGEMAP_SCAN` (Linux ≥ 6.7):
//! the kernel ABI, and the protocol between tandemd and the preload
//! library that registers guest RAM inside QEMU.
//!
//! This one file is compiled into two crates: `tandem-dirty` (tandemd's
//! side, as `tandem_dirty::uffd::sys`) and `tandem-uffd-preload` (QEMU's
//! side, by `#[path]`), so the two cannot disagree on a constant or a
//! message layout. It uses only `std`, `libc` and `crate::procfs` (which
//! both crates have).
//!
//! The constants are the kernel's uapi values (`linux/userfaultfd.h`,
//! `linux/fs.h`); the `libc` crate does not have them yet, and the build
//! hosts' headers predate them. The tests check the ioctl numbers against
//! the values the kernel headers give.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: only faults taken in user mode are delivered.
/// Lets a process without `CAP_SYS_PTRACE` create a userfaultfd when
/// `vm.unprivileged_userfaultfd` is 0. Asynchronous write-protect delivers
/// no faults at all (the kernel resolves them), so it loses nothing; the
/// preload's probe checks that kernel-mode writes are still recorded.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// What the tracker needs: write faults resolved by the kernel itself
/// (async), on shmem, including pages not yet populated.
pub const WP_FEATURES: u64 =
    UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED;

pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `PAGEMAP_SCAN` flags: write-protect the pages that match (the re-arm,
/// atomic with the read per page table entry), and fail unless every area
/// in the range is registered for asynchronous write-protect.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGEMAP_SCAN` page categories.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// One run of pages `PAGEMAP_SCAN` reports: `[start, end)` with the same
/// categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inv_mask: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `_IOWR(ty, nr, size)` on Linux's generic ioctl encoding (x86, arm64,
/// riscv: direction in bits 30–31, size in 16–29, type in 8–15).
const fn iowr(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    (3 << 30) | ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

pub const UFFDIO_API: libc::c_ulong = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: libc::c_ulong = iowr(0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
pub const UFFDIO_WRITEPROTECT: libc::c_ulong =
    iowr(0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>());
pub const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new userfaultfd for this process's memory, close-on-exec and
/// non-blocking, with `flags` (e.g. [`UFFD_USER_MODE_ONLY`]).
pub fn uffd_open(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes one integer of flags and returns a new
    // descriptor (or -1); it touches no memory of ours.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | flags,
        )
    })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The `UFFDIO_API` handshake asking for `features`. Returns the features
/// the kernel granted; `Err(ENOTSUP-like)` from the kernel when it has
/// none of them. The caller checks that every feature it needs is there.
pub fn uffd_api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which
    // `api` is (repr(C), the kernel's layout; the ioctl number encodes its
    // size), and lives across the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) } as _)?;
    Ok(api.features)
}

/// Registers `[start, start + len)` of this process for write-protect
/// tracking through `uffd`.
pub fn uffd_register_wp(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct
    // uffdio_register`, which `reg` is; the range is only looked up in the
    // process's address space, never dereferenced by us.
    check(unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister,
        )
    } as _)?;
    Ok(())
}

/// Write-protects (`protect`) or unprotects a registered range.
pub fn uffd_writeprotect(
    uffd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    protect: bool,
) -> io::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`,
    // which `wp` is; it changes page protections of the registered range
    // only, never memory contents.
    check(unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_WRITEPROTECT,
            &mut wp as *mut UffdioWriteprotect,
        )
    } as _)?;
    Ok(())
}

/// The written pages of `[start, end)` of the process whose pagemap
/// `pagemap` is, as address runs passed to `found`; with `rearm`, every
/// page is write-protected again in the same walk (what was written
/// before the walk reached a page is reported now, what is written after
/// it is reported next time). `buf` is scratch for the kernel's output;
/// its capacity bounds how many runs one ioctl returns (the walk
/// continues from where the kernel stopped). Fails with `EPERM` when an
/// area in the range is not registered for asynchronous write-protect.
pub fn scan_written(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    rearm: bool,
    buf: &mut Vec<PageRegion>,
    mut found: impl FnMut(u64, u64),
) -> io::Result<()> {
    if buf.capacity() == 0 {
        buf.reserve(512);
    }
    buf.clear();
    buf.resize(buf.capacity(), PageRegion::default());
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_CHECK_WPASYNC | if rearm { PM_SCAN_WP_MATCHING } else { 0 },
            start: at,
            end,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN reads and writes one `struct pm_scan_arg`
        // (`arg`) and writes at most `vec_len` `struct page_region`s at
        // `vec`, which is `buf`'s initialised storage of exactly that many
        // elements, alive and not otherwise borrowed across the call.
        let n = check(unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                PAGEMAP_SCAN,
                &mut arg as *mut PmScanArg,
            )
        } as _)? as usize;
        for r in &buf[..n.min(buf.len())] {
            found(r.start, r.end);
        }
        if arg.walk_end <= at {
            // No progress (should not happen): never loop for ever.
            return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = arg.walk_end;
    }
    Ok(())
}

/// A shared mapping of the RAM file in QEMU: `[start, end)` holds the file
/// from byte `offset` on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Area {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
}

/// The areas of `/proc/self/maps` text that map file `(major, minor,
/// inode)` shared, page-aligned ones only.
pub fn ram_areas(maps: &str, major: u32, minor: u32, inode: u64) -> Vec<Area> {
    crate::procfs::mappings_of(maps, major, minor, inode)
        .into_iter()
        .filter(|m| (m.start | m.end | m.offset) % 4096 == 0)
        .map(|m| Area {
            start: m.start,
            end: m.end,
            offset: m.offset,
        })
        .collect()
}

// ---- The protocol between tandemd and the preload ---------------------
//
// tandemd connects to the VM's socket (created by the shim, 0600, handed
// to QEMU as a listening descriptor), sends one `Request` and reads one
// `Reply`; on success the reply carries two descriptors (SCM_RIGHTS): the
// userfaultfd (which keeps the registration alive whatever QEMU does) and
// QEMU's own `/proc/self/pagemap`, opened by QEMU, so tandemd needs no
// ptrace right over QEMU to scan it. Both messages are fixed-size,
// little-endian, and start with a magic and a version.

pub const MAGIC: u32 = 0x5444_5546; // "TDUF"
pub const VERSION: u32 = 1;
pub const OP_REGISTER: u32 = 1;
pub const REQUEST_LEN: usize = 32;
pub const MAX_AREAS: usize = 8;
const MESSAGE_LEN: usize = 400;
pub const REPLY_LEN: usize = 40 + MAX_AREAS * 24 + MESSAGE_LEN;

/// tandemd asks QEMU to register its shared mappings of the RAM file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.op.to_le_bytes());
        b[12..16].copy_from_slice(&self.dev_major.to_le_bytes());
        b[16..20].copy_from_slice(&self.dev_minor.to_le_bytes());
        b[24..32].copy_from_slice(&self.inode.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Request, String> {
        if b.len() != REQUEST_LEN {
            return Err(format!("a request is {REQUEST_LEN} bytes, not {}", b.len()));
        }
        if u32_at(b, 0) != MAGIC || u32_at(b, 4) != VERSION {
            return Err("not a tandem uffd request of this version".into());
        }
        Ok(Request {
            op: u32_at(b, 8),
            dev_major: u32_at(b, 12),
            dev_minor: u32_at(b, 16),
            inode: u64_at(b, 24),
        })
    }
}

/// What the userfaultfd was created with.
pub const MODE_USER_ONLY: u32 = 1;

/// The preload's answer. `status` is 0 or an errno; `message` says what
/// was done or what failed, for `ft status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub status: i32,
    /// `MODE_*` bits the userfaultfd was created with.
    pub mode: u32,
    /// Features the kernel granted.
    pub features: u64,
    /// Pages the in-QEMU probe saw written, of the [`PROBE_ALL`] it wrote.
    pub probe: u32,
    pub areas: Vec<Area>,
    pub message: String,
}

/// The probe writes three pages: one in user mode, one by the kernel on
/// QEMU's behalf (`read(2)` into it), one first touched after protection.
pub const PROBE_USER: u32 = 1;
pub const PROBE_KERNEL: u32 = 2;
pub const PROBE_FIRST_TOUCH: u32 = 4;
pub const PROBE_ALL: u32 = PROBE_USER | PROBE_KERNEL | PROBE_FIRST_TOUCH;

impl Reply {
    pub fn failed(status: i32, message: impl Into<String>) -> Reply {
        Reply {
            status: if status == 0 { libc::EIO } else { status },
            message: message.into(),
            ..Reply::default()
        }
    }

    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.mode.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..28].copy_from_slice(&self.probe.to_le_bytes());
        let n = self.areas.len().min(MAX_AREAS);
        b[28..32].copy_from_slice(&(n as u32).to_le_bytes());
        for (i, a) in self.areas.iter().take(n).enumerate() {
            let at = 40 + i * 24;
            b[at..at + 8].copy_from_slice(&a.start.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&a.end.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&a.offset.to_le_bytes());
        }
        // Cut at a character boundary so the text stays UTF-8.
        let mut len = self.message.len().min(MESSAGE_LEN);
        while !self.message.is_char_boundary(len) {
            len -= 1;
        }
        let at = 40 + MAX_AREAS * 24;
        b[32..36].copy_from_slice(&(len as u32).to_le_bytes());
        b[at..at + len].copy_from_slice(&self.message.as_bytes()[..len]);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Reply, String> {
        if b.len() != REPLY_LEN {
            return Err(format!("a reply is {REPLY_LEN} bytes, not {}", b.len()));
        }
        if u32_at(b, 0) != MAGIC || u32_at(b, 4) != VERSION {
            return Err("not a tandem uffd reply of this version".into());
        }
        let n = u32_at(b, 28) as usize;
        let len = u32_at(b, 32) as usize;
        if n > MAX_AREAS || len > MESSAGE_LEN {
            return Err("a reply with more areas or text than fit".into());
        }
        let areas = (0..n)
            .map(|i| {
                let at = 40 + i * 24;
                Area {
                    start: u64_at(b, at),
                    end: u64_at(b, at + 8),
                    offset: u64_at(b, at + 16),
                }
            })
            .collect();
        let at = 40 + MAX_AREAS * 24;
        Ok(Reply {
            status: u32_at(b, 8) as i32,
            mode: u32_at(b, 12),
            features: u64_at(b, 16),
            probe: u32_at(b, 24),
            areas,
            message: String::from_utf8_lossy(&b[at..at + len]).into_owned(),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Sends `bytes` on a connected unix socket with `fds` attached
/// (SCM_RIGHTS), in one message.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for up to 4 descriptors, aligned as a cmsghdr must be.
    let mut control = [0u64; 8];
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: a zeroed msghdr is a valid empty one; its pointers are set
    // below to `iov` and `control`, both alive across sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        if fds.len() > 4 {
            return Err(io::Error::other("at most 4 descriptors per message"));
        }
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `control`, 64 bytes, which holds
        // CMSG_SPACE(16) = 32 bytes; CMSG_FIRSTHDR returns its start (it
        // is at least one header long), CMSG_DATA the data after the
        // header, into which exactly `fd_bytes` bytes are copied, within
        // `space`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: `msg` describes live buffers (`iov` over `bytes`, `control`);
    // sendmsg only reads them.
    let n = check(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } as _)?;
    if n as usize != bytes.len() {
        return Err(io::Error::other("short send"));
    }
    Ok(())
}

/// Receives one message of exactly `buf.len()` bytes and the descriptors
/// attached to it (close-on-exec). A descriptor arrived with a truncated
/// control message is an error (and the ones that did arrive are closed).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is a valid empty one; its pointers are set
    // below to `iov` and `control`, both alive across recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg writes at most iov_len bytes into `buf` and at most
    // msg_controllen bytes into `control`, both ours and alive.
    let n = check(unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_WAITALL,
        )
    } as _)? as usize;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` and set msg_controllen; the CMSG
    // macros walk only within it, and each SCM_RIGHTS payload is an array
    // of descriptors now installed in this process, which we take over.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "descriptors were lost (control message truncated)",
        ));
    }
    if n != buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("a {n}-byte message, expected {}", buf.len()),
        ));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The ioctl numbers as the kernel headers define them
    /// (`_IOWR(UFFDIO, 0x3F, struct uffdio_api)` etc., x86-64).
    #[test]
    fn ioctl_numbers_and_layouts_are_the_kernels() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn messages_round_trip() {
        let r = Request {
            op: OP_REGISTER,
            dev_major: 0,
            dev_minor: 0x1a,
            inode: 1 << 40,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let reply = Reply {
            status: 0,
            mode: MODE_USER_ONLY,
            features: WP_FEATURES,
            probe: PROBE_ALL,
            areas: vec![
                Area {
                    start: 0x7f00_0000_0000,
                    end: 0x7f00_4000_0000,
                    offset: 0,
                },
                Area {
                    start: 0x7f10_0000_0000,
                    end: 0x7f10_0000_1000,
                    offset: 1 << 30,
                },
            ],
            message: "registered ✓".into(),
        };
        assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
        // Too much text is cut at a character boundary, still UTF-8.
        let long = Reply::failed(libc::EPERM, "é".repeat(MESSAGE_LEN));
        let back = Reply::decode(&long.encode()).unwrap();
        assert_eq!(back.status, libc::EPERM);
        assert_eq!(back.message.chars().count(), MESSAGE_LEN / 2);
    }

    #[test]
    fn garbage_is_refused_not_trusted() {
        assert!(Request::decode(&[0u8; REQUEST_LEN]).is_err());
        assert!(Request::decode(&[0u8; 3]).is_err());
        let mut b = Reply::default().encode();
        b[28] = MAX_AREAS as u8 + 1;
        assert!(Reply::decode(&b).is_err());
        let mut b = Reply::default().encode();
        b[33] = 0xff;
        assert!(Reply::decode(&b).is_err());
    }

    #[test]
    fn areas_are_the_shared_page_aligned_mappings_of_the_file() {
        let maps = "\
7f2c4a000000-7f2c52000000 rw-s 00000000 00:1a 2057 /dev/shm/tandem-x/vm.ram
7f2c52000000-7f2c52001000 rw-p 00000000 00:1a 2057 /dev/shm/tandem-x/vm.ram
7f2c60000000-7f2c60200000 rw-s 08000000 00:1a 2057 /dev/shm/tandem-x/vm.ram (deleted)
7f2c70000000-7f2c70001000 rw-s 00000000 00:1a 2058 /dev/shm/other
";
        assert_eq!(
            ram_areas(maps, 0, 0x1a, 2057),
            [
                Area {
                    start: 0x7f2c4a000000,
                    end: 0x7f2c52000000,
                    offset: 0
                },
                Area {
                    start: 0x7f2c60000000,
                    end: 0x7f2c60200000,
                    offset: 0x0800_0000
                }
            ]
        );
    }

    #[test]
    fn descriptors_travel_with_the_message() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let msg = Reply::default().encode();
        send_with_fds(a.as_fd(), &msg, &[f.as_raw_fd(), f.as_raw_fd()]).unwrap();
        let mut buf = [0u8; REPLY_LEN];
        let fds = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(fds.len(), 2);
        assert_eq!(Reply::decode(&buf), Ok(Reply::default()));
        // Without descriptors, and a short message is an error.
        send_with_fds(a.as_fd(), &msg[..10], &[]).unwrap();
        drop(a);
        assert!(recv_with_fds(b.as_fd(), &mut buf).is_err());
    }
}
