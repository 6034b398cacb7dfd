//! The host's side: the loop a joined tandemd runs to stay in the cluster.
//!
//! Files, in tandemd's state directory under [`HOST_IDENTITY_DIR`]:
//!
//! ```text
//! identity/identity.pem    the host's certificate, key and the CA (tandem-pki, 0600)
//! identity/manager.json    where the manager is and its certificate name
//! identity/revoked         the cluster's revocation list (tandem-pki format)
//! identity/authority.json  this host's VM authority records, as last fetched
//! identity/crl.pem         the revocation list as a CRL, for QEMU's TLS directories
//! ```
//!
//! Every tick (default every 5 s) the agent sends a heartbeat with the
//! host's health; fetches the revocation list when the manager's
//! generation is newer than its copy; fetches the host's authority
//! records and keeps them durably when they change; sends the inventory
//! when the manager asks for it (after a manager restart) and every
//! minute; and renews the certificate once 2/3 of its life has passed.
//! When the manager cannot be reached, nothing changes: the host keeps
//! its certificate (until it expires), its revocation list and its cached
//! authority, and tries again next tick.
//!
//! The heartbeat also carries where the manager reaches this host's API
//! ([`Reporter::host_api`]) and the switch's transaction status
//! ([`Reporter::switch_status`]: the digest it runs, any pending
//! transaction), so the manager always knows what each host runs. When a
//! switch transaction ends on the host without a commit, tandemd hands
//! the agent a host-sync message ([`AgentHandle::switch_sync`]); the agent
//! sends it at once and again with backoff until the manager acknowledges
//! it (a host that just rolled back may reach the manager only a moment
//! later), for at most [`SWITCH_SYNC_GIVE_UP`].
//!
//! tandemd also calls the manager through the handle, with the agent's
//! current identity: [`AgentHandle::register_primary`] before it protects
//! a VM, [`AgentHandle::record_takeover`] after its backup role resumed
//! one, and [`AgentHandle::refresh_authority`] when its backup refused a
//! primary the cache may not know yet. Each refreshes the cached
//! authority at once rather than at the next tick, so the replication
//! authority sees the change within the same request.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tandem_pki::{Identity, RevocationList, CLOCK_SKEW, IDENTITY_FILE};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::api::{
    AuthorityRecord, Credentials, Health, HeartbeatRequest, HeartbeatResponse, HostAuthority,
    HostSwitchSync, Inventory, RegisterPrimaryRequest, Revocations, TakeoverRequest,
};
use crate::client::{ClientError, Joined, ManagerClient, ManagerEndpoint};
use crate::state::{read_json, write_json, StateError, MANAGER_FILE};

/// The directory, in tandemd's state directory, that holds its identity.
pub const HOST_IDENTITY_DIR: &str = "identity";
pub const REVOCATIONS_FILE: &str = "revoked";
pub const AUTHORITY_FILE: &str = "authority.json";
/// The revocation list as a CRL signed by the cluster CA, for QEMU
/// (`tandem_pki::Identity::qemu_crl`).
pub const CRL_FILE: &str = "crl.pem";

/// Saves what a join gave: the identity and `manager.json`.
pub fn save_joined(dir: &Path, joined: &Joined) -> Result<(), StateError> {
    joined.identity.save(dir)?;
    write_json(&dir.join(MANAGER_FILE), &joined.endpoint, 0o644)
}

/// Whether `dir` holds a host identity already.
pub fn has_identity(dir: &Path) -> bool {
    dir.join(IDENTITY_FILE).exists()
}

/// When a certificate should be renewed: once 2/3 of its life has passed.
/// Its life starts [`CLOCK_SKEW`] after its `not_before` (the CA backdates
/// certificates by that much).
pub fn renew_at(id: &Identity) -> SystemTime {
    let start = id.not_before() + CLOCK_SKEW;
    match id.not_after().duration_since(start) {
        Ok(life) => start + life * 2 / 3,
        Err(_) => id.not_before(),
    }
}

