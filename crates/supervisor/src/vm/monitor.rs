//! Following a running QEMU's events, and recording how it ended.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_api::{ExitInfo, VmState};
use tandem_qmp::{qmp, QmpClient};
use tokio::sync::watch;
use tracing::{info, warn};

use super::exit::{decide, ExitDecision, ExitHint};
use super::record::Live;
use super::{qemu_marker, query_status, Supervisor, Vm, TAIL_LINES};
use crate::shim;
use crate::util::{now_unix, tail_lines};

impl Supervisor {
    pub(super) fn spawn_monitor(self: &Arc<Self>, vm: Arc<Vm>, qmp: QmpClient) {
        let (exited_tx, exited_rx) = watch::channel(false);
        *vm.live.lock() = Some(Live {
            qmp: qmp.clone(),
            exited: exited_rx,
        });
        let sup = self.clone();
        tokio::spawn(async move {
            sup.monitor(&vm, qmp).await;
            sup.record_exit(&vm).await;
            let _ = exited_tx.send(true);
        });
    }

    /// Follows QMP events until the connection closes, keeping the state in
    /// step with QEMU (a guest-triggered stop, an accelerator failure).
    async fn monitor(&self, vm: &Vm, qmp: QmpClient) {
        let mut events = qmp.events();
        loop {
            tokio::select! {
                _ = qmp.closed() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => match ev.name.as_str() {
                        "STOP" | "RESUME" if vm.checkpoint_pause.load(Ordering::SeqCst) => {}
                        "STOP" => {
                            let status = query_status(&qmp).await.unwrap_or_default();
                            if status == "internal-error" {
                                warn!(vm = %vm.name, "accelerator internal error; stopping QEMU");
                                *vm.exit_hint.lock() =
                                    Some(ExitHint::AcceleratorFailure);
                                let _ = qmp.execute(qmp::quit {}).await;
                            } else if vm.state() == VmState::Running
                                && !vm.checkpoint_pause.load(Ordering::SeqCst)
                                && !matches!(
                                    status.as_str(),
                                    "running" | "postmigrate" | "finish-migrate" | "inmigrate"
                                )
                            {
                                // Events arrive late: a checkpoint's STOP can
                                // be read after its window closed. Only what
                                // QEMU says *now* marks the VM paused.
                                vm.update_logged(|r| r.state = VmState::Paused);
                            }
                        }
                        "RESUME" if vm.state() == VmState::Paused => {
                            let status = query_status(&qmp).await.unwrap_or_default();
                            if status == "running" && !vm.checkpoint_pause.load(Ordering::SeqCst) {
                                vm.update_logged(|r| r.state = VmState::Running);
                            }
                        }
                        "SHUTDOWN" => {
                            let reason = ev.data.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown");
                            let mut hint = vm.exit_hint.lock();
                            if hint.is_none() {
                                *hint = Some(ExitHint::Shutdown(reason.to_string()));
                            }
                        }
                        _ => {}
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Records how QEMU ended, once the shim has written its exit status.
    pub(super) async fn record_exit(&self, vm: &Vm) {
        let rec = vm.record();
        let marker = qemu_marker(&vm.qmp_socket());
        let deadline = Instant::now() + Duration::from_secs(10);
        let exit = loop {
            if let Some(e) = shim::read_exit(&vm.dir) {
                break Some(e);
            }
            let qemu_alive = rec.qemu(&marker).is_some_and(|q| q.is_alive());
            let shim_alive = rec.shim(&marker).is_some_and(|s| s.is_alive());
            if (!qemu_alive && !shim_alive) || Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let hint = vm.exit_hint.lock().take();
        let ExitDecision {
            state,
            cause,
            reason,
        } = decide(rec.stop_requested, exit, hint);
        let info = ExitInfo {
            code: exit.and_then(|e| e.code),
            signal: exit.and_then(|e| e.signal),
            at: exit.map(|e| e.at).unwrap_or_else(now_unix),
            reason,
            serial_tail: tail_lines(&vm.serial_log(), TAIL_LINES),
            qemu_log_tail: tail_lines(&vm.dir.join(shim::QEMU_LOG), TAIL_LINES),
        };
        // The guest's memory goes with its QEMU (unless it is a replica's
        // the guest never ran from), and so does the lease (the shim that
        // read it is gone).
        vm.remove_runtime_files(&vm.runtime());
        *vm.live.lock() = None;
        match state {
            VmState::Crashed => warn!(vm = %vm.name, reason = %info.reason, "VM crashed"),
            _ => info!(vm = %vm.name, reason = %info.reason, "VM shut off"),
        }
        vm.update_logged(|r| {
            r.state = state;
            r.qemu_pid = None;
            r.shim_pid = None;
            r.qemu_start = None;
            r.shim_start = None;
            r.stop_requested = false;
            r.last_exit = Some(info);
            r.exit_cause = Some(cause);
        });
    }
}
