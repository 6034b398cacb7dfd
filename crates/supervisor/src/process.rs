//! Processes tandem knows by pid (QEMU, its shim), signalled safely.
//!
//! A pid is only a name until the process is gone; then the kernel gives
//! it to someone else. So a process is identified by its pid *and* its
//! start time (`/proc/<pid>/stat` field 22, clock ticks since boot), which
//! tandem records when it learns the pid. Before a signal, the process is
//! opened as a pidfd (`pidfd_open(2)`) and its start time checked again:
//! once that matches, the pidfd names that very process, and a signal sent
//! through it (`pidfd_send_signal(2)`) can only reach it, never a process
//! that inherited its pid. A pidfd also becomes readable when its process
//! exits, which is how [`PidFd::exited`] waits.

use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::libc;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// A process as tandem recorded it: its pid and its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22 (`starttime`, clock ticks after boot).
    pub start_ticks: u64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    pub start_ticks: u64,
    pub zombie: bool,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is `fields[N - 3]`.
    Some(ProcStat {
        zombie: fields.first()?.starts_with('Z'),
        ppid: fields.get(1)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// The process now at `pid`, if there is one.
pub fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Why a process was not signalled.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("pid {0} is gone")]
    Gone(u32),
    #[error("pid {pid} now belongs to another process (started at tick {found}, not {recorded}); not signalled")]
    NotTheSame { pid: u32, recorded: u64, found: u64 },
    #[error("pid {0} no longer runs what was recorded (its command line differs); not signalled")]
    Unrecognised(u32),
    #[error("signalling pid {pid}: {source}")]
    Io { pid: u32, source: Error },
}

impl ProcessIdentity {
    /// The live (non-zombie) process at `pid`, with its start time.
    pub fn of(pid: u32) -> Option<ProcessIdentity> {
        let st = stat(pid).filter(|s| !s.zombie)?;
        Some(ProcessIdentity {
            pid,
            start_ticks: st.start_ticks,
        })
    }

    /// The live child of `parent` at `pid`: how tandem learns QEMU's
    /// identity from the pid its shim wrote. A pid recycled after QEMU
    /// ended has another parent (the shim starts nothing else).
    pub fn child_of(pid: u32, parent: &ProcessIdentity) -> Option<ProcessIdentity> {
        let st = stat(pid).filter(|s| !s.zombie && s.ppid == parent.pid)?;
        parent.is_alive().then_some(ProcessIdentity {
            pid,
            start_ticks: st.start_ticks,
        })
    }

    /// Whether this very process still runs (not a zombie, not a
    /// process that got its pid later).
    pub fn is_alive(&self) -> bool {
        stat(self.pid).is_some_and(|s| !s.zombie && s.start_ticks == self.start_ticks)
    }

    /// A pidfd on this very process: opened, then the start time checked
    /// again, so it cannot be a later process with the same pid.
    pub fn open(&self) -> Result<PidFd, SignalError> {
        let fd = PidFd::open(self.pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => SignalError::Gone(self.pid),
            _ => SignalError::Io {
                pid: self.pid,
                source: e,
            },
        })?;
        match stat(self.pid) {
            Some(s) if s.start_ticks == self.start_ticks => Ok(fd),
            Some(s) => Err(SignalError::NotTheSame {
                pid: self.pid,
                recorded: self.start_ticks,
                found: s.start_ticks,
            }),
            None => Err(SignalError::Gone(self.pid)),
        }
    }

    /// Sends `sig` to this process, and to no other.
    pub fn signal(&self, sig: Signal) -> Result<(), SignalError> {
        self.open()?
            .send_signal(sig)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ESRCH) => SignalError::Gone(self.pid),
                _ => SignalError::Io {
                    pid: self.pid,
                    source: e,
                },
            })
    }
}

/// A process file descriptor: refers to one process for as long as it is
/// open, whatever happens to its pid.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// `pidfd_open(2)` on whatever process has `pid` now; callers check
    /// that it is the one they mean ([`ProcessIdentity::open`]).
    pub fn open(pid: u32) -> std::io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("no such pid {pid}")))?;
        // SAFETY: pidfd_open takes a pid and flags (0) and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(Error::other)?;
        // SAFETY: the kernel just returned this descriptor to us, and
        // nothing else owns it.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `pidfd_send_signal(2)`: fails with ESRCH once the process has
    /// ended, even if its pid is someone else's by now.
    pub fn send_signal(&self, sig: Signal) -> std::io::Result<()> {
        // SAFETY: the descriptor is a pidfd we own and keep open for the
        // call; `info` is NULL (the kernel fills in a kill()-like siginfo)
        // and flags are 0.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc < 0 {
            return Err(Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the process has exited (the pidfd is readable then).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a descriptor we own, timeout 0: poll
        // only writes `revents` of that struct.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// Waits up to `timeout` for the process to exit; whether it did.
    pub async fn exited(&self, timeout: Duration) -> bool {
        // SAFETY: the descriptor is ours (`self.0`) and stays open, neither
        // closed nor replaced, for as long as the registration lives: it
        // is dropped at the end of this function, which borrows `self`.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                self.0.as_raw_fd(),
                tokio::io::Interest::READABLE,
            )
        };
        let Ok(fd) = registered else {
            return self.has_exited();
        };
        tokio::time::timeout(timeout, async {
            loop {
                match fd.readable().await {
                    Ok(mut guard) if self.has_exited() => {
                        guard.retain_ready();
                        return;
                    }
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => return,
                }
            }
        })
        .await
        .is_ok()
            && self.has_exited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_parsed_past_odd_command_names() {
        let line = "4242 (qemu (evil) x) S 17 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 987654 1000 100 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                ppid: 17,
                start_ticks: 987654,
                zombie: false
            })
        );
        let zombie = line.replace(") S ", ") Z ");
        assert!(parse_stat(&zombie).unwrap().zombie);
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    /// A recorded pid whose start time does not match the process now at
    /// that pid (what a recycled pid looks like) is not signalled; the
    /// process it does name is.
    #[test]
    fn a_process_with_another_start_time_is_not_signalled() {
        let mut child = sleeper();
        let real = ProcessIdentity::of(child.id()).expect("the child runs");
        assert!(real.is_alive());
        let recycled = ProcessIdentity {
            start_ticks: real.start_ticks.wrapping_sub(1),
            ..real
        };
        assert!(!recycled.is_alive());
        let e = recycled.signal(Signal::SIGKILL).unwrap_err();
        assert!(matches!(e, SignalError::NotTheSame { .. }), "{e}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(child.try_wait().unwrap().is_none(), "the child was killed");

        real.signal(Signal::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: gone, and nothing is signalled in its name.
        assert!(!real.is_alive());
        assert!(real.signal(Signal::SIGKILL).is_err());
    }

    #[test]
    fn a_child_is_known_by_its_parent_and_a_pidfd_sees_it_exit() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let mut child = sleeper();
        let id = ProcessIdentity::child_of(child.id(), &me).expect("our child");
        let init = ProcessIdentity::of(1).unwrap();
        assert_eq!(ProcessIdentity::child_of(child.id(), &init), None);

        let fd = id.open().unwrap();
        assert!(!fd.has_exited());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(!rt.block_on(fd.exited(Duration::from_millis(50))));
        fd.send_signal(Signal::SIGTERM).unwrap();
        assert!(rt.block_on(fd.exited(Duration::from_secs(5))));
        // Exited but not reaped yet: a zombie is not alive.
        assert!(!id.is_alive());
        child.wait().unwrap();
    }
}
