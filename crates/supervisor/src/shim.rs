//! The per-VM shim: the parent of one QEMU process.
//!
//! tandemd does not parent QEMU directly. It starts a small shim (tandemd
//! re-executed as `tandemd shim …`) in its own session, and the shim starts
//! QEMU, records its pid, waits for it and writes its exit status to a file.
//! So a VM survives a restart of tandemd, and its exit status is still known
//! even when it ends while no tandemd is running. This is the conmon model.
//!
//! The shim also gives QEMU tandem's userfaultfd preload (when it is
//! installed): the library in `LD_PRELOAD` and a listening socket made
//! here, beside the fence lease, over which tandemd later asks QEMU to
//! register guest RAM for dirty tracking ([`UffdHandoff`], docs/dirty.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::util::{atomic_write_json, now_unix};

pub const PID_FILE: &str = "qemu.pid";
pub const EXIT_FILE: &str = "exit.json";
pub const QEMU_LOG: &str = "qemu.log";
/// While a VM is protected, its replication engine keeps a lease file
/// holding a deadline (unix milliseconds) it renews only while the backup
/// answers. Past the deadline the shim freezes QEMU (SIGSTOP): fencing that
/// holds even when tandemd itself is dead or stuck.
///
/// The lease lives on tmpfs, beside the guest's RAM file, at the path the
/// shim gets in [`LEASE_ENV`]. This name in the run directory is where
/// shims started by older tandemds (without that variable) read it.
pub const FENCE_LEASE_FILE: &str = "fence-lease";
/// The environment variable that tells the shim where its lease is. The
/// shim does not pass it on to QEMU.
pub const LEASE_ENV: &str = "TANDEM_FENCE_LEASE";
/// Written by the shim when it fenced QEMU.
pub const FENCED_FILE: &str = "fenced.json";
/// Where the userfaultfd preload library is (tandemd's environment, which
/// the shim inherits); `none` starts QEMU without it. Unset: the library
/// beside the tandemd executable ([`UFFD_PRELOAD_FILE`]).
pub const UFFD_PRELOAD_ENV: &str = "TANDEM_UFFD_PRELOAD";
/// The preload library's file name (the `tandem-uffd-preload` crate).
pub const UFFD_PRELOAD_FILE: &str = "libtandem_uffd_preload.so";
/// Tells the preload, inside QEMU, which inherited descriptor is its
/// listening socket. The preload removes it from QEMU's environment.
pub const UFFD_FD_ENV: &str = "TANDEM_UFFD_FD";
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// What the shim records when QEMU ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at: u64,
}

/// Runs in the shim process: start QEMU, record it, wait, record its end.
/// Returns the shim's own exit code. The fence lease is where
/// [`LEASE_ENV`] says (or, from an older tandemd, in `run_dir`).
pub fn run_shim(run_dir: &Path, qemu: &Path, args: &[String]) -> i32 {
    for sig in [Signal::SIGHUP, Signal::SIGINT] {
        // SAFETY: setting a signal disposition to SIG_IGN installs no
        // handler code; it only makes the shim immune to its session's
        // hangup and to Ctrl-C.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let lease = std::env::var_os(LEASE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| run_dir.join(FENCE_LEASE_FILE));
    run_shim_with_lease(run_dir, &lease, qemu, args)
}

fn run_shim_with_lease(run_dir: &Path, lease: &Path, qemu: &Path, args: &[String]) -> i32 {
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(QEMU_LOG))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "tandem shim: cannot open QEMU log in {}: {e}",
                run_dir.display()
            );
            return 1;
        }
    };
    let log2 = match log.try_clone() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tandem shim: {e}");
            return 1;
        }
    };
    let mut cmd = Command::new(qemu);
    cmd.args(args)
        .env_remove(LEASE_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // Dirty tracking by userfaultfd needs guest RAM registered inside
    // QEMU: its preload gets a listening socket beside the lease (and
    // normally the RAM file), served from inside QEMU, whether or not the VM is ever
    // protected (a protection can start at any time; unasked, the preload
    // does nothing).
    let handoff = find_uffd_preload().and_then(|lib| {
        UffdHandoff::bind(&uffd_socket(lease), &lib)
            .map_err(|e| eprintln!("tandem shim: QEMU starts without the uffd preload: {e}"))
            .ok()
    });
    if let Some(h) = &handoff {
        h.apply(&mut cmd);
    }
    let spawned = cmd.spawn();
    // QEMU holds the listening socket now; the shim's copy goes (the
    // socket file stays until QEMU ends).
    let socket_file = handoff.map(UffdHandoff::into_socket_file);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let exit = ShimExit {
                code: Some(127),
                signal: None,
                at: now_unix(),
            };
            let _ = std::fs::write(
                run_dir.join(QEMU_LOG),
                format!("tandem shim: cannot start {}: {e}\n", qemu.display()),
            );
            let _ = atomic_write_json(&run_dir.join(EXIT_FILE), &exit);
            return 1;
        }
    };
    if let Err(e) =
        crate::util::atomic_write(&run_dir.join(PID_FILE), child.id().to_string().as_bytes())
    {
        eprintln!("tandem shim: cannot record QEMU pid: {e}");
    }
    let status = wait_enforcing_lease(&mut child, run_dir, lease);
    drop(socket_file);
    let exit = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            ShimExit {
                code: s.code(),
                signal: s.signal(),
                at: now_unix(),
            }
        }
        Err(_) => ShimExit {
            code: None,
            signal: None,
            at: now_unix(),
        },
    };
    match atomic_write_json(&run_dir.join(EXIT_FILE), &exit) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tandem shim: cannot record QEMU exit: {e}");
            1
        }
    }
}

