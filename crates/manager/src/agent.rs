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

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tandem_pki::{Identity, RevocationList, CLOCK_SKEW, IDENTITY_FILE};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{
    AuthorityRecord, Credentials, Health, HeartbeatRequest, HeartbeatResponse, HostAuthority,
    Inventory, Revocations,
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
}

pub struct HostAgent {
    cfg: AgentConfig,
    endpoint: ManagerEndpoint,
    identity: watch::Sender<Arc<Identity>>,
    authority: watch::Sender<Arc<HostAuthority>>,
    revocations: Arc<RevocationList>,
    status: watch::Sender<AgentStatus>,
    client: ManagerClient,
    last_inventory: Option<Instant>,
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
        let handle = AgentHandle {
            identity: id_rx,
            authority: auth_rx,
            revocations: Arc::clone(&revocations),
            status: st_rx,
        };
        Ok((
            HostAgent {
                cfg,
                endpoint,
                identity: id_tx,
                authority: auth_tx,
                revocations,
                status: st_tx,
                client,
                last_inventory: None,
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
        let authority: HostAuthority = self.client.get("/v1/host/authority").await?;
        if **self.authority.borrow() != authority {
            write_json(
                &self.cfg.dir.join(AUTHORITY_FILE),
                &CachedAuthority::new(&authority, crate::clock::unix(SystemTime::now())),
                0o600,
            )?;
            info!(vms = authority.vms.len(), "VM authority records updated");
            self.authority.send_replace(Arc::new(authority));
        }
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

    /// Ticks every `heartbeat` until `shutdown`. Errors are logged when the
    /// state changes (reachable ↔ not) and otherwise kept in the status.
    pub async fn run(mut self, reporter: Arc<dyn Reporter>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
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
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.cfg.heartbeat) => {}
            }
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