/// What tandemd gives the agent to report.
pub trait Reporter: Send + Sync + 'static {
    fn health(&self) -> Health;
    fn inventory(&self) -> Inventory;

    /// `HOST:PORT` where the manager reaches this host's API over mutual
    /// TLS (tandemd's `--host-api`); `None`: the manager cannot call it.
    fn host_api(&self) -> Option<String> {
        None
    }

    /// The switch's transaction status (`GET /v1/switch/txn`), sent with
    /// every heartbeat.
    fn switch_status(&self) -> Option<tandem_api::SwitchTxnStatus> {
        None
    }
}

/// How many host-sync messages may wait for the manager; more are refused.
pub const SWITCH_SYNC_QUEUE: usize = 64;
/// A host-sync message not acknowledged within this long is dropped (the
/// heartbeat's switch status tells the manager the same, later).
pub const SWITCH_SYNC_GIVE_UP: Duration = Duration::from_secs(600);
/// The first retry's delay; it doubles up to [`SWITCH_SYNC_MAX_BACKOFF`].
const SWITCH_SYNC_FIRST_BACKOFF: Duration = Duration::from_millis(250);
const SWITCH_SYNC_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How long a call tandemd makes through the handle may take: it holds
/// a request of tandemd's own (protect) while it runs.
pub const HANDLE_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// [`AgentHandle::refresh_authority`] fetches at most this often: a
/// primary knocking at every heartbeat must not turn into a request to
/// the manager each time.
pub const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// The authority cache, shared by the agent's loop and its handle.
struct AuthorityCache {
    dir: PathBuf,
    tx: watch::Sender<Arc<HostAuthority>>,
    /// Held across each fetch and its store, so that an answer older than
    /// the one stored last never replaces it.
    lock: tokio::sync::Mutex<()>,
    last_refresh: parking_lot::Mutex<Option<Instant>>,
    refreshing: AtomicBool,
}

impl AuthorityCache {
    /// Fetches this host's records and keeps them if they changed.
    async fn fetch(&self, client: &ManagerClient) -> Result<(), AgentError> {
        let _one = self.lock.lock().await;
        let authority: HostAuthority = client.get("/v1/host/authority").await?;
        self.store(authority)
    }

    /// Durably first, then published: a restart never starts from less
    /// than what the replication authority already admitted by.
    fn store(&self, authority: HostAuthority) -> Result<(), AgentError> {
        if **self.tx.borrow() == authority {
            return Ok(());
        }
        write_json(
            &self.dir.join(AUTHORITY_FILE),
            &CachedAuthority::new(&authority, crate::clock::unix(SystemTime::now())),
            0o600,
        )?;
        info!(vms = authority.vms.len(), "VM authority records updated");
        self.tx.send_replace(Arc::new(authority));
        Ok(())
    }

    /// Puts one record the manager just answered with into the cache,
    /// when the fetch after it failed.
    async fn merge(&self, rec: &AuthorityRecord) -> Result<(), AgentError> {
        let _one = self.lock.lock().await;
        let mut next = (**self.tx.borrow()).clone();
        next.vms.retain(|v| v.uuid != rec.uuid);
        if rec.involves(&next.host) {
            next.vms.push(rec.clone());
        }
        self.store(next)
    }
}

/// A host-sync message on its way.
struct QueuedSync {
    msg: HostSwitchSync,
    queued: Instant,
    attempts: u32,
    next_try: Instant,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// tandemd's `STATE_DIR/identity`.
    pub dir: PathBuf,
    pub heartbeat: Duration,
    pub inventory_every: Duration,
    pub request_timeout: Duration,
}

impl AgentConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            dir: dir.into(),
            heartbeat: Duration::from_secs(5),
            inventory_every: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The cached authority, as kept in `authority.json`: this host's name
/// and, by lower-case VM UUID, each VM's name, primary, backup (`""` when
/// none) and generation. The same JSON shape as
/// `tandem_replication::authority::RecordedPrimaries`, which loads this
/// file directly (the extra fields are ignored there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedAuthority {
    pub this_host: String,
    pub vms: BTreeMap<String, CachedVm>,
    /// Unix seconds of the fetch.
    #[serde(default)]
    pub fetched_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedVm {
    pub name: String,
    pub primary: String,
    /// `""` when the VM has no backup.
    pub backup: String,
    pub generation: u64,
    #[serde(default)]
    pub updated_at: u64,
    #[serde(default)]
    pub updated_by: String,
}

