//! Why a VM's QEMU ended: the typed cause kept in the VM record, the facts
//! the monitor learns before the exit, and the one decision that turns
//! them (with the shim's exit status) into a state, a cause and a reason.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_api::{ExitInfo, VmState};

use crate::shim::ShimExit;

/// How a VM's last QEMU process ended, as decided when its exit was
/// recorded. Persisted in `vm.json` as `exit_cause` beside `last_exit`,
/// whose `reason` keeps the same story in words for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ExitCause {
    /// tandem was asked to stop the VM (`stop`, or `destroy` of a running
    /// VM), gracefully or by force.
    Requested,
    /// The guest powered itself off (QEMU's `SHUTDOWN` event said
    /// `guest-*`), and QEMU exited cleanly.
    GuestShutdown,
    /// QEMU was asked to end by a signal from someone on the host (an
    /// admin's `kill`, the host shutting down) and exited cleanly: nobody
    /// asked the VM to stop, so for fault tolerance it counts as a crash.
    HostSignal,
    /// QEMU reported another shutdown cause (its `SHUTDOWN` event's
    /// `reason`, e.g. `host-qmp-quit`) and exited cleanly.
    Shutdown { reason: String },
    /// QEMU never came up: it could not be executed, did not answer QMP in
    /// time, or failed to load a checkpoint.
    StartFailed,
    /// The accelerator failed (KVM's internal error) and tandem stopped QEMU.
    AcceleratorFailure,
    /// QEMU was killed by a signal nobody in tandem sent.
    Killed { signal: i32 },
    /// QEMU exited by itself, unasked, with this code (`None`: its exit
    /// status was never recorded).
    Crash { code: Option<i32> },
}

impl ExitCause {
    /// Whether the VM ended without anyone asking it to: what makes a
    /// protected VM's backup take over.
    pub fn is_crash(&self) -> bool {
        match self {
            ExitCause::Requested | ExitCause::GuestShutdown | ExitCause::Shutdown { .. } => false,
            ExitCause::HostSignal
            | ExitCause::StartFailed
            | ExitCause::AcceleratorFailure
            | ExitCause::Killed { .. }
            | ExitCause::Crash { .. } => true,
        }
    }

    /// The cause of an exit recorded before `exit_cause` was kept, derived
    /// from the record's state and reason (the words [`decide`] wrote). The
    /// only place that reads a cause out of text; used once, when an old
    /// record is loaded.
    pub(super) fn from_legacy(state: VmState, exit: &ExitInfo) -> ExitCause {
        let reason = exit.reason.as_str();
        match state {
            VmState::Crashed => {
                if reason.contains("; failed to start: ") {
                    ExitCause::StartFailed
                } else if reason.contains("; accelerator internal error") {
                    ExitCause::AcceleratorFailure
                } else if let Some(signal) = exit.signal {
                    ExitCause::Killed { signal }
                } else {
                    ExitCause::Crash { code: exit.code }
                }
            }
            _ => match reason.strip_prefix("shutdown: ") {
                // A host signal during a requested stop counted as one too.
                _ if reason.contains("host-signal") => ExitCause::HostSignal,
                Some(r) if r.starts_with("guest") => ExitCause::GuestShutdown,
                Some(r) => ExitCause::Shutdown {
                    reason: r.to_string(),
                },
                None => ExitCause::Requested,
            },
        }
    }
}

/// What the monitor (or a lifecycle operation) learns about an exit before
/// QEMU is gone. Its `Display` is the text that ends up in the exit reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ExitHint {
    /// The start failed, with why.
    StartFailed(String),
    /// QEMU stopped with `internal-error` and tandem quit it.
    AcceleratorFailure,
    /// QEMU's `SHUTDOWN` event, with its `reason` (`guest-shutdown`,
    /// `host-signal`, ...).
    Shutdown(String),
    /// A graceful stop ran out of time and tandem quit QEMU.
    PowerOffTimeout(Duration),
}

impl std::fmt::Display for ExitHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitHint::StartFailed(message) => write!(f, "failed to start: {message}"),
            ExitHint::AcceleratorFailure => {
                f.write_str("accelerator internal error (KVM emulation failure); QEMU was stopped")
            }
            ExitHint::Shutdown(reason) => write!(f, "shutdown: {reason}"),
            ExitHint::PowerOffTimeout(timeout) => write!(
                f,
                "guest did not power off within {timeout:?}; QEMU was stopped"
            ),
        }
    }
}

/// The outcome of one exit: the VM's new state, the cause and the reason
/// in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExitDecision {
    pub state: VmState,
    pub cause: ExitCause,
    pub reason: String,
}