/// Waits for QEMU to end, freezing it if its fence lease (at `lease`)
/// expires.
fn wait_enforcing_lease(
    child: &mut std::process::Child,
    run_dir: &Path,
    lease: &Path,
) -> std::io::Result<std::process::ExitStatus> {
    let mut fenced = false;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if !fenced {
            if let Some(deadline) = read_lease(lease) {
                let now = deadline.now();
                let deadline = deadline.ms();
                if now > deadline {
                    // Our own child, not yet reaped (try_wait above
                    // returned None), so the pid is still QEMU's.
                    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP);
                    fenced = true;
                    let _ = atomic_write_json(
                        &run_dir.join(FENCED_FILE),
                        &serde_json::json!({"at_ms": now, "lease_deadline_ms": deadline, "clock": "boottime"}),
                    );
                    eprintln!(
                        "tandem shim: fence lease expired {} ms ago; QEMU frozen",
                        now - deadline
                    );
                }
            }
        }
        std::thread::sleep(LEASE_POLL);
    }
}

/// A fence lease's deadline, on the clock it was written in.
///
/// tandemd writes `boottime:<ms>`: `CLOCK_BOOTTIME`, which is host-wide
/// (the shim is another process on the same host), monotonic, and counts
/// suspend, so no wall-clock step (NTP, an operator's `date`) can move a
/// deadline. A bare number is a wall-clock (unix ms) deadline, as written
/// before 2026-12-04; a shim of that time reads the new format as "no
/// lease" (it does not parse), so an upgrade never freezes a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseDeadline {
    Boottime(u64),
    Unix(u64),
}

impl LeaseDeadline {
    pub fn ms(self) -> u64 {
        match self {
            LeaseDeadline::Boottime(ms) | LeaseDeadline::Unix(ms) => ms,
        }
    }

    /// Now, on the deadline's own clock.
    pub fn now(self) -> u64 {
        match self {
            LeaseDeadline::Boottime(_) => crate::util::boottime_ms(),
            LeaseDeadline::Unix(_) => now_unix_ms(),
        }
    }

    pub fn encode(self) -> String {
        match self {
            LeaseDeadline::Boottime(ms) => format!("boottime:{ms}"),
            LeaseDeadline::Unix(ms) => ms.to_string(),
        }
    }

    pub fn parse(s: &str) -> Option<LeaseDeadline> {
        let s = s.trim();
        match s.strip_prefix("boottime:") {
            Some(ms) => ms.parse().ok().map(LeaseDeadline::Boottime),
            None => s.parse().ok().map(LeaseDeadline::Unix),
        }
    }
}

