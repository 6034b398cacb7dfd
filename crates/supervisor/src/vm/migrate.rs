//! Live migration of a VM between two supervisors: the destination's QEMU
//! waiting for the stream, and the source's driver, which feeds QEMU's
//! `query-migrate` to the convergence ladder (`tandem-migration`) and
//! carries out what it decides.
//!
//! Neither side ever leaves a half-migrated VM behind: the destination
//! removes its VM when the stream fails, is cancelled, or never comes; the
//! source keeps running on every failure and, once QEMU has finished,
//! stays paused until it is told whether the destination runs the guest
//! (then it goes) or not (then it resumes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tandem_api::{
    IncomingMigrationReply, MigrationPhase, MigrationReport, StorageCopyTarget, VmState,
};
use tandem_migration::{setup, Action, Decision, Ladder, LadderConfig, Outcome, Sample, Status};
use tandem_qmp::{qmp, QmpClient};
use tracing::{info, warn};
use uuid::Uuid;

use super::lifecycle::StartFailure;
use super::migrate_storage::StorageMirror;
use super::{Supervisor, SupervisorError, Vm};

const QMP_CALL: Duration = Duration::from_secs(10);
/// How often the source reads `query-migrate`: often enough that a stall
/// window of a few seconds sees many samples, cheap for QEMU.
const POLL: Duration = Duration::from_millis(200);
/// How long a destination with copied disks waits, its stream complete,
/// for the source to say the copies are whole.
const GO_WAIT: Duration = Duration::from_secs(60);

/// What the destination's QEMU is started with.
#[derive(Debug, Clone)]
pub struct IncomingPlan {
    /// `HOST:PORT` to listen on (port 0: any free port).
    pub listen: String,
    pub allow_postcopy: bool,
    /// Parallel streams (QEMU's multifd), as the source migrates.
    pub multifd_channels: Option<u8>,
    /// How long the source may take to connect.
    pub accept_timeout: Duration,
    /// Filled in by [`Supervisor::prepare_incoming`]: QEMU's credentials
    /// directory when this host has a cluster identity.
    pub tls_dir: Option<std::path::PathBuf>,
    /// With TLS: the only host whose certificate may connect (QEMU's
    /// `tls-authz`), when the source said who it is.
    pub source_tls_name: Option<String>,
    /// Filled in by [`Supervisor::prepare_incoming`]: the disks this side
    /// copies (exported over NBD until the guest runs).
    pub copied_disks: Vec<String>,
}

/// The id of QEMU's `tls-creds-x509` object for a migration stream.
pub(super) const TLS_OBJECT: &str = "tandem-migration-tls";
/// The VM's copy of this host's credentials, in QEMU's layout.
const TLS_DIR: &str = "migration-tls";

/// One outgoing migration.
pub(super) struct OutgoingJob {
    report: Mutex<MigrationReport>,
    cancel: tokio::sync::Notify,
    cancel_asked: std::sync::atomic::AtomicBool,
}

fn tls_object(dir: &std::path::Path, endpoint: &str) -> Value {
    json!({
        "qom-type": "tls-creds-x509",
        "id": TLS_OBJECT,
        "dir": dir.display().to_string(),
        "endpoint": endpoint,
        // Both ends show a certificate of the cluster's CA.
        "verify-peer": true,
    })
}

/// Returns at QEMU's next MIGRATION event; never, once its event stream
/// is gone (the caller's poll goes on).
async fn next_migration_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<tandem_qmp::QmpEvent>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let Some(rx) = events.as_mut() else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Ok(e) if e.name == "MIGRATION" => return,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => *events = None,
        }
    }
}

fn capabilities(caps: &[(&str, bool)]) -> Value {
    json!({ "capabilities": caps.iter().map(|(c, on)| json!({"capability": c, "state": on})).collect::<Vec<_>>() })
}

async fn query(qmp: &QmpClient, started: Instant) -> Result<Sample, String> {
    let v = qmp
        .execute_raw("query-migrate", json!({}), QMP_CALL)
        .await
        .map_err(|e| format!("query-migrate: {e}"))?;
    Sample::from_query_migrate(&v, started.elapsed().as_millis() as u64).map_err(|e| e.to_string())
}

