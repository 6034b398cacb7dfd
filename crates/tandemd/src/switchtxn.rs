//! Switch changes as transactions that roll back by themselves (seed 000).
//!
//! `POST /v1/switch/txn` applies a document provisionally: the running
//! document is first saved **durably** (`STATE/switch.pending.json`, with
//! the txid, its origin and its deadline), then the new one is applied.
//! Unless `POST /v1/switch/commit` names the txid before the deadline, the
//! host restores the saved document by itself, because the change may have
//! cut it off from whoever would have committed it. The manager commits
//! only after it reached the host over the new configuration (a fresh TLS
//! connection per request), so a commit arriving proves the change left
//! management working.
//!
//! What must never happen, and what prevents it:
//! - **A change outliving a crash unconfirmed**: the saved document is on
//!   disk before anything changes; a tandemd that starts and finds the
//!   pending file restores it before the switch (or any API) starts
//!   ([`recover_at_start`]).
//! - **A stale commit confirming the wrong change**: a commit must name
//!   the pending txid (`stale-txid` otherwise, which changes nothing), and
//!   a commit with nothing pending is `unknown-txid` (a late commit after
//!   the rollback changes nothing).
//! - **Two changes interleaving**: one pending transaction per host; a
//!   second, or a plain apply meanwhile, gets `busy`.
//! - **A rollback that cannot restore** (an interface the saved document
//!   names has vanished): the host falls back to the saved document
//!   without the uplinks and host ports it can no longer create, then to
//!   its port groups alone, and raises an alarm that `GET /v1/switch/txn`,
//!   the manager's host-sync and the log all carry.
//!
//! Each rollback, fallback and restore-at-start is reported to the manager
//! (a host-sync through the agent, retried until it arrives).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tandem_api::{
    EndedTxn, ErrorKind, PendingTxn, SwitchCommitRequest, SwitchCommitted, SwitchTxnApplied,
    SwitchTxnRequest, SwitchTxnStatus, TxnOrigin, TxnOutcome, TXN_TIMEOUT_DEFAULT_S,
    TXN_TIMEOUT_MAX_S, TXN_TIMEOUT_MIN_S,
};
use tandem_switch::config::SwitchDocument;
use tandem_switch::host::SwitchHost;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::error::HttpError;

/// The saved document and what it belongs to, on disk while a transaction
/// is pending.
pub const PENDING_FILE: &str = "switch.pending.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingRecord {
    txid: String,
    origin: TxnOrigin,
    /// Unix milliseconds; informative (a restart restores whatever the
    /// deadline).
    deadline_unix_ms: u64,
    /// The document that ran before, which the rollback restores.
    saved_toml: String,
    saved_digest: String,
    /// The provisional document's digest.
    new_digest: String,
}

/// What the host tells the manager after it restored a configuration by
/// itself (the seed's "host synchronization").
#[derive(Debug, Clone)]
pub struct HostSync {
    pub txid: Option<String>,
    pub outcome: TxnOutcome,
    pub running_digest: String,
    pub document_toml: String,
    pub alarm: Option<String>,
}

/// Delivers host-syncs (the agent queues and retries them).
pub type SyncSink = Arc<dyn Fn(HostSync) + Send + Sync>;

struct Pending {
    record: PendingRecord,
    deadline: Instant,
    timer: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Inner {
    pending: Option<Pending>,
    last: Option<EndedTxn>,
    alarm: Option<String>,
    /// Test-only faults armed for the next transaction.
    armed: Option<ArmedFault>,
    /// The fault in force since the last apply, undone by the rollback.
    active_fault: Option<ArmedFault>,
}

/// The switch's transactions on this host.
pub struct SwitchTxns {
    host: Arc<SwitchHost>,
    pending_path: PathBuf,
    inner: Mutex<Inner>,
    sync: Mutex<Option<SyncSink>>,
    /// Set when a manager manages this host's switch: a plain local apply
    /// is then refused (it would bypass the manager's document).
    managed: bool,
}

impl std::fmt::Debug for SwitchTxns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchTxns")
            .field("pending_path", &self.pending_path)
            .field("managed", &self.managed)
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What [`recover_at_start`] found.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub txid: String,
    pub restored_digest: String,
}

