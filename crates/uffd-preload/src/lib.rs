//! tandem's userfaultfd preload, loaded into QEMU with `LD_PRELOAD` by the
//! VM's shim (docs/dirty.md, "uffd").
//!
//! A userfaultfd registration belongs to the process that maps the memory,
//! so guest RAM must be registered from inside QEMU. This library does
//! nothing unless the shim handed it a listening unix socket (descriptor
//! number in `TANDEM_UFFD_FD`; the socket file is the shim's, 0600, beside
//! the VM's fence lease). Its constructor then starts one thread, with every
//! signal blocked (QEMU's signals are QEMU's), that serves that socket:
//!
//! (A wrapper that execs QEMU passes the socket on: the thread that serves
//! it is the one in the last program of the exec chain.)
//!
//! 1. tandemd connects (only root or QEMU's own user are answered) and
//!    names the RAM file (device and inode);
//! 2. the first time, the thread creates a userfaultfd
//!    (`UFFD_USER_MODE_ONLY`, which needs no privilege whatever
//!    `vm.unprivileged_userfaultfd` says) with asynchronous write-protect,
//!    and **probes it in QEMU's own context** (its user, its seccomp
//!    filter, its kernel): on a scratch memfd, a user-mode store, a
//!    kernel-mode write (`read(2)` into the page) and a first touch after
//!    protection must each be reported by `PAGEMAP_SCAN`, and a page only
//!    read must not be;
//! 3. it registers every shared mapping of the RAM file in
//!    `/proc/self/maps` for write-protect, and replies with the areas, the
//!    probe's result and two descriptors: the userfaultfd and
//!    `/proc/self/pagemap`, opened here, so tandemd needs no ptrace right
//!    over QEMU to scan it.
//!
//! The registration lives as long as QEMU (this library keeps its
//! descriptor): a restarted tandemd asks again and gets the same one.
//! Nothing here panics across the FFI boundary (the constructor and each
//! connection run under `catch_unwind`), and nothing here runs unless
//! asked.

#[allow(dead_code)]
#[path = "../../dirty/src/procfs.rs"]
mod procfs;
#[allow(dead_code)]
#[path = "../../dirty/src/uffd/sys.rs"]
mod sys;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sys::{Reply, Request};

/// The environment variable through which the shim names the listening
/// socket's descriptor.
pub const FD_ENV: &str = "TANDEM_UFFD_FD";

/// The listening socket, once taken (-1 before).
static LISTENER: AtomicI32 = AtomicI32::new(-1);

const PAGE: usize = 4096;

/// Run by the dynamic loader when QEMU loads this library, before QEMU's
/// `main`.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = tandem_uffd_init;

extern "C" fn tandem_uffd_init() {
    // Nothing may unwind into the dynamic loader.
    let _ = std::panic::catch_unwind(start);
}

fn start() {
    let Some(listener) = take_listener() else {
        return;
    };
    // The thread starts with every signal blocked, so no signal meant for
    // QEMU (which blocks the ones it reads by signalfd only in its own
    // threads, later) is ever delivered to it. This thread's mask is
    // restored after the spawn.
    let old = block_all_signals();
    let spawned = std::thread::Builder::new()
        .name("tandem-uffd".into())
        .stack_size(256 << 10)
        .spawn(move || serve(listener));
    restore_signals(&old);
    if let Err(e) = spawned {
        eprintln!("tandem-uffd: cannot start its thread: {e}");
    }
}

/// The listening socket the shim handed over, if it is one.
///
/// The process that serves it is the last one in an exec chain: a wrapper
/// that execs QEMU (`sh -c 'exec qemu …'`, numactl, taskset) loads this
/// library too and starts serving, but its thread ends at the exec and the
/// descriptor and variable pass on, unchanged, to QEMU. A process QEMU
/// forks (a network helper) gets the descriptor close-on-exec (a fork
/// handler), so it never reaches a program QEMU runs.
fn take_listener() -> Option<OwnedFd> {
    let value = std::env::var(FD_ENV).ok()?;
    let fd: RawFd = value.parse().ok()?;
    if fd < 3 {
        return None;
    }
    // SAFETY: only inspected, not owned, until it proves to be a listening
    // unix socket; getsockopt writes one int each.
    let (listening, domain) = unsafe {
        let fd = BorrowedFd::borrow_raw(fd);
        (
            sockopt_int(fd, libc::SO_ACCEPTCONN),
            sockopt_int(fd, libc::SO_DOMAIN),
        )
    };
    if listening != Some(1) || domain != Some(libc::AF_UNIX) {
        eprintln!("tandem-uffd: descriptor {fd} is not a listening unix socket; not serving");
        return None;
    }
    // SAFETY: the shim passed this descriptor for this library alone; it is
    // a listening socket, so no other code of QEMU's uses it.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    LISTENER.store(fd, Ordering::SeqCst);
    // SAFETY: registers a handler that runs in a forked child; the handler
    // only calls fcntl(2), which is async-signal-safe.
    unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    Some(listener)
}

