//! Starting, pausing, resuming, stopping and destroying a VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_api::{StopRequest, VmInfo, VmState};
use tandem_qmp::{qmp, QmpClient, QmpError};
use tandem_vmspec::{build_argv, RuntimePaths};
use tracing::{info, warn};

use super::exit::{describe, ExitHint};
use super::record::BaseDir;
use super::snapshot::{
    place_ram_file, DirOwner, RestoreRam, RestoreSource, CHECKPOINT_SOCKET, OWNER_FILE,
};
use super::{
    io_err, qemu_marker, wait_exited, Supervisor, SupervisorError, Vm, QMP_SOCKET, SERIAL_LOG,
    TAIL_LINES,
};
use crate::checkpoint::{self, CheckpointError};
use crate::process::ProcessIdentity;
use crate::shim::{self, ShimExit};
use crate::util::{
    create_private_file, ensure_private_dir, make_private, now_unix, process_matches,
    processes_matching, tail_lines,
};

/// Why a started QEMU did not come up.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartFailure {
    #[error("QEMU could not be executed")]
    NotExecuted,
    #[error("no QEMU pid within {0:?}")]
    NoPid(Duration),
    #[error("QEMU exited at once ({}): {tail}", describe(exit))]
    ExitedAtOnce { exit: ShimExit, tail: String },
    #[error("QMP did not answer within {0:?}")]
    NoQmp(Duration),
    #[error("preparing to load the checkpoint: {0}")]
    Prepare(#[source] CheckpointError),
    #[error("loading the checkpoint's device state: {0}")]
    LoadDeviceState(#[source] CheckpointError),
    #[error("making {dir} the VM's own before it runs: {source}")]
    Claim {
        dir: String,
        #[source]
        source: SupervisorError,
    },
    #[error("cont: {0}")]
    Cont(#[source] QmpError),
    #[error("{0}")]
    Persist(#[source] SupervisorError),
    #[error("preparing the incoming migration: {0}")]
    Incoming(String),
}

impl Supervisor {
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, SupervisorError> {
        self.start_with(name, None).await
    }

    pub(super) async fn start_with(
        self: &Arc<Self>,
        name: &str,
        restore: Option<RestoreSource>,
    ) -> Result<VmInfo, SupervisorError> {
        self.start_mode(name, restore, None)
            .await
            .map(|(info, _)| info)
    }

    /// Starts the VM's QEMU: booting, restoring (`restore`) or waiting
    /// for an incoming migration (`incoming`: then the answer carries the
    /// URI QEMU listens on, and the guest does not run yet).
    pub(super) async fn start_mode(
        self: &Arc<Self>,
        name: &str,
        restore: Option<RestoreSource>,
        incoming: Option<&super::migrate::IncomingPlan>,
    ) -> Result<(VmInfo, Option<String>), SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        if vm.state().is_active() {
            return Err(vm.bad_state("start"));
        }
        if let Some(b) = vm.record().base.filter(|b| !b.owned && restore.is_none()) {
            // Its disks are overlays over a replica that is still one (the
            // backup may write it): booting them would run a second copy
            // of the guest on a base that changes under it.
            return Err(SupervisorError::Refused(format!(
                "the disks of `{}` are overlays over {}, which is still a replica (a takeover into this VM did not complete): resume it with `tandem failover {}`, or destroy this VM",
                vm.name,
                b.dir.display(),
                vm.name
            )));
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
                match &src.ram {
                    // Lent, not owned, until the guest runs from it.
                    RestoreRam::InPlace { dir, .. } => {
                        r.base = Some(BaseDir {
                            dir: dir.clone(),
                            owned: false,
                        })
                    }
                    // Its disks are copies now: a lent base is not its.
                    RestoreRam::Copy(_) => {
                        if r.base.as_ref().is_some_and(|b| !b.owned) {
                            r.base = None;
                        }
                    }
                }
            })?;
        }
        let spec = vm.record().spec;
        // Files may have gone since the VM was defined.
        spec.validate(|p| p.is_file())?;
        let accel = self.resolve_accel(spec.accelerator).await;

        // Its QMP socket and RAM file are about to be unlinked: no QEMU of
        // this VM may still hold them (one its record lost track of, say).
        if let Some(pid) = live_qemu(&vm) {
            return Err(SupervisorError::Start {
                name: vm.name.clone(),
                message: format!(
                    "a QEMU of this VM (or its shim), pid {pid}, is still running; stop it first"
                ),
                qemu_log_tail: Vec::new(),
            });
        }
        // Records and logs (the guest's console among them) are root's alone.
        make_private(&vm.dir).map_err(io_err(format!("securing {}", vm.dir.display())))?;
        let mut files = vm.next_runtime.clone();
        let private = files.lease_file.parent().unwrap_or(&files.lease_file);
        ensure_private_dir(private).map_err(io_err("preparing the private RAM directory"))?;
        // A RAM file used in place is a replica's until the guest runs from
        // it: nothing here may remove or create it.
        let in_place = match restore.as_ref().map(|r| &r.ram) {
            Some(RestoreRam::InPlace { file, .. }) => {
                files.ram_file = file.clone();
                true
            }
            _ => false,
        };

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
        // The last QEMU's files (possibly where an older tandemd kept
        // them), then whatever is at the new paths.
        if let Some(last) = vm.record().runtime {
            vm.remove_runtime_files(&last);
        }
        if !in_place {
            let _ = std::fs::remove_file(&files.ram_file);
        }
        let _ = std::fs::remove_file(&files.lease_file);
        // tandemd makes the RAM file itself, private and sized, before QEMU
        // runs; QEMU opens the existing file.
        match restore.as_ref().map(|r| &r.ram) {
            Some(RestoreRam::Copy(from)) => place_ram_file(from, &files.ram_file)?,
            Some(RestoreRam::InPlace { file, .. }) => check_ram_file(file, spec.memory_mib << 20)?,
            None => create_ram_file(&files.ram_file, spec.memory_mib << 20)?,
        }
        let discard_ram = |files: &super::record::RuntimeFiles| {
            if !in_place {
                let _ = std::fs::remove_file(&files.ram_file);
            }
        };
        *vm.exit_hint.lock() = None;
        let prepared = vm.update(|r| {
            r.runtime = Some(files.clone());
            r.accel = Some(accel);
            r.shim_pid = None;
            r.qemu_pid = None;
            r.shim_start = None;
            r.qemu_start = None;
            r.stop_requested = false;
        });
        if let Err(e) = prepared {
            discard_ram(&files);
            return Err(e);
        }

        let rt = RuntimePaths {
            qemu_binary: self.cfg.qemu_binary.clone(),
            qmp_socket: vm.qmp_socket(),
            serial_log: vm.serial_log(),
            ram_file: files.ram_file.clone(),
            qboot_rom: self.cfg.qboot_rom.clone(),
            accel,
            incoming: restore.is_some() || incoming.is_some(),
            switch_dir: self.cfg.switch_dir.clone(),
        };
        let argv = build_argv(&spec, &rt);
        let shim = &self.cfg.shim;
        let spawned = shim.spawn(&vm.dir, &files.lease_file, &self.cfg.qemu_binary, &argv);
        let mut shim_child = match spawned {
            Ok(c) => c,
            Err(e) => {
                discard_ram(&files);
                return Err(io_err("starting the QEMU shim")(e));
            }
        };
        let shim_pid = shim_child.id();
        // Our child, not reaped before the task below: its pid is still
        // its own, so this is exactly the shim's identity.
        let shim_start = shim_pid
            .and_then(ProcessIdentity::of)
            .map(|id| id.start_ticks);
        // Reap the shim when it ends so it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = shim_child.wait().await;
        });
        let started = vm.update(|r| {
            r.state = VmState::Starting;
            r.shim_pid = shim_pid;
            r.shim_start = shim_start;
            r.started_at = Some(now_unix());
        });
        info!(vm = %vm.name, accel = accel.as_str(), "starting QEMU");

        let outcome = match started {
            Ok(()) => {
                let device_state = restore.as_ref().map(|r| r.device_state.as_slice());
                let claim = restore.as_ref().and_then(|r| match &r.ram {
                    RestoreRam::InPlace { dir, .. } => Some(dir.as_path()),
                    RestoreRam::Copy(_) => None,
                });
                match incoming {
                    Some(plan) => self.finish_incoming_start(&vm, plan).await,
                    None => self
                        .finish_start(&vm, device_state, claim)
                        .await
                        .map(|q| (q, None)),
                }
            }
            Err(e) => Err(StartFailure::Persist(e)),
        };
        match outcome {
            Ok((qmp, uri)) => {
                self.spawn_monitor(vm.clone(), qmp);
                drop(_op);
                Ok((self.info_of(&vm).await, uri))
            }
            Err(failure) => {
                let message = failure.to_string();
                kill_started_qemu(&vm).await;
                *vm.exit_hint.lock() = Some(ExitHint::StartFailed(message.clone()));
                self.record_exit(&vm).await;
                Err(SupervisorError::Start {
                    name: vm.name.clone(),
                    message,
                    qemu_log_tail: tail_lines(&vm.dir.join(shim::QEMU_LOG), TAIL_LINES),
                })
            }
        }
    }

    /// Waits for a started QEMU's pid and its QMP socket.
    pub(super) async fn connect_started(&self, vm: &Vm) -> Result<QmpClient, StartFailure> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        let pid = loop {
            if let Some(pid) = shim::read_pid(&vm.dir) {
                break pid;
            }
            if shim::read_exit(&vm.dir).is_some() {
                return Err(StartFailure::NotExecuted);
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::NoPid(self.cfg.start_timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The pid the shim wrote is QEMU's while QEMU is the shim's child
        // (the shim starts nothing else): its start time, taken now, names
        // QEMU from here on. If QEMU already ended, no start time is kept
        // and the exit shows below.
        let qemu_start = qemu_identity(vm, pid).map(|id| id.start_ticks);
        vm.update(|r| {
            r.qemu_pid = Some(pid);
            r.qemu_start = qemu_start;
        })
        .map_err(StartFailure::Persist)?;
        let qmp = loop {
            if let Some(exit) = shim::read_exit(&vm.dir) {
                let tail = tail_lines(&vm.dir.join(shim::QEMU_LOG), 3).join(" | ");
                return Err(StartFailure::ExitedAtOnce { exit, tail });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StartFailure::NoQmp(self.cfg.start_timeout));
            }
            match QmpClient::connect(vm.qmp_socket(), left.min(Duration::from_secs(2))).await {
                Ok(q) => break q,
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        };
        Ok(qmp)
    }

    /// Waits for QEMU to come up, connects QMP and lets the guest run.
    /// `claim`: the directory an in-place restore runs from, which becomes
    /// the VM's own just before `cont` (and stays the replica it was if
    /// anything fails before).
    async fn finish_start(
        &self,
        vm: &Vm,
        device_state: Option<&[u8]>,
        claim: Option<&std::path::Path>,
    ) -> Result<QmpClient, StartFailure> {
        let qmp = self.connect_started(vm).await?;
        if let Some(state) = device_state {
            let t = Instant::now();
            checkpoint::prepare(&qmp)
                .await
                .map_err(StartFailure::Prepare)?;
            checkpoint::load_device_state(
                &qmp,
                &vm.dir.join(CHECKPOINT_SOCKET),
                state,
                self.cfg.start_timeout,
            )
            .await
            .map_err(StartFailure::LoadDeviceState)?;
            info!(vm = %vm.name, ms = t.elapsed().as_millis() as u64, "device state loaded");
        }
        let t = Instant::now();
        if let Some(dir) = claim {
            claim_base(vm, dir).map_err(|source| StartFailure::Claim {
                dir: dir.display().to_string(),
                source,
            })?;
        }
        let claimed = t.elapsed();
        if let Err(e) = qmp.execute(qmp::cont {}).await {
            if let (Some(dir), QmpError::Qemu { .. }) = (claim, &e) {
                // QEMU refused `cont`: the guest never ran, and the
                // directory is still the replica it was. (Any other
                // failure leaves it unknown whether the guest ran: then it
                // stays the VM's, never resumed again.)
                release_base(vm, dir);
            }
            return Err(StartFailure::Cont(e));
        }
        if claim.is_some() {
            info!(
                vm = %vm.name,
                claim_ms = claimed.as_millis() as u64,
                cont_ms = (t.elapsed() - claimed).as_millis() as u64,
                "the guest runs in place"
            );
        }
        if device_state.is_some() {
            // The guest now lives somewhere new: have QEMU announce its MACs
            // (gratuitous ARP/RARP) so switches learn the new port at once.
            if let Err(e) = announce_self(&qmp).await {
                warn!(vm = %vm.name, "announce-self failed: {e}");
            }
        }
        vm.update(|r| r.state = VmState::Running)
            .map_err(StartFailure::Persist)?;
        Ok(qmp)
    }

    /// Has QEMU announce the guest's MACs from here (RARP, five rounds
    /// over about a second), so the network learns this host's port for
    /// them again: after a migration, frames the source released late
    /// (its held output) taught the fabric the source's port.
    pub async fn announce(&self, name: &str) -> Result<(), SupervisorError> {
        let vm = self.get(name).await?;
        let live = vm.live().ok_or_else(|| vm.bad_state("announce"))?;
        announce_self(&live.qmp).await.map_err(vm.qmp_err())
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(name).await?;
        let _op = vm.ops.lock().await;
        let live = match (vm.state(), vm.live()) {
            (VmState::Running, Some(live)) => live,
            _ => return Err(vm.bad_state("pause")),
        };
        live.qmp.execute(qmp::stop {}).await.map_err(vm.qmp_err())?;
        vm.update(|r| r.state = VmState::Paused)?;
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
        // A source whose migration completed waits paused in QEMU's
        // postmigrate state; the destination may be running the guest.
        // Only the migration's own confirm step may resume it.
        let status = live
            .qmp
            .execute_raw(
                "query-status",
                serde_json::json!({}),
                Duration::from_secs(10),
            )
            .await
            .map_err(vm.qmp_err())?;
        if status["status"] == "postmigrate" {
            return Err(SupervisorError::Refused(format!(
                "`{name}` migrated away and may be running on its destination: resuming this copy could run the guest twice; end the migration with its confirm step (tandem migrate), or destroy this copy"
            )));
        }
        live.qmp.execute(qmp::cont {}).await.map_err(vm.qmp_err())?;
        vm.update(|r| r.state = VmState::Running)?;
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
        })?;
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
                    *vm.exit_hint.lock() = Some(ExitHint::PowerOffTimeout(timeout));
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
        let marker = qemu_marker(&vm.qmp_socket());
        if let Some(qemu) = vm.record().qemu(&marker) {
            warn!(vm = %vm.name, pid = qemu.pid, "QEMU ignored quit; killing it");
            if let Err(e) = qemu.signal(Signal::SIGKILL) {
                warn!(vm = %vm.name, "not killed: {e}");
            }
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
        vm.remove_runtime_files(&vm.runtime());
        // The base the VM ran from in place is its own: it goes first (a
        // crash after leaves the record, and a second destroy finishes).
        let rec = vm.record();
        if let Some(base) = rec.base.filter(|b| b.owned) {
            let ours = super::snapshot::dir_owner(&base.dir)
                .ok()
                .flatten()
                .is_some_and(|o| o.uuid == rec.uuid.to_string());
            if ours {
                std::fs::remove_dir_all(&base.dir)
                    .map_err(io_err(format!("removing {}", base.dir.display())))?;
                info!(vm = %name, dir = %base.dir.display(), "removed the base the VM ran from");
            }
        }
        std::fs::remove_dir_all(&vm.dir)
            .map_err(io_err(format!("removing {}", vm.dir.display())))?;
        if let Some(ports) = &self.cfg.nic_ports {
            ports.detach(name);
        }
        self.vms.write().await.remove(name);
        info!(vm = %name, "destroyed");
        Ok(())
    }
}

