//! The manager's logic, with no HTTP in it: tokens, joins, renewals,
//! hosts, revocation and VM authority, on a [`Store`] and the cluster CA.
//! [`crate::http`] maps requests onto these methods after the TLS layer
//! has authenticated the caller and the route has checked its role.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tandem_pki::{
    normalize_serial, validate_name, ClusterCa, Peer, PkiError, RevocationList, Role,
};
use tracing::{info, warn};
use uuid::Uuid;

use crate::api::{
    ClusterStatus, Connection, CreateTokenRequest, CreateVmRequest, CreatedToken, Credentials,
    Dump, DumpEntry, ErrorKind, HandoverRequest, HeartbeatRequest, HeartbeatResponse,
    HostAuthority, HostView, JoinRequest, RegisterPrimaryRequest, RemovedHost, Revocations,
    RevokeRequest, TakeoverRequest, TokenInfo, DUMP_FORMAT,
};
use crate::clock::{rfc3339, unix, Clock};
use crate::model::token::cert_sha256;
use crate::model::{
    host_key, token_key, vm_key, AuthorityRecord, CertRef, ClusterRecord, Health, HostRecord,
    Inventory, JoinToken, RevocationRecord, RevokedCert, TokenRecord, CLUSTER_KEY, HOSTS_PREFIX,
    REVOCATIONS_KEY, TOKENS_PREFIX, VMS_PREFIX,
};
use crate::store::typed::{self, Change};
use crate::store::{CasOutcome, Expect, Store, StoreError};

/// An error with the kind the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("certificate authority: {0}")]
    Pki(#[from] PkiError),
    /// A document with problems, each by its field path.
    #[error("{message}")]
    InvalidDocument {
        message: String,
        fields: Vec<crate::api::FieldProblem>,
    },
}

impl ManagerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ManagerError::NotFound(_) => ErrorKind::NotFound,
            ManagerError::Conflict(_) => ErrorKind::Conflict,
            ManagerError::Forbidden(_) => ErrorKind::Forbidden,
            ManagerError::Unauthorized(_) => ErrorKind::Unauthorized,
            ManagerError::Invalid(_) | ManagerError::InvalidDocument { .. } => ErrorKind::Invalid,
            ManagerError::Store(_) | ManagerError::Pki(_) => ErrorKind::Internal,
        }
    }

    /// An invalid document's problems (empty for every other error).
    pub fn fields(&self) -> Vec<crate::api::FieldProblem> {
        match self {
            ManagerError::InvalidDocument { fields, .. } => fields.clone(),
            _ => Vec::new(),
        }
    }
}

type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// Tunables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Host certificates' lifetime (default 24 h). Hosts renew at 2/3.
    pub host_cert_validity: Duration,
    /// A token's lifetime when `token create` names none (1 h).
    pub token_ttl: Duration,
    /// The longest lifetime a token may be given (24 h).
    pub max_token_ttl: Duration,
    /// A host not heard from for this long is `stale` (30 s).
    pub stale_after: Duration,
    /// Heartbeats are kept in memory; a host's `last_seen` is written to
    /// the store at most this often (60 s).
    pub persist_last_seen_every: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host_cert_validity: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(3600),
            max_token_ttl: Duration::from_secs(24 * 3600),
            stale_after: Duration::from_secs(30),
            persist_last_seen_every: Duration::from_secs(60),
        }
    }
}

/// What the manager knows about a host beyond its record: heartbeats are
/// not all written to the store.
#[derive(Debug, Clone)]
struct Presence {
    last_seen: SystemTime,
    address: Option<String>,
    /// Where its API is, as its heartbeats say.
    host_api: Option<String>,
    health: Health,
    /// When `last_seen` was last written to the store.
    persisted: Option<SystemTime>,
    /// Whether an inventory came since this manager started.
    inventory_seen: bool,
}

/// The cluster manager's state and operations.
pub struct Manager {
    store: Arc<dyn Store>,
    ca: ClusterCa,
    ca_sha256: [u8; 32],
    manager_name: String,
    clock: Arc<dyn Clock>,
    settings: Settings,
    /// The revoked serials, in memory: what the manager's own TLS verifier
    /// asks on every handshake. Updated right after each store write.
    revocations: Arc<RevocationList>,
    presence: Mutex<HashMap<String, Presence>>,
    started_at: SystemTime,
    /// The manager's own certificate's expiry (unix seconds), for status.
    manager_cert_not_after: AtomicU64,
    /// The CRL of the list at a generation: signed once per generation.
    crl: Mutex<Option<(u64, String)>>,
    /// The distributed switch's in-memory part: TLS to hosts, the rollout
    /// lock, hosts' switch states (see [`crate::dvs`]).
    pub(crate) dvs: crate::dvs::DvsState,
    /// Fan-out deployments (see [`crate::deploy`]).
    pub(crate) deploy: crate::deploy::Deployments,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("cluster_id", &self.ca.cluster_id())
            .field("manager_name", &self.manager_name)
            .field("store", &self.store.describe())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Opens the manager on `store` with the cluster CA. Records the
    /// cluster in a new store; refuses a store of another cluster. Loads
    /// the revocation list.
    pub async fn open(
        store: Arc<dyn Store>,
        ca: ClusterCa,
        manager_name: &str,
        clock: Arc<dyn Clock>,
        settings: Settings,
    ) -> Result<Arc<Manager>> {
        validate_name(manager_name)?;
        let now = unix(clock.now());
        let cluster = ClusterRecord {
            cluster_id: ca.cluster_id().to_string(),
            cluster_name: ca.cluster_name().to_string(),
            created_at: now,
        };
        if typed::create(store.as_ref(), CLUSTER_KEY, &cluster)
            .await?
            .is_none()
        {
            let existing = typed::get::<ClusterRecord>(store.as_ref(), CLUSTER_KEY)
                .await?
                .ok_or_else(|| ManagerError::Conflict("the cluster record vanished".into()))?;
            if existing.value.cluster_id != ca.cluster_id() {
                return Err(ManagerError::Conflict(format!(
                    "{} belongs to cluster {} ({}), but the CA is cluster {} ({}): wrong state directory?",
                    store.describe(),
                    existing.value.cluster_name,
                    existing.value.cluster_id,
                    ca.cluster_name(),
                    ca.cluster_id()
                )));
            }
        }
        let revocations = Arc::new(RevocationList::new());
        if let Some(r) = typed::get::<RevocationRecord>(store.as_ref(), REVOCATIONS_KEY).await? {
            revocations.replace(r.value.generation, r.value.serials.keys())?;
        }
        let ca_sha256 = cert_sha256(ca.ca_der());
        Ok(Arc::new(Manager {
            store,
            ca,
            ca_sha256,
            manager_name: manager_name.to_string(),
            clock: Arc::clone(&clock),
            settings,
            revocations,
            presence: Mutex::new(HashMap::new()),
            started_at: clock.now(),
            manager_cert_not_after: AtomicU64::new(0),
            crl: Mutex::new(None),
            dvs: crate::dvs::DvsState::default(),
            deploy: crate::deploy::Deployments::default(),
        }))
    }

    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    pub fn manager_name(&self) -> &str {
        &self.manager_name
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The in-memory revocation list: give it to the TLS server config.
    pub fn revocation_list(&self) -> Arc<RevocationList> {
        Arc::clone(&self.revocations)
    }

    /// Tells status what the manager's own certificate is good until.
    pub fn set_manager_cert_not_after(&self, t: SystemTime) {
        self.manager_cert_not_after
            .store(unix(t), Ordering::Relaxed);
    }

    pub(crate) fn now(&self) -> u64 {
        unix(self.clock.now())
    }

    /// Unix milliseconds on the manager's clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Where host `name`'s API is: its last heartbeat's report, else the
    /// stored one.
    pub(crate) async fn host_api_of(&self, name: &str) -> Result<Option<String>> {
        if let Some(a) = self
            .presence
            .lock()
            .get(name)
            .and_then(|p| p.host_api.clone())
        {
            return Ok(Some(a));
        }
        Ok(
            typed::get::<HostRecord>(self.store.as_ref(), &host_key(name))
                .await?
                .and_then(|r| r.value.host_api),
        )
    }

    /// The member hosts' names.
    pub(crate) async fn host_names(&self) -> Result<Vec<String>> {
        Ok(typed::list::<HostRecord>(self.store.as_ref(), HOSTS_PREFIX)
            .await?
            .into_iter()
            .map(|v| v.value.name)
            .collect())
    }

    // ---- tokens ----------------------------------------------------------

    pub async fn create_token(&self, req: CreateTokenRequest, by: &Peer) -> Result<CreatedToken> {
        let ttl = match req.ttl_secs {
            None => self.settings.token_ttl,
            Some(0) => return Err(ManagerError::Invalid("ttl_secs must be at least 1".into())),
            Some(s) => Duration::from_secs(s),
        };
        if ttl > self.settings.max_token_ttl {
            return Err(ManagerError::Invalid(format!(
                "a join token lives at most {}",
                humantime::format_duration(self.settings.max_token_ttl)
            )));
        }
        if let Some(h) = &req.host {
            validate_name(h).map_err(|e| ManagerError::Invalid(e.to_string()))?;
        }
        let description = req.description.unwrap_or_default();
        if description.len() > 1024 {
            return Err(ManagerError::Invalid(
                "description is over 1024 bytes".into(),
            ));
        }
        let token = JoinToken::generate(self.ca_sha256)
            .map_err(|e| ManagerError::Invalid(e.to_string()))?;
        let now = self.now();
        let rec = TokenRecord {
            id: token.id(),
            secret_sha256: token.secret_hash(),
            created_at: now,
            expires_at: now + ttl.as_secs(),
            host: req.host.clone(),
            created_by: by.name.clone(),
            description,
        };
        if typed::create(self.store.as_ref(), &token_key(&rec.id), &rec)
            .await?
            .is_none()
        {
            return Err(ManagerError::Conflict(
                "a token with this id exists (random collision); try again".into(),
            ));
        }
        info!(id = %rec.id, by = %by.name, host = ?rec.host, expires = %rfc3339(rec.expires_at), "join token created");
        Ok(CreatedToken {
            token: token.to_string(),
            id: rec.id,
            expires_at: rec.expires_at,
            host: rec.host,
            ca_sha256: token.ca_sha256_hex(),
        })
    }

    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let now = self.now();
        Ok(
            typed::list::<TokenRecord>(self.store.as_ref(), TOKENS_PREFIX)
                .await?
                .into_iter()
                .map(|v| {
                    let t = v.value;
                    TokenInfo {
                        expired: now >= t.expires_at,
                        id: t.id,
                        created_at: t.created_at,
                        expires_at: t.expires_at,
                        host: t.host,
                        created_by: t.created_by,
                        description: t.description,
                    }
                })
                .collect(),
        )
    }