/// Run before the switch starts: a transaction left pending by a tandemd
/// that died is rolled back by writing its saved document over the
/// switch's document file, so the switch starts on the configuration that
/// ran before the change. The pending file goes last (a crash in between
/// repeats the same restore).
pub fn recover_at_start(state_dir: &Path, switch_doc: &Path) -> anyhow::Result<Option<Recovered>> {
    use anyhow::Context;
    let path = state_dir.join(PENDING_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let record: PendingRecord = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a pending switch transaction; move it away to start (the switch document in {} may be an unconfirmed change)",
            path.display(),
            switch_doc.display()
        )
    })?;
    // The saved document ran before; it must still parse.
    SwitchDocument::from_toml(&record.saved_toml).with_context(|| {
        format!(
            "the saved switch document in {} (transaction {})",
            path.display(),
            record.txid
        )
    })?;
    tandem_supervisor::util::atomic_write(switch_doc, record.saved_toml.as_bytes())
        .with_context(|| format!("restoring {}", switch_doc.display()))?;
    remove_durably(&path).with_context(|| format!("removing {}", path.display()))?;
    warn!(
        txid = %record.txid,
        digest = %record.saved_digest,
        "switch transaction was pending when tandemd stopped: restored the configuration from before it"
    );
    Ok(Some(Recovered {
        txid: record.txid,
        restored_digest: record.saved_digest,
    }))
}

fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Why a transaction could not begin or commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("timeout_s {0} is outside {TXN_TIMEOUT_MIN_S}..={TXN_TIMEOUT_MAX_S} seconds")]
    Timeout(u32),
    #[error("the txid must be 1 to 128 characters of letters, digits, `-`, `_`, `.` and `:`")]
    BadTxid,
    #[error("switch transaction {0} is pending on this host; one at a time")]
    Busy(String),
    #[error("transaction {asked} is not the pending one ({pending}); ignored")]
    Stale { asked: String, pending: String },
    #[error("no switch transaction is pending on this host{}", .0.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Unknown(Option<String>),
    #[error("saving the running switch configuration in {path}: {source}")]
    Save {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Switch(#[from] tandem_switch::host::HostError),
    #[error(transparent)]
    Invalid(#[from] tandem_switch::config::InvalidDocument),
    #[error("{0}")]
    Managed(String),
}

impl From<TxnError> for HttpError {
    fn from(e: TxnError) -> Self {
        match e {
            TxnError::Timeout(_) | TxnError::BadTxid => HttpError::invalid(e),
            TxnError::Busy(_) => HttpError::new(ErrorKind::Busy, e),
            TxnError::Stale { .. } => HttpError::new(ErrorKind::StaleTxid, e),
            TxnError::Unknown(_) => HttpError::new(ErrorKind::UnknownTxid, e),
            TxnError::Save { .. } => HttpError::new(ErrorKind::Internal, e),
            TxnError::Switch(e) => e.into(),
            TxnError::Invalid(e) => e.into(),
            TxnError::Managed(_) => HttpError::new(ErrorKind::Conflict, e),
        }
    }
}

fn valid_txid(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

impl SwitchTxns {
    pub fn new(
        host: Arc<SwitchHost>,
        state_dir: &Path,
        managed: bool,
        recovered: Option<Recovered>,
    ) -> Arc<Self> {
        let last = recovered.map(|r| EndedTxn {
            txid: r.txid,
            outcome: TxnOutcome::RestoredAtStart,
            digest: r.restored_digest,
            at_ms: unix_ms(),
            detail: Some("tandemd stopped while it was pending".into()),
        });
        Arc::new(SwitchTxns {
            host,
            pending_path: state_dir.join(PENDING_FILE),
            inner: Mutex::new(Inner {
                last,
                ..Inner::default()
            }),
            sync: Mutex::new(None),
            managed,
        })
    }

    /// Where host-syncs go; the one for a restore at start is sent now.
    pub fn set_sync(&self, sink: SyncSink) {
        let restored = {
            let inner = self.inner.lock();
            inner
                .last
                .as_ref()
                .filter(|l| l.outcome == TxnOutcome::RestoredAtStart)
                .map(|l| l.txid.clone())
        };
        *self.sync.lock() = Some(sink);
        if let Some(txid) = restored {
            self.report(Some(txid), TxnOutcome::RestoredAtStart, None);
        }
    }

    fn report(&self, txid: Option<String>, outcome: TxnOutcome, alarm: Option<String>) {
        let Some(sink) = self.sync.lock().clone() else {
            return;
        };
        let doc = self.host.document();
        sink(HostSync {
            txid,
            outcome,
            running_digest: doc.digest(),
            document_toml: doc.to_toml(),
            alarm,
        });
    }

    pub fn status(&self) -> SwitchTxnStatus {
        let inner = self.inner.lock();
        let now = Instant::now();
        SwitchTxnStatus {
            running_digest: self.host.document().digest(),
            pending: inner.pending.as_ref().map(|p| PendingTxn {
                txid: p.record.txid.clone(),
                origin: p.record.origin,
                deadline_in_ms: p.deadline.saturating_duration_since(now).as_millis() as u64,
                saved_digest: p.record.saved_digest.clone(),
            }),
            last: inner.last.clone(),
            alarm: inner.alarm.clone(),
        }
    }

    /// A plain (non-transactional) apply: refused while a transaction is
    /// pending (its rollback would undo this too) and on a managed host
    /// (it would run behind the manager's back). Blocking.
    pub fn apply_plain(
        &self,
        doc: SwitchDocument,
    ) -> Result<tandem_switch::host::ApplyReport, TxnError> {
        if self.managed {
            return Err(TxnError::Managed(
                "this host's switch is managed by the cluster's manager: change it with `tandem dvs apply`, \
                 or try a local change that rolls back unless confirmed: `tandem switch try FILE` then `tandem switch confirm TXID`"
                    .into(),
            ));
        }
        let inner = self.inner.lock();
        if let Some(p) = &inner.pending {
            return Err(TxnError::Busy(p.record.txid.clone()));
        }
        Ok(self.host.apply(doc)?)
    }

    /// Saves the running document durably, applies `req`'s, and arms the
    /// deadline. Blocking (port creation, fsync): call off the reactor.
    pub fn begin(
        self: &Arc<Self>,
        req: &SwitchTxnRequest,
        origin: TxnOrigin,
    ) -> Result<SwitchTxnApplied, TxnError> {
        let timeout_s = req.timeout_s.unwrap_or(TXN_TIMEOUT_DEFAULT_S);
        if !(TXN_TIMEOUT_MIN_S..=TXN_TIMEOUT_MAX_S).contains(&timeout_s) {
            return Err(TxnError::Timeout(timeout_s));
        }
        if !valid_txid(&req.txid) {
            return Err(TxnError::BadTxid);
        }
        let doc = SwitchDocument::from_toml(&req.document_toml)?;
        let mut inner = self.inner.lock();
        if let Some(p) = &inner.pending {
            return Err(TxnError::Busy(p.record.txid.clone()));
        }
        let saved = self.host.document();
        let timeout = Duration::from_secs(timeout_s.into());
        let record = PendingRecord {
            txid: req.txid.clone(),
            origin,
            deadline_unix_ms: unix_ms() + timeout.as_millis() as u64,
            saved_toml: saved.to_toml(),
            saved_digest: saved.digest(),
            new_digest: doc.digest(),
        };
        tandem_supervisor::util::atomic_write_json(&self.pending_path, &record).map_err(
            |source| TxnError::Save {
                path: self.pending_path.display().to_string(),
                source,
            },
        )?;
        // Armed before the apply: the deadline counts from the moment the
        // change can cut the host off.
        let deadline = Instant::now() + timeout;
        if let Err(e) = self.host.apply(doc) {
            // All or nothing: the previous configuration still runs.
            if let Err(rm) = remove_durably(&self.pending_path) {
                error!(txid = %req.txid, "removing {}: {rm}", self.pending_path.display());
            }
            return Err(e.into());
        }
        let fault = inner.armed.take();
        if let Some(f) = &fault {
            f.engage();
        }
        inner.active_fault = fault;
        let me = Arc::clone(self);
        let txid = req.txid.clone();
        let timer = tokio::runtime::Handle::try_current().ok().map(|rt| {
            rt.spawn(async move {
                tokio::time::sleep_until(deadline.into()).await;
                let _ = tokio::task::spawn_blocking(move || me.deadline_passed(&txid)).await;
            })
        });
        info!(
            txid = %record.txid,
            ?origin,
            timeout_s,
            new = %record.new_digest,
            saved = %record.saved_digest,
            "switch transaction applied; rolls back unless committed in time"
        );
        let applied = SwitchTxnApplied {
            txid: record.txid.clone(),
            digest: record.new_digest.clone(),
            deadline_in_ms: deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
        };
        inner.pending = Some(Pending {
            record,
            deadline,
            timer,
        });
        Ok(applied)
    }

    /// Confirms the pending transaction: the saved document is dropped.
    pub fn commit(&self, txid: &str) -> Result<SwitchCommitted, TxnError> {
        let mut inner = self.inner.lock();
        let pending_id = match &inner.pending {
            None => {
                let detail = inner.last.as_ref().filter(|l| l.txid == txid).map(|l| {
                    format!(
                        "{txid} ended {} ago: {:?}",
                        human_ms(unix_ms().saturating_sub(l.at_ms)),
                        l.outcome
                    )
                });
                warn!(%txid, "commit refused: nothing pending (late or unknown)");
                return Err(TxnError::Unknown(detail));
            }
            Some(p) => p.record.txid.clone(),
        };
        if pending_id != txid {
            warn!(asked = %txid, pending = %pending_id, "stale commit ignored");
            return Err(TxnError::Stale {
                asked: txid.to_string(),
                pending: pending_id,
            });
        }
        remove_durably(&self.pending_path).map_err(|source| TxnError::Save {
            path: self.pending_path.display().to_string(),
            source,
        })?;
        let Some(p) = inner.pending.take() else {
            return Err(TxnError::Unknown(None));
        };
        if let Some(t) = p.timer {
            t.abort();
        }
        inner.active_fault = None;
        let digest = p.record.new_digest.clone();
        inner.last = Some(EndedTxn {
            txid: txid.to_string(),
            outcome: TxnOutcome::Committed,
            digest: digest.clone(),
            at_ms: unix_ms(),
            detail: None,
        });
        inner.alarm = None;
        info!(%txid, %digest, "committed({txid}): the saved configuration is dropped");
        Ok(SwitchCommitted {
            txid: txid.to_string(),
            digest,
        })
    }

    /// The deadline of `txid` passed: restore, unless it was committed.
    fn deadline_passed(&self, txid: &str) {
        let mut inner = self.inner.lock();
        let Some(p) = inner.pending.as_ref().filter(|p| p.record.txid == txid) else {
            return;
        };
        let record = p.record.clone();
        if inner.active_fault.as_ref().is_some_and(|f| f.no_rollback) {
            error!(%txid, "FAULT INJECTION: rollback disabled; the unconfirmed change stays");
            return;
        }
        if let Some(f) = inner.active_fault.take() {
            f.disengage();
        }
        let (outcome, detail, alarm) = self.restore(&record);
        match remove_durably(&self.pending_path) {
            Ok(()) => {}
            Err(e) => error!(%txid, "removing {}: {e}", self.pending_path.display()),
        }
        inner.pending = None;
        let digest = self.host.document().digest();
        inner.last = Some(EndedTxn {
            txid: txid.to_string(),
            outcome,
            digest,
            at_ms: unix_ms(),
            detail,
        });
        inner.alarm = alarm.clone();
        drop(inner);
        self.report(Some(txid.to_string()), outcome, alarm);
    }

    /// Puts the saved document back; if it cannot be, the built-in
    /// management-only configurations, loudly.
    fn restore(&self, record: &PendingRecord) -> (TxnOutcome, Option<String>, Option<String>) {
        let txid = &record.txid;
        let saved = match SwitchDocument::from_toml(&record.saved_toml) {
            Ok(d) => d,
            Err(e) => {
                // It was the running document a moment ago; cannot happen
                // short of memory corruption, but say so if it does.
                error!(%txid, "the saved switch document does not parse: {e}");
                return self.fallback(record, format!("the saved document does not parse: {e}"));
            }
        };
        match self.host.apply(saved) {
            Ok(_) => {
                warn!(
                    %txid,
                    restored = %record.saved_digest,
                    "no commit for {txid} by its deadline: restored the configuration from before it"
                );
                (TxnOutcome::RolledBack, None, None)
            }
            Err(e) => {
                error!(%txid, "rollback of {txid} failed: {e}");
                self.fallback(
                    record,
                    format!("restoring the saved configuration failed: {e}"),
                )
            }
        }
    }

    fn fallback(
        &self,
        record: &PendingRecord,
        why: String,
    ) -> (TxnOutcome, Option<String>, Option<String>) {
        let txid = &record.txid;
        let saved = SwitchDocument::from_toml(&record.saved_toml).unwrap_or_default();
        for (name, doc) in fallback_documents(&saved) {
            match self.host.apply(doc) {
                Ok(_) => {
                    let alarm = format!(
                        "switch transaction {txid} could not be rolled back ({why}); running the fallback configuration `{name}`: fix the host and apply a configuration"
                    );
                    error!(%txid, "{alarm}");
                    return (TxnOutcome::Fallback, Some(why), Some(alarm));
                }
                Err(e) => error!(%txid, "fallback `{name}` failed too: {e}"),
            }
        }
        let alarm = format!(
            "switch transaction {txid} could not be rolled back ({why}) and no fallback applied: the unconfirmed configuration still runs"
        );
        error!(%txid, "{alarm}");
        (TxnOutcome::Fallback, Some(why), Some(alarm))
    }
}

/// The built-in configurations a failed rollback falls back to, in order:
/// the saved document keeping only the uplink interfaces and host ports
/// that still exist (management usually rides on one of them), then its
/// port groups alone (VM ports need them; nothing leaves the host).
fn fallback_documents(saved: &SwitchDocument) -> Vec<(&'static str, SwitchDocument)> {
    let exists = |ifname: &str| Path::new("/sys/class/net").join(ifname).exists();
    let mut present = saved.clone();
    for u in &mut present.uplinks {
        u.interfaces.retain(|i| exists(i));
    }
    present.uplinks.retain(|u| !u.interfaces.is_empty());
    let mut groups_only = saved.clone();
    groups_only.uplinks.clear();
    groups_only.host_ports.clear();
    vec![
        ("saved, present interfaces only", present),
        ("port groups only", groups_only),
    ]
}

fn human_ms(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms / 1000)
    }
}

/// Test-only faults on a transaction (fault-injection builds): directional
/// loss of the management path, armed at the apply so it begins exactly
/// when the change does, and undone by the rollback.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ArmedFault {
    /// Drop what `peer` sends to this host (the commit never arrives; the
    /// return already left).
    #[serde(default)]
    pub drop_from_peer: bool,
    /// Drop what this host sends to `peer` (the return never arrives).
    #[serde(default)]
    pub drop_to_peer: bool,
    /// The manager's address (IPv4).
    #[serde(default)]
    pub peer: Option<std::net::Ipv4Addr>,
    /// The mutation check: the deadline restores nothing.
    #[serde(default)]
    pub no_rollback: bool,
}

