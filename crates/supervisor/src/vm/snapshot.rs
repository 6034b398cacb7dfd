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
    ///
    /// A checkpoint must stay restorable (and may be restored into several
    /// VMs, or deleted by its operator later), so nothing of it is used in
    /// place: this costs a copy of RAM and every disk. The backup's
    /// takeover, whose replica is used once, uses
    /// [`Supervisor::restore_in_place`] instead.
    pub async fn restore_from(
        self: &Arc<Self>,
        name: &str,
        dir: &Path,
    ) -> Result<VmInfo, SupervisorError> {
        let (manifest, device_state) = read_checkpoint(dir)?;
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
            ram: RestoreRam::Copy(dir.join(CHECKPOINT_RAM)),
            device_state,
            disks,
        };
        self.start_with(name, Some(source)).await
    }

    /// Starts a VM that is not running from a checkpoint directory *in
    /// place*, copying nothing: the backup's takeover from its replica.
    /// Its QEMU maps the directory's RAM file itself (shared, as every
    /// guest's RAM is), and each disk becomes a new qcow2 overlay in the
    /// VM's directory backed by the directory's disk file, which QEMU
    /// opens read-only. So the time to resume does not grow with RAM or
    /// disk size.
    ///
    /// Nothing writes the directory before the guest runs: QEMU starts
    /// with `-incoming defer`, and with `x-ignore-shared` the device-state
    /// stream carries no page of the shared RAM block (QEMU refuses one
    /// for an ignored block), and the overlays take every disk write. A
    /// start that fails before `cont` leaves the directory as it was, to
    /// be resumed again. Just before `cont` the directory becomes the VM's
    /// own ([`OWNER_FILE`], [`dir_owner`]): from then on it is the VM's
    /// live RAM and the base of its disks, never a replica again, and it
    /// is removed when the VM is destroyed. A directory that already has
    /// an owner is refused.
    pub async fn restore_in_place(
        self: &Arc<Self>,
        name: &str,
        dir: &Path,
    ) -> Result<VmInfo, SupervisorError> {
        let dir = dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", dir.display())))?;
        if let Some(owner) = dir_owner(&dir).map_err(io_err("reading the directory's owner"))? {
            return Err(SupervisorError::Refused(format!(
                "{} is already the RAM and disk base of VM `{}` (uuid {}): it cannot be resumed again",
                dir.display(),
                owner.vm,
                owner.uuid
            )));
        }
        let (manifest, device_state) = read_checkpoint(&dir)?;
        let vm = self.get(name).await?;
        if vm.state().is_active() {
            return Err(vm.bad_state("restore"));
        }
        let qemu_img = self.qemu_img();
        let mut disks = Vec::new();
        for d in &manifest.disks {
            let overlay = vm.dir.join(overlay_file_name(&d.name));
            create_overlay(&qemu_img, &dir.join(&d.file), d.format, &overlay).map_err(|e| {
                SupervisorError::Io {
                    context: format!("creating the overlay of disk {} on {}", d.name, d.file),
                    source: e,
                }
            })?;
            disks.push((d.name.clone(), overlay, DiskFormat::Qcow2));
        }
        let source = RestoreSource {
            ram: RestoreRam::InPlace {
                file: dir.join(CHECKPOINT_RAM),
                dir,
            },
            device_state,
            disks,
        };
        self.start_with(name, Some(source)).await
    }

    /// `qemu-img` beside the QEMU binary, else the one on `PATH`.
    pub(super) fn qemu_img(&self) -> PathBuf {
        self.cfg
            .qemu_binary
            .parent()
            .map(|d| d.join("qemu-img"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("qemu-img"))
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
        let rec = vm.record();
        let spec = rec.spec;
        let spec_base = rec.base.map(|b| b.dir);
        let mut disks = Vec::new();
        for d in &spec.disks {
            let ext = match d.format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "raw",
            };
            let file = format!("disk-{}.{ext}", d.name);
            let to = dir.join(&file);
            if is_overlay_of(&spec_base, &d.path) {
                // An overlay over the base a takeover left: the checkpoint
                // gets the whole disk, so it never depends on that base
                // (which goes with the VM).
                flatten_copy(&self.qemu_img(), &d.path, &to)
            } else {
                copy_private(&d.path, &to).map(|_| ())
            }
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
    pub(super) ram: RestoreRam,
    pub(super) device_state: Vec<u8>,
    pub(super) disks: Vec<(String, PathBuf, DiskFormat)>,
}

/// How a restore gets the guest's RAM.
pub(super) enum RestoreRam {
    /// Copied into the VM's private RAM file: the checkpoint stays
    /// restorable.
    Copy(PathBuf),
    /// `file` of the directory `dir`, mapped by QEMU itself; `dir` becomes
    /// the VM's own just before the guest runs.
    InPlace { file: PathBuf, dir: PathBuf },
}

/// Reads and checks a checkpoint directory's manifest and device state.
fn read_checkpoint(dir: &Path) -> Result<(CheckpointManifest, Vec<u8>), SupervisorError> {
    let manifest: CheckpointManifest = std::fs::read(dir.join(CHECKPOINT_MANIFEST))
        .map_err(io_err(format!(
            "reading the checkpoint in {}",
            dir.display()
        )))
        .and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| io_err("parsing the checkpoint manifest")(std::io::Error::other(e)))
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
    Ok((manifest, device_state))
}

