//! What is persisted for each VM, and the VM as the supervisor holds it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tandem_api::{ExitInfo, VmState};
use tandem_qmp::{QmpClient, QmpError};
use tandem_vmspec::{Accel, VmSpec};
use tokio::sync::{watch, Mutex as AsyncMutex};
use tracing::warn;

use super::exit::{ExitCause, ExitHint};
use super::{SupervisorError, QMP_SOCKET, SERIAL_LOG};
use crate::util::atomic_write_json;

pub(super) const RECORD_FILE: &str = "vm.json";

/// What is persisted for each VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct VmRecord {
    pub(super) spec_toml: String,
    pub(super) spec: VmSpec,
    pub(super) state: VmState,
    pub(super) accel: Option<Accel>,
    pub(super) shim_pid: Option<u32>,
    pub(super) qemu_pid: Option<u32>,
    pub(super) started_at: Option<u64>,
    /// A stop was asked for, so the coming exit is not a crash.
    pub(super) stop_requested: bool,
    pub(super) last_exit: Option<ExitInfo>,
    /// How `last_exit` came about. Absent in records written before it was
    /// kept: [`VmRecord::load`] derives it then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) exit_cause: Option<ExitCause>,
}

impl VmRecord {
    /// Reads a record, filling in what older tandemds did not write.
    pub(super) fn load(path: &Path) -> Result<VmRecord, RecordError> {
        let text = std::fs::read_to_string(path)?;
        let mut rec: VmRecord = serde_json::from_str(&text)?;
        if rec.exit_cause.is_none() {
            rec.exit_cause = rec
                .last_exit
                .as_ref()
                .map(|e| ExitCause::from_legacy(rec.state, e));
        }
        Ok(rec)
    }
}

/// Why a VM record could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Parse(#[from] serde_json::Error),
}

/// The connection to a running QEMU.
#[derive(Clone)]
pub(super) struct Live {
    pub(super) qmp: QmpClient,
    pub(super) exited: watch::Receiver<bool>,
}

pub(super) struct Vm {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) ram_file: PathBuf,
    /// Serialises lifecycle operations on this VM.
    pub(super) ops: AsyncMutex<()>,
    pub(super) rec: Mutex<VmRecord>,
    pub(super) live: Mutex<Option<Live>>,
    /// Facts the monitor learns before QEMU exits, used to explain the exit.
    pub(super) exit_hint: Mutex<Option<ExitHint>>,
    /// Set while a checkpoint has the guest stopped, so the monitor does not
    /// mistake the checkpoint's STOP/RESUME for a user's pause.
    pub(super) checkpoint_pause: AtomicBool,
}

impl Vm {
    pub(super) fn qmp_socket(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }
    pub(super) fn serial_log(&self) -> PathBuf {
        self.dir.join(SERIAL_LOG)
    }
    pub(super) fn record(&self) -> VmRecord {
        self.rec.lock().clone()
    }
    pub(super) fn state(&self) -> VmState {
        self.rec.lock().state
    }
    pub(super) fn live(&self) -> Option<Live> {
        self.live.lock().clone()
    }
    /// Changes the record and persists it atomically.
    pub(super) fn update(&self, f: impl FnOnce(&mut VmRecord)) {
        let snapshot = {
            let mut rec = self.rec.lock();
            f(&mut rec);
            rec.clone()
        };
        if let Err(e) = atomic_write_json(&self.dir.join(RECORD_FILE), &snapshot) {
            warn!(vm = %self.name, "cannot persist VM record: {e}");
        }
    }
    pub(super) fn bad_state(&self, op: &'static str) -> SupervisorError {
        SupervisorError::BadState {
            name: self.name.clone(),
            state: self.state(),
            op,
        }
    }
    pub(super) fn qmp_err(&self) -> impl FnOnce(QmpError) -> SupervisorError {
        let name = self.name.clone();
        move |source| SupervisorError::Qmp { name, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "old"
vcpus = 1
memory_mib = 128
[boot]
kernel = "/k"
initrd = "/i"
"#;

    fn record(state: VmState, reason: &str) -> VmRecord {
        VmRecord {
            spec_toml: SPEC.into(),
            spec: tandem_vmspec::parse_and_validate(SPEC, |_| true).unwrap(),
            state,
            accel: None,
            shim_pid: None,
            qemu_pid: None,
            started_at: Some(5),
            stop_requested: false,
            last_exit: Some(ExitInfo {
                code: Some(0),
                signal: None,
                at: 7,
                reason: reason.into(),
                serial_tail: vec!["a".into()],
                qemu_log_tail: vec![],
            }),
            exit_cause: None,
        }
    }

    /// A record an older tandemd wrote (no `exit_cause`) loads, and its
    /// cause is derived from the reason it kept.
    #[test]
    fn old_record_loads_with_a_derived_cause() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(RECORD_FILE);
        let old = serde_json::to_value(record(VmState::Shutoff, "shutdown: host-signal")).unwrap();
        assert!(old.get("exit_cause").is_none());
        std::fs::write(&p, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
        let rec = VmRecord::load(&p).unwrap();
        assert_eq!(rec.exit_cause, Some(ExitCause::HostSignal));
        assert_eq!(rec.last_exit.unwrap().reason, "shutdown: host-signal");

        let never_ran = VmRecord {
            last_exit: None,
            ..record(VmState::Defined, "")
        };
        atomic_write_json(&p, &never_ran).unwrap();
        assert_eq!(VmRecord::load(&p).unwrap().exit_cause, None);
    }

    /// A new record keeps every old field as it was and only adds
    /// `exit_cause`, which older readers ignore; a recorded cause wins over
    /// the reason's words.
    #[test]
    fn new_record_keeps_old_fields() {
        let mut rec = record(VmState::Crashed, "QEMU exited unexpectedly (exit code 0)");
        let old = serde_json::to_value(&rec).unwrap();
        rec.exit_cause = Some(ExitCause::AcceleratorFailure);
        let mut new = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            new["exit_cause"],
            serde_json::json!({"kind": "accelerator-failure"})
        );
        new.as_object_mut().unwrap().remove("exit_cause");
        assert_eq!(new, old);

        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(RECORD_FILE);
        atomic_write_json(&p, &rec).unwrap();
        assert_eq!(
            VmRecord::load(&p).unwrap().exit_cause,
            Some(ExitCause::AcceleratorFailure)
        );
    }
}
