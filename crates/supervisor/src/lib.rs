//! The QEMU supervisor: one QEMU process per VM, driven over QMP.
//!
//! It owns the VM lifecycle (create, start, pause, resume, graceful stop,
//! destroy), the accelerator decision for `auto`, the per-VM shim that
//! parents QEMU, and the VM records persisted under the state directory, from
//! which a restarted tandemd re-attaches to VMs that are still running.
//!
//! On-disk layout, per VM, under `<state>/vms/<name>/`:
//! - `vm.json`: the record (spec, state, pids, last exit), written atomically;
//! - `qmp.sock`, `serial.log`, `qemu.log`, `qemu.pid`, `exit.json`.
//!
//! Guest RAM is a shared file under the RAM directory (`/dev/shm` by
//! default), so the replication engine and the switch can map it.

pub mod accel;
pub mod checkpoint;
pub mod shim;
pub mod util;
mod vm;

pub use vm::{
    CheckpointDisk, CheckpointManifest, CheckpointReport, CheckpointWindow, DeviceStateJob,
    ExitCause, GuestPort, NicPorts, Supervisor, SupervisorConfig, SupervisorError,
    CHECKPOINT_DEVICE_STATE, CHECKPOINT_MANIFEST, CHECKPOINT_RAM,
};
