//! What is persisted for each VM, and the VM as the supervisor holds it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex as StdMutex;

use serde::{Deserialize, Serialize};
use tandem_api::{ExitInfo, VmState};
use tandem_qmp::{QmpClient, QmpError};
use tandem_vmspec::{Accel, VmSpec};
use tokio::sync::{watch, Mutex as AsyncMutex};
use tracing::warn;

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
    pub(super) rec: StdMutex<VmRecord>,
    pub(super) live: StdMutex<Option<Live>>,
    /// Facts the monitor learns before QEMU exits, used to explain the exit.
    pub(super) exit_hint: StdMutex<Option<String>>,
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
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(super) fn state(&self) -> VmState {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).state
    }
    pub(super) fn live(&self) -> Option<Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Changes the record and persists it atomically.
    pub(super) fn update(&self, f: impl FnOnce(&mut VmRecord)) {
        let snapshot = {
            let mut rec = self.rec.lock().unwrap_or_else(|p| p.into_inner());
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
