//! The manager's HTTP/JSON API: paths, request and response types, error
//! kinds. Shared by the daemon, the host agent and the CLI.
//!
//! Every route is under `/v1`. Errors are a non-2xx status with an
//! [`ErrorBody`] whose `kind` is one of [`ErrorKind`]'s words.
//!
//! | method, path | who | what |
//! |---|---|---|
//! | `POST /v1/join` | anyone holding a token (join connection: no client certificate) | [`JoinRequest`] → [`Credentials`] |
//! | `POST /v1/host/heartbeat` | host | [`HeartbeatRequest`] → [`HeartbeatResponse`] |
//! | `PUT /v1/host/inventory` | host | [`Inventory`] → [`Ack`] |
//! | `GET /v1/host/authority` | host | → [`HostAuthority`]: the VMs it is primary or backup of |
//! | `POST /v1/host/renew` | host | → [`Credentials`]: a new certificate and key |
//! | `POST /v1/host/vms` | host | [`RegisterPrimaryRequest`] → [`AuthorityRecord`]: the caller records itself as a VM's primary (created at generation 1; a new backup bumps the generation; 409 if another host is primary) |
//! | `POST /v1/host/vms/{uuid}/takeover` | host, the record's backup | [`TakeoverRequest`] → [`AuthorityRecord`]: the backup that resumed the VM becomes its primary, without backup, generation + 1 (409 unless at `expected_generation`) |
//! | `GET /v1/revocations` | host, operator | → [`Revocations`] |
//! | `GET /v1/cluster` | host, operator | → [`ClusterStatus`] |
//! | `POST /v1/tokens` | operator | [`CreateTokenRequest`] → [`CreatedToken`] |
//! | `GET /v1/tokens` | operator | → `[TokenInfo]` |
//! | `DELETE /v1/tokens/{id}` | operator | → [`Ack`] |
//! | `GET /v1/hosts` | operator | → `[HostView]` |
//! | `GET /v1/hosts/{name}` | operator | → [`HostView`] |
//! | `DELETE /v1/hosts/{name}` | operator | → [`RemovedHost`]: the host's certificates are revoked at once |
//! | `POST /v1/revocations` | operator | [`RevokeRequest`] → [`Revocations`] (revoke any serial, e.g. a lost operator certificate) |
//! | `GET /v1/vms` | operator | → `[AuthorityRecord]` |
//! | `POST /v1/vms` | operator | [`CreateVmRequest`] → [`AuthorityRecord`] (generation 1) |
//! | `GET /v1/vms/{uuid}` | operator | → [`AuthorityRecord`] |
//! | `POST /v1/vms/{uuid}/handover` | operator | [`HandoverRequest`] → [`AuthorityRecord`] (generation + 1) |
//! | `DELETE /v1/vms/{uuid}?generation=N` | operator | → [`Ack`] |
//! | `GET /v1/cluster/dump` | operator | → [`Dump`]: every record, for `tandem cluster backup` |
//! | `POST /v1/host/switch-sync` | host | [`HostSwitchSync`] → [`Ack`]: the host's switch transaction ended there (rolled back, restored at start, fallback) |
//! | `GET /v1/dvs` | operator | → [`DvsView`]: the distributed switch, its revision and each host's state |
//! | `POST /v1/dvs/apply` | operator | [`DvsApplyRequest`] → [`DvsApplyReport`] (when the rollout has ended) |
//! | `POST /v1/dvs/rollback` | operator | [`DvsRollbackRequest`] → [`DvsApplyReport`]: an old revision's document as a new revision |
//! | `GET /v1/dvs/history` | operator | → `[DvsRevision]` (newest first, without documents) |
//! | `GET /v1/dvs/revisions/{n}` | operator | → [`DvsRevision`] with its document |

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::model::{
    AuthorityRecord, CertRef, Datastore, DatastoreKind, Health, HealthState, HostRecord, Inventory,
    MemoryInfo, Neighbour, PortGroupInfo, QemuInfo, Uplink,
};

/// The ALPN protocol a joining host offers. A connection that offers it is
/// served the join endpoint only, with server-authenticated TLS (the host
/// has no certificate yet; the token authorises). Every other connection
/// must present a cluster certificate.
pub const JOIN_ALPN: &[u8] = b"tandem-join/1";

/// The manager's default TCP port.
pub const DEFAULT_PORT: u16 = 7443;

