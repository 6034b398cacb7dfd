//! VM records, lifecycle operations and the per-VM QMP monitor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_api::{
    AccelProbe, ConsoleChunk, ExitInfo, HostInfo, StopRequest, VmInfo, VmState, VmSummary,
};
use tandem_qmp::{qmp, QmpClient, QmpError};
use tandem_vmspec::{
    build_argv, parse_and_validate, Accel, Accelerator, DiskFormat, RuntimePaths, SpecError, VmSpec,
};
use tokio::sync::{watch, Mutex as AsyncMutex, RwLock};
use tracing::{info, warn};

use crate::accel::{resolve_auto, ProbeConfig};
use crate::checkpoint;
use crate::shim::{self, ShimExit, ShimLauncher};
use crate::util::{
    atomic_write, atomic_write_json, now_unix, process_matches, read_from, send_signal, tail_lines,
};

const RECORD_FILE: &str = "vm.json";
const QMP_SOCKET: &str = "qmp.sock";
const SERIAL_LOG: &str = "serial.log";
const TAIL_LINES: usize = 20;
const CONSOLE_CHUNK_MAX: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub state_dir: PathBuf,
    /// Where guest RAM files live: a tmpfs such as `/dev/shm`.
    pub ram_dir: PathBuf,
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
}

/// The switch side of a VM's switch NICs (`backend = "switch"`). The
/// supervisor attaches a VM's NICs when the VM is defined (or found on
/// disk at start-up) and detaches them when it is destroyed; the port
/// outlives QEMU restarts, so a rebooted or restored guest finds it.
pub trait NicPorts: Send + Sync + std::fmt::Debug {
    /// Creates (idempotently) the port serving `socket` for `nic` of `vm`.
    /// The error says what is wrong (e.g. an unknown port group).
    fn attach(&self, vm: &str, nic: &tandem_vmspec::NicSpec, socket: &Path) -> Result<(), String>;
    /// Removes all of the VM's ports.
    fn detach(&self, vm: &str);
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("no VM named `{0}`")]
    NotFound(String),
    #[error("a VM named `{0}` already exists")]
    Exists(String),
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("VM `{name}` is {state}; cannot {op}")]
    BadState {
        name: String,
        state: VmState,
        op: &'static str,
    },
    #[error("QEMU for `{name}` failed to start: {message}")]
    Start {
        name: String,
        message: String,
        qemu_log_tail: Vec<String>,
    },
    #[error("checkpoint of `{name}` failed: {message}")]
    Checkpoint { name: String, message: String },
    #[error("QMP error on `{name}`: {source}")]
    Qmp { name: String, source: QmpError },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let context = context.into();
    move |source| SupervisorError::Io { context, source }
}

/// What is persisted for each VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmRecord {
    spec_toml: String,
    spec: VmSpec,
    state: VmState,
    accel: Option<Accel>,
    shim_pid: Option<u32>,
    qemu_pid: Option<u32>,
    started_at: Option<u64>,
    /// A stop was asked for, so the coming exit is not a crash.
    stop_requested: bool,
    last_exit: Option<ExitInfo>,
}

/// The connection to a running QEMU.
#[derive(Clone)]
struct Live {
    qmp: QmpClient,
    exited: watch::Receiver<bool>,
}

struct Vm {
    name: String,
    dir: PathBuf,
    ram_file: PathBuf,
    /// Serialises lifecycle operations on this VM.
    ops: AsyncMutex<()>,
    rec: StdMutex<VmRecord>,
    live: StdMutex<Option<Live>>,
    /// Facts the monitor learns before QEMU exits, used to explain the exit.
    exit_hint: StdMutex<Option<String>>,
    /// Set while a checkpoint has the guest stopped, so the monitor does not
    /// mistake the checkpoint's STOP/RESUME for a user's pause.
    checkpoint_pause: AtomicBool,
}