/// In a child QEMU forks: the listening socket is not the child's to pass
/// on to what it runs.
extern "C" fn forked_child() {
    let fd = LISTENER.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: F_SETFD on the descriptor the child inherited; no memory
        // is touched.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask only write
    // the sets they are given.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
}

fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: restores a mask pthread_sigmask returned.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

fn serve(listener: OwnedFd) {
    loop {
        // SAFETY: accept4 on our listening socket; no peer address wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    // Out of descriptors or memory: try again later rather
                    // than spin.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                _ => {
                    eprintln!("tandem-uffd: accept: {e}; no longer serving");
                    return;
                }
            }
        }
        // SAFETY: accept4 just returned this descriptor to us.
        let conn = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_one(conn)));
        if served.is_err() {
            eprintln!("tandem-uffd: a request failed unexpectedly (see above)");
        }
    }
}

/// One request, one reply; the connection is closed after.
fn serve_one(conn: UnixStream) {
    if !peer_allowed(conn.as_fd()) {
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; sys::REQUEST_LEN];
    if (&conn).read_exact(&mut buf).is_err() {
        return;
    }
    let (reply, fds) = handle(&buf);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let _ = sys::send_with_fds(conn.as_fd(), &reply.encode(), &raw);
}

/// Only root (tandemd) or QEMU's own user may ask.
fn peer_allowed(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid cannot fail.
    rc == 0 && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}

/// The reply to one request, and the descriptors that go with it.
fn handle(request: &[u8]) -> (Reply, Vec<OwnedFd>) {
    let outcome = match Request::decode(request) {
        Ok(req) if req.op == sys::OP_REGISTER => register(&req),
        Ok(req) => Err((libc::EINVAL, format!("unknown request {}", req.op))),
        Err(e) => Err((libc::EINVAL, e)),
    };
    outcome.unwrap_or_else(|(errno, why)| (Reply::failed(errno, why), Vec::new()))
}

/// The userfaultfd, once made and probed; kept for QEMU's lifetime.
struct State {
    uffd: OwnedFd,
    features: u64,
    probe: u32,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

type Failure = (i32, String);

fn os_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Failure {
    move |e| {
        (
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{what}: {e}"),
        )
    }
}

fn register(req: &Request) -> Result<(Reply, Vec<OwnedFd>), Failure> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(os_err("/proc/self/maps"))?;
    let areas = sys::ram_areas(&maps, req.dev_major, req.dev_minor, req.inode);
    if areas.is_empty() {
        return Err((
            libc::ENOENT,
            format!(
                "QEMU maps no part of the RAM file (device {:x}:{:x}, inode {}) shared",
                req.dev_major, req.dev_minor, req.inode
            ),
        ));
    }
    if areas.len() > sys::MAX_AREAS {
        return Err((
            libc::E2BIG,
            format!("{} mappings of the RAM file", areas.len()),
        ));
    }
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if state.is_none() {
        *state = Some(new_uffd()?);
    }
    let Some(st) = state.as_ref() else {
        unreachable!("set just above");
    };
    // Registering a range this userfaultfd already holds is a no-op, so
    // every request registers every area it finds.
    for a in &areas {
        sys::uffd_register_wp(st.uffd.as_fd(), a.start, a.end - a.start).map_err(os_err(
            format_args!("UFFDIO_REGISTER {:#x}..{:#x}", a.start, a.end),
        ))?;
    }
    let pagemap = File::open("/proc/self/pagemap").map_err(os_err("/proc/self/pagemap"))?;
    let uffd = st.uffd.try_clone().map_err(os_err("dup"))?;
    let mib: u64 = areas.iter().map(|a| (a.end - a.start) >> 20).sum();
    // SAFETY: getpid and geteuid cannot fail.
    let (pid, uid) = unsafe { (libc::getpid(), libc::geteuid()) };
    let message = format!(
        "registered inside QEMU (pid {pid}, uid {uid}): {mib} MiB in {} area(s), user-mode-only userfaultfd; QEMU's probe saw user-mode, kernel-mode and first-touch writes",
        areas.len()
    );
    let reply = Reply {
        status: 0,
        mode: sys::MODE_USER_ONLY,
        features: st.features,
        probe: st.probe,
        areas,
        message,
    };
    Ok((reply, vec![uffd, OwnedFd::from(pagemap)]))
}

