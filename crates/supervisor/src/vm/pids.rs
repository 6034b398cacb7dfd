//! A VM's QEMU and shim as its record names them (audit L5): by pid and
//! start time, checked before they are believed alive or signalled, and
//! signalled through a pidfd.

use nix::sys::signal::Signal;

use super::record::VmRecord;
use crate::process::{PidFd, ProcessIdentity, SignalError};
use crate::util::process_matches;

/// A process a VM record names.
#[derive(Debug, Clone, Copy)]
pub(super) struct Recorded<'a> {
    pub(super) pid: u32,
    /// Its start time, when the record has it (`qemu_start`, `shim_start`).
    pub(super) start: Option<u64>,
    /// What its command line holds (this VM's QMP chardev): the check for
    /// records of older tandemds, which kept no start time.
    pub(super) marker: &'a str,
}

impl Recorded<'_> {
    fn identity(&self) -> Option<ProcessIdentity> {
        self.start.map(|start_ticks| ProcessIdentity {
            pid: self.pid,
            start_ticks,
        })
    }

    /// Whether the recorded process still runs (not a zombie, and not a
    /// later process that inherited its pid).
    pub(super) fn is_alive(&self) -> bool {
        match self.identity() {
            Some(id) => id.is_alive(),
            None => process_matches(self.pid, self.marker),
        }
    }

    /// A pidfd on the recorded process, opened and then checked to still
    /// be that process: from then on it cannot name another one.
    pub(super) fn open(&self) -> Result<PidFd, SignalError> {
        if let Some(id) = self.identity() {
            return id.open();
        }
        let fd = PidFd::open(self.pid).map_err(|_| SignalError::Gone(self.pid))?;
        if process_matches(self.pid, self.marker) {
            Ok(fd)
        } else {
            Err(SignalError::Unrecognised(self.pid))
        }
    }

    /// Sends `sig` to the recorded process, and to no other.
    pub(super) fn signal(&self, sig: Signal) -> Result<PidFd, SignalError> {
        let fd = self.open()?;
        fd.send_signal(sig).map_err(|source| SignalError::Io {
            pid: self.pid,
            source,
        })?;
        Ok(fd)
    }
}

impl VmRecord {
    /// QEMU, as recorded.
    pub(super) fn qemu<'a>(&self, marker: &'a str) -> Option<Recorded<'a>> {
        Some(Recorded {
            pid: self.qemu_pid?,
            start: self.qemu_start,
            marker,
        })
    }

    /// QEMU's shim, as recorded (its command line carries QEMU's, marker
    /// included).
    pub(super) fn shim<'a>(&self, marker: &'a str) -> Option<Recorded<'a>> {
        Some(Recorded {
            pid: self.shim_pid?,
            start: self.shim_start,
            marker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    /// A record whose QEMU pid now belongs to a process started at another
    /// time (a recycled pid) does not make that process alive, and it is
    /// not signalled; with the right start time it is.
    #[test]
    fn a_recorded_pid_with_another_start_time_is_not_signalled() {
        let mut child = sleeper();
        let start = ProcessIdentity::of(child.id()).unwrap().start_ticks;
        let stale = Recorded {
            pid: child.id(),
            start: Some(start + 1),
            marker: "",
        };
        assert!(!stale.is_alive());
        assert!(matches!(
            stale.signal(Signal::SIGKILL),
            Err(SignalError::NotTheSame { .. })
        ));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(child.try_wait().unwrap().is_none(), "signalled anyway");

        // A record of an older tandemd (no start time) goes by the command
        // line: another program's is not this VM's QEMU.
        let legacy = Recorded {
            start: None,
            marker: "id=qmp,path=/nowhere/qmp.sock,",
            ..stale
        };
        assert!(!legacy.is_alive());
        assert!(matches!(
            legacy.signal(Signal::SIGKILL),
            Err(SignalError::Unrecognised(_))
        ));
        assert!(child.try_wait().unwrap().is_none(), "signalled anyway");

        let right = Recorded {
            start: Some(start),
            ..stale
        };
        assert!(right.is_alive());
        right.signal(Signal::SIGKILL).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(9));
    }
}