/// What went wrong, as [`ErrorBody::kind`] says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// 404: no such host, token or VM.
    NotFound,
    /// 409: it exists already, or a generation or revision did not match.
    Conflict,
    /// 403: the caller's certificate does not allow this (wrong role, a
    /// removed host, a token bound to another host).
    Forbidden,
    /// 401: the join token is malformed, unknown, used, expired or for
    /// another cluster.
    Unauthorized,
    /// 400: a parameter is invalid.
    Invalid,
    /// 500: the store or the CA failed.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Forbidden => 403,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Invalid => 400,
            ErrorKind::Internal => 500,
        }
    }

    pub fn parse(s: &str) -> Option<ErrorKind> {
        [
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Forbidden,
            ErrorKind::Unauthorized,
            ErrorKind::Invalid,
            ErrorKind::Internal,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// An [`ErrorKind`] word; a string so that clients read kinds a newer
    /// manager adds.
    pub kind: String,
    pub message: String,
    /// Every problem of an invalid document, by field path (also what
    /// tandemd's host API sends with `invalid-document`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldProblem>,
}

/// One problem of a document, by its field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// An empty success.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token from `tandem token create`.
    pub token: String,
    /// The host's name: its certificate name, one DNS label.
    pub name: String,
}

/// A node's new certificate and key (join, renewal). Secret: the key is in
/// it. Sent only over TLS.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub name: String,
    pub cluster_id: String,
    pub cluster_name: String,
    /// The manager's certificate name, to dial it by.
    pub manager_name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
    /// Unix seconds: renew from then on (2/3 of the lifetime).
    pub renew_after: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("name", &self.name)
            .field("cluster_id", &self.cluster_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub health: Health,
    /// `HOST:PORT` where the manager reaches this host's API (tandemd's
    /// mutual-TLS listener, `--host-api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_api: Option<String>,
    /// The host's switch: the digest it runs and any transaction pending,
    /// so that the manager always knows what each host runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<tandem_api::SwitchTxnStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The revocation list's generation: fetch `GET /v1/revocations` when
    /// it is newer than the host's copy.
    pub revocation_generation: u64,
    /// The manager's clock (unix seconds), to spot skew.
    pub manager_time: u64,
    /// The manager has no inventory from this host since it started: send
    /// one (`PUT /v1/host/inventory`).
    pub inventory_wanted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub generation: u64,
    /// Lowercase hex serials.
    pub serials: Vec<String>,
    /// The same list as a CRL signed by the cluster CA (CRL number =
    /// `generation`), for QEMU's `tls-creds-x509` directories
    /// (`tandem_pki::Identity::qemu_crl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_pem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAuthority {
    /// The host these are for.
    pub host: String,
    /// Every VM whose primary or backup it is.
    pub vms: Vec<AuthorityRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTokenRequest {
    /// Lifetime in seconds (default 3600, at most 86400).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Only a host of this name may use it.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The token string: give it to `tandem host join`. Shown only now.
    pub token: String,
    pub id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub host: Option<String>,
    /// The CA certificate's SHA-256 the token pins (hex).
    pub ca_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub expired: bool,
    pub host: Option<String>,
    pub created_by: String,
    pub description: String,
}

/// Whether a host has been heard from lately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connection {
    /// Heard within the manager's `--host-stale-after`.
    Online,
    /// Heard before, not lately.
    Stale,
    /// Never heard since it joined.
    Never,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Online => "online",
            Connection::Stale => "stale",
            Connection::Never => "never",
        }
    }
}

/// A host as operators see it: its record, with the manager's freshest
/// knowledge of when it was last heard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub connection: Connection,
    #[serde(flatten)]
    pub record: HostRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedHost {
    pub name: String,
    /// The serials now revoked.
    pub revoked: Vec<String>,
    pub revocation_generation: u64,
    /// VMs whose authority record still names the host: hand them over.
    pub vms: Vec<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Hex, colons allowed.
    pub serial: String,
    /// The certificate's name, for the record.
    #[serde(default)]
    pub name: String,
    /// When it expires (unix seconds), so that the entry can be pruned
    /// after; 0 (unknown) keeps it for ever.
    #[serde(default)]
    pub not_after: u64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVmRequest {
    pub uuid: Uuid,
    pub name: String,
    pub primary: String,
    #[serde(default)]
    pub backup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRequest {
    /// The generation this handover replaces; refused (409) if the record
    /// is at another.
    pub expected_generation: u64,
    pub primary: String,
    #[serde(default)]
    pub backup: Option<String>,
}

/// Body of `POST /v1/host/vms`: the calling host (its certificate name)
/// is the VM's primary, replicating to `backup`. Never moves a VM that
/// another host is recorded to run: that is a handover (operator) or a
/// takeover (the recorded backup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterPrimaryRequest {
    pub uuid: Uuid,
    pub name: String,
    /// The backup's certificate name; `None`: unprotected.
    #[serde(default)]
    pub backup: Option<String>,
}

/// Body of `POST /v1/host/vms/{uuid}/takeover`: the recorded backup has
/// resumed the VM and records itself as its primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverRequest {
    /// The generation the backup replicated under; refused (409) if the
    /// record is at another, so of two claimants only one wins.
    pub expected_generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmQuery {
    /// Refused (409) unless the record is at this generation.
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub cluster_name: String,
    pub manager_name: String,
    pub manager_version: String,
    /// Unix seconds.
    pub manager_cert_not_after: u64,
    pub manager_started_at: u64,
    pub manager_time: u64,
    /// e.g. `redb /var/lib/tandem-manager/manager.redb`.
    pub store: String,
    pub store_revision: u64,
    pub hosts: usize,
    pub hosts_online: usize,
    pub vms: usize,
    pub tokens: usize,
    pub revocation_generation: u64,
    pub revoked: usize,
    /// Host certificates' lifetime, seconds.
    pub host_cert_validity_secs: u64,
}

/// Every record, as JSON: what `tandem cluster backup` saves and
/// `tandem cluster restore` loads. Revisions are not kept (a restored
/// store starts its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dump {
    /// Always [`DUMP_FORMAT`].
    pub format: String,
    pub cluster_id: String,
    /// Unix seconds.
    pub taken_at: u64,
    pub revision: u64,
    pub entries: Vec<DumpEntry>,
}