/// A live QEMU of this VM, or its shim: by the recorded pid, by the shim's
/// pid file, or by any process whose command line carries this VM's QMP
/// chardev (a QEMU the record lost track of).
fn live_qemu(vm: &Vm) -> Option<u32> {
    let marker = qemu_marker(&vm.qmp_socket());
    let recorded = [vm.record().qemu_pid, shim::read_pid(&vm.dir)];
    recorded
        .into_iter()
        .flatten()
        .find(|&pid| process_matches(pid, &marker))
        .or_else(|| processes_matching(&marker).into_iter().next())
}

/// Creates a fresh guest RAM file: private (0600, in tandemd's 0700
/// directory), exclusively (nothing that was at the path is ever used),
/// and sized, so QEMU opens it rather than making its own.
fn create_ram_file(path: &std::path::Path, bytes: u64) -> Result<(), SupervisorError> {
    let context = || format!("creating the guest RAM file {}", path.display());
    let f = create_private_file(path).map_err(io_err(context()))?;
    if let Err(e) = f.set_len(bytes) {
        let _ = std::fs::remove_file(path);
        return Err(io_err(context())(e));
    }
    Ok(())
}

/// The RAM file an in-place restore maps: a regular file (not a symlink)
/// of exactly the guest's RAM size. Nothing is changed.
fn check_ram_file(path: &std::path::Path, bytes: u64) -> Result<(), SupervisorError> {
    let m = std::fs::symlink_metadata(path)
        .map_err(io_err(format!("the RAM file {}", path.display())))?;
    if !m.file_type().is_file() || m.len() != bytes {
        return Err(SupervisorError::Refused(format!(
            "{} is not a RAM file of {bytes} bytes (the guest's RAM) to run from in place",
            path.display()
        )));
    }
    Ok(())
}

