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
        // Nothing the manifest names may lead out of the checkpoint.
        manifest.validate().map_err(|why| {
            SupervisorError::Refused(format!(
                "the checkpoint manifest in {} is refused: {why}",
                dir.display()
            ))
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

impl CheckpointManifest {
    /// Checks what a restore takes from the manifest: every disk's `file`
    /// is a plain file name, so it names a file inside the checkpoint
    /// directory and nothing else (no `/`, no `..`, not absolute: audit
    /// M5, where `/etc/shadow` in `file` became the restored VM's disk).
    pub fn validate(&self) -> Result<(), String> {
        for d in &self.disks {
            if !is_plain_file_name(&d.file) {
                return Err(format!(
                    "disk `{}` names file {:?}, which is not a plain file name in the checkpoint directory",
                    d.name, d.file
                ));
            }
        }
        Ok(())
    }
}

/// A name of a file directly inside a directory: not empty, not `.` or
/// `..`, without `/` or NUL.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Where a checkpoint asked for over the API may be (audit M5): under
/// `root` (tandemd's `--checkpoint-root`), and nowhere else, so the API
/// cannot write the guest's memory into, or restore a VM from, any
/// directory of the host. A relative `requested` is taken under `root`;
/// `..` is refused outright, and symlinks are resolved before the check.
/// For a new checkpoint (`existing` false) the parent must exist and the
/// directory itself is created later; for a restore it must exist.
/// Returns the resolved path to use.
pub fn confine_checkpoint_dir(
    root: &Path,
    requested: &Path,
    existing: bool,
) -> Result<PathBuf, String> {
    use std::path::Component;
    if requested
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(format!(
            "{}: `..` is not allowed in a checkpoint directory",
            requested.display()
        ));
    }
    let full = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        root.join(requested)
    };
    let root_c = root
        .canonicalize()
        .map_err(|e| format!("the checkpoint root {} is unusable: {e}", root.display()))?;
    let outside = || {
        format!(
            "{} is outside the checkpoint root {}; checkpoints are written and restored only under it (tandemd --checkpoint-root)",
            requested.display(),
            root_c.display()
        )
    };
    let resolved = if existing {
        full.canonicalize()
            .map_err(|e| format!("no checkpoint at {}: {e}", full.display()))?
    } else {
        let Some(Component::Normal(name)) = full.components().next_back() else {
            return Err(outside());
        };
        let parent = full.parent().unwrap_or(&root_c);
        parent
            .canonicalize()
            .map_err(|e| format!("{}: {e}", parent.display()))?
            .join(name)
    };
    if resolved == root_c || !resolved.starts_with(&root_c) {
        return Err(outside());
    }
    Ok(resolved)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(dir: &Path) -> crate::SupervisorConfig {
        crate::SupervisorConfig {
            state_dir: dir.join("state"),
            ram_dir: dir.join("ram"),
            checkpoint_root: dir.join("checkpoints"),
            qemu_binary: dir.join("no-qemu"),
            qboot_rom: dir.join("no-rom"),
            shim: crate::shim::ShimLauncher {
                program: dir.join("no-tandemd"),
            },
            image_dir: dir.join("no-images"),
            probe_timeout: Duration::from_secs(1),
            start_timeout: Duration::from_secs(1),
            switch_dir: dir.join("switch"),
            nic_ports: None,
        }
    }

    fn manifest(files: &[&str]) -> CheckpointManifest {
        CheckpointManifest {
            vm: "v".into(),
            taken_at: 0,
            ram_bytes: 0,
            device_state_bytes: 0,
            disks: files
                .iter()
                .enumerate()
                .map(|(i, f)| CheckpointDisk {
                    name: format!("d{i}"),
                    file: f.to_string(),
                    format: DiskFormat::Raw,
                })
                .collect(),
        }
    }

    #[test]
    fn a_manifest_names_only_files_inside_its_checkpoint() {
        assert!(manifest(&["disk-data.qcow2", "disk-x.raw", "..x"])
            .validate()
            .is_ok());
        for bad in ["../x", "/etc/shadow", "a/b", "..", ".", "", "x\0"] {
            let e = manifest(&["ok.raw", bad]).validate().unwrap_err();
            assert!(e.contains("not a plain file name"), "{bad:?}: {e}");
        }
    }

    /// A restore reads the manifest, and refuses it, before anything is
    /// copied: the file it names is never read.
    #[tokio::test]
    async fn restore_refuses_a_manifest_that_leads_out() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("ck");
        std::fs::create_dir(&ck).unwrap();
        std::fs::write(ck.join(CHECKPOINT_DEVICE_STATE), b"").unwrap();
        for bad in ["../secret", "/etc/passwd"] {
            atomic_write_json(&ck.join(CHECKPOINT_MANIFEST), &manifest(&[bad])).unwrap();
            let sup = Supervisor::open(test_config(d.path())).await.unwrap();
            let e = sup.restore_from("nobody", &ck).await.unwrap_err();
            assert!(matches!(e, SupervisorError::Refused(_)), "{e}");
            assert!(e.to_string().contains("not a plain file name"), "{e}");
        }
    }

    #[test]
    fn checkpoint_dirs_stay_under_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("checkpoints");
        std::fs::create_dir(&root).unwrap();
        let root_c = root.canonicalize().unwrap();
        // New checkpoints: relative names and absolute paths under the root.
        assert_eq!(
            confine_checkpoint_dir(&root, Path::new("nightly"), false).unwrap(),
            root_c.join("nightly")
        );
        assert_eq!(
            confine_checkpoint_dir(&root, &root.join("a"), false).unwrap(),
            root_c.join("a")
        );
        // Outside, up and out, the root itself, through a symlink.
        let outside = d.path().join("elsewhere");
        std::fs::create_dir(&outside).unwrap();
        for (req, why) in [
            (outside.join("ck"), "outside the checkpoint root"),
            (PathBuf::from("/tmp/ck"), "outside the checkpoint root"),
            (root.join("../elsewhere/ck"), "`..` is not allowed"),
            (PathBuf::from("../ck"), "`..` is not allowed"),
            (root.clone(), "outside the checkpoint root"),
            (PathBuf::from("/"), "outside the checkpoint root"),
        ] {
            let e = confine_checkpoint_dir(&root, &req, false).unwrap_err();
            assert!(e.contains(why), "{}: {e}", req.display());
        }
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let e = confine_checkpoint_dir(&root, Path::new("link/ck"), false).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        // Restores: the directory must exist, under the root.
        std::fs::create_dir(root.join("ck")).unwrap();
        assert_eq!(
            confine_checkpoint_dir(&root, Path::new("ck"), true).unwrap(),
            root_c.join("ck")
        );
        assert!(confine_checkpoint_dir(&root, Path::new("none"), true).is_err());
        let e = confine_checkpoint_dir(&root, Path::new("link"), true).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e = confine_checkpoint_dir(&root, &outside, true).unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }
}