pub const DUMP_FORMAT: &str = "tandem-manager-dump/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpEntry {
    pub key: String,
    pub value: serde_json::Value,
}

/// Body of `POST /v1/host/switch-sync`: a switch transaction ended on the
/// host other than by a commit (seed 000's "host synchronization"), sent
/// once the host reaches the manager over its restored configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSwitchSync {
    /// The transaction that ended; `None` if the host cannot tell.
    #[serde(default)]
    pub txid: Option<String>,
    pub outcome: tandem_api::TxnOutcome,
    /// What it runs now (`SwitchDocument::digest`).
    pub running_digest: String,
    /// The document it runs, TOML.
    pub document_toml: String,
}

/// Body of `POST /v1/dvs/apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsApplyRequest {
    /// The whole distributed switch document, TOML.
    pub document_toml: String,
    /// Each host's transaction timeout, seconds: 5..=60, default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    /// The host that goes first, alone (default: the first host of the
    /// document whose configuration changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

/// Body of `POST /v1/dvs/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsRollbackRequest {
    /// The revision whose document to apply again (as a new revision).
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

/// One host's part in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsHostOutcome {
    pub host: String,
    /// `canary`, `wave` or `unchanged`.
    pub role: String,
    /// `committed`, `not-applied`, `out-of-sync`; `skipped` (the rollout
    /// stopped before it), `unchanged` (already ran it).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txid: Option<String>,
    /// Its revert to the previous revision, if it had committed and the
    /// rollout failed elsewhere: `committed`, `not-applied`, `out-of-sync`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_detail: Option<String>,
    /// Its state when the rollout ended (`in-sync`, `out-of-sync`, …).
    pub state: String,
}

/// The answer to an apply or a rollback, once the rollout has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsApplyReport {
    /// The revision this change was recorded as.
    pub revision: u64,
    /// `completed`, `rolled-back` or `revert-incomplete`.
    pub outcome: tandem_dvs::RolloutOutcome,
    /// The distributed switch's revision now: `revision` if completed,
    /// the previous one otherwise.
    pub current_revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    pub hosts: Vec<DvsHostOutcome>,
    /// From the request to the end of the rollout.
    pub elapsed_ms: u64,
}

/// One host of the distributed switch as `dvs show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsHostView {
    pub host: String,
    /// Is it in the current revision's document?
    pub in_document: bool,
    /// `in-sync`, `pending`, `out-of-sync`, `resynced`, `failed`.
    pub state: String,
    /// The revision it runs, as far as the manager knows (`None`: an
    /// unknown configuration, or never configured by the manager).
    #[serde(default)]
    pub revision: Option<u64>,
    #[serde(default)]
    pub digest: Option<String>,
    /// The current revision's rendering for it.
    #[serde(default)]
    pub expected_digest: Option<String>,
    /// It runs the current revision's rendering.
    pub matches_current: bool,
    #[serde(default)]
    pub last_txid: Option<String>,
    /// Unix seconds of its last change of state.
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The address the manager reaches its API at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_api: Option<String>,
}

/// `GET /v1/dvs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsView {
    /// The current revision (0: none yet).
    pub revision: u64,
    #[serde(default)]
    pub document_toml: Option<String>,
    #[serde(default)]
    pub updated_at: Option<u64>,
    #[serde(default)]
    pub updated_by: Option<String>,
    /// A rollout running now, by revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_in_progress: Option<u64>,
    pub hosts: Vec<DvsHostView>,
}

pub use crate::model::dvs::DvsRevision;
