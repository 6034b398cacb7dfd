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
use tandem_replication::authority::PeerIdentity;
use tandem_replication::backup::{read_hello, read_identity, Activate, Backup, BackupConfig};
use tandem_replication::link::{Endpoint, Listener};
use tandem_replication::primary::{Primary, PrimaryConfig};
use tandem_replication::tracker::TrackerChoice;
use tandem_supervisor::{
    CheckpointDisk, CheckpointManifest, Supervisor, SupervisorError, CHECKPOINT_MANIFEST,
};
use tandem_vmspec::DiskFormat;
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::error::HttpError;

#[derive(Debug, Clone)]
pub struct FtSettings {
    pub listen: Option<Endpoint>,
    pub replica_root: PathBuf,
    pub heartbeat: Duration,
    pub fence_timeout: Duration,
    pub takeover_timeout: Duration,
    /// Primary: how long a reachable backup may go without committing
    /// before protection degrades on purpose (`None`: hold output).
    pub degrade_after: Option<Duration>,
    pub auto_failover: bool,
    /// Default dirty-page tracker for protections that do not name one.
    pub tracker: tandem_replication::tracker::TrackerChoice,
    /// Cap on a protected disk's write log between two epochs, in bytes.
    pub disk_log_cap: u64,
    /// This host's cluster identity: mutual TLS on TCP replication links
    /// and the authority over who may replicate here.
    pub cluster: Option<Arc<crate::cluster::ClusterLink>>,
}

struct Protected {
    primary: Primary,
    port: tandem_supervisor::GuestPort,
    disks: Vec<Arc<crate::ftdisk::MirroredDisk>>,
    /// Output commit on the VM's switch ports, when it has any here.
    output: Option<Arc<crate::output::VmOutput>>,
    /// What the protection was asked for, and under which generation: a
    /// migration's destination protects the VM the same way, one up.
    request: ProtectRequest,
    generation: u64,
    /// The manager's record generation, where a manager records the VM.
    recorded: Option<u64>,
}

pub struct Ft {
    sup: Arc<Supervisor>,
    switch: Option<Arc<tandem_switch::host::SwitchHost>>,
    settings: FtSettings,
    primaries: Mutex<BTreeMap<String, Protected>>,
    /// Gates put on the switch ports of protected VMs migrating in, from
    /// before their first instruction here until their protection here
    /// takes them over.
    incoming: parking_lot::Mutex<BTreeMap<String, Arc<crate::output::VmOutput>>>,
    backup: Arc<Backup>,
    /// VMs this host took over whose authority record still names the old
    /// primary (recording the takeover failed so far): why, by VM.
    stale_records: StaleRecords,
}

type StaleRecords = Arc<parking_lot::Mutex<BTreeMap<String, String>>>;

/// At most this many replication connections at once (see the listener).
const MAX_REPLICATION_CONNECTIONS: usize = 64;

struct SupervisorActivate {
    sup: Arc<Supervisor>,
    /// tandemd's per-VM FT state (`STATE/ft/<vm>/`).
    ft_root: PathBuf,
    /// A managed host records each takeover with the manager.
    cluster: Option<Arc<crate::cluster::ClusterLink>>,
    stale_records: StaleRecords,
    /// A VM taken over here arrives from another host: its switch ports
    /// are pre-associated as migrated, so the switch rebuilds its state.
    switch: Option<Arc<tandem_switch::host::SwitchHost>>,
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
        let cluster = self.cluster.clone();
        let stale = self.stale_records.clone();
        let switch = self.switch.clone();
        Box::pin(async move {
            let done = activate(&sup, &vm, &dir, &ft_root, switch.as_deref()).await?;
            let agent = cluster
                .as_ref()
                .and_then(|c| Some((c.name(), c.agent()?.clone())));
            if let (Some((me, agent)), Some(uuid)) = (agent, done.uuid) {
                // What this host replicated under: its cached record (it
                // admitted the primary by it), else the replica's own.
                let expected = agent
                    .cached(uuid)
                    .filter(|r| r.backup.as_deref() == Some(me.as_str()))
                    .map_or(done.replica_generation, |r| r.generation);
                // The VM runs here whatever the manager says: recording it
                // must not hold the takeover up.
                tokio::spawn(record_takeover(agent, vm, uuid, expected, stale));
            }
            Ok(())
        })
    }
}