const FAULT_TABLE: &str = "tandem_txn_fault";

impl ArmedFault {
    fn engage(&self) {
        let Some(peer) = self.peer else { return };
        if !(self.drop_from_peer || self.drop_to_peer) {
            return;
        }
        let mut script = format!("table inet {FAULT_TABLE} {{\n");
        if self.drop_from_peer {
            script.push_str(&format!(
                "  chain input {{ type filter hook input priority -10; ip saddr {peer} drop; }}\n"
            ));
        }
        if self.drop_to_peer {
            script.push_str(&format!(
                "  chain output {{ type filter hook output priority -10; ip daddr {peer} drop; }}\n"
            ));
        }
        script.push_str("}\n");
        match nft(&script) {
            Ok(()) => warn!(
                ?self,
                "FAULT INJECTION: management path cut in one direction"
            ),
            Err(e) => error!("FAULT INJECTION: nft: {e}"),
        }
    }

    fn disengage(&self) {
        if self.drop_from_peer || self.drop_to_peer {
            if let Err(e) = nft(&format!("delete table inet {FAULT_TABLE}\n")) {
                error!("FAULT INJECTION: removing the nft table: {e}");
            }
        }
    }
}

fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether a request came over the host API (mutual TLS) and from whom;
/// requests on the local unix sockets carry none.
#[derive(Debug, Clone)]
pub struct RemoteCaller {
    pub name: String,
    pub role: tandem_pki::Role,
}