    pub async fn delete_token(&self, id: &str) -> Result<()> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ManagerError::Invalid(format!("{id:?} is not a token id")));
        }
        if self.store.delete(&token_key(id)).await? {
            Ok(())
        } else {
            Err(ManagerError::NotFound(format!("no unused token {id}")))
        }
    }

    // ---- join and renewal ------------------------------------------------

    /// Checks the token, consumes it, issues the host's certificate and
    /// records the host. The token is consumed only once everything else
    /// checked out, by a compare-and-swap delete, so two joins racing on
    /// one token cannot both succeed.
    pub async fn join(&self, req: JoinRequest, address: Option<String>) -> Result<Credentials> {
        let bad_token = || ManagerError::Unauthorized("unknown, used or expired join token".into());
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|e: crate::model::TokenError| ManagerError::Unauthorized(e.to_string()))?;
        if token.ca_sha256() != self.ca_sha256 {
            return Err(ManagerError::Unauthorized(
                "this token is for another cluster: its CA hash is not this manager's CA".into(),
            ));
        }
        let name = req.name;
        validate_name(&name).map_err(|e| ManagerError::Invalid(e.to_string()))?;
        if name == self.manager_name {
            return Err(ManagerError::Conflict(format!(
                "{name} is the manager's own name; a host must have another"
            )));
        }
        let key = token_key(&token.id());
        let Some(stored) = typed::get::<TokenRecord>(self.store.as_ref(), &key).await? else {
            warn!(%name, ?address, id = %token.id(), "join refused: unknown or used token");
            return Err(bad_token());
        };
        if !token.matches(&stored.value.secret_sha256) {
            warn!(%name, ?address, id = %token.id(), "join refused: wrong token secret");
            return Err(bad_token());
        }
        let now = self.now();
        if now >= stored.value.expires_at {
            // Gone for good; ignore a race with the sweeper.
            let _ = self
                .store
                .compare_and_swap(&key, Expect::Revision(stored.revision), None)
                .await;
            warn!(%name, ?address, id = %token.id(), "join refused: token expired");
            return Err(ManagerError::Unauthorized(format!(
                "join token expired at {}",
                rfc3339(stored.value.expires_at)
            )));
        }
        if let Some(only) = &stored.value.host {
            if *only != name {
                return Err(ManagerError::Forbidden(format!(
                    "this token is for host {only}, not {name}"
                )));
            }
        }
        if self.store.get(&host_key(&name)).await?.is_some() {
            return Err(ManagerError::Conflict(format!(
                "host {name} is already a member; remove it first (`tandem host remove {name}`)"
            )));
        }
        match self
            .store
            .compare_and_swap(&key, Expect::Revision(stored.revision), None)
            .await?
        {
            CasOutcome::Swapped { .. } => {}
            CasOutcome::Conflict { .. } => return Err(bad_token()),
        }
        let issued = self
            .ca
            .issue(&name, Role::Host, self.settings.host_cert_validity)?;
        let record = HostRecord {
            name: name.clone(),
            cert: CertRef {
                serial: issued.serial.clone(),
                not_after: unix(issued.not_after),
            },
            previous_certs: Vec::new(),
            joined_at: now,
            last_seen: Some(now),
            address: address.clone(),
            host_api: None,
            health: Health::default(),
            inventory: None,
            inventory_at: None,
            joined_with: token.id(),
        };
        if typed::create(self.store.as_ref(), &host_key(&name), &record)
            .await?
            .is_none()
        {
            // Another join of the same name won the race: this certificate
            // must never be used.
            self.revoke(
                vec![(issued.serial.clone(), name.clone(), unix(issued.not_after))],
                "join lost a race",
            )
            .await?;
            return Err(ManagerError::Conflict(format!(
                "host {name} joined concurrently"
            )));
        }
        self.presence.lock().insert(
            name.clone(),
            Presence {
                last_seen: self.clock.now(),
                address: address.clone(),
                host_api: None,
                health: Health::default(),
                persisted: Some(self.clock.now()),
                inventory_seen: false,
            },
        );
        info!(host = %name, ?address, serial = %issued.serial, token = %token.id(), "host joined");
        Ok(self.credentials(&issued))
    }

    fn credentials(&self, issued: &tandem_pki::IssuedCert) -> Credentials {
        let not_after = unix(issued.not_after);
        let validity = self.settings.host_cert_validity.as_secs();
        let issued_at = not_after.saturating_sub(validity);
        Credentials {
            name: issued.name.clone(),
            cluster_id: self.ca.cluster_id().to_string(),
            cluster_name: self.ca.cluster_name().to_string(),
            manager_name: self.manager_name.clone(),
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone(),
            ca_pem: self.ca.ca_pem().to_string(),
            serial: issued.serial.clone(),
            not_after,
            renew_after: issued_at + validity * 2 / 3,
        }
    }

    /// The host record of an authenticated host peer, or Forbidden: the
    /// certificate must be one the manager issued to a current member, not
    /// revoked (checked again here for connections that outlive a
    /// revocation) and not expired.
    pub async fn member(&self, peer: &Peer) -> Result<typed::Versioned<HostRecord>> {
        if peer.role != Role::Host {
            return Err(ManagerError::Forbidden(format!(
                "{} has role {}; this needs a host certificate",
                peer.name, peer.role
            )));
        }
        if tandem_pki::Revocations::is_revoked(self.revocations.as_ref(), &peer.serial) {
            return Err(ManagerError::Forbidden(format!(
                "certificate {} of {} is revoked",
                peer.serial, peer.name
            )));
        }
        if peer.not_after <= SystemTime::now() {
            return Err(ManagerError::Forbidden(format!(
                "certificate {} of {} has expired",
                peer.serial, peer.name
            )));
        }
        let rec = typed::get::<HostRecord>(self.store.as_ref(), &host_key(&peer.name))
            .await?
            .ok_or_else(|| {
                ManagerError::Forbidden(format!("{} is not a member of this cluster", peer.name))
            })?;
        if !rec.value.owns_serial(&peer.serial) {
            return Err(ManagerError::Forbidden(format!(
                "certificate {} was not issued to member {} (it re-joined since?)",
                peer.serial, peer.name
            )));
        }
        Ok(rec)
    }

    /// A new certificate for a member host. The one it called with stays
    /// valid until it expires (remembered, so `host remove` revokes it).
    pub async fn renew(&self, peer: &Peer) -> Result<Credentials> {
        self.member(peer).await?;
        let issued = self
            .ca
            .issue(&peer.name, Role::Host, self.settings.host_cert_validity)?;
        let now = self.now();
        let new = CertRef {
            serial: issued.serial.clone(),
            not_after: unix(issued.not_after),
        };
        let updated = typed::update::<HostRecord, ManagerError, _>(
            self.store.as_ref(),
            &host_key(&peer.name),
            |cur| {
                let Some(mut rec) = cur else {
                    return Ok(Change::Keep);
                };
                let old = std::mem::replace(&mut rec.cert, new.clone());
                rec.previous_certs.push(old);
                rec.previous_certs.retain(|c| c.not_after > now);
                Ok(Change::Put(rec))
            },
        )
        .await?;
        if updated.is_none() {
            self.revoke(
                vec![(issued.serial.clone(), peer.name.clone(), new.not_after)],
                "renewal raced with host remove",
            )
            .await?;
            return Err(ManagerError::Forbidden(format!(
                "{} was removed from the cluster",
                peer.name
            )));
        }
        info!(host = %peer.name, old = %peer.serial, new = %issued.serial, "host certificate renewed");
        Ok(self.credentials(&issued))
    }

    // ---- host reports ----------------------------------------------------

    pub async fn heartbeat(
        &self,
        peer: &Peer,
        req: HeartbeatRequest,
        address: Option<String>,
    ) -> Result<HeartbeatResponse> {
        let rec = self.member(peer).await?;
        let now = self.clock.now();
        let (persist, inventory_seen) = {
            let mut presence = self.presence.lock();
            let p = presence.entry(peer.name.clone()).or_insert(Presence {
                last_seen: now,
                address: None,
                host_api: None,
                health: rec.value.health.clone(),
                persisted: None,
                inventory_seen: false,
            });
            let changed =
                p.health != req.health || p.address != address || p.host_api != req.host_api;
            p.last_seen = now;
            p.address = address.clone();
            p.host_api = req.host_api.clone();
            p.health = req.health.clone();
            let due = match p.persisted {
                None => true,
                Some(t) => {
                    now.duration_since(t).unwrap_or_default()
                        >= self.settings.persist_last_seen_every
                }
            };
            let persist = changed
                || due
                || rec.value.health != req.health
                || rec.value.host_api != req.host_api;
            if persist {
                p.persisted = Some(now);
            }
            (persist, p.inventory_seen)
        };
        if persist {
            let secs = unix(now);
            typed::update::<HostRecord, ManagerError, _>(
                self.store.as_ref(),
                &host_key(&peer.name),
                |cur| {
                    let Some(mut r) = cur else {
                        return Ok(Change::Keep);
                    };
                    r.last_seen = Some(secs);
                    r.health = req.health.clone();
                    r.address = address.clone();
                    r.host_api = req.host_api.clone();
                    Ok(Change::Put(r))
                },
            )
            .await?;
        }
        if let Some(status) = &req.switch {
            self.observe_switch(&peer.name, status).await?;
        }
        Ok(HeartbeatResponse {
            revocation_generation: self.revocations.generation(),
            manager_time: unix(now),
            inventory_wanted: !inventory_seen,
        })
    }

    pub async fn report_inventory(
        &self,
        peer: &Peer,
        inventory: Inventory,
        address: Option<String>,
    ) -> Result<()> {
        check_inventory(&inventory)?;
        self.member(peer).await?;
        let now = self.clock.now();
        let secs = unix(now);
        typed::update::<HostRecord, ManagerError, _>(
            self.store.as_ref(),
            &host_key(&peer.name),
            |cur| {
                let Some(mut r) = cur else {
                    return Ok(Change::Keep);
                };
                r.inventory = Some(inventory.clone());
                r.inventory_at = Some(secs);
                r.last_seen = Some(secs);
                r.address = address.clone();
                Ok(Change::Put(r))
            },
        )
        .await?;
        let mut presence = self.presence.lock();
        let p = presence.entry(peer.name.clone()).or_insert(Presence {
            last_seen: now,
            address: address.clone(),
            host_api: None,
            health: Health::default(),
            persisted: Some(now),
            inventory_seen: true,
        });
        p.last_seen = now;
        p.address = address;
        p.persisted = Some(now);
        p.inventory_seen = true;
        Ok(())
    }

    pub async fn host_authority(&self, peer: &Peer) -> Result<HostAuthority> {
        self.member(peer).await?;
        let vms = self
            .vms()
            .await?
            .into_iter()
            .filter(|v| v.involves(&peer.name))
            .collect();
        Ok(HostAuthority {
            host: peer.name.clone(),
            vms,
        })
    }

    // ---- hosts (operators) -----------------------------------------------

    fn view(&self, rec: HostRecord) -> HostView {
        let mut rec = rec;
        let presence = self.presence.lock().get(&rec.name).cloned();
        if let Some(p) = presence {
            let seen = unix(p.last_seen);
            if rec.last_seen.is_none_or(|s| s < seen) {
                rec.last_seen = Some(seen);
                rec.health = p.health;
                if p.address.is_some() {
                    rec.address = p.address;
                }
                if p.host_api.is_some() {
                    rec.host_api = p.host_api;
                }
            }
        }
        let connection = match rec.last_seen {
            None => Connection::Never,
            Some(s) => {
                let age = self.now().saturating_sub(s);
                if age <= self.settings.stale_after.as_secs() {
                    Connection::Online
                } else {
                    Connection::Stale
                }
            }
        };
        HostView {
            connection,
            record: rec,
        }
    }

    pub async fn hosts(&self) -> Result<Vec<HostView>> {
        Ok(typed::list::<HostRecord>(self.store.as_ref(), HOSTS_PREFIX)
            .await?
            .into_iter()
            .map(|v| self.view(v.value))
            .collect())
    }

    pub async fn host(&self, name: &str) -> Result<HostView> {
        validate_name(name).map_err(|e| ManagerError::Invalid(e.to_string()))?;
        typed::get::<HostRecord>(self.store.as_ref(), &host_key(name))
            .await?
            .map(|v| self.view(v.value))
            .ok_or_else(|| ManagerError::NotFound(format!("no host {name}")))
    }

    /// Revokes every certificate the host holds that has not expired, at
    /// once (the manager's own TLS refuses them from the next handshake,
    /// and its request check from the next request), then removes it.
    pub async fn remove_host(&self, name: &str, by: &Peer) -> Result<RemovedHost> {
        validate_name(name).map_err(|e| ManagerError::Invalid(e.to_string()))?;
        let key = host_key(name);
        let mut revoked = Vec::new();
        for _ in 0..typed::UPDATE_TRIES {
            let Some(rec) = typed::get::<HostRecord>(self.store.as_ref(), &key).await? else {
                if revoked.is_empty() {
                    return Err(ManagerError::NotFound(format!("no host {name}")));
                }
                break;
            };
            let now = self.now();
            let certs: Vec<_> = rec
                .value
                .live_serials(now)
                .into_iter()
                .map(|c| (c.serial, name.to_string(), c.not_after))
                .collect();
            for (s, _, _) in &certs {
                if !revoked.contains(s) {
                    revoked.push(s.clone());
                }
            }
            let generation = self
                .revoke(certs, &format!("host removed by {}", by.name))
                .await?;
            match self
                .store
                .compare_and_swap(&key, Expect::Revision(rec.revision), None)
                .await?
            {
                CasOutcome::Swapped { .. } => {
                    self.presence.lock().remove(name);
                    let vms = self
                        .vms()
                        .await?
                        .into_iter()
                        .filter(|v| v.involves(name))
                        .map(|v| v.uuid)
                        .collect();
                    info!(host = %name, by = %by.name, ?revoked, "host removed; its certificates are revoked");
                    return Ok(RemovedHost {
                        name: name.to_string(),
                        revoked,
                        revocation_generation: generation,
                        vms,
                    });
                }
                // Renewed in between: revoke the new certificate too.
                CasOutcome::Conflict { .. } => continue,
            }
        }
        Err(StoreError::Contended {
            key,
            tries: typed::UPDATE_TRIES,
        }
        .into())
    }

    // ---- revocation ------------------------------------------------------

    /// Adds `certs` (serial, name, not_after) to the revocation record and
    /// then to the in-memory list. Returns the list's generation.
    async fn revoke(&self, certs: Vec<(String, String, u64)>, reason: &str) -> Result<u64> {
        let now = self.now();
        let mut normalized = Vec::with_capacity(certs.len());
        for (serial, name, not_after) in certs {
            let s = normalize_serial(&serial)
                .ok_or_else(|| ManagerError::Invalid(format!("{serial:?} is not a hex serial")))?;
            normalized.push((s, name, not_after));
        }
        let after = typed::update::<RevocationRecord, ManagerError, _>(
            self.store.as_ref(),
            REVOCATIONS_KEY,
            |cur| {
                let mut rec = cur.unwrap_or_default();
                let mut changed = false;
                for (serial, name, not_after) in &normalized {
                    if !rec.serials.contains_key(serial) {
                        rec.serials.insert(
                            serial.clone(),
                            RevokedCert {
                                name: name.clone(),
                                revoked_at: now,
                                not_after: *not_after,
                                reason: reason.to_string(),
                            },
                        );
                        changed = true;
                    }
                }
                if !changed {
                    return Ok(Change::Keep);
                }
                rec.generation += 1;
                Ok(Change::Put(rec))
            },
        )
        .await?;
        let Some(rec) = after else {
            return Ok(self.revocations.generation());
        };
        self.revocations
            .replace(rec.value.generation, rec.value.serials.keys())?;
        Ok(rec.value.generation)
    }

    /// Revokes any serial (an operator certificate, say).
    pub async fn revoke_serial(&self, req: RevokeRequest, by: &Peer) -> Result<Revocations> {
        let reason = if req.reason.is_empty() {
            format!("revoked by {}", by.name)
        } else {
            format!("{} (by {})", req.reason, by.name)
        };
        self.revoke(vec![(req.serial, req.name, req.not_after)], &reason)
            .await?;
        info!(by = %by.name, "certificate revoked");
        Ok(self.revocation_snapshot())
    }

    pub fn revocation_snapshot(&self) -> Revocations {
        // Read the serials and generation together: the list may change in
        // between, so retry until both come from the same generation.
        let (generation, serials) = loop {
            let g = self.revocations.generation();
            let s = self.revocations.serials();
            if self.revocations.generation() == g {
                break (g, s);
            }
        };
        let crl_pem = {
            let mut cache = self.crl.lock();
            match &*cache {
                Some((g, pem)) if *g == generation => Some(pem.clone()),
                _ => match self.ca.crl_pem(generation, &serials) {
                    Ok(pem) => {
                        *cache = Some((generation, pem.clone()));
                        Some(pem)
                    }
                    Err(e) => {
                        warn!("signing the CRL at generation {generation}: {e}");
                        None
                    }
                },
            }
        };
        Revocations {
            generation,
            serials,
            crl_pem,
        }
    }

    // ---- VM authority ----------------------------------------------------

    async fn require_host(&self, name: &str, what: &str) -> Result<()> {
        validate_name(name).map_err(|e| ManagerError::Invalid(format!("{what}: {e}")))?;
        if self.store.get(&host_key(name)).await?.is_none() {
            return Err(ManagerError::Invalid(format!(
                "{what} {name} is not a member host"
            )));
        }
        Ok(())
    }

    async fn check_placement(&self, primary: &str, backup: Option<&str>) -> Result<()> {
        self.require_host(primary, "primary").await?;
        if let Some(b) = backup {
            if b == primary {
                return Err(ManagerError::Invalid(
                    "the backup must be another host than the primary".into(),
                ));
            }
            self.require_host(b, "backup").await?;
        }
        Ok(())
    }

    pub async fn create_vm(&self, req: CreateVmRequest, by: &Peer) -> Result<AuthorityRecord> {
        if req.name.is_empty() || req.name.len() > 128 {
            return Err(ManagerError::Invalid("a VM name is 1 to 128 bytes".into()));
        }
        self.check_placement(&req.primary, req.backup.as_deref())
            .await?;
        let rec = AuthorityRecord {
            uuid: req.uuid,
            name: req.name,
            primary: req.primary,
            backup: req.backup,
            generation: 1,
            updated_at: self.now(),
            updated_by: by.name.clone(),
        };
        match typed::create(self.store.as_ref(), &vm_key(&rec.uuid), &rec).await? {
            Some(_) => {
                info!(vm = %rec.uuid, name = %rec.name, primary = %rec.primary, backup = ?rec.backup, "VM authority created");
                Ok(rec)
            }
            None => Err(ManagerError::Conflict(format!(
                "VM {} already has an authority record",
                rec.uuid
            ))),
        }
    }

    /// Moves a VM's primary and/or backup, if the record is still at
    /// `expected_generation`; the generation goes up by one.
    pub async fn handover(
        &self,
        uuid: Uuid,
        req: HandoverRequest,
        by: &Peer,
    ) -> Result<AuthorityRecord> {
        self.check_placement(&req.primary, req.backup.as_deref())
            .await?;
        let now = self.now();
        let after = typed::update::<AuthorityRecord, ManagerError, _>(
            self.store.as_ref(),
            &vm_key(&uuid),
            |cur| {
                let Some(mut rec) = cur else {
                    return Err(ManagerError::NotFound(format!("no VM {uuid}")));
                };
                if rec.generation != req.expected_generation {
                    return Err(ManagerError::Conflict(format!(
                        "VM {uuid} is at generation {}, not {}: someone handed it over first",
                        rec.generation, req.expected_generation
                    )));
                }
                rec.primary = req.primary.clone();
                rec.backup = req.backup.clone();
                rec.generation += 1;
                rec.updated_at = now;
                rec.updated_by = by.name.clone();
                Ok(Change::Put(rec))
            },
        )
        .await?
        .ok_or_else(|| ManagerError::NotFound(format!("no VM {uuid}")))?;
        info!(vm = %uuid, generation = after.value.generation, primary = %after.value.primary, backup = ?after.value.backup, by = %by.name, "VM handed over");
        Ok(after.value)
    }

    /// `POST /v1/host/vms`: the calling host records itself as the VM's
    /// primary with `req.backup`. A new record starts at generation 1; a
    /// record the caller is already primary of gets the new backup, one
    /// generation up (so the old backup's cache stops admitting it), or
    /// stays as it is. A VM recorded on another host is never taken this
    /// way (409 naming it): moving it is a handover or a takeover.
    pub async fn register_primary(
        &self,
        peer: &Peer,
        req: RegisterPrimaryRequest,
    ) -> Result<AuthorityRecord> {
        self.member(peer).await?;
        if req.name.is_empty() || req.name.len() > 128 {
            return Err(ManagerError::Invalid("a VM name is 1 to 128 bytes".into()));
        }
        let me = peer.name.as_str();
        self.check_placement(me, req.backup.as_deref()).await?;
        let uuid = req.uuid;
        let now = self.now();
        let mut what = "unchanged";
        let after = typed::update::<AuthorityRecord, ManagerError, _>(
            self.store.as_ref(),
            &vm_key(&uuid),
            |cur| match cur {
                None => {
                    what = "created";
                    Ok(Change::Put(AuthorityRecord {
                        uuid,
                        name: req.name.clone(),
                        primary: me.to_string(),
                        backup: req.backup.clone(),
                        generation: 1,
                        updated_at: now,
                        updated_by: me.to_string(),
                    }))
                }
                Some(rec) if rec.primary != me => Err(ManagerError::Conflict(format!(
                    "VM {uuid} (`{}`) is recorded on host {} at generation {}: it is handed over by an operator (tandem cluster vm handover) or taken over by its backup, never claimed",
                    rec.name, rec.primary, rec.generation
                ))),
                Some(rec) if rec.backup == req.backup => {
                    what = "unchanged";
                    Ok(Change::Keep)
                }
                Some(mut rec) => {
                    what = "backup changed";
                    rec.backup = req.backup.clone();
                    rec.generation += 1;
                    rec.updated_at = now;
                    rec.updated_by = me.to_string();
                    Ok(Change::Put(rec))
                }
            },
        )
        .await?
        .ok_or_else(|| ManagerError::NotFound(format!("no VM {uuid}")))?;
        if what != "unchanged" {
            info!(vm = %uuid, name = %after.value.name, primary = %after.value.primary, backup = ?after.value.backup, generation = after.value.generation, "VM authority {what} by its primary");
        }
        Ok(after.value)
    }

    /// `POST /v1/host/vms/{uuid}/takeover`: the record's backup, having
    /// resumed the VM, becomes its primary with no backup, one generation
    /// up, if the record is still at `expected_generation`. Sent again
    /// after a lost answer, it finds its own takeover and answers it.
    pub async fn record_takeover(
        &self,
        peer: &Peer,
        uuid: Uuid,
        req: TakeoverRequest,
    ) -> Result<AuthorityRecord> {
        self.member(peer).await?;
        let me = peer.name.as_str();
        let now = self.now();
        let mut done_before = false;
        let after = typed::update::<AuthorityRecord, ManagerError, _>(
            self.store.as_ref(),
            &vm_key(&uuid),
            |cur| {
                let Some(mut rec) = cur else {
                    return Err(ManagerError::NotFound(format!("no VM {uuid}")));
                };
                if rec.primary == me
                    && rec.backup.is_none()
                    && rec.generation == req.expected_generation.saturating_add(1)
                    && rec.updated_by == me
                {
                    done_before = true;
                    return Ok(Change::Keep);
                }
                if rec.backup.as_deref() != Some(me) {
                    return Err(ManagerError::Forbidden(format!(
                        "{me} is not the recorded backup of VM {uuid} (`{}`): primary {}, backup {}, generation {}",
                        rec.name,
                        rec.primary,
                        rec.backup.as_deref().unwrap_or("none"),
                        rec.generation
                    )));
                }
                if rec.generation != req.expected_generation {
                    return Err(ManagerError::Conflict(format!(
                        "VM {uuid} is at generation {}, not {}: the record moved on (primary {})",
                        rec.generation, req.expected_generation, rec.primary
                    )));
                }
                rec.primary = me.to_string();
                rec.backup = None;
                rec.generation += 1;
                rec.updated_at = now;
                rec.updated_by = me.to_string();
                Ok(Change::Put(rec))
            },
        )
        .await?
        .ok_or_else(|| ManagerError::NotFound(format!("no VM {uuid}")))?;
        if !done_before {
            warn!(vm = %uuid, generation = after.value.generation, primary = %me, "VM taken over by its backup");
        }
        Ok(after.value)
    }

    pub async fn delete_vm(&self, uuid: Uuid, generation: u64) -> Result<()> {
        let mut found = false;
        typed::update::<AuthorityRecord, ManagerError, _>(
            self.store.as_ref(),
            &vm_key(&uuid),
            |cur| {
                let Some(rec) = cur else {
                    return Err(ManagerError::NotFound(format!("no VM {uuid}")));
                };
                if rec.generation != generation {
                    return Err(ManagerError::Conflict(format!(
                        "VM {uuid} is at generation {}, not {generation}",
                        rec.generation
                    )));
                }
                found = true;
                Ok(Change::Delete)
            },
        )
        .await?;
        if found {
            info!(vm = %uuid, "VM authority deleted");
        }
        Ok(())
    }

    pub async fn vm(&self, uuid: Uuid) -> Result<AuthorityRecord> {
        typed::get::<AuthorityRecord>(self.store.as_ref(), &vm_key(&uuid))
            .await?
            .map(|v| v.value)
            .ok_or_else(|| ManagerError::NotFound(format!("no VM {uuid}")))
    }

    pub async fn vms(&self) -> Result<Vec<AuthorityRecord>> {
        Ok(
            typed::list::<AuthorityRecord>(self.store.as_ref(), VMS_PREFIX)
                .await?
                .into_iter()
                .map(|v| v.value)
                .collect(),
        )
    }

    // ---- housekeeping, status, dump --------------------------------------

    /// Deletes expired tokens and prunes revocations of long-expired
    /// certificates. Run periodically.
    pub async fn sweep(&self) -> Result<()> {
        let now = self.now();
        for t in typed::list::<TokenRecord>(self.store.as_ref(), TOKENS_PREFIX).await? {
            if now >= t.value.expires_at {
                let _ = self
                    .store
                    .compare_and_swap(&token_key(&t.value.id), Expect::Revision(t.revision), None)
                    .await?;
                info!(id = %t.value.id, "expired join token removed");
            }
        }
        let after = typed::update::<RevocationRecord, ManagerError, _>(
            self.store.as_ref(),
            REVOCATIONS_KEY,
            |cur| {
                let Some(mut rec) = cur else {
                    return Ok(Change::Keep);
                };
                let gone = rec.prunable(now);
                if gone.is_empty() {
                    return Ok(Change::Keep);
                }
                for s in gone {
                    rec.serials.remove(&s);
                }
                rec.generation += 1;
                Ok(Change::Put(rec))
            },
        )
        .await?;
        if let Some(rec) = after {
            self.revocations
                .replace(rec.value.generation, rec.value.serials.keys())?;
        }
        Ok(())
    }

    pub async fn status(&self) -> Result<ClusterStatus> {
        let hosts = self.hosts().await?;
        let now = self.now();
        Ok(ClusterStatus {
            cluster_id: self.ca.cluster_id().to_string(),
            cluster_name: self.ca.cluster_name().to_string(),
            manager_name: self.manager_name.clone(),
            manager_version: env!("CARGO_PKG_VERSION").to_string(),
            manager_cert_not_after: self.manager_cert_not_after.load(Ordering::Relaxed),
            manager_started_at: unix(self.started_at),
            manager_time: now,
            store: self.store.describe(),
            store_revision: self.store.revision().await?,
            hosts_online: hosts
                .iter()
                .filter(|h| h.connection == Connection::Online)
                .count(),
            hosts: hosts.len(),
            vms: self.store.list(VMS_PREFIX).await?.len(),
            tokens: self.store.list(TOKENS_PREFIX).await?.len(),
            revocation_generation: self.revocations.generation(),
            revoked: self.revocations.len(),
            host_cert_validity_secs: self.settings.host_cert_validity.as_secs(),
        })
    }

    pub async fn dump(&self) -> Result<Dump> {
        dump_store(self.store.as_ref(), self.ca.cluster_id(), self.now()).await
    }
}