impl CachedAuthority {
    pub fn new(a: &HostAuthority, fetched_at: u64) -> Self {
        CachedAuthority {
            this_host: a.host.clone(),
            vms: a
                .vms
                .iter()
                .map(|r| {
                    (
                        r.uuid.hyphenated().to_string(),
                        CachedVm {
                            name: r.name.clone(),
                            primary: r.primary.clone(),
                            backup: r.backup.clone().unwrap_or_default(),
                            generation: r.generation,
                            updated_at: r.updated_at,
                            updated_by: r.updated_by.clone(),
                        },
                    )
                })
                .collect(),
            fetched_at,
        }
    }

    /// Back to the API's shape; a key that is not a UUID is an error.
    pub fn to_host_authority(&self) -> Result<HostAuthority, String> {
        let mut vms = Vec::with_capacity(self.vms.len());
        for (k, v) in &self.vms {
            vms.push(AuthorityRecord {
                uuid: k.parse().map_err(|_| format!("{k:?} is not a VM UUID"))?,
                name: v.name.clone(),
                primary: v.primary.clone(),
                backup: (!v.backup.is_empty()).then(|| v.backup.clone()),
                generation: v.generation,
                updated_at: v.updated_at,
                updated_by: v.updated_by.clone(),
            });
        }
        Ok(HostAuthority {
            host: self.this_host.clone(),
            vms,
        })
    }
}

/// How the agent is doing, for `tandem host info` and logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStatus {
    /// The last tick reached the manager.
    pub connected: bool,
    /// The last error, if the last tick failed.
    pub last_error: Option<String>,
}

/// What tandemd keeps of the agent: all of it works while the manager is down.
#[derive(Clone)]
pub struct AgentHandle {
    /// The host's identity; changes when the certificate is renewed
    /// (rebuild TLS configurations from it).
    pub identity: watch::Receiver<Arc<Identity>>,
    /// This host's authority records, as last fetched (kept on disk).
    pub authority: watch::Receiver<Arc<HostAuthority>>,
    /// The cluster's revocation list (kept on disk): give it to every TLS
    /// configuration tandemd builds.
    pub revocations: Arc<RevocationList>,
    pub status: watch::Receiver<AgentStatus>,
    switch_sync: tokio::sync::mpsc::Sender<HostSwitchSync>,
    endpoint: ManagerEndpoint,
    cache: Arc<AuthorityCache>,
}

