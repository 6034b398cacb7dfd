//! VM records, lifecycle operations and the per-VM QMP monitor.
//!
//! - `record`: what is persisted per VM, and the in-memory VM;
//! - `lifecycle`: start, pause, resume, stop, destroy;
//! - `monitor`: following QEMU's events and recording how it ended;
//! - `snapshot`: checkpoints to a directory and restores from one;
//! - `guest_port`: the replication engine's handle on a running VM;
//! - `migrate`: live migration, the destination's incoming QEMU and the
//!   source's driver of the convergence ladder;
//! - `migrate_storage`: disks the destination does not share, copied
//!   over NBD while the VM runs;
//! - `exit`: why QEMU ended ([`ExitCause`]), decided once per exit;
//! - `error`: [`SupervisorError`].

mod error;
mod exit;
mod guest_port;
mod lifecycle;
mod migrate;
mod migrate_storage;
mod monitor;
mod pids;
mod record;
mod snapshot;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use tandem_api::{AccelProbe, ConsoleChunk, HostInfo, VmInfo, VmState, VmSummary};
use tandem_qmp::{QmpClient, QmpError};
use tandem_vmspec::{parse_and_validate, Accel, Accelerator, SpecError};
use tokio::sync::{watch, Mutex as AsyncMutex, RwLock};
use tracing::{info, warn};
use uuid::Uuid;

use crate::accel::{resolve_auto, ProbeConfig};
use crate::shim::{self, ShimLauncher};
use crate::util::{make_private, now_unix, read_from};

pub use error::SupervisorError;
pub use exit::ExitCause;
pub use guest_port::{CheckpointWindow, DeviceStateJob, GuestPort};
pub use migrate::{ladder_config, IncomingPlan};
pub use snapshot::{
    confine_checkpoint_dir, dir_owner, CheckpointDisk, CheckpointManifest, CheckpointReport,
    DirOwner, CHECKPOINT_DEVICE_STATE, CHECKPOINT_MANIFEST, CHECKPOINT_RAM, OWNER_FILE,
};

use error::io_err;
use record::{Loaded, RuntimeFiles, Vm, VmRecord, RECORD_FILE};

const QMP_SOCKET: &str = "qmp.sock";
const SERIAL_LOG: &str = "serial.log";
const TAIL_LINES: usize = 20;
const CONSOLE_CHUNK_MAX: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub state_dir: PathBuf,
    /// The tmpfs (such as `/dev/shm`) under which tandemd keeps its private
    /// directory (`tandem-<instance>/`, 0700) of guest RAM files and fence
    /// leases.
    pub ram_dir: PathBuf,
    /// Where checkpoints asked for over the API are written and restored
    /// from ([`Supervisor::checkpoint_dir`]); created 0700 if missing.
    pub checkpoint_root: PathBuf,
    pub qemu_binary: PathBuf,
    pub qboot_rom: PathBuf,
    pub shim: ShimLauncher,
    /// Guest image used by the KVM probe boot.
    pub image_dir: PathBuf,
    /// Bound on the KVM probe boot.
    pub probe_timeout: Duration,
    /// Bound on QEMU creating its QMP socket and answering after start.
    pub start_timeout: Duration,
    /// Where switch NICs' vhost-user sockets live.
    pub switch_dir: PathBuf,
    /// The host's switch, which serves switch NICs; `None` on a host
    /// without one (a VM with a switch NIC is then refused).
    pub nic_ports: Option<Arc<dyn NicPorts>>,
    /// Where this host's cluster identity (`identity.pem`) is, if it has
    /// one: live migration then runs QEMU's stream over TLS with it (both
    /// ends verified against the cluster CA), and never in the clear.
    pub identity_dir: Option<PathBuf>,
}

