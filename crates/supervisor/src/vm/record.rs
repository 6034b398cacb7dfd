//! What is persisted for each VM, and the VM as the supervisor holds it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tandem_api::{ExitInfo, VmState};
use tandem_qmp::{QmpClient, QmpError};
use tandem_vmspec::{Accel, VmSpec};
use tokio::sync::{watch, Mutex as AsyncMutex};
use tracing::error;
use uuid::Uuid;

use super::exit::{ExitCause, ExitHint};
use super::{SupervisorError, QMP_SOCKET, SERIAL_LOG};
use crate::util::atomic_write_json;

pub(super) const RECORD_FILE: &str = "vm.json";

/// What is persisted for each VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct VmRecord {
    /// The VM's identity, given once when it is defined (and kept by a
    /// backup that takes it over). Records from before it was kept load
    /// with the nil UUID, and [`VmRecord::load`] gives them one.
    #[serde(default = "Uuid::nil", with = "uuid_text")]
    pub(super) uuid: Uuid,
    pub(super) spec_toml: String,
    pub(super) spec: VmSpec,
    pub(super) state: VmState,
    pub(super) accel: Option<Accel>,
    pub(super) shim_pid: Option<u32>,
    pub(super) qemu_pid: Option<u32>,
    /// The start times (`/proc/<pid>/stat` field 22) of the shim and of
    /// QEMU, taken when their pids were learnt: with the pid, they name
    /// the process, so a pid recycled after it ended (even while no
    /// tandemd ran) is never taken for it, nor signalled. Absent in records
    /// of older tandemds, which are checked by command line instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) shim_start: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) qemu_start: Option<u64>,
    pub(super) started_at: Option<u64>,
    /// A stop was asked for, so the coming exit is not a crash.
    pub(super) stop_requested: bool,
    pub(super) last_exit: Option<ExitInfo>,
    /// How `last_exit` came about. Absent in records written before it was
    /// kept: [`VmRecord::load`] derives it then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) exit_cause: Option<ExitCause>,
    /// The host files of the VM's last (or current) QEMU. Absent in
    /// records from before they were kept, and before the first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) runtime: Option<RuntimeFiles>,
    /// The directory the VM was last restored from in place (a replica a
    /// takeover ran it from, see [`BaseDir`]). Absent for every other VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) base: Option<BaseDir>,
    /// The VM is an incoming migration's that has not run here yet: a
    /// tandemd that starts and finds it so removes it (the migration it
    /// belonged to cannot finish without the tandemd that ended, and the
    /// source runs on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) incoming: bool,
}

/// A directory a VM runs from in place: its RAM file (while the QEMU
/// restored from it runs) and the backing files of its disks' overlays.
/// Until the guest has run from it (`owned` false) it is still someone
/// else's (a replica, resumable again): nothing of the VM's lifecycle
/// removes or writes it. Once the guest ran, it is the VM's own: marked so
/// in the directory ([`super::snapshot::OWNER_FILE`]) and removed with the
/// VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BaseDir {
    pub(super) dir: PathBuf,
    pub(super) owned: bool,
}

/// Where one QEMU of a VM keeps its RAM, and where its shim reads the fence
/// lease. Fixed for the life of that QEMU, so a tandemd that restarts (even
/// a newer one that would put them elsewhere) finds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RuntimeFiles {
    pub(super) ram_file: PathBuf,
    pub(super) lease_file: PathBuf,
}

/// A record as loaded, with what was filled in.
pub(super) struct Loaded {
    pub(super) rec: VmRecord,
    /// The record had no UUID and was given one: persist it.
    pub(super) new_uuid: bool,
}

impl VmRecord {
    /// Reads a record, filling in what older tandemds did not write.
    pub(super) fn load(path: &Path) -> Result<Loaded, RecordError> {
        let text = std::fs::read_to_string(path)?;
        let mut rec: VmRecord = serde_json::from_str(&text)?;
        if rec.exit_cause.is_none() {
            rec.exit_cause = rec
                .last_exit
                .as_ref()
                .map(|e| ExitCause::from_legacy(rec.state, e));
        }
        let new_uuid = rec.uuid.is_nil();
        if new_uuid {
            rec.uuid = Uuid::new_v4();
        }
        Ok(Loaded { rec, new_uuid })
    }
}