/// The lease's deadline; `None` when there is no lease. The writer
/// replaces the file by rename, so a read sees one whole value.
pub fn read_lease(lease: &Path) -> Option<LeaseDeadline> {
    std::fs::read_to_string(lease)
        .ok()
        .and_then(|s| LeaseDeadline::parse(&s))
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The socket through which tandemd asks QEMU's uffd preload to register
/// guest RAM: beside the VM's fence lease, named after it (`NAME.uffd`
/// beside `NAME.lease`, and normally `NAME.ram`, in tandemd's private RAM
/// directory). The shim derives it from the lease it is given, tandemd
/// from the same lease (`GuestPort::uffd_socket`): after an in-place
/// takeover QEMU runs on the replica's RAM file elsewhere, the lease and
/// the socket stay here.
pub fn uffd_socket(runtime_file: &Path) -> PathBuf {
    runtime_file.with_extension("uffd")
}

/// The preload library: [`UFFD_PRELOAD_ENV`] if set (`none`: no library),
/// else [`UFFD_PRELOAD_FILE`] beside this executable, if it is there.
pub fn find_uffd_preload() -> Option<PathBuf> {
    match std::env::var_os(UFFD_PRELOAD_ENV) {
        Some(v) if v == "none" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::current_exe()
            .ok()?
            .parent()
            .map(|d| d.join(UFFD_PRELOAD_FILE))
            .filter(|p| p.is_file()),
    }
}

/// QEMU's end of the uffd preload: a listening unix socket made by the
/// shim (so QEMU needs no right to create files, and only root can
/// connect: the file is 0600 in a private directory), which QEMU inherits
/// with the library in `LD_PRELOAD`.
pub struct UffdHandoff {
    listener: std::os::unix::net::UnixListener,
    library: PathBuf,
    socket: SocketFile,
}

/// A socket file, removed when dropped.
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl UffdHandoff {
    /// Binds `socket` (replacing a stale one), 0600, for `library`. Fails
    /// if the library is not an absolute path to a file: the dynamic
    /// loader would ignore anything else with only a warning.
    pub fn bind(socket: &Path, library: &Path) -> std::io::Result<UffdHandoff> {
        use std::os::unix::fs::PermissionsExt;
        if !library.is_absolute() || !library.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no preload library at {}", library.display()),
            ));
        }
        let _ = std::fs::remove_file(socket);
        let listener = std::os::unix::net::UnixListener::bind(socket)?;
        let socket = SocketFile(socket.to_path_buf());
        std::fs::set_permissions(socket.path(), std::fs::Permissions::from_mode(0o600))?;
        Ok(UffdHandoff {
            listener,
            library: library.to_path_buf(),
            socket,
        })
    }

    /// Makes `cmd` load the library and inherit the listening socket.
    pub fn apply(&self, cmd: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = self.listener.as_raw_fd();
        let mut preload = self.library.as_os_str().to_os_string();
        if let Some(more) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
            preload.push(":");
            preload.push(more);
        }
        cmd.env("LD_PRELOAD", preload)
            .env(UFFD_FD_ENV, fd.to_string());
        // SAFETY: runs between fork and exec; fcntl(2) is
        // async-signal-safe, allocates nothing and only clears the
        // close-on-exec flag of the listening socket, which the child
        // inherited from us, so that QEMU keeps it across exec.
        unsafe {
            cmd.pre_exec(move || {
                use nix::fcntl::{fcntl, FcntlArg, FdFlag};
                fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                Ok(())
            });
        }
    }

    /// Closes this process's copy of the listening socket and keeps the
    /// file, to be removed when the returned value drops.
    pub fn into_socket_file(self) -> SocketFile {
        self.socket
    }
}

/// How tandemd starts a shim.
#[derive(Debug, Clone)]
pub struct ShimLauncher {
    /// The executable that understands `shim --run-dir D --qemu Q -- ARGS`.
    pub program: PathBuf,
}

impl ShimLauncher {
    /// Starts a shim for one QEMU: `run_dir` holds its pid, exit status and
    /// logs; `lease` is the fence lease it enforces.
    pub fn spawn(
        &self,
        run_dir: &Path,
        lease: &Path,
        qemu: &Path,
        args: &[String],
    ) -> std::io::Result<tokio::process::Child> {
        let shim_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("shim.log"))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg("shim")
            .arg("--run-dir")
            .arg(run_dir)
            .arg("--qemu")
            .arg(qemu)
            .arg("--")
            .args(args)
            .env(LEASE_ENV, lease)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(shim_log))
            .kill_on_drop(false);
        // Its own session: signals to tandemd's process group (Ctrl-C, a
        // service manager stopping tandemd) never reach the VM.
        // SAFETY: the closure runs between fork and exec; setsid() is
        // async-signal-safe, allocates nothing and touches no memory of the
        // parent, and it is the only call made there.
        unsafe {
            cmd.pre_exec(|| {
                let _ = nix::unistd::setsid();
                Ok(())
            });
        }
        cmd.spawn()
    }
}