/// The first retry's delay for recording a takeover; doubles up to
/// [`TAKEOVER_RECORD_MAX_BACKOFF`].
const TAKEOVER_RECORD_FIRST_BACKOFF: Duration = Duration::from_millis(500);
const TAKEOVER_RECORD_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Records this host's takeover of `vm` with the manager, retrying with
/// backoff while the manager is out of reach. Until it succeeds the
/// record names the old primary (so protecting the VM onward from here is
/// refused): every failure is logged as an error and shown by `ft status`.
async fn record_takeover(
    agent: tandem_manager::agent::AgentHandle,
    vm: String,
    uuid: uuid::Uuid,
    expected: u64,
    stale: StaleRecords,
) {
    use tandem_manager::api::ErrorKind as M;
    let mut wait = TAKEOVER_RECORD_FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match agent.record_takeover(uuid, expected).await {
            Ok(rec) => {
                info!(%vm, %uuid, generation = rec.generation, attempts, "the manager records this host as the VM's primary after the takeover");
                stale.lock().remove(&vm);
                return;
            }
            Err(e) => {
                // The manager read the request and said no: trying again
                // cannot change its answer (an operator must hand over).
                let refused = matches!(
                    e.kind(),
                    Some(M::Conflict | M::Forbidden | M::NotFound | M::Invalid)
                );
                let note = format!(
                    "the manager's authority record still names the old primary: recording this host's takeover (from generation {expected}) {}: {e}",
                    if refused {
                        "was refused; an operator must hand the VM over (tandem cluster vm handover)"
                    } else {
                        "failed; retrying"
                    }
                );
                error!(%vm, %uuid, attempts, "{note}");
                stale.lock().insert(vm.clone(), note);
                if refused {
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(TAKEOVER_RECORD_MAX_BACKOFF);
            }
        }
    }
}

/// What a takeover started: the VM's identity, and the generation the
/// replica was written under (before the takeover's own).
struct Activated {
    uuid: Option<uuid::Uuid>,
    replica_generation: u64,
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
    #[error("the replica of `{vm}` is of a VM named `{other}` ({what}); refusing to take it over")]
    NameMismatch {
        vm: String,
        other: String,
        what: &'static str,
    },
    #[error(
        "a VM named `{vm}` (uuid {local}) is defined on this host and is not the replica's VM \
         (uuid {replica}); refusing to take over into it: destroy or rename it first"
    )]
    NotTheReplicasVm {
        vm: String,
        local: String,
        replica: String,
    },
    #[error(
        "the VM `{vm}` defined on this host has the replica's uuid but another spec than the \
         replica's; refusing to take over into it: destroy it first"
    )]
    SpecDiffers { vm: String },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// What a takeover does about the VM of the replica's name on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// None is defined: define it, with the replica's spec and uuid.
    Define,
    /// It is the replica's own VM (same uuid, same spec; defined here by
    /// an earlier takeover) and not running: start it from the replica.
    Reuse,
}

/// A VM of the replica's name already defined on this host.
struct LocalVm {
    uuid: String,
    state: tandem_api::VmState,
    /// Its spec, its disks pointed at the replica as the takeover would.
    spec: Option<tandem_vmspec::VmSpec>,
}

/// Decides a takeover of the replica of `vm` (audit M4). The replica (its
/// hello and spec) must be of `vm`; a VM of that name defined here must
/// be the replica's own (same uuid, same spec), or the takeover is
/// refused: a takeover must never start an unrelated VM of the same name
/// with its own spec, nor point that VM's disks at the replica's.
/// `spec` is the replica's, its disks already pointed at the replica.
fn plan_takeover(
    vm: &str,
    hello_vm: &str,
    spec: &tandem_vmspec::VmSpec,
    replica_uuid: Option<uuid::Uuid>,
    local: Option<&LocalVm>,
) -> Result<Takeover, ActivateError> {
    for (other, what) in [(hello_vm, "its hello"), (spec.name.as_str(), "its spec")] {
        if other != vm {
            return Err(ActivateError::NameMismatch {
                vm: vm.to_string(),
                other: other.to_string(),
                what,
            });
        }
    }
    let Some(local) = local else {
        return Ok(Takeover::Define);
    };
    if local.state.is_active() {
        return Err(ActivateError::Active {
            vm: vm.to_string(),
            state: local.state,
        });
    }
    let same = replica_uuid.is_some_and(|r| local.uuid.parse::<uuid::Uuid>().is_ok_and(|l| l == r));
    if !same {
        return Err(ActivateError::NotTheReplicasVm {
            vm: vm.to_string(),
            local: local.uuid.clone(),
            replica: replica_uuid.map_or("unknown".to_string(), |u| u.to_string()),
        });
    }
    if local.spec.as_ref() != Some(spec) {
        return Err(ActivateError::SpecDiffers { vm: vm.to_string() });
    }
    Ok(Takeover::Reuse)
}