/// Makes `dir` the VM's own, durably, before its guest first runs from
/// it: the record first (so a destroy knows it), then the marker in the
/// directory (so nobody resumes or writes it again). A crash between the
/// two leaves a record naming a directory without the marker, which a
/// destroy leaves alone.
fn claim_base(vm: &Vm, dir: &std::path::Path) -> Result<(), SupervisorError> {
    vm.update(|r| {
        r.base = Some(BaseDir {
            dir: dir.to_path_buf(),
            owned: true,
        })
    })?;
    let owner = DirOwner {
        vm: vm.name.clone(),
        uuid: vm.rec.lock().uuid.to_string(),
        since: now_unix(),
    };
    let marked = crate::util::atomic_write_json(&dir.join(OWNER_FILE), &owner);
    if let Err(e) = marked {
        release_base(vm, dir);
        return Err(io_err(format!(
            "writing {}",
            dir.join(OWNER_FILE).display()
        ))(e));
    }
    Ok(())
}

/// Undoes [`claim_base`] for a guest that never ran: the marker first.
fn release_base(vm: &Vm, dir: &std::path::Path) {
    let _ = std::fs::remove_file(dir.join(OWNER_FILE));
    vm.update_logged(|r| {
        if let Some(b) = r.base.as_mut().filter(|b| b.dir == dir) {
            b.owned = false;
        }
    });
}