impl Vm {
    fn qmp_socket(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }
    fn serial_log(&self) -> PathBuf {
        self.dir.join(SERIAL_LOG)
    }
    fn record(&self) -> VmRecord {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn state(&self) -> VmState {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).state
    }
    fn live(&self) -> Option<Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Changes the record and persists it atomically.
    fn update(&self, f: impl FnOnce(&mut VmRecord)) {
        let snapshot = {
            let mut rec = self.rec.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut rec);
            rec.clone()
        };
        if let Err(e) = atomic_write_json(&self.dir.join(RECORD_FILE), &snapshot) {
            warn!(vm = %self.name, "cannot persist VM record: {e}");
        }
    }
    fn bad_state(&self, op: &'static str) -> SupervisorError {
        SupervisorError::BadState {
            name: self.name.clone(),
            state: self.state(),
            op,
        }
    }
    fn qmp_err(&self) -> impl FnOnce(QmpError) -> SupervisorError {
        let name = self.name.clone();
        move |source| SupervisorError::Qmp { name, source }
    }
}

pub struct Supervisor {
    cfg: SupervisorConfig,
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
    accel_probe: AsyncMutex<Option<AccelProbe>>,
    qemu_version: String,
    /// Distinguishes this daemon's RAM files from another daemon's (several
    /// simulated hosts share one /dev/shm in tests and drills).
    instance_tag: String,
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
        let sup = Arc::new(Supervisor {
            qemu_version: qemu_version(&cfg.qemu_binary),
            instance_tag: format!("{:08x}", fnv1a(&cfg.state_dir.to_string_lossy()) as u32),
            cfg,
            vms: RwLock::new(BTreeMap::new()),
            accel_probe: AsyncMutex::new(None),
        });
        let entries = std::fs::read_dir(&vms_dir).map_err(io_err("reading VM records"))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let rec_path = dir.join(RECORD_FILE);
            let rec: VmRecord = match std::fs::read_to_string(&rec_path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!("skipping unreadable VM record {}: {e}", rec_path.display());
                    continue;
                }
            };
            let vm = sup.new_vm(rec);
            if let Err(e) = sup.attach_nics(&vm.record().spec) {
                warn!(vm = %vm.name, "cannot attach its switch NICs: {}: {}", e.0, e.1);
            }
            sup.vms.write().await.insert(vm.name.clone(), vm.clone());
            if vm.state().is_active() {
                sup.reattach(&vm).await;
            }
        }
        Ok(sup)
    }

    fn new_vm(&self, rec: VmRecord) -> Arc<Vm> {
        let name = rec.spec.name.clone();
        Arc::new(Vm {
            dir: self.cfg.state_dir.join("vms").join(&name),
            ram_file: self
                .cfg
                .ram_dir
                .join(format!("tandem-{}-{}.ram", self.instance_tag, name)),
            name,
            ops: AsyncMutex::new(()),
            rec: StdMutex::new(rec),
            live: StdMutex::new(None),
            exit_hint: StdMutex::new(None),
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
        let marker = vm.qmp_socket().to_string_lossy().into_owned();
        let alive = rec
            .qemu_pid
            .is_some_and(|pid| process_matches(pid, &marker));
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
                vm.update(|r| {
                    r.state = state;
                    r.stop_requested = false;
                });
                info!(vm = %vm.name, pid = ?rec.qemu_pid, %state, "re-attached to running VM");
                self.spawn_monitor(vm.clone(), qmp);
            }
            Err(e) => warn!(vm = %vm.name, "QEMU is alive but QMP does not answer: {e}"),
        }
    }

    pub async fn create(&self, spec_toml: &str) -> Result<VmInfo, SupervisorError> {
        let spec = parse_and_validate(spec_toml, |p| p.is_file())?;
        let mut vms = self.vms.write().await;
        if vms.contains_key(&spec.name) {
            return Err(SupervisorError::Exists(spec.name));
        }
        let rec = VmRecord {
            spec_toml: spec_toml.to_string(),
            spec,
            state: VmState::Defined,
            accel: None,
            shim_pid: None,
            qemu_pid: None,
            started_at: None,
            stop_requested: false,
            last_exit: None,
        };
        self.attach_nics(&rec.spec).map_err(|e| {
            SpecError::Invalid(vec![tandem_vmspec::FieldError {
                field: e.0,
                message: e.1,
            }])
        })?;
        let vm = self.new_vm(rec);
        std::fs::create_dir_all(&vm.dir)
            .map_err(io_err(format!("creating {}", vm.dir.display())))?;
        vm.update(|_| {});
        info!(vm = %vm.name, "defined");
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
                return Err((field, e));
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

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, SupervisorError> {
        self.start_with(name, None).await
    }

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
        // Disks are copied, like RAM, so the checkpoint stays restorable.
        let mut disks = Vec::new();
        for d in &manifest.disks {
            let to = vm.dir.join(format!("restored-{}", d.file));
            std::fs::copy(dir.join(&d.file), &to).map_err(io_err(format!(
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

    async fn start_with(
        self: &Arc<Self>,
        name: &str,
        restore: Option<RestoreSource>,
    ) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        if vm.state().is_active() {
            return Err(vm.bad_state("start"));
        }
        if let Some(src) = &restore {
            // The checkpoint's disks replace the spec's from now on.
            vm.update(|r| {
                for (disk, path, format) in &src.disks {
                    if let Some(d) = r.spec.disks.iter_mut().find(|d| &d.name == disk) {
                        d.path = path.clone();
                        d.format = *format;
                    }
                }
            });
        }
        let spec = vm.record().spec;
        // Files may have gone since the VM was defined.
        spec.validate(|p| p.is_file())?;
        let accel = self.resolve_accel(spec.accelerator).await;

        for f in [
            shim::PID_FILE,
            shim::EXIT_FILE,
            shim::FENCE_LEASE_FILE,
            shim::FENCED_FILE,
            QMP_SOCKET,
        ] {
            let _ = std::fs::remove_file(vm.dir.join(f));
        }
        for log in [SERIAL_LOG, shim::QEMU_LOG] {
            let p = vm.dir.join(log);
            if p.exists() {
                let _ = std::fs::rename(&p, vm.dir.join(format!("{log}.prev")));
            }
        }
        let _ = std::fs::remove_file(&vm.ram_file);
        if let Some(src) = &restore {
            place_ram_file(&src.ram_file, &vm.ram_file)?;
        }
        *vm.exit_hint.lock().unwrap_or_else(|p| p.into_inner()) = None;

        let rt = RuntimePaths {
            qemu_binary: self.cfg.qemu_binary.clone(),
            qmp_socket: vm.qmp_socket(),
            serial_log: vm.serial_log(),
            ram_file: vm.ram_file.clone(),
            qboot_rom: self.cfg.qboot_rom.clone(),
            accel,
            incoming: restore.is_some(),
            switch_dir: self.cfg.switch_dir.clone(),
        };
        let argv = build_argv(&spec, &rt);
        let mut shim_child = self
            .cfg
            .shim
            .spawn(&vm.dir, &self.cfg.qemu_binary, &argv)
            .map_err(io_err("starting the QEMU shim"))?;
        let shim_pid = shim_child.id();
        // Reap the shim when it ends so it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = shim_child.wait().await;
        });
        vm.update(|r| {
            r.state = VmState::Starting;
            r.accel = Some(accel);
            r.shim_pid = shim_pid;
            r.qemu_pid = None;
            r.stop_requested = false;
            r.started_at = Some(now_unix());
        });
        info!(vm = %vm.name, accel = accel.as_str(), "starting QEMU");

        match self
            .finish_start(&vm, restore.as_ref().map(|r| r.device_state.as_slice()))
            .await
        {
            Ok(qmp) => {
                self.spawn_monitor(vm.clone(), qmp);
                drop(_op);
                Ok(self.info_of(&vm).await)
            }
            Err(message) => {
                if let Some(pid) = shim::read_pid(&vm.dir) {
                    send_signal(pid, libc::SIGKILL);
                }
                *vm.exit_hint.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("failed to start: {message}"));
                self.record_exit(&vm).await;
                Err(SupervisorError::Start {
                    name: vm.name.clone(),
                    message,
                    qemu_log_tail: tail_lines(&vm.dir.join(shim::QEMU_LOG), TAIL_LINES),
                })
            }
        }
    }

    /// Waits for QEMU to come up, connects QMP and lets the guest run.
    async fn finish_start(
        &self,
        vm: &Vm,
        device_state: Option<&[u8]>,
    ) -> Result<QmpClient, String> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        let pid = loop {
            if let Some(pid) = shim::read_pid(&vm.dir) {
                break pid;
            }
            if shim::read_exit(&vm.dir).is_some() {
                return Err("QEMU could not be executed".into());
            }
            if Instant::now() >= deadline {
                return Err(format!("no QEMU pid within {:?}", self.cfg.start_timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        vm.update(|r| r.qemu_pid = Some(pid));
        let qmp = loop {
            if let Some(exit) = shim::read_exit(&vm.dir) {
                let tail = tail_lines(&vm.dir.join(shim::QEMU_LOG), 3).join(" | ");
                return Err(format!("QEMU exited at once ({}): {tail}", describe(&exit)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "QMP did not answer within {:?}",
                    self.cfg.start_timeout
                ));
            }
            match QmpClient::connect(vm.qmp_socket(), left.min(Duration::from_secs(2))).await {
                Ok(q) => break q,
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        };
        if let Some(state) = device_state {
            let t = Instant::now();
            checkpoint::prepare(&qmp)
                .await
                .map_err(|e| format!("preparing to load the checkpoint: {e}"))?;
            checkpoint::load_device_state(
                &qmp,
                &vm.dir.join(CHECKPOINT_SOCKET),
                state,
                self.cfg.start_timeout,
            )
            .await
            .map_err(|e| format!("loading the checkpoint's device state: {e}"))?;
            info!(vm = %vm.name, ms = t.elapsed().as_millis() as u64, "device state loaded");
        }
        qmp.execute(qmp::cont {})
            .await
            .map_err(|e| format!("cont: {e}"))?;
        if device_state.is_some() {
            // The guest now lives somewhere new: have QEMU announce its MACs
            // (gratuitous ARP/RARP) so switches learn the new port at once.
            let announce = serde_json::json!({"initial": 50, "max": 550, "rounds": 5, "step": 100});
            if let Err(e) = qmp
                .execute_raw("announce-self", announce, Duration::from_secs(5))
                .await
            {
                warn!(vm = %vm.name, "announce-self failed: {e}");
            }
        }
        vm.update(|r| r.state = VmState::Running);
        Ok(qmp)
    }

    fn spawn_monitor(self: &Arc<Self>, vm: Arc<Vm>, qmp: QmpClient) {
        let (exited_tx, exited_rx) = watch::channel(false);
        *vm.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(Live {
            qmp: qmp.clone(),
            exited: exited_rx,
        });
        let sup = self.clone();
        tokio::spawn(async move {
            sup.monitor(&vm, qmp).await;
            sup.record_exit(&vm).await;
            let _ = exited_tx.send(true);
        });
    }

    /// Follows QMP events until the connection closes, keeping the state in
    /// step with QEMU (a guest-triggered stop, an accelerator failure).
    async fn monitor(&self, vm: &Vm, qmp: QmpClient) {
        let mut events = qmp.events();
        loop {
            tokio::select! {
                _ = qmp.closed() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => match ev.name.as_str() {
                        "STOP" | "RESUME" if vm.checkpoint_pause.load(Ordering::SeqCst) => {}
                        "STOP" => {
                            let status = query_status(&qmp).await.unwrap_or_default();
                            if status == "internal-error" {
                                warn!(vm = %vm.name, "accelerator internal error; stopping QEMU");
                                *vm.exit_hint.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some("accelerator internal error (KVM emulation failure); QEMU was stopped".into());
                                let _ = qmp.execute(qmp::quit {}).await;
                            } else if vm.state() == VmState::Running
                                && !vm.checkpoint_pause.load(Ordering::SeqCst)
                                && !matches!(
                                    status.as_str(),
                                    "running" | "postmigrate" | "finish-migrate" | "inmigrate"
                                )
                            {
                                // Events arrive late: a checkpoint's STOP can
                                // be read after its window closed. Only what
                                // QEMU says *now* marks the VM paused.
                                vm.update(|r| r.state = VmState::Paused);
                            }
                        }
                        "RESUME" if vm.state() == VmState::Paused => {
                            let status = query_status(&qmp).await.unwrap_or_default();
                            if status == "running" && !vm.checkpoint_pause.load(Ordering::SeqCst) {
                                vm.update(|r| r.state = VmState::Running);
                            }
                        }
                        "SHUTDOWN" => {
                            let reason = ev.data.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown");
                            let mut hint = vm.exit_hint.lock().unwrap_or_else(|p| p.into_inner());
                            if hint.is_none() {
                                *hint = Some(format!("shutdown: {reason}"));
                            }
                        }
                        _ => {}
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Records how QEMU ended, once the shim has written its exit status.
    async fn record_exit(&self, vm: &Vm) {
        let rec = vm.record();
        let deadline = Instant::now() + Duration::from_secs(10);
        let exit = loop {
            if let Some(e) = shim::read_exit(&vm.dir) {
                break Some(e);
            }
            let qemu_alive = rec
                .qemu_pid
                .is_some_and(|pid| process_matches(pid, &vm.qmp_socket().to_string_lossy()));
            let shim_alive = rec.shim_pid.is_some_and(|pid| process_matches(pid, "shim"));
            if (!qemu_alive && !shim_alive) || Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let hint = vm
            .exit_hint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let clean = exit.is_some_and(|e| e.code == Some(0) && e.signal.is_none());
        let guest_shutdown = hint
            .as_deref()
            .is_some_and(|h| h.starts_with("shutdown: guest"));
        let (state, reason) = if rec.stop_requested && exit.is_some() {
            (
                VmState::Shutoff,
                hint.unwrap_or_else(|| "stopped on request".into()),
            )
        } else if clean
            && (guest_shutdown || hint.as_deref().is_some_and(|h| h.starts_with("shutdown:")))
        {
            (VmState::Shutoff, hint.unwrap_or_default())
        } else {
            let why = match exit {
                Some(e) => format!("QEMU exited unexpectedly ({})", describe(&e)),
                None => "QEMU is gone and its exit status was not recorded".into(),
            };
            (
                VmState::Crashed,
                hint.map(|h| format!("{why}; {h}")).unwrap_or(why),
            )
        };
        let info = ExitInfo {
            code: exit.and_then(|e| e.code),
            signal: exit.and_then(|e| e.signal),
            at: exit.map(|e| e.at).unwrap_or_else(now_unix),
            reason,
            serial_tail: tail_lines(&vm.serial_log(), TAIL_LINES),
            qemu_log_tail: tail_lines(&vm.dir.join(shim::QEMU_LOG), TAIL_LINES),
        };
        let _ = std::fs::remove_file(&vm.ram_file);
        *vm.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match state {
            VmState::Crashed => warn!(vm = %vm.name, reason = %info.reason, "VM crashed"),
            _ => info!(vm = %vm.name, reason = %info.reason, "VM shut off"),
        }
        vm.update(|r| {
            r.state = state;
            r.qemu_pid = None;
            r.shim_pid = None;
            r.stop_requested = false;
            r.last_exit = Some(info);
        });
    }

    /// Writes a consistent checkpoint of a running or paused VM into `dir`
    /// (created; must not exist): RAM, device state, disks and a manifest.
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
        std::fs::create_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
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
        let state = checkpoint::save_device_state(
            qmp,
            &vm.dir.join(CHECKPOINT_SOCKET),
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
            std::fs::copy(&d.path, dir.join(&file))
                .map_err(io_err(format!("copying disk {}", d.path.display())))?;
            disks.push(CheckpointDisk {
                name: d.name.clone(),
                file,
                format: d.format,
            });
        }
        let ram_bytes = std::fs::copy(&vm.ram_file, dir.join(CHECKPOINT_RAM))
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
        Ok(GuestPort { vm, qmp: live.qmp })
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        let live = match (vm.state(), vm.live()) {
            (VmState::Running, Some(live)) => live,
            _ => return Err(vm.bad_state("pause")),
        };
        live.qmp.execute(qmp::stop {}).await.map_err(vm.qmp_err())?;
        vm.update(|r| r.state = VmState::Paused);
        drop(_op);
        Ok(self.info_of(&vm).await)
    }

    pub async fn resume(&self, name: &str) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        let live = match (vm.state(), vm.live()) {
            (VmState::Paused, Some(live)) => live,
            _ => return Err(vm.bad_state("resume")),
        };
        live.qmp.execute(qmp::cont {}).await.map_err(vm.qmp_err())?;
        vm.update(|r| r.state = VmState::Running);
        drop(_op);
        Ok(self.info_of(&vm).await)
    }

    /// Graceful stop: ACPI power-down, bounded wait, then `quit`, then SIGKILL.
    pub async fn stop(&self, name: &str, req: StopRequest) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        self.stop_locked(&vm, req).await?;
        drop(_op);
        Ok(self.info_of(&vm).await)
    }

    async fn stop_locked(&self, vm: &Vm, req: StopRequest) -> Result<(), SupervisorError> {
        let was = vm.state();
        let Some(mut live) = vm.live().filter(|_| was.is_active()) else {
            return Err(vm.bad_state("stop"));
        };
        vm.update(|r| {
            r.state = VmState::Stopping;
            r.stop_requested = true;
        });
        let timeout =
            Duration::from_secs(req.timeout_s.unwrap_or(vm.record().spec.shutdown_timeout_s));
        if !req.force {
            if was == VmState::Paused {
                // A paused guest cannot see the power button.
                let _ = live.qmp.execute(qmp::cont {}).await;
            }
            match live.qmp.execute(qmp::system_powerdown {}).await {
                Ok(_) => {
                    if wait_exited(&mut live.exited, timeout).await {
                        return Ok(());
                    }
                    warn!(vm = %vm.name, ?timeout, "guest did not power off in time; quitting QEMU");
                    *vm.exit_hint.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                        "guest did not power off within {timeout:?}; QEMU was stopped"
                    ));
                }
                Err(e) => warn!(vm = %vm.name, "system_powerdown failed: {e}"),
            }
        }
        let _ = live
            .qmp
            .execute_timeout(qmp::quit {}, Duration::from_secs(3))
            .await;
        if wait_exited(&mut live.exited, Duration::from_secs(5)).await {
            return Ok(());
        }
        if let Some(pid) = vm.record().qemu_pid {
            warn!(vm = %vm.name, pid, "QEMU ignored quit; killing it");
            send_signal(pid, libc::SIGKILL);
        }
        wait_exited(&mut live.exited, Duration::from_secs(10)).await;
        Ok(())
    }

    pub async fn destroy(&self, name: &str) -> Result<(), SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        if vm.state().is_active() {
            self.stop_locked(
                &vm,
                StopRequest {
                    timeout_s: None,
                    force: true,
                },
            )
            .await?;
        }
        if vm.state().is_active() {
            return Err(vm.bad_state("destroy"));
        }
        let _ = std::fs::remove_file(&vm.ram_file);
        std::fs::remove_dir_all(&vm.dir)
            .map_err(io_err(format!("removing {}", vm.dir.display())))?;
        if let Some(ports) = &self.cfg.nic_ports {
            ports.detach(name);
        }
        self.vms.write().await.remove(name);
        info!(vm = %name, "destroyed");
        Ok(())
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
            state: r.state,
            qmp_status,
            accel: r.accel.map(|a| a.as_str().to_string()),
            pid: r.qemu_pid,
            started_at: r.started_at,
            qmp_socket: vm.qmp_socket().display().to_string(),
            serial_log: vm.serial_log().display().to_string(),
            ram_file: vm.ram_file.display().to_string(),
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

fn describe(e: &ShimExit) -> String {
    match (e.code, e.signal) {
        (_, Some(s)) => format!("killed by signal {s}"),
        (Some(c), None) => format!("exit code {c}"),
        (None, None) => "exit status unknown".into(),
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

const CHECKPOINT_SOCKET: &str = "checkpoint.sock";
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
struct RestoreSource {
    ram_file: PathBuf,
    device_state: Vec<u8>,
    disks: Vec<(String, PathBuf, DiskFormat)>,
}

/// Copies a checkpoint's RAM file into the VM's RAM path. A copy (not a
/// rename) keeps the checkpoint restorable a second time.
fn place_ram_file(from: &Path, to: &Path) -> Result<(), SupervisorError> {
    let tmp = to.with_extension("ram.incoming");
    std::fs::copy(from, &tmp).map_err(io_err(format!("copying RAM from {}", from.display())))?;
    std::fs::rename(&tmp, to).map_err(io_err("placing the restored RAM file"))?;
    Ok(())
}

/// What the replication engine needs from one running VM: its RAM file, and
/// short windows in which the guest is stopped.
#[derive(Clone)]
pub struct GuestPort {
    vm: Arc<Vm>,
    qmp: QmpClient,
}

/// The guest inside [`GuestPort::with_stopped`].
pub struct StoppedGuest<'a> {
    port: &'a GuestPort,
}

impl StoppedGuest<'_> {
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
}

async fn save_device_state(
    qmp: &QmpClient,
    vm: &Vm,
    timeout: Duration,
) -> Result<Vec<u8>, SupervisorError> {
    checkpoint::save_device_state(qmp, &vm.dir.join(CHECKPOINT_SOCKET), timeout)
        .await
        .map_err(|e| SupervisorError::Checkpoint {
            name: vm.name.clone(),
            message: e.to_string(),
        })
}

/// A device-state save running beside the caller. Dropping it abandons the
/// save (the task is aborted), as dropping [`StoppedGuest::device_state`]
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
    pub fn ram_file(&self) -> &Path {
        &self.vm.ram_file
    }
    pub fn ram_size(&self) -> u64 {
        self.vm.record().spec.memory_mib << 20
    }
    /// How the VM's QEMU ended, once the supervisor has recorded it:
    /// `Some(true)` for a crash (it exited unexpectedly), `Some(false)` for
    /// a shutdown (guest power-off or a requested stop), `None` while it
    /// runs or its exit is not yet recorded.
    pub fn ended_in_crash(&self) -> Option<bool> {
        let rec = self.vm.record();
        match rec.state {
            VmState::Crashed => Some(true),
            // A host signal (an admin's kill, the host shutting down) ends
            // QEMU cleanly, but nobody asked the VM to stop.
            VmState::Shutoff => Some(
                rec.last_exit
                    .as_ref()
                    .is_some_and(|e| e.reason.contains("host-signal")),
            ),
            _ => None,
        }
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

    /// Runs `f` with the guest stopped, and resumes it afterwards if it was
    /// running. Holds the VM's lifecycle lock throughout, so a user's pause
    /// or stop waits for the window to end instead of racing it.
    pub async fn with_stopped<R>(
        &self,
        f: impl AsyncFnOnce(&StoppedGuest<'_>) -> R,
    ) -> Result<R, SupervisorError> {
        let _op = self.vm.ops.lock().await;
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
        let r = f(&StoppedGuest { port: self }).await;
        if running {
            let resumed = self.qmp.execute(qmp::cont {}).await;
            self.vm.checkpoint_pause.store(false, Ordering::SeqCst);
            resumed.map_err(self.vm.qmp_err())?;
        }
        Ok(r)
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
    /// `deadline_ms` (unix ms) even if tandemd is gone.
    pub fn renew_lease(&self, deadline_ms: u64) -> std::io::Result<()> {
        atomic_write(
            &self.vm.dir.join(shim::FENCE_LEASE_FILE),
            deadline_ms.to_string().as_bytes(),
        )
    }

    /// Ends the lease (protection ended on purpose).
    pub fn clear_lease(&self) {
        let _ = std::fs::remove_file(self.vm.dir.join(shim::FENCE_LEASE_FILE));
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
            self.vm.update(|r| r.state = VmState::Paused);
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
            self.vm.update(|r| r.state = VmState::Running);
        }
        info!(vm = %self.vm.name, "unfenced: the backup granted a resume");
        Ok(())
    }
}