/// The marker that makes a directory a VM's own base: written (durably)
/// by the supervisor just before a guest restored in place from it runs.
/// A directory with it is never resumed again, and the replication backup
/// never treats it as a replica (never writes it, never offers it).
pub const OWNER_FILE: &str = "owned-by-vm.json";

/// What [`OWNER_FILE`] says: the VM that runs from the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirOwner {
    pub vm: String,
    pub uuid: String,
    /// When the guest was first let run from it (Unix seconds).
    pub since: u64,
}

/// The VM that owns `dir` (see [`OWNER_FILE`]), if any.
pub fn dir_owner(dir: &Path) -> std::io::Result<Option<DirOwner>> {
    match std::fs::read(dir.join(OWNER_FILE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The overlay of disk `disk` in a VM's directory after an in-place
/// restore.
pub(super) fn overlay_file_name(disk: &str) -> String {
    format!("overlay-{disk}.qcow2")
}

/// Whether `path` is one of the overlays an in-place restore made over
/// `base`.
fn is_overlay_of(base: &Option<PathBuf>, path: &Path) -> bool {
    base.is_some()
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("overlay-") && n.ends_with(".qcow2"))
}

/// Creates (replacing whatever was there, atomically) a qcow2 overlay at
/// `overlay` backed by `base` (of `format`), of the base's size, 0600.
/// `qemu-img create -u` never opens the base: nothing touches it.
pub(super) fn create_overlay(
    qemu_img: &Path,
    base: &Path,
    format: DiskFormat,
    overlay: &Path,
) -> std::io::Result<()> {
    let size = std::fs::metadata(base)?.len();
    let fmt = match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    };
    if format == DiskFormat::Qcow2 {
        // A qcow2 base's virtual size is not its file's length.
        return Err(std::io::Error::other(
            "an in-place restore takes raw disks only",
        ));
    }
    let tmp = overlay.with_extension("qcow2.tmp");
    let _ = std::fs::remove_file(&tmp);
    let out = std::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-u", "-b"])
        .arg(base)
        .arg(&tmp)
        .arg(size.to_string())
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::other(format!(
            "{} create failed ({}): {}",
            qemu_img.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, overlay));
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

/// Copies the whole disk an overlay shows (its base's data included) into
/// a new standalone qcow2 at `to` (0600; `to` must not exist).
fn flatten_copy(qemu_img: &Path, overlay: &Path, to: &Path) -> std::io::Result<()> {
    // Made private before qemu-img writes into it.
    drop(crate::util::create_private_file(to)?);
    let out = std::process::Command::new(qemu_img)
        // The guest is stopped and its disks flushed; QEMU still holds
        // the image, so read it without taking its lock.
        .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "qcow2"])
        .arg(overlay)
        .arg(to)
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let _ = std::fs::remove_file(to);
        return Err(std::io::Error::other(format!(
            "{} convert failed ({}): {}",
            qemu_img.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
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
    use uuid::Uuid;

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
            identity_dir: None,
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

    /// A replica directory as a takeover finds it: RAM, one raw disk,
    /// device state and the manifest naming the disk.
    fn replica_dir(root: &Path, ram_mib: u64) -> PathBuf {
        let dir = root.join("replicas").join("v");
        std::fs::create_dir_all(&dir).unwrap();
        let ram: Vec<u8> = (0..ram_mib << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join(CHECKPOINT_RAM), ram).unwrap();
        let disk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.join("disk-data.raw"), disk).unwrap();
        std::fs::write(dir.join(CHECKPOINT_DEVICE_STATE), b"QEVM").unwrap();
        let mut m = manifest(&["disk-data.raw"]);
        m.disks[0].name = "data".into();
        atomic_write_json(&dir.join(CHECKPOINT_MANIFEST), &m).unwrap();
        dir
    }

    fn digest(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let p = e.path();
                let meta = std::fs::metadata(&p).unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    meta.len(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn qemu_img_available() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The takeover's restore copies nothing: the VM's disk is a qcow2
    /// overlay backed by the replica's disk, and its RAM file is the
    /// replica's. A start that fails (here: no shim to run QEMU) leaves
    /// the replica byte for byte as it was, unowned, and restorable again;
    /// deleting the VM leaves it too. A directory with an owner is refused.
    #[tokio::test]
    async fn an_in_place_restore_copies_nothing_and_a_failed_one_leaves_the_replica() {
        if !qemu_img_available() {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let rep = replica_dir(d.path(), 32).canonicalize().unwrap();
        for f in ["k", "i"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let spec = format!(
            "name = \"v\"\nmemory_mib = 32\naccelerator = \"tcg\"\n[boot]\nkernel = \"{k}\"\ninitrd = \"{i}\"\n[[disks]]\nname = \"data\"\npath = \"{disk}\"\nformat = \"raw\"\n",
            k = d.path().join("k").display(),
            i = d.path().join("i").display(),
            disk = rep.join("disk-data.raw").display(),
        );
        let sup = Supervisor::open(test_config(d.path())).await.unwrap();
        sup.create(&spec).await.unwrap();
        let before = digest(&rep);
        for attempt in 1..=2 {
            let e = sup.restore_in_place("v", &rep).await.unwrap_err();
            assert!(
                e.to_string().contains("QEMU shim"),
                "attempt {attempt}: {e}"
            );
            assert_eq!(
                digest(&rep),
                before,
                "attempt {attempt} changed the replica"
            );
            assert_eq!(dir_owner(&rep).unwrap(), None);
        }
        let info = sup.info("v").await.unwrap();
        assert_eq!(
            info.ram_file,
            rep.join(CHECKPOINT_RAM).display().to_string()
        );
        let overlay = d.path().join("state/vms/v").join(overlay_file_name("data"));
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()
            .unwrap();
        let img: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(img["format"], "qcow2", "{img}");
        assert_eq!(img["virtual-size"], 1u64 << 20, "{img}");
        assert_eq!(
            img["backing-filename"],
            rep.join("disk-data.raw").display().to_string(),
            "{img}"
        );
        assert_eq!(img["backing-filename-format"], "raw", "{img}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&overlay).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Its disks are overlays over what is still a replica: it is not
        // booted on them (a takeover must complete, or the VM go).
        let e = sup.start("v").await.unwrap_err();
        assert!(matches!(e, SupervisorError::Refused(_)), "{e}");
        assert!(e.to_string().contains("still a replica"), "{e}");
        // A VM that never ran from it does not own it: deleting the VM
        // leaves the replica.
        sup.destroy("v").await.unwrap();
        assert_eq!(digest(&rep), before);

        // Owned by a VM: never resumed again.
        let owner = DirOwner {
            vm: "w".into(),
            uuid: Uuid::new_v4().to_string(),
            since: 1,
        };
        atomic_write_json(&rep.join(OWNER_FILE), &owner).unwrap();
        sup.create(&spec).await.unwrap();
        let e = sup.restore_in_place("v", &rep).await.unwrap_err();
        assert!(matches!(e, SupervisorError::Refused(_)), "{e}");
        assert!(e.to_string().contains("VM `w`"), "{e}");
        assert_eq!(dir_owner(&rep).unwrap(), Some(owner));
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