/// A start failed: make sure the QEMU it launched (if any) does not live
/// on. The shim writes QEMU's pid just after starting it, so wait a moment
/// for the pid when it is not there yet (or for the shim to report QEMU
/// never ran).
async fn kill_started_qemu(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let marker = qemu_marker(&vm.qmp_socket());
    loop {
        if let Some(pid) = shim::read_pid(&vm.dir) {
            // Only QEMU itself: the shim's child, or the QEMU on record.
            let qemu = qemu_identity(vm, pid)
                .map(|id| id.signal(Signal::SIGKILL))
                .or_else(|| {
                    let rec = vm.record();
                    let qemu = rec.qemu(&marker).filter(|q| q.pid == pid)?;
                    Some(qemu.signal(Signal::SIGKILL).map(|_| ()))
                });
            if let Some(Err(e)) = qemu {
                warn!(vm = %vm.name, pid, "QEMU of a failed start not killed: {e}");
            }
            return;
        }
        if shim::read_exit(&vm.dir).is_some() || Instant::now() >= deadline {
            return;
        }
        let shim_alive = vm.record().shim(&marker).is_some_and(|s| s.is_alive());
        if !shim_alive {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// QEMU's identity, from the pid its shim wrote: the live child of the
/// VM's recorded shim at `pid`. `None` when QEMU has ended (its pid may be
/// someone else's by now), or the shim is not known.
fn qemu_identity(vm: &Vm, pid: u32) -> Option<ProcessIdentity> {
    let rec = vm.record();
    let shim = ProcessIdentity {
        pid: rec.shim_pid?,
        start_ticks: rec.shim_start?,
    };
    ProcessIdentity::child_of(pid, &shim)
}

/// QEMU's `announce-self`: RARP from every NIC's MAC, first at once, then
/// backing off from 50 to 550 ms over five rounds.
async fn announce_self(qmp: &QmpClient) -> Result<(), QmpError> {
    let announce = serde_json::json!({"initial": 50, "max": 550, "rounds": 5, "step": 100});
    qmp.execute_raw("announce-self", announce, Duration::from_secs(5))
        .await
        .map(|_| ())
}