impl AgentHandle {
    /// Queues a host-sync message: a switch transaction ended here without
    /// a commit (rolled back, restored at start, fallback). The agent
    /// sends it to the manager, retrying with backoff until acknowledged.
    /// Refused only when the queue is full or the agent has stopped.
    pub fn switch_sync(&self, msg: HostSwitchSync) -> Result<(), String> {
        self.switch_sync.try_send(msg).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => format!(
                "{SWITCH_SYNC_QUEUE} host-sync messages are already waiting for the manager"
            ),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                "the manager agent has stopped".into()
            }
        })
    }

    /// A client of the manager as this host is now (a renewal replaced the
    /// certificate since the agent started, perhaps).
    fn client(&self) -> Result<ManagerClient, ClientError> {
        let id = self.identity.borrow().clone();
        Ok(
            ManagerClient::new(self.endpoint.clone(), &id, self.revocations.clone())?
                .with_timeout(HANDLE_REQUEST_TIMEOUT),
        )
    }

    /// Records this host as the primary of VM `uuid`, replicating to
    /// `backup` (`POST /v1/host/vms`), then refreshes the cached
    /// authority. A `conflict` answer means another host is recorded as
    /// its primary; a connect or timeout error, that the manager is out of
    /// reach (the cache is unchanged then).
    pub async fn register_primary(
        &self,
        uuid: Uuid,
        name: &str,
        backup: Option<&str>,
    ) -> Result<AuthorityRecord, ClientError> {
        let client = self.client()?;
        let rec: AuthorityRecord = client
            .post(
                "/v1/host/vms",
                &RegisterPrimaryRequest {
                    uuid,
                    name: name.to_string(),
                    backup: backup.map(str::to_string),
                },
            )
            .await?;
        self.refresh_after(&client, &rec).await;
        Ok(rec)
    }

    /// Records that this host, the VM's backup, took it over from the
    /// record at `expected_generation` (`POST /v1/host/vms/{uuid}/takeover`),
    /// then refreshes the cached authority.
    pub async fn record_takeover(
        &self,
        uuid: Uuid,
        expected_generation: u64,
    ) -> Result<AuthorityRecord, ClientError> {
        let client = self.client()?;
        let rec: AuthorityRecord = client
            .post(
                &format!("/v1/host/vms/{}/takeover", uuid.hyphenated()),
                &TakeoverRequest {
                    expected_generation,
                },
            )
            .await?;
        self.refresh_after(&client, &rec).await;
        Ok(rec)
    }

    async fn refresh_after(&self, client: &ManagerClient, rec: &AuthorityRecord) {
        if let Err(e) = self.cache.fetch(client).await {
            debug!(vm = %rec.uuid, "fetching the authority after a change: {e}; keeping the answer");
            if let Err(e) = self.cache.merge(rec).await {
                warn!(vm = %rec.uuid, "caching the VM's authority record: {e}");
            }
        }
    }

    /// This host's cached record of VM `uuid`, if any.
    pub fn cached(&self, uuid: Uuid) -> Option<AuthorityRecord> {
        self.authority
            .borrow()
            .vms
            .iter()
            .find(|v| v.uuid == uuid)
            .cloned()
    }

    /// Fetches the authority now, in the background, instead of at the
    /// next tick: the backup calls it when it refused a primary, so that a
    /// VM just registered is admitted at the primary's next try. At most
    /// once per [`REFRESH_AT_MOST_EVERY`] and one at a time; returns
    /// whether a fetch was started.
    pub fn refresh_authority(&self) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        {
            let mut last = self.cache.last_refresh.lock();
            if last.is_some_and(|t| t.elapsed() < REFRESH_AT_MOST_EVERY) {
                return false;
            }
            if self.cache.refreshing.swap(true, Ordering::AcqRel) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => {
                self.cache.refreshing.store(false, Ordering::Release);
                warn!("refreshing the VM authority: {e}");
                return false;
            }
        };
        let cache = self.cache.clone();
        rt.spawn(async move {
            if let Err(e) = cache.fetch(&client).await {
                debug!("refreshing the VM authority: {e} (the next tick tries again)");
            }
            cache.refreshing.store(false, Ordering::Release);
        });
        true
    }
}

pub struct HostAgent {
    cfg: AgentConfig,
    endpoint: ManagerEndpoint,
    identity: watch::Sender<Arc<Identity>>,
    cache: Arc<AuthorityCache>,
    revocations: Arc<RevocationList>,
    status: watch::Sender<AgentStatus>,
    client: ManagerClient,
    last_inventory: Option<Instant>,
    sync_rx: tokio::sync::mpsc::Receiver<HostSwitchSync>,
    syncs: VecDeque<QueuedSync>,
}