type TxnState = Arc<SwitchTxns>;

pub fn router(txns: TxnState) -> Router {
    let r = Router::new()
        .route("/v1/switch/txn", get(status).post(begin))
        .route("/v1/switch/commit", post(commit));
    let r = if tandem_outcommit::FAULT_INJECTION {
        r.route("/v1/faults/switch-txn", post(arm_fault))
    } else {
        r
    };
    r.with_state(txns)
}

async fn status(State(t): State<TxnState>) -> Json<SwitchTxnStatus> {
    Json(t.status())
}

async fn begin(
    State(t): State<TxnState>,
    caller: Option<Extension<RemoteCaller>>,
    Json(req): Json<SwitchTxnRequest>,
) -> Result<Json<SwitchTxnApplied>, HttpError> {
    let origin = if caller.is_some() {
        TxnOrigin::Manager
    } else {
        TxnOrigin::Local
    };
    if let Some(Extension(c)) = &caller {
        info!(txid = %req.txid, caller = %c.name, role = %c.role, "switch transaction requested");
    }
    Ok(Json(tokio::task::block_in_place(|| t.begin(&req, origin))?))
}

async fn commit(
    State(t): State<TxnState>,
    Json(req): Json<SwitchCommitRequest>,
) -> Result<Json<SwitchCommitted>, HttpError> {
    Ok(Json(tokio::task::block_in_place(|| t.commit(&req.txid))?))
}

