//! The replication engine's handle on one running VM.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem_api::VmState;
use tandem_qmp::{qmp, QmpClient};
use tandem_vmspec::VmSpec;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::exit::ExitCause;
use super::snapshot::CHECKPOINT_SOCKET;
use super::{query_status, Supervisor, SupervisorError, Vm};
use crate::checkpoint;
use crate::shim;
use crate::util::replace_file_volatile;

impl Supervisor {
    /// A handle for the replication engine on a running (or paused) VM.
    pub async fn guest_port(&self, name: &str) -> Result<GuestPort, SupervisorError> {
        let vm = self.get(name).await?;
        let live = match (vm.state(), vm.live()) {
            (VmState::Running | VmState::Paused, Some(live)) => live,
            _ => return Err(vm.bad_state("protect")),
        };
        checkpoint::prepare(&live.qmp)
            .await
            .map_err(|e| SupervisorError::Checkpoint {
                name: vm.name.clone(),
                message: e.to_string(),
            })?;
        let files = vm.runtime();
        Ok(GuestPort {
            vm,
            qmp: live.qmp,
            ram_file: files.ram_file,
            lease_file: files.lease_file,
        })
    }
}

impl GuestPort {
    /// Sets QEMU's migration settings back to what checkpoints need, after
    /// a live migration of this QEMU set its own (a failed or cancelled
    /// one: protection goes on here).
    pub async fn prepare_checkpoints(&self) -> Result<(), SupervisorError> {
        checkpoint::prepare(&self.qmp)
            .await
            .map_err(|e| SupervisorError::Checkpoint {
                name: self.vm.name.clone(),
                message: e.to_string(),
            })
    }
}

/// What the replication engine needs from one running VM: its RAM file, and
/// short windows in which the guest is stopped.
#[derive(Clone)]
pub struct GuestPort {
    vm: Arc<Vm>,
    qmp: QmpClient,
    /// This QEMU's RAM file and fence lease (fixed while it runs).
    ram_file: PathBuf,
    lease_file: PathBuf,
}

/// The guest, stopped for a checkpoint by [`GuestPort::stop_for_checkpoint`].
/// Holds the VM's lifecycle lock, so a user's pause or stop waits for the
/// window to end instead of racing it. End it with
/// [`CheckpointWindow::resume`]; dropping it instead leaves the guest
/// stopped (and releases the lock).
pub struct CheckpointWindow<'a> {
    port: &'a GuestPort,
    _op: tokio::sync::MutexGuard<'a, ()>,
    /// The window stopped a running guest, so it resumes it.
    stopped_it: bool,
}

impl CheckpointWindow<'_> {
    /// QEMU's device state (x-ignore-shared migration into tandem's socket).
    pub async fn device_state(&self, timeout: Duration) -> Result<Vec<u8>, SupervisorError> {
        save_device_state(&self.port.qmp, &self.port.vm, timeout).await
    }

    /// Starts saving QEMU's device state on another task and returns at
    /// once, so the caller can scan RAM while QEMU serialises its devices:
    /// the two take about as long as each other, and most of the device
    /// save is QEMU's time, not ours. Await [`DeviceStateJob::finish`]
    /// before the guest may resume.
    pub fn spawn_device_state(&self, timeout: Duration) -> DeviceStateJob {
        let qmp = self.port.qmp.clone();
        let vm = self.port.vm.clone();
        DeviceStateJob(tokio::spawn(async move {
            save_device_state(&qmp, &vm, timeout).await
        }))
    }

    /// Ends the window: continues the guest if the window stopped it.
    pub async fn resume(self) -> Result<(), SupervisorError> {
        if !self.stopped_it {
            return Ok(());
        }
        let vm = &self.port.vm;
        let resumed = self.port.qmp.execute(qmp::cont {}).await;
        vm.checkpoint_pause.store(false, Ordering::SeqCst);
        resumed.map(|_| ()).map_err(vm.qmp_err())
    }
}

async fn save_device_state(
    qmp: &QmpClient,
    vm: &Vm,
    timeout: Duration,
) -> Result<Vec<u8>, SupervisorError> {
    let qemu_pid = vm.record().qemu_pid;
    checkpoint::save_device_state_from(qmp, &vm.dir.join(CHECKPOINT_SOCKET), qemu_pid, timeout)
        .await
        .map_err(|e| SupervisorError::Checkpoint {
            name: vm.name.clone(),
            message: e.to_string(),
        })
}

/// A device-state save running beside the caller. Dropping it abandons the
/// save (the task is aborted), as dropping [`CheckpointWindow::device_state`]
/// would.
pub struct DeviceStateJob(tokio::task::JoinHandle<Result<Vec<u8>, SupervisorError>>);

impl DeviceStateJob {
    pub async fn finish(mut self) -> Result<Vec<u8>, SupervisorError> {
        match (&mut self.0).await {
            Ok(r) => r,
            Err(e) => Err(SupervisorError::Checkpoint {
                name: String::from("device-state task"),
                message: e.to_string(),
            }),
        }
    }
}