impl HostAgent {
    /// Loads the host's identity, manager endpoint, revocation list and
    /// cached authority from `cfg.dir`. Needs no manager.
    pub fn open(cfg: AgentConfig) -> Result<(HostAgent, AgentHandle), StateError> {
        let identity = Identity::load(&cfg.dir)?;
        let endpoint: ManagerEndpoint = read_json(&cfg.dir.join(MANAGER_FILE))?;
        let revocations = Arc::new(RevocationList::open(&cfg.dir.join(REVOCATIONS_FILE))?);
        let cache = cfg.dir.join(AUTHORITY_FILE);
        let authority = match std::fs::symlink_metadata(&cache) {
            Ok(_) => read_json::<CachedAuthority>(&cache)?
                .to_host_authority()
                .map_err(|e| StateError::Invalid(format!("{}: {e}", cache.display())))?,
            Err(_) => HostAuthority {
                host: identity.name().to_string(),
                vms: Vec::new(),
            },
        };
        let client = ManagerClient::new(endpoint.clone(), &identity, revocations.clone())?
            .with_timeout(cfg.request_timeout);
        let (id_tx, id_rx) = watch::channel(Arc::new(identity));
        let (auth_tx, auth_rx) = watch::channel(Arc::new(authority));
        let (st_tx, st_rx) = watch::channel(AgentStatus::default());
        let (sync_tx, sync_rx) = tokio::sync::mpsc::channel(SWITCH_SYNC_QUEUE);
        let cache = Arc::new(AuthorityCache {
            dir: cfg.dir.clone(),
            tx: auth_tx,
            lock: tokio::sync::Mutex::new(()),
            last_refresh: parking_lot::Mutex::new(None),
            refreshing: AtomicBool::new(false),
        });
        let handle = AgentHandle {
            identity: id_rx,
            authority: auth_rx,
            revocations: Arc::clone(&revocations),
            status: st_rx,
            switch_sync: sync_tx,
            endpoint: endpoint.clone(),
            cache: cache.clone(),
        };
        Ok((
            HostAgent {
                cfg,
                endpoint,
                identity: id_tx,
                cache,
                revocations,
                status: st_tx,
                client,
                last_inventory: None,
                sync_rx,
                syncs: VecDeque::new(),
            },
            handle,
        ))
    }

    pub fn identity(&self) -> Arc<Identity> {
        self.identity.borrow().clone()
    }

    /// One round with the manager (see the module's documentation).
    pub async fn tick(&mut self, reporter: &dyn Reporter) -> Result<(), AgentError> {
        let hb: HeartbeatResponse = self
            .client
            .post(
                "/v1/host/heartbeat",
                &HeartbeatRequest {
                    health: reporter.health(),
                    host_api: reporter.host_api(),
                    switch: reporter.switch_status(),
                },
            )
            .await?;
        if hb.revocation_generation > self.revocations.generation() {
            let list: Revocations = self.client.get("/v1/revocations").await?;
            // The CRL first: the list's generation is what says "done".
            if let Some(crl) = &list.crl_pem {
                crate::state::write_atomic(&self.cfg.dir.join(CRL_FILE), crl.as_bytes(), 0o644)?;
            }
            if self.revocations.replace(list.generation, &list.serials)? {
                info!(
                    generation = list.generation,
                    revoked = list.serials.len(),
                    "revocation list updated"
                );
            }
        }
        self.cache.fetch(&self.client).await?;
        let inventory_due = self
            .last_inventory
            .is_none_or(|t| t.elapsed() >= self.cfg.inventory_every);
        if hb.inventory_wanted || inventory_due {
            let _: crate::api::Ack = self
                .client
                .put("/v1/host/inventory", &reporter.inventory())
                .await?;
            self.last_inventory = Some(Instant::now());
        }
        if SystemTime::now() >= renew_at(&self.identity.borrow()) {
            self.renew().await?;
        }
        Ok(())
    }

    /// Renews the certificate now: a new key and certificate from the
    /// manager, saved atomically, then published.
    pub async fn renew(&mut self) -> Result<(), AgentError> {
        let creds: Credentials = self.client.post("/v1/host/renew", &()).await?;
        let id = Identity::from_pem(&creds.cert_pem, &creds.key_pem, &creds.ca_pem)?;
        let current = self.identity();
        if id.name() != current.name()
            || id.cluster_id() != current.cluster_id()
            || id.role() != current.role()
        {
            return Err(AgentError::Invalid(format!(
                "the renewed certificate is for {} {} of cluster {}",
                id.role(),
                id.name(),
                id.cluster_id()
            )));
        }
        id.save(&self.cfg.dir)?;
        self.client = ManagerClient::new(self.endpoint.clone(), &id, self.revocations.clone())?
            .with_timeout(self.cfg.request_timeout);
        info!(serial = %id.serial(), not_after = %humantime::format_rfc3339_seconds(id.not_after()), "host certificate renewed");
        self.identity.send_replace(Arc::new(id));
        Ok(())
    }