/// Every record of `store` as JSON.
pub async fn dump_store(store: &dyn Store, cluster_id: &str, now: u64) -> Result<Dump> {
    let revision = store.revision().await?;
    let mut entries = Vec::new();
    for e in store.list("").await? {
        let value = serde_json::from_slice(&e.value).map_err(|err| StoreError::Decode {
            key: e.key.clone(),
            detail: err.to_string(),
        })?;
        entries.push(DumpEntry { key: e.key, value });
    }
    Ok(Dump {
        format: DUMP_FORMAT.to_string(),
        cluster_id: cluster_id.to_string(),
        taken_at: now,
        revision,
        entries,
    })
}

/// Writes a dump into an empty store. Refuses a dump of another format.
pub async fn load_dump(store: &dyn Store, dump: &Dump) -> Result<usize> {
    if dump.format != DUMP_FORMAT {
        return Err(ManagerError::Invalid(format!(
            "not a manager dump: format {:?}, expected {DUMP_FORMAT:?}",
            dump.format
        )));
    }
    if !store.list("").await?.is_empty() {
        return Err(ManagerError::Conflict(format!(
            "{} is not empty; restore into a new state directory",
            store.describe()
        )));
    }
    for e in &dump.entries {
        let bytes = serde_json::to_vec(&e.value).map_err(|err| StoreError::Decode {
            key: e.key.clone(),
            detail: err.to_string(),
        })?;
        store.put(&e.key, bytes).await?;
    }
    Ok(dump.entries.len())
}