/// The switch side of a VM's switch NICs (`backend = "switch"`). The
/// supervisor attaches a VM's NICs when the VM is defined (or found on
/// disk at start-up) and detaches them when it is destroyed; the port
/// outlives QEMU restarts, so a rebooted or restored guest finds it.
pub trait NicPorts: Send + Sync + std::fmt::Debug {
    /// Creates (idempotently) the port serving `socket` for `nic` of `vm`.
    /// The error says what is wrong (e.g. an unknown port group).
    fn attach(
        &self,
        vm: &str,
        nic: &tandem_vmspec::NicSpec,
        socket: &Path,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Removes all of the VM's ports.
    fn detach(&self, vm: &str);
    /// The VM's switchover in a live migration: frames for it that
    /// arrive while it moves are kept, and go where it ends up.
    fn switchover(&self, _vm: &str, _step: Switchover) {}
}

/// [`NicPorts::switchover`]'s steps on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switchover {
    /// The migration started: frames for the VM are queued (bounded, in
    /// order) from the moment its rings stop, instead of being dropped.
    Hold,
    /// The destination runs the VM: the queued frames are forwarded
    /// again, to where the VM now is.
    Moved,
    /// The VM stays here (the migration failed or was cancelled): the
    /// queued frames are delivered to it as its rings run again.
    Stay,
}

pub struct Supervisor {
    cfg: SupervisorConfig,
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
    accel_probe: AsyncMutex<Option<AccelProbe>>,
    qemu_version: String,
    /// Distinguishes this daemon's RAM files from another daemon's (several
    /// simulated hosts share one /dev/shm in tests and drills).
    instance_tag: String,
    /// Outgoing migrations by VM name, finished ones kept until the next.
    migrations: Mutex<BTreeMap<String, Arc<migrate::OutgoingJob>>>,
    /// Incoming migrations whose guest waits for the source's word before
    /// it runs here (copied disks: complete only once the source says so).
    incoming_go: Mutex<BTreeMap<String, Arc<tokio::sync::Notify>>>,
}

/// The marker of a VM's QEMU in its command line (and its shim's, which
/// carries QEMU's argv): its QMP chardev, as `build_argv` writes it.
fn qemu_marker(qmp_socket: &Path) -> String {
    format!(
        "id=qmp,path={},",
        tandem_vmspec::escape_opt(&qmp_socket.to_string_lossy())
    )
}