/// A userfaultfd with asynchronous write-protect, probed.
fn new_uffd() -> Result<State, Failure> {
    let uffd = sys::uffd_open(sys::UFFD_USER_MODE_ONLY)
        .map_err(os_err("userfaultfd(UFFD_USER_MODE_ONLY)"))?;
    let features = sys::uffd_api(uffd.as_fd(), sys::WP_FEATURES).map_err(os_err("UFFDIO_API"))?;
    if features & sys::WP_FEATURES != sys::WP_FEATURES {
        return Err((
            libc::EOPNOTSUPP,
            format!(
                "the kernel lacks asynchronous write-protect on shmem (features {features:#x}; Linux 6.7 or later has it)"
            ),
        ));
    }
    let probe = probe(uffd.as_fd()).map_err(|e| (libc::EIO, format!("probe: {e}")))?;
    if probe != sys::PROBE_ALL {
        let missing: Vec<&str> = [
            (sys::PROBE_USER, "a user-mode store"),
            (
                sys::PROBE_KERNEL,
                "a kernel-mode write (read(2) into the page)",
            ),
            (sys::PROBE_FIRST_TOUCH, "a first touch after protection"),
        ]
        .iter()
        .filter(|(bit, _)| probe & bit == 0)
        .map(|(_, what)| *what)
        .collect();
        return Err((
            libc::EIO,
            format!("probe: not recorded: {}", missing.join(", ")),
        ));
    }
    Ok(State {
        uffd,
        features,
        probe,
    })
}

/// A scratch shared mapping, unmapped on drop.
struct Scratch {
    addr: *mut u8,
    len: usize,
}

