//! The QEMU supervisor: one QEMU process per VM, driven over QMP.
//!
//! It owns the VM lifecycle (create, start, pause, resume, graceful stop,
//! destroy), the accelerator decision for `auto`, the per-VM shim that
//! parents QEMU, and the VM records persisted under the state directory, from
//! which a restarted tandemd re-attaches to VMs that are still running.
//!
//! On-disk layout, per VM, under `<state>/vms/<name>/` (0700):
//! - `vm.json`: the record (UUID, spec, state, pids, last exit), written
//!   atomically, one write at a time;
//! - `qmp.sock`, `serial.log`, `qemu.log`, `qemu.pid`, `exit.json`.
//!
//! Guest RAM is a shared file, so the replication engine and the switch can
//! map it: `<ram-dir>/tandem-<instance>/<name>.ram`, in a directory only
//! root can enter (0700), created 0600 by tandemd itself (exclusively, and
//! sized) before QEMU opens it. The fence lease, `<name>.lease`, sits beside
//! it on the same tmpfs.

pub mod accel;
pub mod checkpoint;
pub mod process;
pub mod shim;
pub mod sock;
pub mod util;
mod vm;

/// A VM's identity ([`GuestPort::uuid`], [`Supervisor::create_with_uuid`]).
pub use uuid::Uuid;
pub use vm::{
    confine_checkpoint_dir, dir_owner, ladder_config, CheckpointDisk, CheckpointManifest,
    CheckpointReport, CheckpointWindow, DeviceStateJob, DirOwner, ExitCause, GuestPort,
    IncomingPlan, NicPorts, Supervisor, SupervisorConfig, SupervisorError, Switchover,
    CHECKPOINT_DEVICE_STATE, CHECKPOINT_MANIFEST, CHECKPOINT_RAM, OWNER_FILE,
};