/// Bounds on what a host may report, so one host cannot bloat the store.
fn check_inventory(inv: &Inventory) -> Result<()> {
    const MAX_ITEMS: usize = 1024;
    let too_many =
        |what: &str| ManagerError::Invalid(format!("inventory: more than {MAX_ITEMS} {what}"));
    if inv.datastores.len() > MAX_ITEMS {
        return Err(too_many("datastores"));
    }
    if inv.port_groups.len() > MAX_ITEMS {
        return Err(too_many("port groups"));
    }
    if inv.uplinks.len() > MAX_ITEMS {
        return Err(too_many("uplinks"));
    }
    if inv.qemu.machine_types.len() > MAX_ITEMS {
        return Err(too_many("machine types"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::RedbStore;

    struct Fixture {
        _dir: tempfile::TempDir,
        clock: ManualClock,
        m: Arc<Manager>,
        op: Peer,
    }

    fn peer(name: &str, role: Role, serial: &str) -> Peer {
        Peer {
            name: name.into(),
            role,
            cluster_id: String::new(),
            serial: serial.into(),
            not_after: SystemTime::now() + Duration::from_secs(3600),
        }
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(&dir.path().join("ca"), "test").unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db")).unwrap());
        let clock = ManualClock::starting_now();
        let m = Manager::open(
            store,
            ca,
            "manager",
            Arc::new(clock.clone()),
            Settings::default(),
        )
        .await
        .unwrap();
        Fixture {
            _dir: dir,
            clock,
            m,
            op: peer("admin", Role::Operator, "01"),
        }
    }

    async fn token(f: &Fixture, host: Option<&str>) -> String {
        f.m.create_token(
            CreateTokenRequest {
                host: host.map(String::from),
                ..Default::default()
            },
            &f.op,
        )
        .await
        .unwrap()
        .token
    }

    async fn join(f: &Fixture, token: &str, name: &str) -> Result<Credentials> {
        f.m.join(
            JoinRequest {
                token: token.into(),
                name: name.into(),
            },
            None,
        )
        .await
    }

    fn host_peer(c: &Credentials) -> Peer {
        peer(&c.name, Role::Host, &c.serial)
    }

    #[tokio::test]
    async fn a_token_joins_once() {
        let f = fixture().await;
        let t = token(&f, None).await;
        assert_eq!(f.m.tokens().await.unwrap().len(), 1);
        let c = join(&f, &t, "host-a").await.unwrap();
        assert_eq!(c.name, "host-a");
        assert_eq!(c.manager_name, "manager");
        assert!(c.renew_after < c.not_after);
        // Used up: the second join with it fails, for any name.
        let again = join(&f, &t, "host-b").await.unwrap_err();
        assert_eq!(again.kind(), ErrorKind::Unauthorized, "{again}");
        assert!(f.m.tokens().await.unwrap().is_empty());
        let h = f.m.host("host-a").await.unwrap();
        assert_eq!(h.record.cert.serial, c.serial);
        assert_eq!(h.connection, Connection::Online);
    }

    #[tokio::test]
    async fn tokens_expire_on_the_injected_clock() {
        let f = fixture().await;
        let t = token(&f, None).await;
        f.clock.advance(Duration::from_secs(3599));
        assert!(!f.m.tokens().await.unwrap()[0].expired);
        f.clock.advance(Duration::from_secs(1));
        assert!(f.m.tokens().await.unwrap()[0].expired);
        let e = join(&f, &t, "host-a").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        assert!(e.to_string().contains("expired"), "{e}");
        // The expired token is gone, and the sweeper removes others.
        assert!(f.m.tokens().await.unwrap().is_empty());
        let _t2 = token(&f, None).await;
        f.clock.advance(Duration::from_secs(7200));
        f.m.sweep().await.unwrap();
        assert!(f.m.tokens().await.unwrap().is_empty());
        assert!(f.m.host("host-a").await.is_err());
    }

    #[tokio::test]
    async fn bad_tokens_do_not_join_and_do_not_use_up_good_ones() {
        let f = fixture().await;
        let t = token(&f, Some("host-a")).await;
        // Malformed; right id with a wrong secret; another cluster's CA hash.
        assert_eq!(
            join(&f, "nonsense", "host-a").await.unwrap_err().kind(),
            ErrorKind::Unauthorized
        );
        let parts: Vec<&str> = t.split('.').collect();
        let wrong_secret = format!("{}.{}.{}.{}", parts[0], parts[1], "0".repeat(32), parts[3]);
        assert_eq!(
            join(&f, &wrong_secret, "host-a").await.unwrap_err().kind(),
            ErrorKind::Unauthorized
        );
        let wrong_ca = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], "0".repeat(64));
        let e = join(&f, &wrong_ca, "host-a").await.unwrap_err();
        assert!(e.to_string().contains("another cluster"), "{e}");
        // Bound to host-a: another name is refused, the token survives.
        assert_eq!(
            join(&f, &t, "host-b").await.unwrap_err().kind(),
            ErrorKind::Forbidden
        );
        // The manager's own name and invalid names are refused.
        assert_eq!(
            join(&f, &token(&f, None).await, "manager")
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            join(&f, &t, "Not A Name").await.unwrap_err().kind(),
            ErrorKind::Invalid
        );
        join(&f, &t, "host-a").await.unwrap();
        // A member's name cannot be joined again without removing it.
        let e = join(&f, &token(&f, None).await, "host-a")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
    }

    #[tokio::test]
    async fn token_ttl_bounds() {
        let f = fixture().await;
        for bad in [0, 86_401] {
            let e =
                f.m.create_token(
                    CreateTokenRequest {
                        ttl_secs: Some(bad),
                        ..Default::default()
                    },
                    &f.op,
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid);
        }
        let t =
            f.m.create_token(
                CreateTokenRequest {
                    ttl_secs: Some(60),
                    ..Default::default()
                },
                &f.op,
            )
            .await
            .unwrap();
        assert_eq!(t.expires_at, unix(f.clock.now()) + 60);
        f.m.delete_token(&t.id).await.unwrap();
        assert_eq!(
            f.m.delete_token(&t.id).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn authority_create_and_handover_bump_the_generation_by_cas() {
        let f = fixture().await;
        for h in ["host-a", "host-b", "host-c"] {
            join(&f, &token(&f, None).await, h).await.unwrap();
        }
        let uuid = Uuid::new_v4();
        let req = CreateVmRequest {
            uuid,
            name: "web".into(),
            primary: "host-a".into(),
            backup: Some("host-b".into()),
        };
        let r = f.m.create_vm(req.clone(), &f.op).await.unwrap();
        assert_eq!(r.generation, 1);
        assert_eq!(
            f.m.create_vm(req, &f.op).await.unwrap_err().kind(),
            ErrorKind::Conflict
        );
        // Failover: the backup becomes primary.
        let r2 =
            f.m.handover(
                uuid,
                HandoverRequest {
                    expected_generation: 1,
                    primary: "host-b".into(),
                    backup: Some("host-c".into()),
                },
                &f.op,
            )
            .await
            .unwrap();
        assert_eq!((r2.generation, r2.primary.as_str()), (2, "host-b"));
        // A handover that names the old generation loses, and changes nothing.
        let stale =
            f.m.handover(
                uuid,
                HandoverRequest {
                    expected_generation: 1,
                    primary: "host-c".into(),
                    backup: None,
                },
                &f.op,
            )
            .await
            .unwrap_err();
        assert_eq!(stale.kind(), ErrorKind::Conflict);
        assert_eq!(f.m.vm(uuid).await.unwrap(), r2);
        // Two racing handovers from generation 2: exactly one wins.
        let (a, b) = tokio::join!(
            f.m.handover(
                uuid,
                HandoverRequest {
                    expected_generation: 2,
                    primary: "host-a".into(),
                    backup: Some("host-b".into()),
                },
                &f.op,
            ),
            f.m.handover(
                uuid,
                HandoverRequest {
                    expected_generation: 2,
                    primary: "host-c".into(),
                    backup: Some("host-b".into()),
                },
                &f.op,
            )
        );
        assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} {b:?}");
        assert_eq!(f.m.vm(uuid).await.unwrap().generation, 3);
        // Placement is checked: members only, backup != primary.
        for (p, b) in [("host-x", None), ("host-a", Some("host-a"))] {
            let e =
                f.m.handover(
                    uuid,
                    HandoverRequest {
                        expected_generation: 3,
                        primary: p.into(),
                        backup: b.map(String::from),
                    },
                    &f.op,
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid);
        }
        // The hosts see their records.
        let c = f.m.host("host-b").await.unwrap().record.cert.serial;
        let seen =
            f.m.host_authority(&peer("host-b", Role::Host, &c))
                .await
                .unwrap();
        assert_eq!(seen.vms.len(), 1);
        assert_eq!(
            f.m.delete_vm(uuid, 2).await.unwrap_err().kind(),
            ErrorKind::Conflict
        );
        f.m.delete_vm(uuid, 3).await.unwrap();
        assert_eq!(f.m.vm(uuid).await.unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_host_registers_itself_as_primary_and_its_backup_takes_over() {
        let f = fixture().await;
        let mut hosts = HashMap::new();
        for h in ["host-a", "host-b", "host-c"] {
            let c = join(&f, &token(&f, None).await, h).await.unwrap();
            hosts.insert(h, host_peer(&c));
        }
        let (a, b, c) = (&hosts["host-a"], &hosts["host-b"], &hosts["host-c"]);
        let uuid = Uuid::new_v4();
        let reg = |backup: Option<&str>| RegisterPrimaryRequest {
            uuid,
            name: "web".into(),
            backup: backup.map(String::from),
        };
        let r = f.m.register_primary(a, reg(Some("host-b"))).await.unwrap();
        assert_eq!(
            (r.primary.as_str(), r.backup.as_deref(), r.generation),
            ("host-a", Some("host-b"), 1)
        );
        assert_eq!(r.updated_by, "host-a");
        // Again with the same backup: unchanged (protect after a restart).
        assert_eq!(
            f.m.register_primary(a, reg(Some("host-b"))).await.unwrap(),
            r
        );
        // Host B cannot take A's VM by registering it.
        let e =
            f.m.register_primary(b, reg(Some("host-c")))
                .await
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(
            e.to_string().contains("host-a") && e.to_string().contains("generation 1"),
            "{e}"
        );
        assert_eq!(f.m.vm(uuid).await.unwrap(), r);
        // Placement: a member backup, not the primary itself.
        for bad in ["host-x", "host-a"] {
            let e = f.m.register_primary(a, reg(Some(bad))).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{bad}: {e}");
        }
        // An operator certificate is no host.
        let e =
            f.m.register_primary(&f.op, reg(Some("host-b")))
                .await
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Forbidden);
        // A new backup: one generation up, so the old backup stops admitting.
        let r2 = f.m.register_primary(a, reg(Some("host-c"))).await.unwrap();
        assert_eq!((r2.backup.as_deref(), r2.generation), (Some("host-c"), 2));

        // Only the recorded backup (now C) can take over.
        let tk = |g| TakeoverRequest {
            expected_generation: g,
        };
        for who in [b, a] {
            let e = f.m.record_takeover(who, uuid, tk(2)).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Forbidden, "{}: {e}", who.name);
        }
        // At a stale generation: refused, nothing changes.
        let e = f.m.record_takeover(c, uuid, tk(1)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(f.m.vm(uuid).await.unwrap(), r2);
        let t = f.m.record_takeover(c, uuid, tk(2)).await.unwrap();
        assert_eq!(
            (t.primary.as_str(), t.backup.as_deref(), t.generation),
            ("host-c", None, 3)
        );
        // Sent again (its answer was lost): the same record, no new generation.
        assert_eq!(f.m.record_takeover(c, uuid, tk(2)).await.unwrap(), t);
        // The old primary can neither register it back nor take it over.
        assert_eq!(
            f.m.register_primary(a, reg(Some("host-b")))
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            f.m.record_takeover(a, uuid, tk(3))
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Forbidden
        );
        // The new primary protects it onward.
        let r4 = f.m.register_primary(c, reg(Some("host-a"))).await.unwrap();
        assert_eq!((r4.primary.as_str(), r4.generation), ("host-c", 4));
        assert_eq!(
            f.m.record_takeover(c, Uuid::new_v4(), tk(1))
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn two_backups_claiming_one_takeover_one_wins() {
        let f = fixture().await;
        let mut hosts = HashMap::new();
        for h in ["host-a", "host-b"] {
            let c = join(&f, &token(&f, None).await, h).await.unwrap();
            hosts.insert(h, host_peer(&c));
        }
        let uuid = Uuid::new_v4();
        f.m.register_primary(
            &hosts["host-a"],
            RegisterPrimaryRequest {
                uuid,
                name: "web".into(),
                backup: Some("host-b".into()),
            },
        )
        .await
        .unwrap();
        let b = &hosts["host-b"];
        let req = TakeoverRequest {
            expected_generation: 1,
        };
        // The same host twice at once (a retry racing the first try): both
        // see the takeover done, and the generation moves once.
        let (x, y) = tokio::join!(
            f.m.record_takeover(b, uuid, req.clone()),
            f.m.record_takeover(b, uuid, req.clone())
        );
        assert_eq!(x.unwrap().generation, 2);
        assert_eq!(y.unwrap().generation, 2);
        // An operator handover in between makes a late claim lose.
        f.m.handover(
            uuid,
            HandoverRequest {
                expected_generation: 2,
                primary: "host-a".into(),
                backup: Some("host-b".into()),
            },
            &f.op,
        )
        .await
        .unwrap();
        assert_eq!(
            f.m.record_takeover(b, uuid, req).await.unwrap_err().kind(),
            ErrorKind::Conflict
        );
    }

    #[tokio::test]
    async fn renew_then_remove_revokes_every_live_certificate() {
        let f = fixture().await;
        let c1 = join(&f, &token(&f, None).await, "host-a").await.unwrap();
        let c2 = f.m.renew(&host_peer(&c1)).await.unwrap();
        assert_ne!(c1.serial, c2.serial);
        // The old certificate still works until removal or expiry.
        f.m.member(&host_peer(&c1)).await.unwrap();
        f.m.member(&host_peer(&c2)).await.unwrap();
        let before = f.m.revocation_snapshot().generation;
        let removed = f.m.remove_host("host-a", &f.op).await.unwrap();
        assert_eq!(removed.revoked.len(), 2);
        assert!(removed.revocation_generation > before);
        let list = f.m.revocation_list();
        for c in [&c1, &c2] {
            assert!(tandem_pki::Revocations::is_revoked(
                list.as_ref(),
                &c.serial
            ));
            assert_eq!(
                f.m.member(&host_peer(c)).await.unwrap_err().kind(),
                ErrorKind::Forbidden
            );
        }
        assert_eq!(
            f.m.remove_host("host-a", &f.op).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // Re-joining under the same name works (a new certificate).
        let c3 = join(&f, &token(&f, None).await, "host-a").await.unwrap();
        f.m.member(&host_peer(&c3)).await.unwrap();
        // ... and the old ones stay refused.
        assert!(f.m.member(&host_peer(&c1)).await.is_err());
    }

    #[tokio::test]
    async fn revocations_are_pruned_a_day_after_expiry() {
        let f = fixture().await;
        let now = unix(f.clock.now());
        f.m.revoke_serial(
            RevokeRequest {
                serial: "AB:CD".into(),
                name: "x".into(),
                not_after: now + 10,
                reason: String::new(),
            },
            &f.op,
        )
        .await
        .unwrap();
        f.m.revoke_serial(
            RevokeRequest {
                serial: "ef01".into(),
                name: "y".into(),
                not_after: 0,
                reason: String::new(),
            },
            &f.op,
        )
        .await
        .unwrap();
        assert_eq!(f.m.revocation_snapshot().serials, ["abcd", "ef01"]);
        f.m.sweep().await.unwrap();
        assert_eq!(f.m.revocation_snapshot().serials.len(), 2);
        let g = f.m.revocation_snapshot().generation;
        f.clock.advance(Duration::from_secs(10 + 24 * 3600 + 1));
        f.m.sweep().await.unwrap();
        let s = f.m.revocation_snapshot();
        assert_eq!(s.serials, ["ef01"]);
        assert_eq!(s.generation, g + 1);
    }

    #[tokio::test]
    async fn heartbeats_asks_for_inventory_and_liveness_uses_the_clock() {
        let f = fixture().await;
        let c = join(&f, &token(&f, None).await, "host-a").await.unwrap();
        let p = host_peer(&c);
        let hb =
            f.m.heartbeat(&p, HeartbeatRequest::default(), Some("10.0.0.1".into()))
                .await
                .unwrap();
        assert!(hb.inventory_wanted);
        f.m.report_inventory(&p, Inventory::default(), None)
            .await
            .unwrap();
        let hb =
            f.m.heartbeat(&p, HeartbeatRequest::default(), None)
                .await
                .unwrap();
        assert!(!hb.inventory_wanted);
        assert_eq!(
            f.m.host("host-a").await.unwrap().connection,
            Connection::Online
        );
        f.clock.advance(Duration::from_secs(31));
        assert_eq!(
            f.m.host("host-a").await.unwrap().connection,
            Connection::Stale
        );
        // An operator or another host's certificate is not a member.
        assert!(f.m.member(&f.op).await.is_err());
        assert!(f.m.member(&peer("host-a", Role::Host, "99")).await.is_err());
    }

    #[tokio::test]
    async fn a_store_of_another_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db")).unwrap());
        let one = ClusterCa::create(&dir.path().join("one"), "one").unwrap();
        let two = ClusterCa::create(&dir.path().join("two"), "two").unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
        Manager::open(
            store.clone(),
            one,
            "manager",
            clock.clone(),
            Settings::default(),
        )
        .await
        .unwrap();
        let e = Manager::open(store, two, "manager", clock, Settings::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("wrong state directory"), "{e}");
    }
}