    /// Sends the queued host-sync messages that are due, oldest first;
    /// stops at the first that fails (it is retried after its backoff).
    pub async fn deliver_switch_syncs(&mut self) {
        let now = Instant::now();
        while let Some(q) = self.syncs.front_mut() {
            if q.next_try > now {
                return;
            }
            let sent: Result<crate::api::Ack, ClientError> =
                self.client.post("/v1/host/switch-sync", &q.msg).await;
            match sent {
                Ok(_) => {
                    info!(txid = ?q.msg.txid, outcome = ?q.msg.outcome, attempts = q.attempts + 1, "switch host-sync delivered to the manager");
                    self.syncs.pop_front();
                }
                // The manager read it and refused it: sending it again
                // cannot help.
                Err(
                    e @ ClientError::Server {
                        status: 400..=499, ..
                    },
                ) => {
                    warn!(txid = ?q.msg.txid, "the manager refused the switch host-sync: {e}");
                    self.syncs.pop_front();
                }
                Err(e) => {
                    q.attempts += 1;
                    if q.queued.elapsed() >= SWITCH_SYNC_GIVE_UP {
                        warn!(txid = ?q.msg.txid, attempts = q.attempts, "giving up on the switch host-sync (the heartbeat still reports the switch): {e}");
                        self.syncs.pop_front();
                        continue;
                    }
                    let backoff = SWITCH_SYNC_FIRST_BACKOFF
                        .saturating_mul(1 << q.attempts.min(8))
                        .min(SWITCH_SYNC_MAX_BACKOFF);
                    q.next_try = Instant::now() + backoff;
                    return;
                }
            }
        }
    }

    /// Host-sync messages not yet acknowledged.
    pub fn switch_syncs_waiting(&self) -> usize {
        self.syncs.len()
    }

    /// Takes what tandemd queued since (without waiting).
    fn take_queued_syncs(&mut self) {
        while let Ok(msg) = self.sync_rx.try_recv() {
            self.queue_sync(msg);
        }
    }

    fn queue_sync(&mut self, msg: HostSwitchSync) {
        let now = Instant::now();
        self.syncs.push_back(QueuedSync {
            msg,
            queued: now,
            attempts: 0,
            next_try: now,
        });
    }

    /// Ticks every `heartbeat` until `shutdown`, and sends host-sync
    /// messages as they come. Errors are logged when the state changes
    /// (reachable ↔ not) and otherwise kept in the status.
    pub async fn run(mut self, reporter: Arc<dyn Reporter>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut next_tick = Instant::now();
        loop {
            self.take_queued_syncs();
            self.deliver_switch_syncs().await;
            if Instant::now() < next_tick {
                let wake = self
                    .syncs
                    .front()
                    .map_or(next_tick, |q| q.next_try.min(next_tick));
                tokio::select! {
                    () = &mut shutdown => return,
                    Some(msg) = self.sync_rx.recv() => self.queue_sync(msg),
                    () = tokio::time::sleep_until(wake.into()) => {}
                }
                continue;
            }
            next_tick = Instant::now() + self.cfg.heartbeat;
            let result = self.tick(reporter.as_ref()).await;
            let was = self.status.borrow().clone();
            let now = match result {
                Ok(()) => AgentStatus {
                    connected: true,
                    last_error: None,
                },
                Err(e) => AgentStatus {
                    connected: false,
                    last_error: Some(e.to_string()),
                },
            };
            if was.connected != now.connected
                || was.last_error.is_none() != now.last_error.is_none()
            {
                match &now.last_error {
                    None => info!(manager = %self.endpoint.address, "in touch with the manager"),
                    Some(e) => {
                        warn!(manager = %self.endpoint.address, "manager unreachable or refusing, keeping cached state: {e}")
                    }
                }
            }
            self.status.send_replace(now);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Pki(#[from] tandem_pki::PkiError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Invalid(String),
}