impl Supervisor {
    /// Defines the VM with the source's identity and starts a QEMU that
    /// waits for its migration stream on `plan.listen`; answers with the
    /// URI the source migrates to. In the background it lets the guest run
    /// as soon as the stream completes (or postcopy starts), and removes
    /// the VM if the stream fails or does not come within the plan's
    /// accept timeout.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        spec_toml: &str,
        uuid: &str,
        plan: IncomingPlan,
        disks: &[tandem_api::MigrationDisk],
    ) -> Result<IncomingMigrationReply, SupervisorError> {
        let uuid = Uuid::parse_str(uuid)
            .map_err(|e| SupervisorError::Refused(format!("the VM's uuid `{uuid}`: {e}")))?;
        if uuid.is_nil() {
            return Err(SupervisorError::Refused(
                "a migrated VM keeps its identity: the nil uuid is not one".into(),
            ));
        }
        let storage = self.plan_incoming_storage(spec_toml, disks).await?;
        if !storage.copied.is_empty() && plan.allow_postcopy {
            return Err(SupervisorError::Refused(format!(
                "disks {:?} are not on storage this host shares with the source, and their copy must be complete before the guest runs here: postcopy cannot be allowed with copied storage",
                storage.copied
            )));
        }
        let made = if storage.copied.is_empty() {
            None
        } else {
            let spec = tandem_vmspec::parse_and_validate(&storage.spec_toml, |_| true)
                .map_err(|e| SupervisorError::Refused(e.to_string()))?;
            let dir = self.cfg.state_dir.join("vms").join(&spec.name);
            if let Err(e) = self.make_incoming_copies(&storage).await {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            Some(dir)
        };
        let info = match self.create_with_uuid(&storage.spec_toml, uuid).await {
            Ok(i) => i,
            Err(e) => {
                if let Some(dir) = made {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        let name = info.name.clone();
        let vm = self.get(&name).await?;
        // From now on a tandemd that restarts removes this VM unless it
        // has run here (see `VmRecord::incoming`).
        if let Err(e) = vm.update(|r| r.incoming = true) {
            let _ = self.destroy(&name).await;
            return Err(e);
        }
        let mut plan = plan;
        plan.copied_disks = storage.copied.clone();
        let tls = match self.migration_tls(&vm) {
            Ok(t) => t,
            Err(e) => {
                let _ = self.destroy(&name).await;
                return Err(e);
            }
        };
        plan.tls_dir = tls.as_ref().map(|(dir, _)| dir.clone());
        match self.start_mode(&name, None, Some(&plan)).await {
            Ok((_, Some(uri))) => {
                let copy_storage = if plan.copied_disks.is_empty() {
                    None
                } else {
                    let exported = match vm.live() {
                        Some(live) => {
                            let host = plan.listen.rsplit_once(':').map_or("", |(h, _)| h);
                            self.export_incoming_copies(
                                &live.qmp,
                                host,
                                &plan.copied_disks,
                                tls.is_some(),
                                tls.is_some() && plan.source_tls_name.is_some(),
                            )
                            .await
                        }
                        None => Err("QEMU ended".to_string()),
                    };
                    match exported {
                        Ok(t) => Some(t),
                        Err(e) => {
                            if let Err(d) = self.destroy(&name).await {
                                warn!(vm = %name, "removing the VM after a failed export: {d}");
                            }
                            return Err(SupervisorError::Refused(format!(
                                "serving the disks' copies: {e}"
                            )));
                        }
                    }
                };
                if !plan.copied_disks.is_empty() {
                    self.incoming_go
                        .lock()
                        .insert(name.clone(), Arc::new(tokio::sync::Notify::new()));
                }
                info!(vm = %name, %uri, tls = tls.is_some(), copied = ?plan.copied_disks, "waiting for the incoming migration");
                let sup = self.clone();
                tokio::spawn(async move { sup.watch_incoming(vm, plan).await });
                Ok(IncomingMigrationReply {
                    vm: name,
                    uri,
                    tls_hostname: tls.map(|(_, n)| n),
                    copy_storage,
                })
            }
            Ok((_, None)) => Err(SupervisorError::Refused(
                "QEMU started without saying where it listens".into(),
            )),
            Err(e) => {
                // Nothing of a destination that cannot listen stays.
                if let Err(d) = self.destroy(&name).await {
                    warn!(vm = %name, "removing the VM after a failed incoming start: {d}");
                }
                Err(e)
            }
        }
    }

    /// The destination's side after `migrate-incoming`: run the guest when
    /// it is whole, or remove the VM.
    async fn watch_incoming(self: Arc<Self>, vm: Arc<Vm>, plan: IncomingPlan) {
        let started = Instant::now();
        let mut running = false;
        // QEMU's MIGRATION events wake the watcher at once: the guest must
        // not wait up to a poll interval, paused, after its stream
        // completed (measured: that wait was most of tandem's extra
        // client-visible gap against plain QEMU). The poll stays as the
        // fallback.
        let mut events = vm.live().map(|l| l.qmp.events());
        let failure = loop {
            match events.as_mut() {
                Some(rx) => {
                    let deadline = tokio::time::sleep(POLL);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            ev = rx.recv() => match ev {
                                Ok(e) if e.name == "MIGRATION" => break,
                                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                                Err(_) => {
                                    events = None;
                                    break;
                                }
                            },
                        }
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
            let Some(live) = vm.live() else {
                break "QEMU ended".to_string();
            };
            let sample = match query(&live.qmp, started).await {
                Ok(s) => s,
                Err(e) => break e,
            };
            match sample.status {
                Some(Status::Completed) => {
                    if !running && !plan.copied_disks.is_empty() {
                        // The copies are whole only once the source has
                        // ended its mirrors: it says so (`run_incoming`).
                        let go = self.incoming_go.lock().get(&vm.name).cloned();
                        let told = match go {
                            Some(go) => tokio::time::timeout(GO_WAIT, go.notified()).await.is_ok(),
                            None => false,
                        };
                        self.incoming_go.lock().remove(&vm.name);
                        if !told {
                            break format!(
                                "the source did not confirm the disks' copies within {GO_WAIT:?}"
                            );
                        }
                    }
                    if !running {
                        if let Err(e) = self.run_incoming(&vm, &live.qmp, &plan).await {
                            break e;
                        }
                    }
                    info!(vm = %vm.name, ms = started.elapsed().as_millis() as u64, "incoming migration completed; the guest runs here");
                    return;
                }
                Some(Status::Postcopy) if !running => {
                    // The destination runs the guest from now on and pulls
                    // what it lacks (QEMU does not start it itself under -S).
                    if let Err(e) = self.run_incoming(&vm, &live.qmp, &plan).await {
                        break e;
                    }
                    running = true;
                }
                Some(Status::Failed) => {
                    break sample
                        .error
                        .unwrap_or_else(|| "the incoming stream failed".into())
                }
                Some(Status::Cancelled) => break "the migration was cancelled".into(),
                Some(Status::None) | Some(Status::Setup)
                    if started.elapsed() > plan.accept_timeout =>
                {
                    break format!("no migration stream within {:?}", plan.accept_timeout)
                }
                _ => {}
            }
        };
        if running {
            // Postcopy failed after the guest ran here: neither side has
            // the whole guest any more. Leave the paused QEMU for the
            // operator (postcopy recovery), never delete it.
            warn!(vm = %vm.name, "postcopy failed: {failure}; the VM stays here, paused");
            return;
        }
        // Only this migration's VM: once it is gone (removed by the CLI),
        // a new VM of the same name may already be another migration's.
        let ours = self
            .get(&vm.name)
            .await
            .is_ok_and(|current| Arc::ptr_eq(&current, &vm));
        if !ours {
            info!(vm = %vm.name, "incoming migration ended ({failure}); its VM is already gone");
            return;
        }
        self.incoming_go.lock().remove(&vm.name);
        warn!(vm = %vm.name, "incoming migration ended without the guest: {failure}; removing the VM");
        if let Err(e) = self.destroy(&vm.name).await {
            warn!(vm = %vm.name, "removing the VM: {e}");
        }
    }

    async fn run_incoming(
        &self,
        vm: &Vm,
        qmp: &QmpClient,
        plan: &IncomingPlan,
    ) -> Result<(), String> {
        let _op = vm.ops.lock().await;
        if !plan.copied_disks.is_empty() {
            // The copies are complete (the source's writes were in step
            // when the stream completed); nobody writes them but the guest
            // from now on.
            qmp.execute_raw("nbd-server-stop", json!({}), QMP_CALL)
                .await
                .map_err(|e| format!("nbd-server-stop: {e}"))?;
        }
        qmp.execute(qmp::cont {})
            .await
            .map_err(|e| format!("cont: {e}"))?;
        vm.update(|r| {
            r.state = VmState::Running;
            r.incoming = false;
        })
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The start of an incoming QEMU, after its QMP answers: the
    /// capabilities the stream needs, then `migrate-incoming`; answers with
    /// the URI QEMU listens on (the real port when 0 was asked for).
    pub(super) async fn finish_incoming_start(
        &self,
        vm: &Vm,
        plan: &IncomingPlan,
    ) -> Result<(QmpClient, Option<String>), StartFailure> {
        let qmp = self.connect_started(vm).await?;
        let mut caps = vec![("events", true)];
        if plan.allow_postcopy {
            caps.push(("postcopy-ram", true));
        }
        if plan.multifd_channels.is_some() {
            caps.push(("multifd", true));
        }
        let fail =
            |what: &str, e: tandem_qmp::QmpError| StartFailure::Incoming(format!("{what}: {e}"));
        qmp.execute_raw("migrate-set-capabilities", capabilities(&caps), QMP_CALL)
            .await
            .map_err(|e| fail("migrate-set-capabilities", e))?;
        if let Some(dir) = &plan.tls_dir {
            qmp.execute_raw("object-add", tls_object(dir, "server"), QMP_CALL)
                .await
                .map_err(|e| fail("adding the TLS credentials", e))?;
            let mut params = json!({ "tls-creds": TLS_OBJECT });
            if let Some(n) = plan.multifd_channels {
                params["multifd-channels"] = json!(n);
            }
            if let Some(source) = &plan.source_tls_name {
                tandem_pki::validate_name(source).map_err(|e| {
                    StartFailure::Incoming(format!("the source's name `{source}`: {e}"))
                })?;
                qmp.execute_raw(
                    "object-add",
                    super::migrate_storage::authz_object(source),
                    QMP_CALL,
                )
                .await
                .map_err(|e| fail("adding the source's authorization", e))?;
                params["tls-authz"] = json!(super::migrate_storage::AUTHZ_OBJECT);
            }
            qmp.execute_raw("migrate-set-parameters", params, QMP_CALL)
                .await
                .map_err(|e| fail("migrate-set-parameters tls-creds", e))?;
        } else if let Some(n) = plan.multifd_channels {
            qmp.execute_raw(
                "migrate-set-parameters",
                json!({ "multifd-channels": n }),
                QMP_CALL,
            )
            .await
            .map_err(|e| fail("migrate-set-parameters multifd-channels", e))?;
        }
        qmp.execute_raw(
            "migrate-incoming",
            json!({ "uri": format!("tcp:{}", plan.listen) }),
            QMP_CALL,
        )
        .await
        .map_err(|e| fail("migrate-incoming", e))?;
        let v = qmp
            .execute_raw("query-migrate", json!({}), QMP_CALL)
            .await
            .map_err(|e| fail("query-migrate", e))?;
        let addr = v
            .get("socket-address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or(Value::Null);
        let (Some(host), Some(port)) = (
            addr.get("host").and_then(Value::as_str),
            addr.get("port").and_then(Value::as_str),
        ) else {
            return Err(StartFailure::Incoming(format!(
                "QEMU does not say where it listens: {v}"
            )));
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        vm.update(|r| r.state = VmState::Paused)
            .map_err(StartFailure::Persist)?;
        Ok((qmp, Some(format!("tcp:{host}:{port}"))))
    }

    /// Starts migrating a running VM to `uri` (where a destination's
    /// [`Supervisor::prepare_incoming`] listens) and drives it to its end in
    /// the background; [`Supervisor::migration`] reads where it is.
    pub async fn migrate_out(
        self: &Arc<Self>,
        name: &str,
        uri: &str,
        tls_hostname: Option<&str>,
        cfg: LadderConfig,
        copy_storage: Option<&StorageCopyTarget>,
    ) -> Result<MigrationReport, SupervisorError> {
        cfg.validate()
            .map_err(|e| SupervisorError::Refused(e.to_string()))?;
        if !uri.starts_with("tcp:") || uri.len() > 512 || uri.contains(char::is_control) {
            return Err(SupervisorError::Refused(format!(
                "`{uri}` is not a migration URI of the form tcp:HOST:PORT"
            )));
        }
        let vm = self.get(name).await?;
        if let Some(job) = self.migrations.lock().get(name) {
            if !job.report.lock().phase.is_final() {
                return Err(SupervisorError::Refused(format!(
                    "`{name}` is already migrating"
                )));
            }
        }
        // The VM's lifecycle lock is not held for the migration's length:
        // a stop or destroy meanwhile ends QEMU, and the driver reports
        // the migration failed (the destination then removes its VM).
        let live = match (vm.state(), vm.live()) {
            (VmState::Running, Some(live)) => live,
            _ => return Err(vm.bad_state("migrate")),
        };
        // A disk in tandemd's own directory for this VM (a copy made by an
        // earlier migration, a restored copy) or under a taken-over
        // replica is this host's alone: it must be copied, or removing the
        // source after the migration would delete it under the
        // destination.
        let rec = vm.record();
        let copied = |d: &str| copy_storage.is_some_and(|c| c.disks.iter().any(|x| x == d));
        if let Some(c) = copy_storage {
            if let Some(d) = c
                .disks
                .iter()
                .find(|d| !rec.spec.disks.iter().any(|s| &s.name == *d))
            {
                return Err(SupervisorError::Refused(format!(
                    "the destination offers a copy of disk `{d}`, which `{name}` does not have"
                )));
            }
            if cfg.allow_postcopy && !c.disks.is_empty() {
                return Err(SupervisorError::Refused(
                    "postcopy cannot be allowed while disks are copied: a copy must be complete before the guest runs on the destination".into(),
                ));
            }
        }
        for d in &rec.spec.disks {
            if copied(&d.name) {
                continue;
            }
            if let Some(base) = &rec.base {
                return Err(SupervisorError::Refused(format!(
                    "`{name}` runs from {} (a taken-over replica) on this host: disk `{}` is this host's alone and must be copied (the destination did not offer a copy)",
                    base.dir.display(),
                    d.name
                )));
            }
            if d.path.starts_with(&vm.dir) {
                return Err(SupervisorError::Refused(format!(
                    "disk `{}` of `{name}` is {}, inside this host's own directory for the VM: it must be copied (the destination did not offer a copy)",
                    d.name,
                    d.path.display()
                )));
            }
        }
        super::migrate_storage::remove_probes(&vm);
        let (caps, mut params) = setup(&cfg);
        let mut tls_peer = None;
        if let Some((dir, _)) = self.migration_tls(&vm)? {
            let Some(peer) = tls_hostname.filter(|h| !h.is_empty() && h.len() <= 253) else {
                return Err(SupervisorError::Refused(
                    "this host has a cluster identity, so its migrations run over TLS: the destination must name its certificate (tls_hostname); a destination without an identity cannot take the VM".into(),
                ));
            };
            // A credentials object of an earlier attempt is replaced.
            let _ = live
                .qmp
                .execute_raw("object-del", json!({ "id": TLS_OBJECT }), QMP_CALL)
                .await;
            live.qmp
                .execute_raw("object-add", tls_object(&dir, "client"), QMP_CALL)
                .await
                .map_err(vm.qmp_err())?;
            params["tls-creds"] = json!(TLS_OBJECT);
            params["tls-hostname"] = json!(peer);
            tls_peer = Some(peer.to_string());
        } else {
            // A plain stream: clear what an earlier TLS attempt set.
            params["tls-creds"] = json!("");
        }
        let qmp_err = vm.qmp_err();
        live.qmp
            .execute_raw("migrate-set-capabilities", capabilities(&caps), QMP_CALL)
            .await
            .map_err(qmp_err)?;
        live.qmp
            .execute_raw("migrate-set-parameters", params, QMP_CALL)
            .await
            .map_err(vm.qmp_err())?;
        let mirror = match copy_storage.filter(|c| !c.disks.is_empty()) {
            Some(target) => Some(
                StorageMirror::start(
                    &live.qmp,
                    target,
                    tls_peer.as_deref().map(|p| (TLS_OBJECT, p)),
                    cfg.bandwidth_bps,
                )
                .await
                .map_err(SupervisorError::Refused)?,
            ),
            None => {
                live.qmp
                    .execute_raw("migrate", json!({ "uri": uri }), QMP_CALL)
                    .await
                    .map_err(vm.qmp_err())?;
                None
            }
        };
        info!(vm = %name, %uri, copying = mirror.is_some(), "migration started");
        self.switchover(name, super::Switchover::Hold);
        let report = MigrationReport::starting(
            name,
            MigrationPhase::Running,
            if mirror.is_some() {
                "storage"
            } else {
                "precopy"
            },
        );
        let job = Arc::new(OutgoingJob {
            report: Mutex::new(report.clone()),
            cancel: tokio::sync::Notify::new(),
            cancel_asked: std::sync::atomic::AtomicBool::new(false),
        });
        self.migrations.lock().insert(name.to_string(), job.clone());
        let sup = self.clone();
        let uri = uri.to_string();
        tokio::spawn(async move {
            sup.drive_outgoing(vm, live.qmp, job, cfg, mirror, Some(uri))
                .await;
        });
        Ok(report)
    }

    async fn drive_outgoing(
        &self,
        vm: Arc<Vm>,
        qmp: QmpClient,
        job: Arc<OutgoingJob>,
        cfg: LadderConfig,
        mut mirror: Option<StorageMirror>,
        pending_uri: Option<String>,
    ) {
        let t0 = Instant::now();
        let set_final = |phase: MigrationPhase, message: Option<String>| {
            let mut r = job.report.lock();
            r.phase = phase;
            r.message = message;
            r.elapsed_ms = t0.elapsed().as_millis() as u64;
        };
        // The storage phase, then `migrate` (an adopted migration has
        // passed both: `pending_uri` is None).
        if let Some(uri) = pending_uri.as_deref() {
            if let Some(m) = mirror.take() {
                match self
                    .copy_storage(&vm, &qmp, &job, m, uri, cfg.link_silence_ms)
                    .await
                {
                    Ok(m) => mirror = Some(m),
                    Err((phase, message)) => {
                        set_final(phase, message);
                        return;
                    }
                }
            }
        }
        let storage_ms = t0.elapsed().as_millis() as u64;
        let started = Instant::now();
        let mut ladder = Ladder::new(cfg, 0);
        let mut abort_reason: Option<String> = None;
        let mut cancel_sent = false;
        // QEMU's MIGRATION events wake the driver at once: at completion
        // the guest is paused here until the CLI sees `awaiting-confirm`,
        // so every poll interval of delay is downtime for its clients.
        let mut events = Some(qmp.events());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = job.cancel.notified() => {}
                _ = next_migration_event(&mut events) => {}
            }
            let wants_cancel = abort_reason.is_some()
                || job.cancel_asked.load(std::sync::atomic::Ordering::SeqCst);
            if wants_cancel && !cancel_sent {
                cancel_sent = true;
                if let Err(e) = qmp.execute_raw("migrate_cancel", json!({}), QMP_CALL).await {
                    warn!(vm = %vm.name, "migrate_cancel: {e}");
                }
            }
            let sample = match query(&qmp, started).await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(m) = mirror.take() {
                        m.abandon(&qmp).await;
                    }
                    set_final(MigrationPhase::Failed, Some(e));
                    return;
                }
            };
            if let (Some(m), None) = (&mirror, &abort_reason) {
                if !sample.status.is_some_and(|s| s == Status::Completed) {
                    if let Err(e) = m.progress(&qmp).await {
                        warn!(vm = %vm.name, "{e}");
                        abort_reason = Some(e);
                        job.cancel.notify_one();
                    }
                }
            }
            {
                let mut r = job.report.lock();
                r.elapsed_ms = storage_ms + sample.at_ms;
                r.transferred = sample.transferred;
                r.multifd_bytes = sample.multifd_bytes;
                r.remaining = sample.remaining;
                r.total = sample.total;
                r.dirty_rate_bps = sample.dirty_rate_bps();
                r.bandwidth_bps = sample.bandwidth_bps();
                r.iteration = sample.iteration;
                r.expected_downtime_ms = sample.expected_downtime_ms;
                r.cpu_throttle_pct = sample.cpu_throttle_pct;
                r.downtime_ms = sample.downtime_ms;
            }
            let decision = ladder.observe(&sample);
            job.report.lock().rung = ladder.rung().to_string();
            match decision {
                Decision::Continue => {}
                Decision::Act(Action::Abort { reason }) => {
                    warn!(vm = %vm.name, "{reason}");
                    abort_reason = Some(reason);
                    job.cancel.notify_one();
                }
                Decision::Act(action) => {
                    info!(vm = %vm.name, ?action, "convergence ladder: next rung");
                    if let Some((cmd, args)) = action.qmp() {
                        if let Err(e) = qmp.execute_raw(cmd, args, QMP_CALL).await {
                            warn!(vm = %vm.name, "{cmd}: {e}");
                        }
                    }
                }
                Decision::Finished(Outcome::Completed {
                    rung,
                    downtime_ms,
                    total_ms,
                }) => {
                    if let Some(m) = mirror.take() {
                        if let Err(e) = m.complete(&qmp).await {
                            // The destination waits for our word before it
                            // runs the guest, and does not get it.
                            self.keep_source_running(&vm, &qmp).await;
                            set_final(MigrationPhase::Failed, Some(e));
                            return;
                        }
                    }
                    info!(vm = %vm.name, %rung, ?downtime_ms, ?total_ms, "migration completed; the source waits to be confirmed");
                    vm.update_logged(|r| r.state = VmState::Paused);
                    set_final(MigrationPhase::AwaitingConfirm, None);
                    return;
                }
                Decision::Finished(Outcome::Failed { reason }) => {
                    if let Some(m) = mirror.take() {
                        m.abandon(&qmp).await;
                    }
                    self.keep_source_running(&vm, &qmp).await;
                    set_final(MigrationPhase::Failed, Some(reason));
                    return;
                }
                Decision::Finished(Outcome::Cancelled) => {
                    if let Some(m) = mirror.take() {
                        m.abandon(&qmp).await;
                    }
                    self.keep_source_running(&vm, &qmp).await;
                    match abort_reason.take() {
                        Some(reason) => set_final(MigrationPhase::Aborted, Some(reason)),
                        None => set_final(MigrationPhase::Cancelled, None),
                    }
                    return;
                }
            }
        }
    }

    /// The storage phase: the mirrors catch up (progress in the report),
    /// then the memory stream starts. On failure or cancel the mirrors are
    /// gone and the error is the job's end.
    async fn copy_storage(
        &self,
        vm: &Vm,
        qmp: &QmpClient,
        job: &OutgoingJob,
        mirror: StorageMirror,
        uri: &str,
        silence_ms: u64,
    ) -> Result<StorageMirror, (MigrationPhase, Option<String>)> {
        let t0 = Instant::now();
        // The copy has the memory stream's dead-link bound: an NBD write
        // into a cut link would otherwise wait for TCP's minutes.
        let mut moved = (0u64, Instant::now());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = job.cancel.notified() => {}
            }
            if job.cancel_asked.load(std::sync::atomic::Ordering::SeqCst) {
                mirror.abandon(qmp).await;
                return Err((MigrationPhase::Cancelled, None));
            }
            match mirror.progress(qmp).await {
                Ok(p) => {
                    {
                        let mut r = job.report.lock();
                        r.elapsed_ms = t0.elapsed().as_millis() as u64;
                        r.transferred = p.done;
                        r.total = p.total;
                        r.remaining = p.total.saturating_sub(p.done);
                    }
                    if p.synced {
                        break;
                    }
                    if p.done > moved.0 || p.done >= p.total {
                        // (A whole copy waiting to be in step is not silence.)
                        moved = (p.done, Instant::now());
                    } else if moved.1.elapsed() >= Duration::from_millis(silence_ms) {
                        let e = format!(
                            "the disks' copy moved nothing for {} ms (the link is down, or the destination stopped writing) with {} MiB to go",
                            moved.1.elapsed().as_millis(),
                            p.total.saturating_sub(p.done) >> 20
                        );
                        mirror.abandon(qmp).await;
                        return Err((MigrationPhase::Aborted, Some(e)));
                    }
                }
                Err(e) => {
                    mirror.abandon(qmp).await;
                    return Err((MigrationPhase::Failed, Some(e)));
                }
            }
        }
        info!(vm = %vm.name, ms = t0.elapsed().as_millis() as u64, "disk copies in step; the memory stream starts");
        if let Err(e) = qmp
            .execute_raw("migrate", json!({ "uri": uri }), QMP_CALL)
            .await
        {
            mirror.abandon(qmp).await;
            return Err((MigrationPhase::Failed, Some(format!("migrate: {e}"))));
        }
        let mut r = job.report.lock();
        r.storage_bytes = r.transferred;
        r.storage_ms = Some(t0.elapsed().as_millis() as u64);
        r.rung = "precopy".into();
        r.transferred = 0;
        r.remaining = 0;
        r.total = 0;
        drop(r);
        Ok(mirror)
    }

    /// A tandemd that starts and finds a VM's QEMU migrating out (its
    /// predecessor ended mid-migration) takes the job up again: a stream
    /// still running is followed to its end (the ladder's settings were
    /// lost: it waits its longest window before a rung; a dead link still
    /// aborts), a completed one waits to be confirmed, and disk copies
    /// whose memory stream never started are abandoned (the destination's
    /// address went with the old tandemd). `GET …/migration` and the CLI
    /// see the job as before.
    pub(super) async fn adopt_outgoing(self: Arc<Self>, vm: Arc<Vm>) {
        let Some(live) = vm.live() else {
            return;
        };
        let started = Instant::now();
        let Ok(sample) = query(&live.qmp, started).await else {
            return;
        };
        let mirror = match StorageMirror::adopt(&live.qmp).await {
            Ok(m) => m,
            Err(e) => {
                warn!(vm = %vm.name, "reading block jobs: {e}");
                None
            }
        };
        let phase = match sample.status {
            Some(Status::Setup | Status::Active | Status::Postcopy | Status::Cancelling) => {
                MigrationPhase::Running
            }
            Some(Status::Completed) => {
                // Only a source still waiting for its word: QEMU keeps
                // saying `completed` after a resumed source runs on.
                let waiting = super::query_status(&live.qmp)
                    .await
                    .is_ok_and(|s| s == "postmigrate");
                if !waiting {
                    return;
                }
                MigrationPhase::AwaitingConfirm
            }
            _ => {
                if let Some(m) = mirror {
                    warn!(vm = %vm.name, "a disk copy of a migration the previous tandemd did not finish: abandoned (start the migration again)");
                    m.abandon(&live.qmp).await;
                }
                return;
            }
        };
        let report = MigrationReport {
            transferred: sample.transferred,
            remaining: sample.remaining,
            total: sample.total,
            dirty_rate_bps: sample.dirty_rate_bps(),
            bandwidth_bps: sample.bandwidth_bps(),
            iteration: sample.iteration,
            expected_downtime_ms: sample.expected_downtime_ms,
            cpu_throttle_pct: sample.cpu_throttle_pct,
            downtime_ms: sample.downtime_ms,
            message: Some(
                "taken up again by a restarted tandemd (the ladder's settings were lost)".into(),
            ),
            multifd_bytes: sample.multifd_bytes,
            ..MigrationReport::starting(&vm.name, phase, "adopted")
        };
        let job = Arc::new(OutgoingJob {
            report: Mutex::new(report),
            cancel: tokio::sync::Notify::new(),
            cancel_asked: std::sync::atomic::AtomicBool::new(false),
        });
        self.migrations.lock().insert(vm.name.clone(), job.clone());
        info!(vm = %vm.name, ?phase, "took up a migration the previous tandemd did not finish");
        if phase == MigrationPhase::AwaitingConfirm {
            if let Some(m) = mirror {
                if let Err(e) = m.complete(&live.qmp).await {
                    warn!(vm = %vm.name, "ending the disk copies: {e}");
                }
            }
            vm.update_logged(|r| r.state = VmState::Paused);
            return;
        }
        let cfg = LadderConfig {
            // Follow, do not climb: no window short of the longest.
            stall_ms: 600_000,
            max_downtime_ms: LadderConfig::default().downtime_ms,
            allow_throttle: false,
            ..LadderConfig::default()
        };
        self.drive_outgoing(vm, live.qmp.clone(), job, cfg, mirror, None)
            .await;
    }

    /// After a failed or cancelled precopy QEMU runs the source on; make
    /// sure, since the guest must never stay stopped by a migration.
    fn switchover(&self, vm: &str, step: super::Switchover) {
        if let Some(p) = &self.cfg.nic_ports {
            p.switchover(vm, step);
        }
    }

    async fn keep_source_running(&self, vm: &Vm, qmp: &QmpClient) {
        self.switchover(&vm.name, super::Switchover::Stay);
        let running = qmp
            .execute(qmp::query_status {})
            .await
            .map(|s| s.running)
            .unwrap_or(false);
        if !running {
            if let Err(e) = qmp.execute(qmp::cont {}).await {
                warn!(vm = %vm.name, "resuming the source after the migration: {e}");
            }
        }
        vm.update_logged(|r| r.state = VmState::Running);
    }

    /// QEMU's credentials for a migration of `vm`, from this host's
    /// cluster identity (written into the VM's directory), and the
    /// identity's name; `None` on a host without an identity.
    fn migration_tls(
        &self,
        vm: &Vm,
    ) -> Result<Option<(std::path::PathBuf, String)>, SupervisorError> {
        let Some(dir) = &self.cfg.identity_dir else {
            return Ok(None);
        };
        if !dir.join(tandem_pki::IDENTITY_FILE).exists() {
            return Ok(None);
        }
        let refuse = |e: tandem_pki::PkiError| {
            SupervisorError::Refused(format!(
                "this host's cluster identity in {} cannot secure the migration: {e}",
                dir.display()
            ))
        };
        let id = tandem_pki::Identity::load(dir).map_err(refuse)?;
        let out = vm.dir.join(TLS_DIR);
        id.qemu_tls_dir(&out).map_err(refuse)?;
        Ok(Some((out, id.name().to_string())))
    }

    /// The destination's go for an incoming VM whose disks were copied:
    /// the source has ended its mirrors, so the copies are whole and the
    /// guest may run here. Refused for a VM that does not wait for it.
    pub async fn release_incoming(&self, name: &str) -> Result<(), SupervisorError> {
        self.get(name).await?;
        let go = self.incoming_go.lock().get(name).cloned().ok_or_else(|| {
            SupervisorError::Refused(format!(
                "`{name}` is not an incoming migration waiting for its disks"
            ))
        })?;
        // A permit is kept if the stream has not completed yet.
        go.notify_one();
        Ok(())
    }

    /// Where the VM's last outgoing migration is.
    pub async fn migration(&self, name: &str) -> Result<MigrationReport, SupervisorError> {
        self.get(name).await?;
        self.migrations
            .lock()
            .get(name)
            .map(|j| j.report.lock().clone())
            .ok_or_else(|| SupervisorError::Refused(format!("`{name}` has not migrated")))
    }

    /// The VM's migration job, if it is in phase `want` (else refused,
    /// saying `otherwise`).
    fn job_in_phase(
        &self,
        name: &str,
        want: MigrationPhase,
        otherwise: &str,
    ) -> Result<Arc<OutgoingJob>, SupervisorError> {
        let job = self
            .migrations
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| SupervisorError::Refused(format!("`{name}` is not migrating")))?;
        let phase = job.report.lock().phase;
        if phase != want {
            let phase = serde_json::to_value(phase).unwrap_or(Value::Null);
            return Err(SupervisorError::Refused(format!(
                "the migration of `{name}` is {}: {otherwise}",
                phase.as_str().unwrap_or("in another phase")
            )));
        }
        Ok(job)
    }

    /// Asks a running migration to stop; the source keeps running.
    pub async fn cancel_migration(&self, name: &str) -> Result<MigrationReport, SupervisorError> {
        let job = self.job_in_phase(
            name,
            MigrationPhase::Running,
            "too late to cancel (confirm or resume it instead)",
        )?;
        job.cancel_asked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        job.cancel.notify_one();
        let report = job.report.lock().clone();
        Ok(report)
    }

    /// Ends a completed migration: the destination runs the guest (the
    /// source's VM is removed), or it does not (the source resumes).
    pub async fn confirm_migration(
        &self,
        name: &str,
        destination_running: bool,
    ) -> Result<MigrationReport, SupervisorError> {
        let job = self.job_in_phase(
            name,
            MigrationPhase::AwaitingConfirm,
            "not waiting to be confirmed",
        )?;
        if destination_running {
            self.switchover(name, super::Switchover::Moved);
            self.destroy(name).await?;
            job.report.lock().phase = MigrationPhase::Done;
            info!(vm = %name, "migrated away; the source's copy is gone");
        } else {
            let vm = self.get(name).await?;
            let _op = vm.ops.lock().await;
            let live = vm.live().ok_or_else(|| vm.bad_state("resume"))?;
            self.switchover(name, super::Switchover::Stay);
            live.qmp.execute(qmp::cont {}).await.map_err(vm.qmp_err())?;
            vm.update(|r| r.state = VmState::Running)?;
            job.report.lock().phase = MigrationPhase::Resumed;
            info!(vm = %name, "the destination did not take the VM; the source runs on");
        }
        let report = job.report.lock().clone();
        Ok(report)
    }
}

/// The ladder an API request asks for: QEMU's and the ladder's defaults
/// for what it leaves out.
pub fn ladder_config(req: &tandem_api::MigrateRequest) -> LadderConfig {
    let d = LadderConfig::default();
    let downtime_ms = req.downtime_ms.unwrap_or(d.downtime_ms);
    let stall_ms = req.stall_s.map_or(d.stall_ms, |s| s.saturating_mul(1000));
    LadderConfig {
        downtime_ms,
        max_downtime_ms: req
            .max_downtime_ms
            .unwrap_or_else(|| d.max_downtime_ms.max(downtime_ms)),
        allow_throttle: req.allow_throttle.unwrap_or(d.allow_throttle),
        allow_postcopy: req.allow_postcopy,
        multifd_channels: req.multifd_channels,
        bandwidth_bps: req.bandwidth_bps,
        stall_ms,
        // A dead link is told from a slow one by three windows of silence.
        link_silence_ms: req.link_timeout_s.map_or_else(
            || stall_ms.saturating_mul(3).clamp(3_000, 3_600_000),
            |s| s.saturating_mul(1000),
        ),
        ..d
    }
}