/// Decides how QEMU ended from whether a stop was asked for, the shim's
/// exit status (`None`: never recorded) and what was learnt before.
pub(super) fn decide(
    stop_requested: bool,
    exit: Option<ShimExit>,
    hint: Option<ExitHint>,
) -> ExitDecision {
    let clean = exit.is_some_and(|e| e.code == Some(0) && e.signal.is_none());
    let host_signal = matches!(&hint, Some(ExitHint::Shutdown(r)) if r == "host-signal");
    if stop_requested && exit.is_some() {
        let cause = if host_signal {
            ExitCause::HostSignal
        } else {
            ExitCause::Requested
        };
        let reason = hint.map_or_else(|| "stopped on request".into(), |h| h.to_string());
        return ExitDecision {
            state: VmState::Shutoff,
            cause,
            reason,
        };
    }
    if let (true, Some(ExitHint::Shutdown(r))) = (clean, &hint) {
        let cause = if host_signal {
            ExitCause::HostSignal
        } else if r.starts_with("guest") {
            ExitCause::GuestShutdown
        } else {
            ExitCause::Shutdown { reason: r.clone() }
        };
        let reason = hint.map(|h| h.to_string()).unwrap_or_default();
        return ExitDecision {
            state: VmState::Shutoff,
            cause,
            reason,
        };
    }
    let why = match exit {
        Some(e) => format!("QEMU exited unexpectedly ({})", describe(&e)),
        None => "QEMU is gone and its exit status was not recorded".into(),
    };
    let cause = match (&hint, exit) {
        (Some(ExitHint::StartFailed(_)), _) => ExitCause::StartFailed,
        (Some(ExitHint::AcceleratorFailure), _) => ExitCause::AcceleratorFailure,
        (
            _,
            Some(ShimExit {
                signal: Some(signal),
                ..
            }),
        ) => ExitCause::Killed { signal },
        (_, exit) => ExitCause::Crash {
            code: exit.and_then(|e| e.code),
        },
    };
    ExitDecision {
        state: VmState::Crashed,
        cause,
        reason: hint.map(|h| format!("{why}; {h}")).unwrap_or(why),
    }
}