async fn arm_fault(
    State(t): State<TxnState>,
    caller: Option<Extension<RemoteCaller>>,
    Json(fault): Json<ArmedFault>,
) -> Result<Json<serde_json::Value>, HttpError> {
    if caller.is_some() {
        return Err(HttpError::new(
            ErrorKind::Forbidden,
            "faults are armed on the local socket only",
        ));
    }
    warn!(
        ?fault,
        "FAULT INJECTION: armed for the next switch transaction"
    );
    t.inner.lock().armed = Some(fault);
    Ok(Json(serde_json::json!({ "armed": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txids_are_bounded_plain_words() {
        assert!(valid_txid("m-1700000000-3:hA"));
        assert!(!valid_txid(""));
        assert!(!valid_txid("a b"));
        assert!(!valid_txid("../x"));
        assert!(!valid_txid(&"x".repeat(129)));
    }

    #[test]
    fn the_fallbacks_drop_vanished_interfaces_then_everything_but_port_groups() {
        let saved = SwitchDocument::from_toml(
            r#"
[[port_group]]
name = "mgmt"
vlan = 10

[[uplink]]
name = "up"
interfaces = ["tandem-no-such-if0", "lo"]
port_group = "mgmt"

[[uplink]]
name = "gone"
interfaces = ["tandem-no-such-if1"]
port_group = "mgmt"

[[host_port]]
name = "m"
tap = "tmgmt0"
port_group = "mgmt"
"#,
        )
        .unwrap();
        let f = fallback_documents(&saved);
        assert_eq!(f[0].1.uplinks.len(), 1);
        assert_eq!(f[0].1.uplinks[0].interfaces, vec!["lo".to_string()]);
        assert_eq!(f[0].1.host_ports.len(), 1);
        assert!(f[1].1.uplinks.is_empty() && f[1].1.host_ports.is_empty());
        assert_eq!(f[1].1.port_groups, saved.port_groups);
    }
}

/// The transaction rules on a real switch (no ports that need privileges:
/// port groups only), a real state directory and real timers.
#[cfg(test)]
mod txn_tests {
    use super::*;

    const OLD: &str = "[[port_group]]\nname = \"mgmt\"\nvlan = 10\n";
    const NEW: &str = "[[port_group]]\nname = \"mgmt\"\nvlan = 20\n";

    fn setup() -> (tempfile::TempDir, Arc<SwitchHost>, Arc<SwitchTxns>) {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("switch.toml");
        std::fs::write(&doc, OLD).unwrap();
        let host = SwitchHost::start(&doc).unwrap();
        let txns = SwitchTxns::new(host.clone(), dir.path(), false, None);
        (dir, host, txns)
    }

    fn req(txid: &str, doc: &str, timeout_s: Option<u32>) -> SwitchTxnRequest {
        SwitchTxnRequest {
            txid: txid.into(),
            document_toml: doc.into(),
            timeout_s,
        }
    }

    fn digest(text: &str) -> String {
        SwitchDocument::from_toml(text).unwrap().digest()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_keeps_the_change_and_disarms_the_deadline() {
        let (dir, host, txns) = setup();
        let applied = txns
            .begin(&req("t1", NEW, None), TxnOrigin::Manager)
            .unwrap();
        assert_eq!(applied.digest, digest(NEW));
        assert!(applied.deadline_in_ms > 29_000, "default 30 s");
        // Durable before the commit: the saved document is on disk.
        let rec: PendingRecord =
            serde_json::from_slice(&std::fs::read(dir.path().join(PENDING_FILE)).unwrap()).unwrap();
        assert_eq!(rec.saved_digest, digest(OLD));
        txns.commit("t1").unwrap();
        assert!(!dir.path().join(PENDING_FILE).exists());
        let st = txns.status();
        assert!(st.pending.is_none());
        assert_eq!(st.last.unwrap().outcome, TxnOutcome::Committed);
        assert_eq!(host.document().digest(), digest(NEW));
        // Committing twice is a late commit: refused, nothing changes.
        assert!(matches!(txns.commit("t1"), Err(TxnError::Unknown(Some(_)))));
        host.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_stale_and_bad_timeouts_change_nothing() {
        let (_dir, host, txns) = setup();
        for t in [4, 61] {
            assert!(matches!(
                txns.begin(&req("x", NEW, Some(t)), TxnOrigin::Manager),
                Err(TxnError::Timeout(_))
            ));
        }
        assert_eq!(host.document().digest(), digest(OLD));
        for t in [5, 60] {
            let id = format!("ok{t}");
            txns.begin(&req(&id, NEW, Some(t)), TxnOrigin::Manager)
                .unwrap();
            txns.commit(&id).unwrap();
        }
        txns.begin(&req("t2", OLD, Some(30)), TxnOrigin::Manager)
            .unwrap();
        assert!(matches!(
            txns.begin(&req("t3", NEW, Some(30)), TxnOrigin::Manager),
            Err(TxnError::Busy(p)) if p == "t2"
        ));
        assert!(matches!(
            txns.apply_plain(SwitchDocument::from_toml(NEW).unwrap()),
            Err(TxnError::Busy(_))
        ));
        assert!(matches!(txns.commit("t1"), Err(TxnError::Stale { .. })));
        assert_eq!(txns.status().pending.unwrap().txid, "t2");
        assert_eq!(host.document().digest(), digest(OLD));
        host.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_commit_by_the_deadline_restores_and_a_late_commit_is_refused() {
        let (dir, host, txns) = setup();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        txns.set_sync(Arc::new(move |s: HostSync| {
            let _ = tx.send(s);
        }));
        txns.begin(&req("t1", NEW, Some(5)), TxnOrigin::Manager)
            .unwrap();
        assert_eq!(host.document().digest(), digest(NEW));
        // The host-sync is the rollback's event.
        let sync = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("a rollback within 15 s of a 5 s deadline")
            .unwrap();
        assert_eq!(sync.outcome, TxnOutcome::RolledBack);
        assert_eq!(sync.txid.as_deref(), Some("t1"));
        assert_eq!(sync.running_digest, digest(OLD));
        assert_eq!(host.document().digest(), digest(OLD));
        assert!(!dir.path().join(PENDING_FILE).exists());
        // The switch's own file holds the restored document too.
        let on_disk = std::fs::read_to_string(dir.path().join("switch.toml")).unwrap();
        assert_eq!(
            SwitchDocument::from_toml(&on_disk).unwrap().digest(),
            digest(OLD)
        );
        assert!(matches!(txns.commit("t1"), Err(TxnError::Unknown(_))));
        assert_eq!(host.document().digest(), digest(OLD));
        host.shutdown();
    }

    #[test]
    fn a_pending_transaction_found_at_start_is_restored_before_the_switch_starts() {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("switch.toml");
        // What a tandemd killed mid-transaction leaves: the new document
        // in the switch's file and the saved one in the pending file.
        std::fs::write(&doc, NEW).unwrap();
        let rec = PendingRecord {
            txid: "t9".into(),
            origin: TxnOrigin::Manager,
            deadline_unix_ms: 0,
            saved_toml: OLD.into(),
            saved_digest: digest(OLD),
            new_digest: digest(NEW),
        };
        std::fs::write(
            dir.path().join(PENDING_FILE),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        let r = recover_at_start(dir.path(), &doc).unwrap().unwrap();
        assert_eq!(r.txid, "t9");
        assert!(!dir.path().join(PENDING_FILE).exists());
        let text = std::fs::read_to_string(&doc).unwrap();
        assert_eq!(
            SwitchDocument::from_toml(&text).unwrap().digest(),
            digest(OLD)
        );
        assert!(recover_at_start(dir.path(), &doc).unwrap().is_none());
        // A pending file that is not one stops the start, loudly.
        std::fs::write(dir.path().join(PENDING_FILE), b"{garbage").unwrap();
        let e = recover_at_start(dir.path(), &doc).unwrap_err();
        assert!(format!("{e:#}").contains("not a pending switch transaction"));
    }
}