/// A UUID in `vm.json`: its hyphenated text.
mod uuid_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&u.hyphenated())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(d)?;
        Uuid::parse_str(&text).map_err(D::Error::custom)
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
    /// Where the next QEMU of this VM gets its RAM file and fence lease:
    /// in tandemd's private directory on the RAM file system.
    pub(super) next_runtime: RuntimeFiles,
    /// Serialises lifecycle operations on this VM.
    pub(super) ops: AsyncMutex<()>,
    pub(super) rec: Mutex<VmRecord>,
    /// Serialises writes of `vm.json`, in the order the record changed.
    pub(super) persist: Mutex<()>,
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
    /// The host files of the VM's current (or last) QEMU; before its first
    /// start, where the next one will have them.
    pub(super) fn runtime(&self) -> RuntimeFiles {
        self.rec
            .lock()
            .runtime
            .clone()
            .unwrap_or_else(|| self.next_runtime.clone())
    }
    /// Removes the RAM file and fence lease of a QEMU of this VM that is
    /// gone (or never ran). A RAM file used in place is left alone while
    /// its directory is not the VM's own ([`BaseDir`]): it is a replica's,
    /// resumable again after a failed start.
    pub(super) fn remove_runtime_files(&self, files: &RuntimeFiles) {
        let lent = self
            .rec
            .lock()
            .base
            .as_ref()
            .is_some_and(|b| !b.owned && files.ram_file.starts_with(&b.dir));
        if !lent {
            let _ = std::fs::remove_file(&files.ram_file);
        }
        let _ = std::fs::remove_file(&files.lease_file);
    }
    /// Changes the record and persists it atomically. Writes are serialised
    /// in the order of the changes, so the file always ends with the latest
    /// record, never a torn or an older one. The change stays in memory
    /// even when it cannot be persisted; the error says so.
    pub(super) fn update(&self, f: impl FnOnce(&mut VmRecord)) -> Result<(), SupervisorError> {
        let _order = self.persist.lock();
        let snapshot = {
            let mut rec = self.rec.lock();
            f(&mut rec);
            rec.clone()
        };
        atomic_write_json(&self.dir.join(RECORD_FILE), &snapshot).map_err(|source| {
            SupervisorError::Io {
                context: format!("persisting the record of VM `{}`", self.name),
                source,
            }
        })
    }
    /// [`Vm::update`] where nobody waits for the answer (QEMU's events, a
    /// recorded exit): a failure is logged as an error.
    pub(super) fn update_logged(&self, f: impl FnOnce(&mut VmRecord)) {
        if let Err(e) = self.update(f) {
            error!(vm = %self.name, "{e}; the record on disk is stale");
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
            uuid: Uuid::nil(),
            spec_toml: SPEC.into(),
            spec: tandem_vmspec::parse_and_validate(SPEC, |_| true).unwrap(),
            state,
            accel: None,
            shim_pid: None,
            qemu_pid: None,
            shim_start: None,
            qemu_start: None,
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
            runtime: None,
            base: None,
            incoming: false,
        }
    }

    /// A record an older tandemd wrote (no `exit_cause`) loads, and its
    /// cause is derived from the reason it kept.
    #[test]
    fn old_record_loads_with_a_derived_cause() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(RECORD_FILE);
        let mut old =
            serde_json::to_value(record(VmState::Shutoff, "shutdown: host-signal")).unwrap();
        assert!(old.get("exit_cause").is_none());
        old.as_object_mut().unwrap().remove("uuid");
        std::fs::write(&p, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
        let Loaded { rec, new_uuid } = VmRecord::load(&p).unwrap();
        assert!(new_uuid && !rec.uuid.is_nil());
        assert_eq!(rec.exit_cause, Some(ExitCause::HostSignal));
        assert_eq!(rec.last_exit.unwrap().reason, "shutdown: host-signal");

        let never_ran = VmRecord {
            last_exit: None,
            ..record(VmState::Defined, "")
        };
        atomic_write_json(&p, &never_ran).unwrap();
        assert_eq!(VmRecord::load(&p).unwrap().rec.exit_cause, None);
    }

    /// A UUID, once in the record, is read back as it was written.
    #[test]
    fn uuid_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(RECORD_FILE);
        let id = Uuid::new_v4();
        let rec = VmRecord {
            uuid: id,
            ..record(VmState::Defined, "")
        };
        atomic_write_json(&p, &rec).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(&format!("\"uuid\": \"{id}\"")), "{text}");
        let Loaded { rec, new_uuid } = VmRecord::load(&p).unwrap();
        assert_eq!((rec.uuid, new_uuid), (id, false));
    }

    /// A new record keeps every old field as it was and only adds
    /// `exit_cause` (and `uuid`, `runtime`), which older readers ignore; a
    /// recorded cause wins over the reason's words.
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
        rec.runtime = Some(RuntimeFiles {
            ram_file: "/dev/shm/tandem-x/old.ram".into(),
            lease_file: "/dev/shm/tandem-x/old.lease".into(),
        });

        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(RECORD_FILE);
        atomic_write_json(&p, &rec).unwrap();
        let loaded = VmRecord::load(&p).unwrap().rec;
        assert_eq!(loaded.exit_cause, Some(ExitCause::AcceleratorFailure));
        assert_eq!(loaded.runtime, rec.runtime);
    }
}
