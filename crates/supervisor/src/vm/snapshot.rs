//! Checkpoints of a VM into a directory, and restores from one.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_api::{VmInfo, VmState};
use tandem_qmp::{qmp, QmpClient};
use tandem_vmspec::DiskFormat;

use super::{io_err, Supervisor, SupervisorError, Vm};
use crate::checkpoint;
use crate::util::{
    atomic_write, atomic_write_json, copy_private, copy_private_replace, create_private_dir,
    now_unix,
};

impl Supervisor {
    /// Starts a VM that is not running from a checkpoint directory written
    /// by [`Supervisor::checkpoint_to`] (or by the replication backup): its
    /// RAM, device state and disks. The disks are copied into the VM's
    /// directory and *become* its disks: the spec on record points at them.
    pub async fn restore_from(
        self: &Arc<Self>,
        name: &str,
        dir: &Path,
    ) -> Result<VmInfo, SupervisorError> {
        let manifest: CheckpointManifest = std::fs::read(dir.join(CHECKPOINT_MANIFEST))
            .map_err(io_err(format!(
                "reading the checkpoint in {}",
                dir.display()
            )))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| {
                    io_err("parsing the checkpoint manifest")(std::io::Error::other(e))
                })
            })?;
        let device_state = std::fs::read(dir.join(CHECKPOINT_DEVICE_STATE))
            .map_err(io_err("reading the checkpoint's device state"))?;
        let vm = self.get(name).await?;
        if vm.state().is_active() {
            return Err(vm.bad_state("restore"));
        }
        // Disks are copied, like RAM, so the checkpoint stays restorable;
        // the copies are the VM's own (0600), whatever the source's mode.
        let mut disks = Vec::new();
        for d in &manifest.disks {
            let to = vm.dir.join(format!("restored-{}", d.file));
            copy_private_replace(&dir.join(&d.file), &to).map_err(io_err(format!(
                "copying disk {} from the checkpoint",
                d.name
            )))?;
            disks.push((d.name.clone(), to, d.format));
        }
        let source = RestoreSource {
            ram_file: dir.join(CHECKPOINT_RAM),
            device_state,
            disks,
        };
        self.start_with(name, Some(source)).await
    }

    /// Writes a consistent checkpoint of a running or paused VM into `dir`
    /// (created 0700; must not exist): RAM, device state, disks and a
    /// manifest, each 0600 (a checkpoint holds the guest's memory).
    /// The guest is stopped for the copy and resumed if it was running.
    pub async fn checkpoint_to(
        &self,
        name: &str,
        dir: &Path,
    ) -> Result<CheckpointReport, SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        let was = vm.state();
        let live = match (was, vm.live()) {
            (VmState::Running | VmState::Paused, Some(live)) => live,
            _ => return Err(vm.bad_state("checkpoint")),
        };
        create_private_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let started = Instant::now();
        vm.checkpoint_pause.store(true, Ordering::SeqCst);
        let result = self.checkpoint_stopped(&vm, &live.qmp, dir).await;
        if was == VmState::Running {
            // Resume even when the checkpoint failed: it must not cost the guest.
            let resumed = live.qmp.execute(qmp::cont {}).await;
            vm.checkpoint_pause.store(false, Ordering::SeqCst);
            resumed.map_err(vm.qmp_err())?;
        } else {
            vm.checkpoint_pause.store(false, Ordering::SeqCst);
        }
        let pause = started.elapsed();
        let (device_state_bytes, ram_bytes) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        Ok(CheckpointReport {
            dir: dir.to_path_buf(),
            pause_ms: pause.as_secs_f64() * 1000.0,
            device_state_bytes,
            ram_bytes,
        })
    }

    async fn checkpoint_stopped(
        &self,
        vm: &Vm,
        qmp: &QmpClient,
        dir: &Path,
    ) -> Result<(u64, u64), SupervisorError> {
        qmp.execute(qmp::stop {}).await.map_err(vm.qmp_err())?;
        let ck = |e: checkpoint::CheckpointError| SupervisorError::Checkpoint {
            name: vm.name.clone(),
            message: e.to_string(),
        };
        checkpoint::prepare(qmp).await.map_err(ck)?;
        let state = checkpoint::save_device_state_from(
            qmp,
            &vm.dir.join(CHECKPOINT_SOCKET),
            vm.record().qemu_pid,
            Duration::from_secs(30),
        )
        .await
        .map_err(ck)?;
        // The migration has flushed and inactivated the disks, so their files
        // are consistent with the device state until `cont`.
        let spec = vm.record().spec;
        let mut disks = Vec::new();
        for d in &spec.disks {
            let ext = match d.format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "raw",
            };
            let file = format!("disk-{}.{ext}", d.name);
            copy_private(&d.path, &dir.join(&file))
                .map_err(io_err(format!("copying disk {}", d.path.display())))?;
            disks.push(CheckpointDisk {
                name: d.name.clone(),
                file,
                format: d.format,
            });
        }
        let ram_bytes = copy_private(&vm.runtime().ram_file, &dir.join(CHECKPOINT_RAM))
            .map_err(io_err("copying guest RAM"))?;
        atomic_write(&dir.join(CHECKPOINT_DEVICE_STATE), &state)
            .map_err(io_err("writing the device state"))?;
        let manifest = CheckpointManifest {
            vm: vm.name.clone(),
            taken_at: now_unix(),
            ram_bytes,
            device_state_bytes: state.len() as u64,
            disks,
        };
        atomic_write_json(&dir.join(CHECKPOINT_MANIFEST), &manifest)
            .map_err(io_err("writing the checkpoint manifest"))?;
        Ok((state.len() as u64, ram_bytes))
    }
}

pub(super) const CHECKPOINT_SOCKET: &str = "checkpoint.sock";
pub const CHECKPOINT_MANIFEST: &str = "checkpoint.json";
pub const CHECKPOINT_RAM: &str = "ram";
pub const CHECKPOINT_DEVICE_STATE: &str = "device-state";

/// `checkpoint.json`: what a checkpoint directory holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointManifest {
    pub vm: String,
    pub taken_at: u64,
    pub ram_bytes: u64,
    pub device_state_bytes: u64,
    pub disks: Vec<CheckpointDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointDisk {
    pub name: String,
    /// File name inside the checkpoint directory.
    pub file: String,
    pub format: DiskFormat,
}

/// The result of [`Supervisor::checkpoint_to`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub dir: PathBuf,
    /// How long the guest was stopped (includes copying RAM and disks).
    pub pause_ms: f64,
    pub device_state_bytes: u64,
    pub ram_bytes: u64,
}

/// Where a restore takes the guest from.
pub(super) struct RestoreSource {
    pub(super) ram_file: PathBuf,
    pub(super) device_state: Vec<u8>,
    pub(super) disks: Vec<(String, PathBuf, DiskFormat)>,
}

/// Copies a checkpoint's RAM file into the VM's RAM path (in tandemd's
/// private directory): into a new 0600 temp file created exclusively, then
/// renamed into place. A copy (not a rename) keeps the checkpoint
/// restorable a second time.
pub(super) fn place_ram_file(from: &Path, to: &Path) -> Result<(), SupervisorError> {
    copy_private_replace(from, to)
        .map_err(io_err(format!("copying RAM from {}", from.display())))?;
    Ok(())
}