impl Scratch {
    fn page(&self, n: usize) -> *mut u8 {
        assert!(n * PAGE < self.len);
        // SAFETY: inside the mapping (checked above).
        unsafe { self.addr.add(n * PAGE) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `probe`, used no more.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// In this process, on a scratch memfd mapped shared as QEMU maps guest
/// RAM: which kinds of write `PAGEMAP_SCAN` reports after write-protect
/// (`PROBE_*` bits). Pages 0, 1 and 3 hold data before the protection,
/// page 2 does not; then page 0 is stored to, page 1 written by the kernel
/// (`read(2)` from a pipe), page 2 stored to, page 3 only read.
fn probe(uffd: BorrowedFd<'_>) -> Result<u32, String> {
    const PAGES: usize = 4;
    let len = PAGES * PAGE;
    // SAFETY: memfd_create takes a C string and flags, returns a new fd.
    let memfd = unsafe { libc::memfd_create(c"tandem-uffd-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if memfd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned it to us.
    let memfd = File::from(unsafe { OwnedFd::from_raw_fd(memfd) });
    memfd
        .set_len(len as u64)
        .map_err(|e| format!("ftruncate: {e}"))?;
    // SAFETY: a new shared mapping of our own memfd at an address the
    // kernel picks; unmapped when `scratch` drops.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let scratch = Scratch {
        addr: addr.cast(),
        len,
    };
    for p in [0, 1, 3] {
        // SAFETY: inside the scratch mapping.
        unsafe { std::ptr::write_volatile(scratch.page(p), 1) };
    }
    let start = scratch.addr as u64;
    sys::uffd_register_wp(uffd, start, len as u64).map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
    sys::uffd_writeprotect(uffd, start, len as u64, true)
        .map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))?;
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut buf = Vec::with_capacity(8);
    let mut scan = || -> Result<Vec<usize>, String> {
        let mut pages = Vec::new();
        sys::scan_written(
            pagemap.as_fd(),
            start,
            start + len as u64,
            true,
            &mut buf,
            |s, e| pages.extend(((s - start) as usize / PAGE)..((e - start) as usize / PAGE)),
        )
        .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
        Ok(pages)
    };
    let before = scan()?;
    if !before.is_empty() {
        return Err(format!(
            "pages {before:?} reported written right after write-protect"
        ));
    }
    // SAFETY: inside the scratch mapping.
    unsafe { std::ptr::write_volatile(scratch.page(0).add(8), 2) };
    kernel_write(scratch.page(1))?;
    // SAFETY: inside the scratch mapping.
    unsafe { std::ptr::write_volatile(scratch.page(2).add(8), 2) };
    // SAFETY: inside the scratch mapping.
    let _ = unsafe { std::ptr::read_volatile(scratch.page(3).add(8)) };
    let written = scan()?;
    if written.contains(&3) {
        return Err("a page only read was reported written".into());
    }
    let again = scan()?;
    if !again.is_empty() {
        return Err(format!("pages {again:?} still written after a re-arm"));
    }
    Ok([
        (0, sys::PROBE_USER),
        (1, sys::PROBE_KERNEL),
        (2, sys::PROBE_FIRST_TOUCH),
    ]
    .iter()
    .filter(|(p, _)| written.contains(p))
    .fold(0, |bits, (_, bit)| bits | bit))
}

/// The kernel writes 8 bytes at `at` on our behalf: `read(2)` from a pipe
/// (a copy to user memory made in kernel mode, as a `preadv` into guest
/// RAM by QEMU's block layer is).
fn kernel_write(at: *mut u8) -> Result<(), String> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these to us.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let bytes = [7u8; 8];
    // SAFETY: writes 8 bytes from `bytes`; reads them back into `at`,
    // which the caller guarantees is 8 writable bytes of our mapping.
    let n = unsafe {
        libc::write(w.as_raw_fd(), bytes.as_ptr().cast(), 8);
        libc::read(r.as_raw_fd(), at.cast(), 8)
    };
    if n != 8 {
        return Err(format!(
            "read(2) from a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole request path in this process (the test plays QEMU): a
    /// shared mapping of a tmpfs file, a request naming it, a reply with
    /// a passed probe and the two descriptors, and a scan through them
    /// that sees a write.
    #[test]
    fn registers_the_ram_mapping_and_hands_over_working_descriptors() {
        use std::os::unix::fs::MetadataExt;
        let path = format!("/dev/shm/tandem-uffd-preload-test-{}", std::process::id());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let len = 16 * PAGE;
        file.set_len(len as u64).unwrap();
        // SAFETY: a new shared mapping of our own file; unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let meta = file.metadata().unwrap();
        let req = Request {
            op: sys::OP_REGISTER,
            dev_major: libc::major(meta.dev()),
            dev_minor: libc::minor(meta.dev()),
            inode: meta.ino(),
        };
        let (reply, fds) = handle(&req.encode());
        assert_eq!(reply.status, 0, "{}", reply.message);
        assert_eq!(reply.probe, sys::PROBE_ALL);
        assert_eq!(reply.areas.len(), 1);
        assert_eq!(reply.areas[0].start, map as u64);
        assert_eq!(fds.len(), 2);
        let pagemap = &fds[1];
        let mut buf = Vec::new();
        let (start, end) = (reply.areas[0].start, reply.areas[0].end);
        sys::scan_written(pagemap.as_fd(), start, end, true, &mut buf, |_, _| {}).unwrap();
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(map.cast::<u8>().add(5 * PAGE), 1) };
        let mut seen = Vec::new();
        sys::scan_written(pagemap.as_fd(), start, end, true, &mut buf, |s, e| {
            seen.push(((s - start) / PAGE as u64, (e - start) / PAGE as u64))
        })
        .unwrap();
        assert_eq!(seen, [(5, 6)]);
        // A second request is answered from the same registration.
        let (again, fds2) = handle(&req.encode());
        assert_eq!(again.status, 0, "{}", again.message);
        assert_eq!(fds2.len(), 2);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(map, len) };
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let (r, fds) = handle(&[0u8; 5]);
        assert_ne!(r.status, 0);
        assert!(fds.is_empty());
        let req = Request {
            op: sys::OP_REGISTER,
            dev_major: 0,
            dev_minor: 0,
            inode: u64::MAX,
        };
        let (r, fds) = handle(&req.encode());
        assert_eq!(r.status, libc::ENOENT, "{}", r.message);
        assert!(fds.is_empty());
        let (r, _) = handle(&Request { op: 99, ..req }.encode());
        assert_eq!(r.status, libc::EINVAL);
    }
}
