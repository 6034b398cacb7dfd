//! Fault tolerance in tandemd: the primary role (one replication engine per
//! protected VM), the backup role (a listener for primaries and the
//! replicas), and their API routes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use tandem_api::{FailoverReport, FtStatus, OutputRules, ProtectRequest, RulesChange};
use tandem_replication::backup::{read_hello, read_identity, Activate, Backup, BackupConfig};
use tandem_replication::link::{Endpoint, Listener};
use tandem_replication::primary::{Primary, PrimaryConfig};
use tandem_replication::tracker::TrackerChoice;
use tandem_supervisor::{
    CheckpointDisk, CheckpointManifest, Supervisor, SupervisorError, CHECKPOINT_MANIFEST,
};
use tandem_vmspec::DiskFormat;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::error::HttpError;

#[derive(Debug, Clone)]
pub struct FtSettings {
    pub listen: Option<Endpoint>,
    pub replica_root: PathBuf,
    pub heartbeat: Duration,
    pub fence_timeout: Duration,
    pub takeover_timeout: Duration,
    pub auto_failover: bool,
    /// Default dirty-page tracker for protections that do not name one.
    pub tracker: tandem_replication::tracker::TrackerChoice,
    /// Cap on a protected disk's write log between two epochs, in bytes.
    pub disk_log_cap: u64,
}

struct Protected {
    primary: Primary,
    port: tandem_supervisor::GuestPort,
    disks: Vec<Arc<crate::ftdisk::MirroredDisk>>,
    /// Output commit on the VM's switch ports, when it has any here.
    output: Option<Arc<crate::output::VmOutput>>,
}

pub struct Ft {
    sup: Arc<Supervisor>,
    switch: Option<Arc<tandem_switch::host::SwitchHost>>,
    settings: FtSettings,
    primaries: Mutex<BTreeMap<String, Protected>>,
    backup: Arc<Backup>,
}

/// At most this many replication connections at once (see the listener).
const MAX_REPLICATION_CONNECTIONS: usize = 64;

struct SupervisorActivate {
    sup: Arc<Supervisor>,
    /// tandemd's per-VM FT state (`STATE/ft/<vm>/`).
    ft_root: PathBuf,
}

/// This host's generation for `vm`: written when it takes the VM over (one
/// more than the replica's), 0 for a VM that was created here.
fn generation_file(ft_root: &std::path::Path, vm: &str) -> PathBuf {
    ft_root.join(vm).join("generation")
}