fn qemu_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown (QEMU not found)".to_string())
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl Supervisor {
    /// Loads every VM record under the state directory and re-attaches to
    /// the QEMU processes that are still running.
    pub async fn open(cfg: SupervisorConfig) -> Result<Arc<Self>, SupervisorError> {
        let vms_dir = cfg.state_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)
            .map_err(io_err(format!("creating {}", vms_dir.display())))?;
        std::fs::create_dir_all(&cfg.ram_dir)
            .map_err(io_err(format!("creating {}", cfg.ram_dir.display())))?;
        if !cfg.checkpoint_root.exists() {
            // Checkpoints hold guests' memory: a root we make is root's alone.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&cfg.checkpoint_root)
                .and_then(|()| make_private(&cfg.checkpoint_root))
                .map_err(io_err(format!(
                    "creating {}",
                    cfg.checkpoint_root.display()
                )))?;
        }
        let sup = Arc::new(Supervisor {
            qemu_version: qemu_version(&cfg.qemu_binary),
            instance_tag: format!("{:08x}", fnv1a(&cfg.state_dir.to_string_lossy()) as u32),
            cfg,
            vms: RwLock::new(BTreeMap::new()),
            accel_probe: AsyncMutex::new(None),
            migrations: Mutex::new(BTreeMap::new()),
            incoming_go: Mutex::new(BTreeMap::new()),
        });
        let entries = std::fs::read_dir(&vms_dir).map_err(io_err("reading VM records"))?;
        let mut stale_incoming = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let rec_path = dir.join(RECORD_FILE);
            let Loaded { mut rec, new_uuid } = match VmRecord::load(&rec_path) {
                Ok(r) => r,
                Err(e) => {
                    warn!("skipping unreadable VM record {}: {e}", rec_path.display());
                    continue;
                }
            };
            // A QEMU started by a tandemd that kept no runtime files has
            // them where that tandemd put them.
            let legacy = rec.runtime.is_none() && rec.state.is_active();
            if legacy {
                rec.runtime = Some(RuntimeFiles {
                    ram_file: sup
                        .cfg
                        .ram_dir
                        .join(format!("tandem-{}-{}.ram", sup.instance_tag, rec.spec.name)),
                    lease_file: dir.join(shim::FENCE_LEASE_FILE),
                });
            }
            let vm = sup.new_vm(rec);
            if new_uuid || legacy {
                if new_uuid {
                    info!(vm = %vm.name, uuid = %vm.rec.lock().uuid, "gave the VM its UUID");
                }
                vm.update_logged(|_| {});
            }
            if let Err(e) = sup.attach_nics(&vm.record().spec) {
                warn!(vm = %vm.name, "cannot attach its switch NICs: {}: {}", e.0, e.1);
            }
            sup.vms.write().await.insert(vm.name.clone(), vm.clone());
            if vm.state().is_active() {
                sup.reattach(&vm).await;
            }
            if vm.record().incoming {
                stale_incoming.push(vm.name.clone());
            } else if vm.live().is_some() {
                tokio::spawn(sup.clone().adopt_outgoing(vm.clone()));
            }
        }
        for name in stale_incoming {
            warn!(vm = %name, "an incoming migration the previous tandemd did not finish: removing its VM (the source runs on)");
            if let Err(e) = sup.destroy(&name).await {
                warn!(vm = %name, "removing a stale incoming migration: {e}");
            }
        }
        Ok(sup)
    }

    /// The directory a checkpoint (or restore) asked for over the API may
    /// use: `requested` resolved under the checkpoint root (a relative one
    /// is taken from there), or `Refused` when it leads outside the root
    /// (see [`snapshot::confine_checkpoint_dir`]). `existing`: a restore's
    /// directory, which must exist; otherwise a new one's.
    pub fn checkpoint_dir(
        &self,
        requested: &Path,
        existing: bool,
    ) -> Result<PathBuf, SupervisorError> {
        snapshot::confine_checkpoint_dir(&self.cfg.checkpoint_root, requested, existing)
            .map_err(SupervisorError::Refused)
    }

    /// tandemd's private directory (0700) of guest RAM files and fence
    /// leases on the RAM file system.
    fn private_ram_dir(&self) -> PathBuf {
        self.cfg
            .ram_dir
            .join(format!("tandem-{}", self.instance_tag))
    }

    fn new_vm(&self, rec: VmRecord) -> Arc<Vm> {
        let name = rec.spec.name.clone();
        let private = self.private_ram_dir();
        Arc::new(Vm {
            dir: self.cfg.state_dir.join("vms").join(&name),
            next_runtime: RuntimeFiles {
                ram_file: private.join(format!("{name}.ram")),
                lease_file: private.join(format!("{name}.lease")),
            },
            name,
            ops: AsyncMutex::new(()),
            rec: Mutex::new(rec),
            persist: Mutex::new(()),
            live: Mutex::new(None),
            exit_hint: Mutex::new(None),
            checkpoint_pause: AtomicBool::new(false),
        })
    }

    async fn get(&self, name: &str) -> Result<Arc<Vm>, SupervisorError> {
        self.vms
            .read()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound(name.to_string()))
    }

    /// Re-attaches to a VM whose record says QEMU should be running.
    async fn reattach(self: &Arc<Self>, vm: &Arc<Vm>) {
        let rec = vm.record();
        // By pid and start time (by command line for a record of an older
        // tandemd): a pid recycled while no tandemd ran is not this QEMU.
        let marker = qemu_marker(&vm.qmp_socket());
        let alive = rec.qemu(&marker).is_some_and(|q| q.is_alive());
        if !alive {
            info!(vm = %vm.name, "QEMU ended while tandemd was away; recording its exit");
            self.record_exit(vm).await;
            return;
        }
        match QmpClient::connect_retry(vm.qmp_socket(), self.cfg.start_timeout).await {
            Ok(qmp) => {
                let state = match query_status(&qmp).await.as_deref() {
                    Ok("running") => VmState::Running,
                    Ok(_) => VmState::Paused,
                    Err(_) => rec.state,
                };
                vm.update_logged(|r| {
                    r.state = state;
                    r.stop_requested = false;
                });
                info!(vm = %vm.name, pid = ?rec.qemu_pid, %state, "re-attached to running VM");
                self.spawn_monitor(vm.clone(), qmp);
            }
            Err(e) => warn!(vm = %vm.name, "QEMU is alive but QMP does not answer: {e}"),
        }
    }

    /// Defines a VM from its spec, with a new identity (UUID).
    pub async fn create(&self, spec_toml: &str) -> Result<VmInfo, SupervisorError> {
        self.create_with_uuid(spec_toml, Uuid::new_v4()).await
    }

    /// Defines a VM that already has an identity: a backup defining the
    /// primary's VM at takeover keeps the primary's UUID. A nil `uuid`
    /// means "give it a new one". Refused (`Exists`, naming the other VM)
    /// when another VM here has that UUID.
    pub async fn create_with_uuid(
        &self,
        spec_toml: &str,
        uuid: Uuid,
    ) -> Result<VmInfo, SupervisorError> {
        let uuid = if uuid.is_nil() { Uuid::new_v4() } else { uuid };
        let spec = parse_and_validate(spec_toml, |p| p.is_file())?;
        let mut vms = self.vms.write().await;
        if vms.contains_key(&spec.name) {
            return Err(SupervisorError::Exists(spec.name));
        }
        if let Some(other) = vms.values().find(|v| v.rec.lock().uuid == uuid) {
            return Err(SupervisorError::Exists(other.name.clone()));
        }
        let rec = VmRecord {
            uuid,
            spec_toml: spec_toml.to_string(),
            spec,
            state: VmState::Defined,
            accel: None,
            shim_pid: None,
            qemu_pid: None,
            shim_start: None,
            qemu_start: None,
            started_at: None,
            stop_requested: false,
            last_exit: None,
            exit_cause: None,
            runtime: None,
            base: None,
            incoming: false,
        };
        self.attach_nics(&rec.spec).map_err(|e| {
            SpecError::Invalid(vec![tandem_vmspec::FieldError {
                field: e.0,
                message: e.1,
            }])
        })?;
        let vm = self.new_vm(rec);
        let persisted = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vm.dir)
            .and_then(|()| make_private(&vm.dir))
            .map_err(io_err(format!("creating {}", vm.dir.display())))
            .and_then(|()| vm.update(|_| {}));
        if let Err(e) = persisted {
            if let Some(ports) = &self.cfg.nic_ports {
                ports.detach(&vm.name);
            }
            return Err(e);
        }
        info!(vm = %vm.name, %uuid, "defined");
        vms.insert(vm.name.clone(), vm.clone());
        drop(vms);
        Ok(self.info_of(&vm).await)
    }

    /// Attaches the spec's switch NICs; the error is (field, message).
    fn attach_nics(&self, spec: &tandem_vmspec::VmSpec) -> Result<(), (String, String)> {
        for (i, n) in spec.nics.iter().enumerate() {
            if n.backend != tandem_vmspec::NicBackend::Switch {
                continue;
            }
            let field = format!("nics[{i}].port_group");
            let Some(ports) = &self.cfg.nic_ports else {
                return Err((field, "this host runs no switch".into()));
            };
            let sock = tandem_vmspec::switch_socket(&self.cfg.switch_dir, &spec.name, &n.name);
            if let Err(e) = ports.attach(&spec.name, n, &sock) {
                ports.detach(&spec.name);
                return Err((field, e.to_string()));
            }
        }
        Ok(())
    }

    async fn resolve_accel(&self, wanted: Accelerator) -> Accel {
        match wanted {
            Accelerator::Kvm => Accel::Kvm,
            Accelerator::Tcg => Accel::Tcg,
            Accelerator::Auto => {
                if self.host_accel().await.chosen == "kvm" {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        }
    }

    /// The accelerator `auto` resolves to on this host (probing once).
    pub async fn host_accel(&self) -> AccelProbe {
        let mut cached = self.accel_probe.lock().await;
        if let Some(p) = cached.as_ref() {
            return p.clone();
        }
        let cache_file = self.cfg.state_dir.join("host").join("accel-probe.json");
        let version = self.qemu_version.clone();
        let probe_cfg = ProbeConfig {
            qemu_binary: self.cfg.qemu_binary.clone(),
            kernel: self.cfg.image_dir.join("vmlinux"),
            initrd: self.cfg.image_dir.join("initrd.img"),
            qboot_rom: self.cfg.qboot_rom.clone(),
            timeout: self.cfg.probe_timeout,
            work_dir: self.cfg.state_dir.join("host"),
        };
        let probe =
            tokio::task::spawn_blocking(move || resolve_auto(&cache_file, &version, &probe_cfg))
                .await
                .unwrap_or_else(|e| AccelProbe {
                    chosen: "tcg".into(),
                    reason: format!("probe task failed: {e}"),
                    cpu_virt_flag: false,
                    kvm_modules: vec![],
                    dev_kvm: false,
                    probe_boot: None,
                    probe_timeout_ms: 0,
                    probed_at: now_unix(),
                    cache_key: String::new(),
                });
        info!(accel = %probe.chosen, reason = %probe.reason, "accelerator for auto");
        *cached = Some(probe.clone());
        probe
    }

    pub async fn list(&self) -> Vec<VmSummary> {
        let vms: Vec<Arc<Vm>> = self.vms.read().await.values().cloned().collect();
        vms.iter()
            .map(|vm| {
                let r = vm.record();
                VmSummary {
                    name: vm.name.clone(),
                    state: r.state,
                    vcpus: r.spec.vcpus,
                    memory_mib: r.spec.memory_mib,
                    accel: r.accel.map(|a| a.as_str().to_string()),
                    pid: r.qemu_pid,
                }
            })
            .collect()
    }

    pub async fn info(&self, name: &str) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(name).await?;
        // Waits out a replication epoch's stop window (a few ms), so QEMU's
        // reported run state is the guest's, not the checkpoint's; but never
        // long (a graceful stop holds the lock for seconds).
        let _op = tokio::time::timeout(Duration::from_millis(250), vm.ops.lock())
            .await
            .ok();
        Ok(self.info_of(&vm).await)
    }

    async fn info_of(&self, vm: &Vm) -> VmInfo {
        let qmp_status = match vm.live() {
            Some(live) => query_status(&live.qmp).await.ok(),
            None => None,
        };
        let r = vm.record();
        VmInfo {
            name: vm.name.clone(),
            uuid: r.uuid.to_string(),
            state: r.state,
            qmp_status,
            accel: r.accel.map(|a| a.as_str().to_string()),
            pid: r.qemu_pid,
            started_at: r.started_at,
            qmp_socket: vm.qmp_socket().display().to_string(),
            serial_log: vm.serial_log().display().to_string(),
            ram_file: r
                .runtime
                .as_ref()
                .unwrap_or(&vm.next_runtime)
                .ram_file
                .display()
                .to_string(),
            last_exit: r.last_exit,
            spec_toml: r.spec_toml,
        }
    }

    pub async fn console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, SupervisorError> {
        let vm = self.get(name).await?;
        let active = vm.state().is_active();
        let (data, next_offset) = match read_from(&vm.serial_log(), offset, CONSOLE_CHUNK_MAX) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(e) => return Err(io_err("reading the serial log")(e)),
        };
        let offset = next_offset - data.len() as u64;
        Ok(ConsoleChunk {
            offset,
            next_offset,
            data: String::from_utf8_lossy(&data).into_owned(),
            active,
        })
    }

    pub async fn host_info(&self) -> HostInfo {
        HostInfo {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            tandem_version: env!("CARGO_PKG_VERSION").to_string(),
            qemu_binary: self.cfg.qemu_binary.display().to_string(),
            qemu_version: self.qemu_version.clone(),
            state_dir: self.cfg.state_dir.display().to_string(),
            accel: self.host_accel().await,
            vms: self.vms.read().await.len(),
        }
    }
}

async fn query_status(qmp: &QmpClient) -> Result<String, QmpError> {
    let v = qmp
        .execute_raw(
            "query-status",
            serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await?;
    Ok(v.get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("unknown")
        .to_string())
}

async fn wait_exited(rx: &mut watch::Receiver<bool>, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, rx.wait_for(|e| *e))
        .await
        .is_ok_and(|r| r.is_ok())
}
