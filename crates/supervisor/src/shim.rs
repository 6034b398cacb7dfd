//! The per-VM shim: the parent of one QEMU process.
//!
//! tandemd does not parent QEMU directly. It starts a small shim (tandemd
//! re-executed as `tandemd shim …`) in its own session, and the shim starts
//! QEMU, records its pid, waits for it and writes its exit status to a file.
//! So a VM survives a restart of tandemd, and its exit status is still known
//! even when it ends while no tandemd is running. This is the conmon model.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::util::{atomic_write_json, now_unix};

pub const PID_FILE: &str = "qemu.pid";
pub const EXIT_FILE: &str = "exit.json";
pub const QEMU_LOG: &str = "qemu.log";
/// While a VM is protected, its replication engine keeps this file holding
/// a deadline (unix milliseconds) it renews only while the backup answers.
/// Past the deadline the shim freezes QEMU (SIGSTOP): fencing that holds
/// even when tandemd itself is dead or stuck.
pub const FENCE_LEASE_FILE: &str = "fence-lease";
/// Written by the shim when it fenced QEMU.
pub const FENCED_FILE: &str = "fenced.json";
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// What the shim records when QEMU ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at: u64,
}

/// Runs in the shim process: start QEMU, record it, wait, record its end.
/// Returns the shim's own exit code.
pub fn run_shim(run_dir: &Path, qemu: &Path, args: &[String]) -> i32 {
    for sig in [Signal::SIGHUP, Signal::SIGINT] {
        // SAFETY: setting a signal disposition to SIG_IGN installs no
        // handler code; it only makes the shim immune to its session's
        // hangup and to Ctrl-C.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
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
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let mut child = match cmd.spawn() {
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
    let status = wait_enforcing_lease(&mut child, run_dir);
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

/// Waits for QEMU to end, freezing it if its fence lease expires.
fn wait_enforcing_lease(
    child: &mut std::process::Child,
    run_dir: &Path,
) -> std::io::Result<std::process::ExitStatus> {
    let mut fenced = false;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if !fenced {
            if let Some(deadline) = read_lease(run_dir) {
                let now = now_unix_ms();
                if now > deadline {
                    // Our own child, not yet reaped (try_wait above
                    // returned None), so the pid is still QEMU's.
                    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP);
                    fenced = true;
                    let _ = atomic_write_json(
                        &run_dir.join(FENCED_FILE),
                        &serde_json::json!({"at_ms": now, "lease_deadline_ms": deadline}),
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

pub fn read_lease(run_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(run_dir.join(FENCE_LEASE_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How tandemd starts a shim.
#[derive(Debug, Clone)]
pub struct ShimLauncher {
    /// The executable that understands `shim --run-dir D --qemu Q -- ARGS`.
    pub program: PathBuf,
}

impl ShimLauncher {
    pub fn spawn(
        &self,
        run_dir: &Path,
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