impl Drop for DeviceStateJob {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl GuestPort {
    pub fn name(&self) -> &str {
        &self.vm.name
    }
    /// The VM's identity: the same on the primary and, after a takeover,
    /// on the backup that now runs it.
    pub fn uuid(&self) -> Uuid {
        self.vm.rec.lock().uuid
    }
    /// The guest's RAM file (in tandemd's private directory; root's alone).
    pub fn ram_file(&self) -> &Path {
        &self.ram_file
    }
    pub fn ram_size(&self) -> u64 {
        self.vm.record().spec.memory_mib << 20
    }
    /// How the VM's QEMU ended, once the supervisor has recorded it;
    /// `None` while it runs or its exit is not yet recorded.
    /// [`ExitCause::is_crash`] says whether nobody asked it to stop (what
    /// makes a backup take over).
    pub fn exit_cause(&self) -> Option<ExitCause> {
        let rec = self.vm.record();
        match rec.state {
            VmState::Crashed => Some(rec.exit_cause.unwrap_or(ExitCause::Crash { code: None })),
            VmState::Shutoff => Some(rec.exit_cause.unwrap_or(ExitCause::Requested)),
            _ => None,
        }
    }
    /// Where this QEMU's uffd preload listens (the shim made it beside
    /// the fence lease; see [`shim::uffd_socket`]).
    pub fn uffd_socket(&self) -> PathBuf {
        shim::uffd_socket(&self.lease_file)
    }
    /// QEMU's pid, while it runs.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.vm.record().qemu_pid
    }
    /// The spec as the user wrote it, for defining the VM on the backup.
    pub fn spec_toml(&self) -> String {
        self.vm.record().spec_toml
    }
    pub fn spec(&self) -> VmSpec {
        self.vm.record().spec
    }
    pub fn is_closed(&self) -> bool {
        self.qmp.is_closed()
    }

    /// Stops the guest for a checkpoint (if it runs) and holds the VM's
    /// lifecycle lock until the returned window is resumed.
    pub async fn stop_for_checkpoint(&self) -> Result<CheckpointWindow<'_>, SupervisorError> {
        let op = self.vm.ops.lock().await;
        if !matches!(self.vm.state(), VmState::Running | VmState::Paused) {
            return Err(self.vm.bad_state("checkpoint"));
        }
        // QEMU, not our record, says whether the guest runs: a checkpoint
        // must never capture a running guest.
        let status = query_status(&self.qmp).await.map_err(self.vm.qmp_err())?;
        let running = status == "running";
        if running {
            self.vm.checkpoint_pause.store(true, Ordering::SeqCst);
            if let Err(e) = self.qmp.execute(qmp::stop {}).await {
                self.vm.checkpoint_pause.store(false, Ordering::SeqCst);
                return Err((self.vm.qmp_err())(e));
            }
        }
        Ok(CheckpointWindow {
            port: self,
            _op: op,
            stopped_it: running,
        })
    }

    /// Runs a QMP command on the VM's QEMU (for block jobs and the like).
    pub async fn qmp(
        &self,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, SupervisorError> {
        self.qmp
            .execute_raw(command, args, Duration::from_secs(10))
            .await
            .map_err(self.vm.qmp_err())
    }

    pub fn dir(&self) -> &Path {
        &self.vm.dir
    }

    /// Sets the fence lease: if not renewed, the shim freezes QEMU at
    /// `deadline_boottime_ms` (on `CLOCK_BOOTTIME`, see
    /// [`crate::shim::LeaseDeadline`]) even if tandemd is gone.
    ///
    /// The lease lives beside the RAM file on tmpfs, not in the state
    /// directory (which can fill up), and is replaced by rename without
    /// fsync: the shim only needs to read a whole value, and after a host
    /// crash there is no QEMU left to fence. Cheap enough for every epoch.
    pub fn renew_lease(&self, deadline_boottime_ms: u64) -> std::io::Result<()> {
        let lease = crate::shim::LeaseDeadline::Boottime(deadline_boottime_ms);
        replace_file_volatile(&self.lease_file, lease.encode().as_bytes())
    }

    /// Ends the lease (protection ended on purpose).
    pub fn clear_lease(&self) {
        let _ = std::fs::remove_file(&self.lease_file);
    }

    /// Whether the shim froze QEMU because the lease ran out.
    pub fn shim_fenced(&self) -> bool {
        self.vm.dir.join(shim::FENCED_FILE).exists()
    }

    /// Self-fencing: the primary lost its backup for longer than the fencing
    /// timeout, so the guest must not run on (the backup may take over).
    /// Returns whether the fence paused the guest (`false`: it was paused
    /// already, and [`GuestPort::unfence`] must leave it so).
    pub async fn fence(&self, why: &str) -> Result<bool, SupervisorError> {
        let _op = self.vm.ops.lock().await;
        let mut paused = false;
        if self.vm.state() == VmState::Running {
            self.qmp
                .execute(qmp::stop {})
                .await
                .map_err(self.vm.qmp_err())?;
            // The guest is stopped, which is what the fence is for; the
            // record is only tandemd's view of it (QEMU's status wins at
            // re-attach), so a write failure is reported, not a failed fence.
            if let Err(e) = self.vm.update(|r| r.state = VmState::Paused) {
                error!(vm = %self.vm.name, "fenced, but {e}");
            }
            paused = true;
        }
        warn!(vm = %self.vm.name, "fenced: {why}");
        Ok(paused)
    }

    /// Resumes a guest its fence paused, once the backup has granted it.
    pub async fn unfence(&self) -> Result<(), SupervisorError> {
        let _op = self.vm.ops.lock().await;
        if self.vm.state() == VmState::Paused {
            self.qmp
                .execute(qmp::cont {})
                .await
                .map_err(self.vm.qmp_err())?;
            if let Err(e) = self.vm.update(|r| r.state = VmState::Running) {
                error!(vm = %self.vm.name, "unfenced, but {e}");
            }
        }
        info!(vm = %self.vm.name, "unfenced: the backup granted a resume");
        Ok(())
    }
}