fn read_generation(ft_root: &std::path::Path, vm: &str) -> u64 {
    std::fs::read_to_string(generation_file(ft_root, vm))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_generation(ft_root: &std::path::Path, vm: &str, generation: u64) -> std::io::Result<()> {
    tandem_supervisor::util::atomic_write(
        &generation_file(ft_root, vm),
        generation.to_string().as_bytes(),
    )
}

impl Activate for SupervisorActivate {
    fn activate(
        &self,
        vm: String,
        dir: PathBuf,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), tandem_replication::backup::ActivateError>>
                + Send,
        >,
    > {
        let sup = self.sup.clone();
        let ft_root = self.ft_root.clone();
        Box::pin(async move {
            activate(&sup, &vm, &dir, &ft_root)
                .await
                .map_err(Into::into)
        })
    }
}

/// Why the backup could not start a VM from its replica.
#[derive(Debug, thiserror::Error)]
enum ActivateError {
    #[error("reading the replica's hello: {0}")]
    Hello(#[source] std::io::Error),
    #[error("replica spec: {0}")]
    Spec(#[source] toml::de::Error),
    #[error("{0}")]
    Manifest(#[from] serde_json::Error),
    #[error("{0}")]
    WriteManifest(#[source] std::io::Error),
    #[error("recording this host's generation for the VM: {0}")]
    Generation(#[source] std::io::Error),
    #[error("{0}")]
    SpecToml(#[from] toml::ser::Error),
    #[error("`{vm}` is already {state} on this host")]
    Active {
        vm: String,
        state: tandem_api::VmState,
    },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// Defines the VM here (if needed) with its disks pointing at the replica,
/// and starts it from the replica's committed checkpoint.
async fn activate(
    sup: &Arc<Supervisor>,
    vm: &str,
    dir: &std::path::Path,
    ft_root: &std::path::Path,
) -> Result<(), ActivateError> {
    let hello = read_hello(dir).map_err(ActivateError::Hello)?;
    // The VM runs here from now on, one generation after the primary it
    // replaces: a protection from this host carries it, and a backup
    // refuses the old primary's.
    let generation = read_identity(dir)
        .map_err(ActivateError::Hello)?
        .map_or(hello.generation, |id| id.generation)
        + 1;
    write_generation(ft_root, vm, generation).map_err(ActivateError::Generation)?;
    let mut spec: tandem_vmspec::VmSpec =
        toml::from_str(&hello.spec_toml).map_err(ActivateError::Spec)?;
    let mut disks = Vec::new();
    for d in spec.disks.iter_mut() {
        let file = tandem_replication::replica::disk_file_name(&d.name);
        d.path = dir.join(&file);
        d.format = DiskFormat::Raw;
        disks.push(CheckpointDisk {
            name: d.name.clone(),
            file,
            format: DiskFormat::Raw,
        });
    }
    let manifest = CheckpointManifest {
        vm: vm.to_string(),
        taken_at: 0,
        ram_bytes: hello.ram_size,
        device_state_bytes: 0,
        disks,
    };
    let bytes = serde_json::to_vec_pretty(&manifest)?;
    std::fs::write(dir.join(CHECKPOINT_MANIFEST), bytes).map_err(ActivateError::WriteManifest)?;
    match sup.info(vm).await {
        Ok(info) if info.state.is_active() => {
            return Err(ActivateError::Active {
                vm: vm.to_string(),
                state: info.state,
            })
        }
        Ok(_) => {}
        Err(SupervisorError::NotFound(_)) => {
            // The VM keeps its identity across the handover.
            let toml = toml::to_string(&spec)?;
            match hello.uuid.parse::<uuid::Uuid>() {
                Ok(uuid) => sup.create_with_uuid(&toml, uuid).await?,
                Err(_) => sup.create(&toml).await?,
            };
        }
        Err(e) => return Err(e.into()),
    }
    sup.restore_from(vm, dir).await?;
    Ok(())
}

impl Ft {
    pub async fn start(
        sup: Arc<Supervisor>,
        settings: FtSettings,
        switch: Option<Arc<tandem_switch::host::SwitchHost>>,
    ) -> anyhow::Result<Arc<Ft>> {
        let mut bcfg = BackupConfig::new(settings.replica_root.clone());
        bcfg.heartbeat = settings.heartbeat;
        bcfg.takeover_timeout = settings.takeover_timeout;
        bcfg.suspect_after = settings.fence_timeout;
        bcfg.auto_failover = settings.auto_failover;
        let backup = Backup::new(
            bcfg,
            Arc::new(SupervisorActivate {
                sup: sup.clone(),
                ft_root: settings.replica_root.with_file_name("ft"),
            }),
        );
        if let Some(ep) = &settings.listen {
            let listener = Listener::bind(ep).await?;
            info!(endpoint = %ep, "accepting replication streams");
            let b = backup.clone();
            // Each connection may hold a frame buffer of up to 8 MiB: bound
            // how many there are (far more than protected VMs on a host).
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REPLICATION_CONNECTIONS));
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((conn, peer)) => {
                            let Ok(slot) = slots.clone().try_acquire_owned() else {
                                warn!(%peer, "refusing a replication connection: {MAX_REPLICATION_CONNECTIONS} are open");
                                continue;
                            };
                            let b = b.clone();
                            tokio::spawn(async move {
                                b.serve(conn, peer).await;
                                drop(slot);
                            });
                        }
                        Err(e) => {
                            warn!("accepting a replication connection: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        Ok(Arc::new(Ft {
            sup,
            switch,
            settings,
            primaries: Mutex::new(BTreeMap::new()),
            backup,
        }))
    }

    async fn protect(&self, vm: &str, req: ProtectRequest) -> Result<FtStatus, HttpError> {
        let backup: Endpoint = req.backup.parse()?;
        let epoch_ms = req.epoch_ms.unwrap_or(50);
        if !(10..=1000).contains(&epoch_ms) {
            return Err(HttpError::invalid(format!(
                "epoch_ms {epoch_ms} is outside 10..=1000"
            )));
        }
        let plan = crate::output::OutputPlan::from_request(&req).map_err(HttpError::invalid)?;
        let mut primaries = self.primaries.lock().await;
        if let Some(p) = primaries.get(vm) {
            if !p.primary.is_finished() {
                return Err(HttpError::conflict(format!("`{vm}` is already protected")));
            }
        }
        if let Some(old) = primaries.remove(vm) {
            crate::ftdisk::stop(&old.port, &old.disks).await;
            if let Some(o) = old.output {
                o.uninstall();
            }
            if let Some(sw) = &self.switch {
                sw.set_vm_write_log(vm, None);
            }
        }
        let port = self.sup.guest_port(vm).await?;
        let tracker = match &req.tracker {
            Some(t) => t.parse()?,
            None => self.settings.tracker,
        };
        let switch_nics = port
            .spec()
            .nics
            .iter()
            .any(|n| n.backend == tandem_vmspec::NicBackend::Switch);
        let soft_dirty = tandem_replication::tracker::soft_dirty_support();
        if let (TrackerChoice::SoftDirty, Err(why)) = (tracker, &soft_dirty) {
            // Refuse now, with the reason, rather than leave a protection
            // that stops as soon as it starts.
            return Err(HttpError::invalid(format!(
                "soft-dirty tracking is not available on this host: {why}"
            )));
        }
        // The switch writes guest RAM through tandemd's own mapping, which
        // soft-dirty bits cannot see: where soft-dirty may be used, the
        // VM's switch ports record their writes for the tracker. (A scan
        // sees every write; then the ports are spared the bookkeeping.)
        let write_log = (switch_nics
            && self.switch.is_some()
            && tracker != TrackerChoice::Scan
            && soft_dirty.is_ok())
        .then(|| {
            Arc::new(tandem_dirty::PageLog::new(
                port.ram_size() / tandem_dirty::PAGE_SIZE as u64,
            ))
        });
        let external_writers = switch_nics && write_log.is_none();
        let work = self.settings.replica_root.with_file_name("ft").join(vm);
        let mirror = crate::ftdisk::MirrorSettings {
            log_cap: self.settings.disk_log_cap,
        };
        let disks = crate::ftdisk::start_with(&port, &work, mirror).await?;
        let mut cfg = PrimaryConfig::new(backup);
        cfg.generation = read_generation(&self.settings.replica_root.with_file_name("ft"), vm);
        cfg.epoch = Duration::from_millis(epoch_ms);
        cfg.heartbeat = self.settings.heartbeat;
        cfg.fence_timeout = self.settings.fence_timeout;
        cfg.tracker = tracker;
        cfg.external_writers = external_writers;
        if let (Some(log), Some(sw)) = (&write_log, &self.switch) {
            sw.set_vm_write_log(vm, Some(log.clone()));
        }
        cfg.external_log = write_log;
        let output = self
            .switch
            .as_ref()
            .and_then(|sw| crate::output::VmOutput::install(vm, sw, plan));
        cfg.observer = output
            .clone()
            .map(|o| o as Arc<dyn tandem_replication::EpochObserver>);
        let sources: Vec<Arc<dyn tandem_replication::DiskSource>> = disks
            .iter()
            .map(|d| d.clone() as Arc<dyn tandem_replication::DiskSource>)
            .collect();
        let p = Primary::spawn(port.clone(), cfg, sources);
        let st = p.status();
        primaries.insert(
            vm.to_string(),
            Protected {
                primary: p,
                port,
                disks,
                output,
            },
        );
        Ok(st)
    }

    async fn unprotect(&self, vm: &str) -> Result<FtStatus, HttpError> {
        let p = self.primaries.lock().await.remove(vm).ok_or_else(|| {
            HttpError::not_found(format!("`{vm}` is not protected from this host"))
        })?;
        let mut st = p.primary.status();
        p.primary.stop().await;
        crate::ftdisk::stop(&p.port, &p.disks).await;
        if let Some(o) = &p.output {
            o.uninstall();
        }
        if let Some(sw) = &self.switch {
            sw.set_vm_write_log(vm, None);
        }
        st.state = tandem_api::FtState::Stopped;
        st.detail = "protection ended".into();
        Ok(st)
    }

    async fn status(&self) -> Vec<FtStatus> {
        let mut out: Vec<FtStatus> = self
            .primaries
            .lock()
            .await
            .values()
            .map(|p| {
                let mut st = p.primary.status();
                st.output = p.output.as_ref().map(|o| o.counters());
                st
            })
            .collect();
        out.extend(self.backup.status());
        out
    }
}

pub fn router(ft: Arc<Ft>) -> Router {
    Router::new()
        .route("/v1/ft", get(list))
        .route("/v1/ft/{name}", get(one))
        .route("/v1/ft/{name}/rules", get(rules).post(change_rules))
        .route("/v1/vms/{name}/protect", post(protect))
        .route("/v1/vms/{name}/unprotect", post(unprotect))
        .route("/v1/vms/{name}/failover", post(failover))
        .with_state(ft)
}

async fn list(State(ft): State<Arc<Ft>>) -> Json<Vec<FtStatus>> {
    Json(ft.status().await)
}

async fn one(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<FtStatus>>, HttpError> {
    let v: Vec<FtStatus> = ft
        .status()
        .await
        .into_iter()
        .filter(|s| s.vm == name)
        .collect();
    if v.is_empty() {
        return Err(HttpError::not_found(format!(
            "`{name}` is not protected on this host"
        )));
    }
    Ok(Json(v))
}

impl Ft {
    async fn output(&self, vm: &str) -> Result<Arc<crate::output::VmOutput>, HttpError> {
        let primaries = self.primaries.lock().await;
        let p = primaries.get(vm).ok_or_else(|| {
            HttpError::not_found(format!("`{vm}` is not protected from this host"))
        })?;
        p.output.clone().ok_or_else(|| {
            HttpError::conflict(format!(
                "`{vm}` has no switch NIC on this host, so its output is not under output commit"
            ))
        })
    }
}

async fn rules(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
) -> Result<Json<OutputRules>, HttpError> {
    Ok(Json(ft.output(&name).await?.rules()))
}

async fn change_rules(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
    Json(change): Json<RulesChange>,
) -> Result<Json<OutputRules>, HttpError> {
    let out = ft.output(&name).await?;
    out.change(change).map(Json).map_err(HttpError::invalid)
}

async fn protect(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
    Json(req): Json<ProtectRequest>,
) -> Result<Json<FtStatus>, HttpError> {
    Ok(Json(ft.protect(&name, req).await?))
}

async fn unprotect(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
) -> Result<Json<FtStatus>, HttpError> {
    Ok(Json(ft.unprotect(&name).await?))
}

/// Manual failover, run on the backup: the VM starts here from its last
/// committed epoch. The operator is responsible for the primary being down
/// (or fenced) — this is the planned or forced path.
async fn failover(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
) -> Result<Json<FailoverReport>, HttpError> {
    ft.backup
        .failover(&name, Duration::ZERO, "manual failover")
        .await
        .map(Json)
        .map_err(HttpError::from)
}