pub fn read_pid(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

pub fn read_exit(run_dir: &Path) -> Option<ShimExit> {
    std::fs::read_to_string(run_dir.join(EXIT_FILE))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim enforces the lease where tandemd writes it (not in the run
    /// directory): past its deadline, the child is frozen and the fence
    /// recorded; the child's exit is still recorded after.
    #[test]
    fn an_expired_lease_beside_the_ram_file_freezes_the_child() {
        let run = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir().unwrap();
        let lease = shm.path().join("vm.lease");
        let deadline = LeaseDeadline::Boottime(crate::util::boottime_ms() + 300);
        crate::util::replace_file_volatile(&lease, deadline.encode().as_bytes()).unwrap();
        assert_eq!(read_lease(&lease), Some(deadline));
        let (run_dir, lease2) = (run.path().to_path_buf(), lease.clone());
        let shim = std::thread::spawn(move || {
            run_shim_with_lease(&run_dir, &lease2, Path::new("/bin/sleep"), &["30".into()])
        });
        let t = std::time::Instant::now();
        while !run.path().join(FENCED_FILE).exists() {
            assert!(t.elapsed().as_secs() < 10, "the shim never fenced");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(t.elapsed().as_millis() >= 200, "fenced before the deadline");
        assert!(!run.path().join(FENCE_LEASE_FILE).exists());
        let pid = read_pid(run.path()).expect("child pid");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit_once(')').unwrap().1.trim_start();
        assert!(state.starts_with('T'), "child not stopped: {state}");
        crate::util::send_signal(pid, Signal::SIGKILL);
        assert_eq!(shim.join().unwrap(), 0);
        let exit = read_exit(run.path()).expect("exit recorded");
        assert_eq!(exit.signal, Some(9));
    }

    /// QEMU is started with the preload library in `LD_PRELOAD` and the
    /// listening socket inherited (named in `TANDEM_UFFD_FD`); the socket
    /// file is root's alone, and goes when QEMU's end does.
    #[test]
    fn qemu_inherits_the_uffd_socket_and_loads_the_library() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libfake.so");
        std::fs::write(&lib, b"").unwrap();
        let socket = uffd_socket(&dir.path().join("vm.lease"));
        assert_eq!(socket, dir.path().join("vm.uffd"));
        assert_eq!(uffd_socket(&dir.path().join("vm.ram")), socket);
        assert!(UffdHandoff::bind(&socket, Path::new("libfake.so")).is_err());
        let h = UffdHandoff::bind(&socket, &lib).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "echo \"$TANDEM_UFFD_FD\"; echo \"$LD_PRELOAD\"; readlink /proc/$$/fd/$TANDEM_UFFD_FD",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
        h.apply(&mut cmd);
        let out = cmd.output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].parse::<i32>().is_ok_and(|fd| fd > 2), "{out}");
        assert!(lines[1].starts_with(lib.to_str().unwrap()), "{out}");
        assert!(lines[2].starts_with("socket:"), "{out}");
        let file = h.into_socket_file();
        assert!(file.path().exists());
        drop(file);
        assert!(!socket.exists());
    }

    /// The lease is on the boot clock: a deadline is compared with
    /// `CLOCK_BOOTTIME`, never with the wall clock, and the legacy bare
    /// number still reads as a wall-clock deadline. (A wall-clock step
    /// cannot be made in a test without disturbing the host; the boot
    /// clock being far from the unix epoch is what shows the two are not
    /// confused: a boottime deadline read as unix ms would be long past.)
    #[test]
    fn lease_deadlines_name_their_clock() {
        let soon = crate::util::boottime_ms() + 60_000;
        let lease = LeaseDeadline::parse(&LeaseDeadline::Boottime(soon).encode()).unwrap();
        assert_eq!(lease, LeaseDeadline::Boottime(soon));
        assert!(
            lease.now() < lease.ms(),
            "a boot-clock deadline a minute away is not due"
        );
        assert!(now_unix_ms() > soon, "the clocks differ on this host");
        assert_eq!(
            LeaseDeadline::parse("1700000000000\n"),
            Some(LeaseDeadline::Unix(1_700_000_000_000))
        );
        assert_eq!(LeaseDeadline::parse("boottime:x"), None);
        assert_eq!(LeaseDeadline::parse(""), None);
    }
}