pub(super) fn describe(e: &ShimExit) -> String {
    match (e.code, e.signal) {
        (_, Some(s)) => format!("killed by signal {s}"),
        (Some(c), None) => format!("exit code {c}"),
        (None, None) => "exit status unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: Option<i32>, signal: Option<i32>) -> Option<ShimExit> {
        Some(ShimExit {
            code,
            signal,
            at: 1,
        })
    }

    fn shutdown(r: &str) -> Option<ExitHint> {
        Some(ExitHint::Shutdown(r.into()))
    }

    fn info(reason: &str, code: Option<i32>, signal: Option<i32>) -> ExitInfo {
        ExitInfo {
            code,
            signal,
            at: 1,
            reason: reason.into(),
            serial_tail: vec![],
            qemu_log_tail: vec![],
        }
    }

    #[test]
    fn guest_power_off_is_a_shutdown() {
        let d = decide(false, exit(Some(0), None), shutdown("guest-shutdown"));
        assert_eq!(d.state, VmState::Shutoff);
        assert_eq!(d.cause, ExitCause::GuestShutdown);
        assert_eq!(d.reason, "shutdown: guest-shutdown");
        assert!(!d.cause.is_crash());
    }

    #[test]
    fn host_signal_shuts_off_but_counts_as_a_crash() {
        let d = decide(false, exit(Some(0), None), shutdown("host-signal"));
        assert_eq!(d.state, VmState::Shutoff);
        assert_eq!(d.cause, ExitCause::HostSignal);
        assert!(d.cause.is_crash());
        // Even while a requested stop was under way (as before: the reason
        // said host-signal).
        let d = decide(true, exit(Some(0), None), shutdown("host-signal"));
        assert_eq!(
            (d.state, d.cause),
            (VmState::Shutoff, ExitCause::HostSignal)
        );
    }

    #[test]
    fn requested_stops_are_not_crashes_however_they_end() {
        for (e, hint, reason) in [
            (exit(Some(0), None), None, "stopped on request"),
            (exit(None, Some(9)), None, "stopped on request"),
            (
                exit(Some(0), None),
                shutdown("guest-shutdown"),
                "shutdown: guest-shutdown",
            ),
            (
                exit(Some(0), None),
                Some(ExitHint::PowerOffTimeout(Duration::from_secs(2))),
                "guest did not power off within 2s; QEMU was stopped",
            ),
        ] {
            let d = decide(true, e, hint);
            assert_eq!(d.state, VmState::Shutoff);
            assert_eq!(d.cause, ExitCause::Requested);
            assert_eq!(d.reason, reason);
            assert!(!d.cause.is_crash());
        }
    }

    #[test]
    fn other_clean_shutdowns_keep_qemus_reason() {
        let d = decide(false, exit(Some(0), None), shutdown("host-qmp-quit"));
        assert_eq!(d.state, VmState::Shutoff);
        assert_eq!(
            d.cause,
            ExitCause::Shutdown {
                reason: "host-qmp-quit".into()
            }
        );
        assert!(!d.cause.is_crash());
    }

    #[test]
    fn unasked_exits_are_crashes() {
        let d = decide(false, exit(None, Some(9)), None);
        assert_eq!(d.state, VmState::Crashed);
        assert_eq!(d.cause, ExitCause::Killed { signal: 9 });
        assert_eq!(d.reason, "QEMU exited unexpectedly (killed by signal 9)");

        let d = decide(false, exit(Some(1), None), shutdown("guest-shutdown"));
        assert_eq!(d.cause, ExitCause::Crash { code: Some(1) });
        assert_eq!(
            d.reason,
            "QEMU exited unexpectedly (exit code 1); shutdown: guest-shutdown"
        );

        let d = decide(true, None, None);
        assert_eq!(d.state, VmState::Crashed);
        assert_eq!(d.cause, ExitCause::Crash { code: None });
        assert_eq!(
            d.reason,
            "QEMU is gone and its exit status was not recorded"
        );

        let d = decide(
            false,
            exit(None, Some(9)),
            Some(ExitHint::StartFailed("cont: boom".into())),
        );
        assert_eq!(d.cause, ExitCause::StartFailed);
        assert_eq!(
            d.reason,
            "QEMU exited unexpectedly (killed by signal 9); failed to start: cont: boom"
        );

        let d = decide(
            false,
            exit(Some(0), None),
            Some(ExitHint::AcceleratorFailure),
        );
        assert_eq!(d.state, VmState::Crashed);
        assert_eq!(d.cause, ExitCause::AcceleratorFailure);
        for d in [
            decide(false, exit(None, Some(9)), None),
            decide(
                false,
                exit(Some(0), None),
                Some(ExitHint::AcceleratorFailure),
            ),
        ] {
            assert!(d.cause.is_crash());
        }
    }

    /// Every decision's reason, read back as an old record would be, gives
    /// the cause the decision made (host-signal during a requested stop
    /// aside, which reads back the same way it was counted).
    #[test]
    fn legacy_reasons_read_back_as_their_cause() {
        let cases = [
            (false, exit(Some(0), None), shutdown("guest-shutdown")),
            (false, exit(Some(0), None), shutdown("guest-panic")),
            (false, exit(Some(0), None), shutdown("host-signal")),
            (true, exit(Some(0), None), shutdown("host-signal")),
            (false, exit(Some(0), None), shutdown("host-qmp-quit")),
            (true, exit(Some(0), None), None),
            (true, exit(None, Some(9)), None),
            (
                true,
                exit(Some(0), None),
                Some(ExitHint::PowerOffTimeout(Duration::from_secs(5))),
            ),
            (false, exit(None, Some(9)), None),
            (false, exit(Some(3), None), None),
            (false, None, None),
            (false, exit(Some(1), None), shutdown("guest-shutdown")),
            (
                false,
                exit(None, Some(9)),
                Some(ExitHint::StartFailed("no QEMU pid within 15s".into())),
            ),
            (
                false,
                exit(Some(0), None),
                Some(ExitHint::AcceleratorFailure),
            ),
        ];
        for (stop, e, hint) in cases {
            let d = decide(stop, e, hint.clone());
            let old = info(&d.reason, e.and_then(|e| e.code), e.and_then(|e| e.signal));
            let derived = ExitCause::from_legacy(d.state, &old);
            assert_eq!(derived, d.cause, "{stop} {e:?} {hint:?}: {}", d.reason);
        }
    }

    /// Old records the way earlier tandemds wrote them.
    #[test]
    fn old_record_strings_give_a_cause() {
        let cases = [
            (VmState::Shutoff, "stopped on request", None, None, ExitCause::Requested),
            (
                VmState::Shutoff,
                "shutdown: guest-shutdown",
                Some(0),
                None,
                ExitCause::GuestShutdown,
            ),
            (
                VmState::Shutoff,
                "shutdown: host-signal",
                Some(0),
                None,
                ExitCause::HostSignal,
            ),
            (
                VmState::Crashed,
                "QEMU exited unexpectedly (killed by signal 9)",
                None,
                Some(9),
                ExitCause::Killed { signal: 9 },
            ),
            (
                VmState::Crashed,
                "QEMU exited unexpectedly (exit code 0); accelerator internal error (KVM emulation failure); QEMU was stopped",
                Some(0),
                None,
                ExitCause::AcceleratorFailure,
            ),
        ];
        for (state, reason, code, signal, want) in cases {
            let got = ExitCause::from_legacy(state, &info(reason, code, signal));
            assert_eq!(got, want, "{reason}");
            // The same answer the old text search gave.
            let old_answer = match state {
                VmState::Crashed => true,
                _ => reason.contains("host-signal"),
            };
            assert_eq!(got.is_crash(), old_answer, "{reason}");
        }
    }

    #[test]
    fn cause_serialises_with_a_kind_tag() {
        let j = serde_json::to_string(&ExitCause::Killed { signal: 9 }).unwrap();
        assert_eq!(j, r#"{"kind":"killed","signal":9}"#);
        let j = serde_json::to_string(&ExitCause::HostSignal).unwrap();
        assert_eq!(j, r#"{"kind":"host-signal"}"#);
        let back: ExitCause = serde_json::from_str(r#"{"kind":"crash","code":null}"#).unwrap();
        assert_eq!(back, ExitCause::Crash { code: None });
    }
}