/// Points a spec's disks at the replica's files in `dir` (raw), as a
/// takeover runs them.
fn spec_on_replica(spec: &mut tandem_vmspec::VmSpec, dir: &std::path::Path) -> Vec<CheckpointDisk> {
    spec.disks
        .iter_mut()
        .map(|d| {
            let file = tandem_replication::replica::disk_file_name(&d.name);
            d.path = dir.join(&file);
            d.format = DiskFormat::Raw;
            CheckpointDisk {
                name: d.name.clone(),
                file,
                format: DiskFormat::Raw,
            }
        })
        .collect()
}

/// Defines the VM here (if needed) with its disks pointing at the replica,
/// and starts it from the replica's committed checkpoint, in place: its
/// QEMU maps the replica's RAM file and its disks are overlays backed by
/// the replica's (see [`Supervisor::restore_in_place`]), so nothing is
/// copied. A start that fails before the guest runs leaves the replica as
/// it was; once the guest runs, the replica directory is the VM's own.
async fn activate(
    sup: &Arc<Supervisor>,
    vm: &str,
    dir: &std::path::Path,
    ft_root: &std::path::Path,
    switch: Option<&tandem_switch::host::SwitchHost>,
) -> Result<Activated, ActivateError> {
    let hello = read_hello(dir).map_err(ActivateError::Hello)?;
    let identity = read_identity(dir).map_err(ActivateError::Hello)?;
    let mut spec: tandem_vmspec::VmSpec =
        toml::from_str(&hello.spec_toml).map_err(ActivateError::Spec)?;
    let disks = spec_on_replica(&mut spec, dir);
    // The VM's identity: the replica's record of it, else the hello's.
    let replica_uuid = identity
        .as_ref()
        .map_or(hello.uuid.as_str(), |id| id.uuid.as_str())
        .parse::<uuid::Uuid>()
        .ok()
        .filter(|u| !u.is_nil());
    let local = match sup.info(vm).await {
        Ok(info) => Some(LocalVm {
            uuid: info.uuid,
            state: info.state,
            spec: toml::from_str::<tandem_vmspec::VmSpec>(&info.spec_toml)
                .ok()
                .map(|mut s| {
                    spec_on_replica(&mut s, dir);
                    s
                }),
        }),
        Err(SupervisorError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let plan = plan_takeover(vm, &hello.vm, &spec, replica_uuid, local.as_ref())?;
    // The VM runs here from now on, one generation after the primary it
    // replaces: a protection from this host carries it, and a backup
    // refuses the old primary's.
    let replica_generation = identity.map_or(hello.generation, |id| id.generation);
    let generation = replica_generation + 1;
    write_generation(ft_root, vm, generation).map_err(ActivateError::Generation)?;
    let manifest = CheckpointManifest {
        vm: vm.to_string(),
        taken_at: 0,
        ram_bytes: hello.ram_size,
        device_state_bytes: 0,
        disks,
    };
    let bytes = serde_json::to_vec_pretty(&manifest)?;
    std::fs::write(dir.join(CHECKPOINT_MANIFEST), bytes).map_err(ActivateError::WriteManifest)?;
    if plan == Takeover::Define {
        // The VM keeps its identity across the handover.
        let toml = toml::to_string(&spec)?;
        match replica_uuid {
            Some(uuid) => sup.create_with_uuid(&toml, uuid).await?,
            None => sup.create(&toml).await?,
        };
    }
    if let Some(sw) = switch {
        // The VM arrives from its failed primary: nothing is handed over,
        // so the switch asks DHCP for its lease and queries its groups.
        let uuid = replica_uuid.map(|u| u.to_string()).unwrap_or_default();
        crate::switch::pre_associate(sw, vm, &uuid, true, &[]);
    }
    sup.restore_in_place(vm, dir).await?;
    Ok(Activated {
        uuid: replica_uuid,
        replica_generation,
    })
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
        if let Some(c) = &settings.cluster {
            bcfg.authority = c.authority();
        }
        let stale_records = StaleRecords::default();
        let backup = Backup::new(
            bcfg,
            Arc::new(SupervisorActivate {
                sup: sup.clone(),
                ft_root: settings.replica_root.with_file_name("ft"),
                cluster: settings.cluster.clone(),
                stale_records: stale_records.clone(),
                switch: switch.clone(),
            }),
        );
        // Before the listener: a replica is known (and a manual failover
        // possible) whether or not its primary comes back.
        let found = backup.recover_replicas().await;
        if found > 0 {
            info!(replicas = found, "replicas found from before this start");
        }
        if let Some(ep) = &settings.listen {
            let listener = Listener::bind(ep).await?;
            info!(endpoint = %ep, "accepting replication streams");
            let b = backup.clone();
            let cluster = settings.cluster.clone();
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
                            let revocations = cluster.as_ref().map(|c| c.revocations());
                            let tls = match &cluster {
                                Some(c) => match c.replication_server() {
                                    Ok(cfg) => Some(cfg),
                                    Err(e) => {
                                        warn!(%peer, "refusing a replication connection: {e:#}");
                                        continue;
                                    }
                                },
                                None => None,
                            };
                            tokio::spawn(async move {
                                match tandem_replication::link::authenticate(
                                    conn,
                                    peer,
                                    tls.as_ref(),
                                )
                                .await
                                {
                                    Ok((conn, who)) => {
                                        let conn = match (&who, &revocations) {
                                            (PeerIdentity::Certified { peer, .. }, Some(r)) => {
                                                cut_when_revoked(conn, peer, r.clone())
                                            }
                                            _ => conn,
                                        };
                                        b.serve_peer(conn, who).await
                                    }
                                    Err(why) => warn!("refusing a replication connection: {why}"),
                                }
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
            incoming: parking_lot::Mutex::new(BTreeMap::new()),
            backup,
            stale_records,
        }))
    }

    /// On a host a manager manages, replicating to a named backup: records
    /// this host as the VM's primary with that backup (the backup admits
    /// only the recorded primary). Returns the record's generation, which
    /// the primary's hello must carry at least. `None`: no record is
    /// involved (no manager, or a backup on this host's own socket).
    ///
    /// The manager out of reach: protection goes on only if the cached
    /// record already names this host as primary with that backup (hosts
    /// keep working from their cache); otherwise it is refused, since the
    /// backup would refuse this host anyway.
    async fn register_primary(
        &self,
        vm: &str,
        uuid: uuid::Uuid,
        backup_spec: &str,
    ) -> Result<Option<u64>, HttpError> {
        use tandem_manager::api::ErrorKind as M;
        let Some(cluster) = &self.settings.cluster else {
            return Ok(None);
        };
        let Some(agent) = cluster.agent() else {
            return Ok(None);
        };
        let Some((backup, _)) = backup_spec.split_once('@') else {
            return Ok(None);
        };
        let me = cluster.name();
        let e = match agent.register_primary(uuid, vm, Some(backup)).await {
            Ok(rec) => {
                info!(%vm, %uuid, backup, generation = rec.generation, "the manager records this host as the VM's primary");
                return Ok(Some(rec.generation));
            }
            Err(e) => e,
        };
        let refused = |kind| {
            HttpError::new(
                kind,
                format!("the manager refuses to record this host ({me}) as the primary of `{vm}` (uuid {uuid}) with backup {backup}: {e}"),
            )
        };
        match e.kind() {
            Some(M::Conflict) => return Err(refused(tandem_api::ErrorKind::Conflict)),
            Some(M::Invalid) => return Err(refused(tandem_api::ErrorKind::Invalid)),
            Some(M::Forbidden | M::Unauthorized) => {
                return Err(refused(tandem_api::ErrorKind::Forbidden))
            }
            _ => {}
        }
        match agent.cached(uuid) {
            Some(rec) if rec.primary == me && rec.backup.as_deref() == Some(backup) => {
                warn!(%vm, %uuid, generation = rec.generation, "the manager is out of reach ({e}); protecting by the cached authority record, which names this host as primary and {backup} as backup");
                Ok(Some(rec.generation))
            }
            _ => Err(HttpError::new(
                tandem_api::ErrorKind::BadState,
                format!(
                    "cannot record this host ({me}) as the primary of `{vm}` (uuid {uuid}) with backup {backup}: {e}; \
                     not protecting without an authority record ({backup} admits only the recorded primary), \
                     and the cached records do not name this host as its primary with that backup"
                ),
            )),
        }
    }

    /// How to reach the backup a protect request names: `HOST:PORT` or
    /// `unix:PATH`, and on a host with a cluster identity `NAME@HOST:PORT`,
    /// where NAME is the certificate name the backup must present (mutual
    /// TLS; a TCP backup without a name is refused there).
    fn backup_link(
        &self,
        spec: &str,
    ) -> Result<Arc<dyn tandem_replication::link::Connect>, HttpError> {
        let (name, addr) = match spec.split_once('@') {
            Some((n, a)) => (Some(n), a),
            None => (None, spec),
        };
        let endpoint: Endpoint = addr.parse()?;
        match (&self.settings.cluster, name, &endpoint) {
            (_, None, Endpoint::Unix(_)) => Ok(Arc::new(endpoint)),
            (Some(_), Some(_), Endpoint::Unix(_)) => Err(HttpError::invalid(
                "a unix-socket backup is on this host: name no certificate for it",
            )),
            (Some(c), Some(n), Endpoint::Tcp(_)) => {
                tandem_pki::validate_name(n).map_err(|e| HttpError::invalid(e.to_string()))?;
                let client = c
                    .client()
                    .map_err(|e| HttpError::invalid(format!("{e:#}")))?;
                Ok(Arc::new(tandem_replication::link::TlsEndpoint {
                    endpoint,
                    peer_name: n.to_string(),
                    client,
                }))
            }
            (Some(_), None, Endpoint::Tcp(_)) => Err(HttpError::invalid(format!(
                "this host replicates over mutual TLS: name the backup's certificate, as NAME@{addr}"
            ))),
            (None, Some(_), _) => Err(HttpError::invalid(
                "this host has no cluster identity, so it cannot check the backup's name (tandem cluster init --standalone, or tandem host join)",
            )),
            (None, None, Endpoint::Tcp(_)) => Ok(Arc::new(endpoint)),
        }
    }

    async fn protect(&self, vm: &str, req: ProtectRequest) -> Result<FtStatus, HttpError> {
        if self
            .sup
            .migration(vm)
            .await
            .is_ok_and(|m| !m.phase.is_final())
        {
            return Err(tandem_supervisor::SupervisorError::Refused(format!(
                "`{vm}` is migrating: protect it once the migration has ended (on the host it then runs on)"
            ))
            .into());
        }
        let backup = self.backup_link(&req.backup)?;
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
        let ft_root = self.settings.replica_root.with_file_name("ft");
        if let Some(g) = req.generation {
            // A migration's destination: from now on this host protects
            // the VM at least under the generation it was handed.
            if g > read_generation(&ft_root, vm) {
                write_generation(&ft_root, vm, g).map_err(|e| {
                    HttpError::new(
                        tandem_api::ErrorKind::Internal,
                        format!("recording generation {g} for `{vm}`: {e}"),
                    )
                })?;
            }
        }
        // Before anything starts: a refusal leaves nothing to undo.
        let recorded = self.register_primary(vm, port.uuid(), &req.backup).await?;
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
        // page-table trackers (uffd, soft-dirty) cannot see: where one may
        // be used, the VM's switch ports record their writes for the
        // tracker. (A scan sees every write; then the ports are spared the
        // bookkeeping.)
        let write_log = (switch_nics
            && self.switch.is_some()
            && tandem_replication::tracker::needs_write_log(tracker))
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
        let mut cfg = PrimaryConfig::over(backup);
        // The backup refuses a hello older than the manager's record.
        cfg.generation = read_generation(&ft_root, vm)
            .max(recorded.unwrap_or(0))
            .max(req.generation.unwrap_or(0));
        let generation = cfg.generation;
        cfg.epoch = Duration::from_millis(epoch_ms);
        cfg.heartbeat = self.settings.heartbeat;
        cfg.fence_timeout = self.settings.fence_timeout;
        cfg.degrade_after = self.settings.degrade_after;
        cfg.tracker = tracker;
        cfg.external_writers = external_writers;
        if let (Some(log), Some(sw)) = (&write_log, &self.switch) {
            sw.set_vm_write_log(vm, Some(log.clone()));
        }
        cfg.external_log = write_log;
        // A VM that migrated in keeps the gate that has held its output
        // since it arrived (the guest may have answered clients already).
        let arrived = self
            .incoming
            .lock()
            .remove(vm)
            .filter(|o| self.switch.as_ref().is_some_and(|sw| o.is_current(sw)));
        let output = match arrived {
            Some(o) => Some(o),
            None => self
                .switch
                .as_ref()
                .and_then(|sw| crate::output::VmOutput::install(vm, sw, plan)),
        };
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
                request: req,
                generation,
                recorded,
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
        // A protected VM that migrated in and is not protected here yet:
        // its output is held by the gate it arrived under.
        let primaries_now: Vec<String> = out.iter().map(|s| s.vm.clone()).collect();
        for (vm, gate) in self.incoming.lock().iter() {
            let current = self.switch.as_ref().is_some_and(|sw| gate.is_current(sw));
            if current && !primaries_now.contains(vm) {
                out.push(FtStatus {
                    vm: vm.clone(),
                    role: Some(tandem_api::FtRole::Primary),
                    state: tandem_api::FtState::Connecting,
                    detail: "migrated in from a protected source: its output is held until it is protected here to the source's backup, one generation up (`tandem migrate` does this; if it died after the stream: tandem protect VM --backup … --generation <the source's + 1>)".into(),
                    output: Some(gate.counters()),
                    ..Default::default()
                });
            }
        }
        let stale = self.stale_records.lock().clone();
        out.extend(self.backup.status().into_iter().map(|mut st| {
            if let Some(note) = stale.get(&st.vm) {
                st.detail = if st.detail.is_empty() {
                    note.clone()
                } else {
                    format!("{}; {note}", st.detail)
                };
            }
            st
        }));
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
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route(
            "/v1/vms/{name}/migration/protection",
            get(migration_protection),
        )
        .route("/v1/vms/{name}/migration/confirm", post(confirm_migration))
        .route("/v1/migrations/incoming", post(incoming))
        .with_state(ft)
}

/// How long a migration waits for the backup to commit the epochs in
/// flight before it starts (then none is taken until it ends).
const MIGRATION_HOLD_BOUND: Duration = Duration::from_secs(20);

/// Live migration starts here, beside protection: a protected VM's
/// checkpoints are held first (QEMU runs one migration at a time, and its
/// output then waits for the destination's first commit).
async fn migrate(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
    Json(req): Json<tandem_api::MigrateRequest>,
) -> Result<Json<tandem_api::MigrationReport>, HttpError> {
    let cfg = tandem_supervisor::ladder_config(&req);
    let primaries = ft.primaries.lock().await;
    let Some(p) = primaries.get(&name).filter(|p| !p.primary.is_finished()) else {
        drop(primaries);
        return Ok(Json(
            ft.sup
                .migrate_out(
                    &name,
                    &req.uri,
                    req.tls_hostname.as_deref(),
                    cfg,
                    req.copy_storage.as_ref(),
                )
                .await?,
        ));
    };
    if req.copy_storage.is_some() {
        return Err(SupervisorError::Refused(format!(
            "`{name}` is protected (fault tolerance) and its disks would be copied to the destination: QEMU cannot mirror a disk twice at once (to the backup and to the destination); migrate it between hosts that share its storage, or unprotect it first"
        ))
        .into());
    }
    // Not under the lock: the backup may take a while to commit what is
    // in flight, and `ft status` must answer meanwhile.
    let hold = p.primary.epoch_hold();
    drop(primaries);
    let held = hold.hold(MIGRATION_HOLD_BOUND).await.map_err(|e| {
        SupervisorError::Refused(format!(
            "`{name}` is protected and its backup must be current before it migrates: {e}"
        ))
    })?;
    info!(vm = %name, epoch = held, "checkpoints held for the migration; output waits for the destination's first commit");
    let started = ft
        .sup
        .migrate_out(&name, &req.uri, req.tls_hostname.as_deref(), cfg, None)
        .await;
    match started {
        Ok(report) => {
            tokio::spawn(release_when_migration_fails(ft.clone(), name));
            Ok(Json(report))
        }
        Err(e) => {
            if let Some(p) = ft.primaries.lock().await.get(&name) {
                resume_checkpoints(&name, p).await;
            }
            Err(e.into())
        }
    }
}

/// How often a held protection looks at its migration.
const MIGRATION_WATCH: Duration = Duration::from_millis(100);

/// Checkpoints held for a migration go on if it ends without the
/// destination taking the VM (cancelled, aborted, failed): the next
/// commit releases the output held meanwhile. A completed migration is
/// ended by its confirm instead.
async fn release_when_migration_fails(ft: Arc<Ft>, vm: String) {
    loop {
        tokio::time::sleep(MIGRATION_WATCH).await;
        let phase = ft.sup.migration(&vm).await.map(|r| r.phase);
        match phase {
            Ok(tandem_api::MigrationPhase::Running) => continue,
            Ok(tandem_api::MigrationPhase::AwaitingConfirm | tandem_api::MigrationPhase::Done) => {
                return
            }
            Ok(phase) => {
                if let Some(p) = ft.primaries.lock().await.get(&vm) {
                    resume_checkpoints(&vm, p).await;
                    info!(%vm, ?phase, "the migration ended here: checkpoints go on");
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// Lets a protection whose migration did not move the VM take checkpoints
/// again, QEMU's migration settings first set back from the stream's.
async fn resume_checkpoints(vm: &str, p: &Protected) {
    if let Err(e) = p.port.prepare_checkpoints().await {
        // The next checkpoint fails and says why; protection retries.
        warn!(%vm, "restoring the checkpoint settings after the migration: {e}");
    }
    p.primary.release_epochs();
}

/// `GET /v1/vms/{name}/migration/protection`: how a VM is protected from
/// this host (404: it is not).
async fn migration_protection(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
) -> Result<Json<tandem_api::MigrationProtection>, HttpError> {
    let primaries = ft.primaries.lock().await;
    let p = primaries
        .get(&name)
        .filter(|p| !p.primary.is_finished())
        .ok_or_else(|| HttpError::not_found(format!("`{name}` is not protected from this host")))?;
    Ok(Json(tandem_api::MigrationProtection {
        request: p.request.clone(),
        generation: p.generation,
        record_generation: p.recorded,
        backup_host: p
            .request
            .backup
            .split_once('@')
            .map(|(host, _)| host.to_string()),
    }))
}

/// `POST /v1/migrations/incoming`: the destination prepares. A protected
/// VM's output is gated from before it runs here, and a host that holds
/// the VM's replica (its backup) refuses to run it.
async fn incoming(
    State(ft): State<Arc<Ft>>,
    Json(req): Json<tandem_api::IncomingMigrationRequest>,
) -> Result<
    (
        axum::http::StatusCode,
        Json<tandem_api::IncomingMigrationReply>,
    ),
    HttpError,
> {
    let vm = toml::from_str::<tandem_vmspec::VmSpec>(&req.spec_toml)
        .map(|s| s.name)
        .map_err(|e| HttpError::invalid(format!("the VM spec: {e}")))?;
    if req.protection.is_some() {
        if let Some(st) = ft
            .backup
            .status()
            .into_iter()
            .find(|s| s.vm == vm && s.role == Some(tandem_api::FtRole::Backup))
        {
            return Err(SupervisorError::Refused(format!(
                "this host is the backup of `{vm}` (its replica is {}): running the VM here would leave it with no backup on another host; migrate it to a third host",
                st.state
            ))
            .into());
        }
    }
    let plan = tandem_supervisor::IncomingPlan {
        listen: req.listen.clone(),
        allow_postcopy: req.allow_postcopy,
        multifd_channels: req.multifd_channels,
        accept_timeout: Duration::from_secs(req.accept_timeout_s.unwrap_or(60).clamp(1, 3600)),
        tls_dir: None,
        source_tls_name: req.source_tls_name.clone(),
        copied_disks: Vec::new(),
    };
    let gate_plan = match &req.protection {
        Some(p) => Some(crate::output::OutputPlan::from_request(p).map_err(HttpError::invalid)?),
        None => None,
    };
    let reply = ft
        .sup
        .prepare_incoming(&req.spec_toml, &req.uuid, plan, &req.disks)
        .await?;
    if let Some(sw) = &ft.switch {
        // Before any RAM moves: the ports' policy is in place, and what
        // the source knew of the VM's network waits for it to run here.
        crate::switch::pre_associate(sw, &vm, &req.uuid, true, &req.network);
    }
    let old = ft.incoming.lock().remove(&vm);
    if let Some(o) = old {
        o.uninstall();
    }
    if let (Some(plan), Some(sw)) = (gate_plan, &ft.switch) {
        // Installed before the stream can complete: whatever the guest
        // sends here waits for this host's first commit.
        if let Some(out) = crate::output::VmOutput::install(&vm, sw, plan) {
            ft.incoming.lock().insert(vm.clone(), out);
        }
    }
    Ok((axum::http::StatusCode::CREATED, Json(reply)))
}

/// `POST /v1/vms/{name}/migration/confirm`: the source ends a completed
/// migration. For a protected VM whose destination runs it, this host's
/// protection ends without a word to the backup (the destination's newer
/// generation has taken the replica over), and the output it held since
/// its last commit goes out if the destination has committed (it is
/// covered there) or is dropped. If the destination does not run it, the
/// guest resumes here and checkpoints go on.
async fn confirm_migration(
    State(ft): State<Arc<Ft>>,
    Path(name): Path<String>,
    Json(req): Json<tandem_api::MigrationConfirm>,
) -> Result<Json<tandem_api::MigrationReport>, HttpError> {
    if !req.destination_running {
        let report = ft.sup.confirm_migration(&name, false).await?;
        if let Some(p) = ft.primaries.lock().await.get(&name) {
            resume_checkpoints(&name, p).await;
        }
        return Ok(Json(report));
    }
    // Only a migration waiting for its confirm hands protection over.
    let phase = ft.sup.migration(&name).await?.phase;
    if phase == tandem_api::MigrationPhase::AwaitingConfirm {
        let handed = ft.primaries.lock().await.remove(&name);
        if let Some(p) = handed {
            use tandem_replication::EpochObserver as _;
            p.primary.handed_over();
            crate::ftdisk::stop(&p.port, &p.disks).await;
            if let Some(o) = &p.output {
                if req.destination_committed {
                    o.ended();
                } else {
                    o.abandoned();
                    o.uninstall();
                }
            }
            if let Some(sw) = &ft.switch {
                sw.set_vm_write_log(&name, None);
            }
            info!(vm = %name, released = req.destination_committed, "protection handed over to the migration's destination");
        }
    }
    Ok(Json(ft.sup.confirm_migration(&name, true).await?))
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

/// How often a certified replication stream's peer is looked up in the
/// revocation list (the agent refreshes it from the manager).
const REVOCATION_CHECK: Duration = Duration::from_secs(1);

/// Ends `conn` (as a disconnect) once `peer`'s certificate is revoked:
/// `host remove` cuts a stream that is already open, not only new ones.
fn cut_when_revoked(
    conn: tandem_replication::link::BoxStream,
    peer: &tandem_pki::Peer,
    revocations: Arc<dyn tandem_pki::Revocations>,
) -> tandem_replication::link::BoxStream {
    let (conn, mut switch) = tandem_replication::link::cut_off(conn);
    let (name, serial) = (peer.name.clone(), peer.serial.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = switch.stream_gone() => return,
                () = tokio::time::sleep(REVOCATION_CHECK) => {}
            }
            if revocations.is_revoked(&serial) {
                warn!(peer = %name, %serial, "the replication peer's certificate was revoked: cutting its stream");
                switch.throw();
                return;
            }
        }
    });
    conn
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::VmState;

    const SPEC: &str = r#"
name = "web"
memory_mib = 128
[boot]
kernel = "/k"
initrd = "/i"
[[disks]]
name = "data"
path = "/primary/data.qcow2"
format = "qcow2"
"#;

    fn replica_spec(dir: &std::path::Path) -> tandem_vmspec::VmSpec {
        let mut s: tandem_vmspec::VmSpec = toml::from_str(SPEC).unwrap();
        spec_on_replica(&mut s, dir);
        s
    }

    fn local(uuid: uuid::Uuid, state: VmState, spec: tandem_vmspec::VmSpec) -> LocalVm {
        LocalVm {
            uuid: uuid.to_string(),
            state,
            spec: Some(spec),
        }
    }

    /// Audit M4: a takeover never runs in an unrelated local VM of the
    /// replica's name (with *its* spec, its disks repointed); only the
    /// replica's own VM, or none, is taken.
    #[test]
    fn takeover_refuses_a_local_vm_that_is_not_the_replicas() {
        let dir = std::path::Path::new("/state/replicas/web");
        let spec = replica_spec(dir);
        assert_eq!(spec.disks[0].path, dir.join("disk-data.raw"));
        let replica = uuid::Uuid::new_v4();
        let plan = |l: Option<&LocalVm>| plan_takeover("web", "web", &spec, Some(replica), l);

        assert_eq!(plan(None).unwrap(), Takeover::Define);
        let own = local(replica, VmState::Shutoff, spec.clone());
        assert_eq!(plan(Some(&own)).unwrap(), Takeover::Reuse);

        // Another VM that happens to be called `web`.
        let other = local(uuid::Uuid::new_v4(), VmState::Defined, spec.clone());
        let e = plan(Some(&other)).unwrap_err();
        assert!(matches!(e, ActivateError::NotTheReplicasVm { .. }), "{e}");
        assert!(e.to_string().contains("not the replica's VM"), "{e}");
        // A replica without an identity cannot vouch for any local VM.
        let e = plan_takeover("web", "web", &spec, None, Some(&own)).unwrap_err();
        assert!(matches!(e, ActivateError::NotTheReplicasVm { .. }), "{e}");
        assert_eq!(
            plan_takeover("web", "web", &spec, None, None).unwrap(),
            Takeover::Define
        );
        // The replica's own VM, with another spec (more memory, another
        // kernel), is not silently run with it.
        let mut changed = spec.clone();
        changed.memory_mib = 256;
        let e = plan(Some(&local(replica, VmState::Shutoff, changed))).unwrap_err();
        assert!(matches!(e, ActivateError::SpecDiffers { .. }), "{e}");
        let unreadable = LocalVm {
            spec: None,
            ..local(replica, VmState::Shutoff, spec.clone())
        };
        assert!(plan(Some(&unreadable)).is_err());
        // Running here already.
        let e = plan(Some(&local(replica, VmState::Running, spec.clone()))).unwrap_err();
        assert!(matches!(e, ActivateError::Active { .. }), "{e}");
    }

    #[test]
    fn takeover_requires_the_replica_to_be_of_the_vm_named() {
        let spec = replica_spec(std::path::Path::new("/r/web"));
        let e = plan_takeover("web", "db", &spec, None, None).unwrap_err();
        assert!(e.to_string().contains("its hello"), "{e}");
        let e = plan_takeover("db", "db", &spec, None, None).unwrap_err();
        assert!(e.to_string().contains("its spec"), "{e}");
    }
}
