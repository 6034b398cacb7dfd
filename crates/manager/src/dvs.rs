//! The distributed switch on the manager: revisions and history in the
//! store, rollouts as per-host transactions to the hosts' APIs (seed 000),
//! and what each host's switch runs.
//!
//! A change (`POST /v1/dvs/apply`) is validated whole, recorded as a new
//! revision (`in-progress`), and rolled out by [`tandem_dvs::Rollout`]: the
//! canary alone, then every other changing host at once. Per host:
//!
//! 1. `POST /v1/switch/txn {txid, document_toml, timeout_s}` on a fresh
//!    mutual-TLS connection to the host's reported API address, the
//!    server checked to be that host's certificate. The host saves what it
//!    runs, applies, and returns the txid and its new digest.
//! 2. On the return, `POST /v1/switch/commit {txid}` on **another fresh
//!    connection**: its handshake runs over the host's new configuration,
//!    so a commit that gets through is the manager hearing the host over
//!    it. Only the commit's acknowledgement makes the host
//!    [`committed`](tandem_dvs::HostSwitch::commit_acked).
//! 3. No return by the timeout, or no acknowledgement of the commit: the
//!    host is out of sync, and its model stays at the previous revision;
//!    the host rolls back by itself and says so (`POST
//!    /v1/host/switch-sync`), or its next heartbeat's digest says what it
//!    runs.
//!
//! At the first host that does not commit nothing more starts, and the
//! hosts that committed get the previous revision's rendering as a new
//! transaction. The revision becomes current only if every host committed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tandem_api::{
    SwitchCommitRequest, SwitchCommitted, SwitchTxnApplied, SwitchTxnRequest, SwitchTxnStatus,
    TxnOutcome, TXN_TIMEOUT_DEFAULT_S, TXN_TIMEOUT_MAX_S, TXN_TIMEOUT_MIN_S,
};
use tandem_dvs::txn::AfterReturn;
use tandem_dvs::{
    DvsDocument, HostResult, HostSwitch, InvalidDvs, OutOfSyncReason, ReturnFailure, Rollout,
    RolloutOutcome, RolloutPlan, Step, SyncState,
};
use tandem_pki::rustls::ClientConfig;
use tandem_pki::{Identity, Peer, PkiError};
use tracing::{info, warn};
use uuid::Uuid;

use crate::api::{
    DvsApplyReport, DvsApplyRequest, DvsHostOutcome, DvsHostView, DvsRollbackRequest, DvsView,
    FieldProblem, HostSwitchSync,
};
use crate::client::{ClientError, ClusterClient};
use crate::model::dvs::{
    dvs_host_key, dvs_revision_key, DvsRecord, DvsRevision, DvsRevisionHost, HostSwitchRecord,
    DVS_HOSTS_PREFIX, DVS_KEY, DVS_REVISIONS_PREFIX,
};
use crate::service::{Manager, ManagerError};
use crate::store::typed::{self, Change};

type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// How many recent revisions' renderings the manager remembers to name
/// the revision a host's digest belongs to.
const KNOWN_REVISIONS: usize = 32;

/// The manager's in-memory part of the distributed switch.
#[derive(Default)]
pub struct DvsState {
    /// TLS to hosts' APIs, from the manager's identity
    /// ([`Manager::set_identity`]).
    pub(crate) host_tls: RwLock<Option<Arc<ClientConfig>>>,
    /// One rollout at a time.
    rollout: tokio::sync::Mutex<()>,
    /// The revision rolling out now (0: none).
    in_progress: AtomicU64,
    /// Every host's switch state, loaded from the store on first use;
    /// written back when a transaction starts and when anything ends.
    hosts: tokio::sync::Mutex<Option<BTreeMap<String, HostSwitch>>>,
    /// Recent revisions' per-host digests.
    digests: Mutex<BTreeMap<u64, BTreeMap<String, String>>>,
}

fn invalid(e: InvalidDvs) -> ManagerError {
    ManagerError::InvalidDocument {
        message: e.to_string(),
        fields: e
            .0
            .into_iter()
            .map(|p| FieldProblem {
                field: p.field,
                message: p.message,
            })
            .collect(),
    }
}

/// Whether a failed transaction request certainly did not reach the host's
/// switch: nothing was sent, or the host answered with a refusal.
fn classify(e: &ClientError) -> ReturnFailure {
    match e {
        ClientError::Connect { .. } | ClientError::Tls { .. } | ClientError::Local(_) => {
            ReturnFailure::NotApplied(e.to_string())
        }
        ClientError::Server { kind, message, .. } => {
            ReturnFailure::NotApplied(format!("{kind}: {message}"))
        }
        ClientError::Timeout { .. } | ClientError::Http { .. } | ClientError::Decode { .. } => {
            ReturnFailure::Unknown(e.to_string())
        }
    }
}

fn result_of(h: &HostSwitch, revision: u64) -> HostResult {
    if h.committed_at(revision) {
        return HostResult::Committed;
    }
    match &h.state {
        SyncState::Failed { why } => HostResult::NotApplied(why.clone()),
        SyncState::OutOfSync { why } => HostResult::OutOfSync(why.describe()),
        other => HostResult::OutOfSync(format!("ended {}", other.word())),
    }
}

impl Manager {
    /// Gives the manager its own certificate for dialling hosts' APIs; call
    /// again after the manager's certificate is renewed.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), PkiError> {
        let config = tandem_pki::client_config(identity, self.revocation_list())?;
        *self.dvs.host_tls.write() = Some(config);
        Ok(())
    }

    /// Loads the hosts' switch states and recent revisions once. A
    /// transaction found pending was cut off by a manager restart: the
    /// host rolls back by itself, and the manager knows nothing more.
    async fn hosts_loaded<'a>(
        &'a self,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<BTreeMap<String, HostSwitch>>>> {
        let mut guard = self.dvs.hosts.lock().await;
        if guard.is_none() {
            let now = self.now_ms();
            let mut map = BTreeMap::new();
            for v in
                typed::list::<HostSwitchRecord>(self.store().as_ref(), DVS_HOSTS_PREFIX).await?
            {
                let mut h = v.value.0;
                if let SyncState::Pending { txid, .. } = &h.state {
                    let why = OutOfSyncReason::ReturnLost(format!(
                        "the manager restarted while {txid} was in flight"
                    ));
                    h.state = SyncState::OutOfSync { why };
                    h.since_ms = now;
                }
                map.insert(h.host.clone(), h);
            }
            let revisions =
                typed::list::<DvsRevision>(self.store().as_ref(), DVS_REVISIONS_PREFIX).await?;
            let mut digests = self.dvs.digests.lock();
            for r in revisions.iter().rev().take(KNOWN_REVISIONS) {
                if let Ok(doc) = DvsDocument::from_toml(&r.value.document_toml) {
                    digests.insert(r.value.revision, doc.digests());
                }
            }
            drop(digests);
            *guard = Some(map);
        }
        Ok(guard)
    }

    /// Changes one host's state with `f`; writes it to the store if
    /// `persist` and it changed. Returns what `f` returned and the state.
    async fn update_host<R>(
        &self,
        host: &str,
        persist: bool,
        f: impl FnOnce(&mut HostSwitch) -> R,
    ) -> Result<(R, HostSwitch)> {
        let now = self.now_ms();
        let mut guard = self.hosts_loaded().await?;
        let map = guard.get_or_insert_with(BTreeMap::new);
        let entry = map
            .entry(host.to_string())
            .or_insert_with(|| HostSwitch::new(host, now));
        let before = entry.clone();
        let r = f(entry);
        let after = entry.clone();
        if persist && after != before {
            typed::put(
                self.store().as_ref(),
                &dvs_host_key(host),
                &HostSwitchRecord(after.clone()),
            )
            .await?;
        }
        Ok((r, after))
    }

    /// Names the revision whose rendering for `host` has a digest: the
    /// current revision first, then the newest.
    fn revision_resolver(&self, host: &str, current: u64) -> impl Fn(&str) -> Option<u64> {
        let known: Vec<(u64, String)> = {
            let digests = self.dvs.digests.lock();
            let mut v: Vec<(u64, String)> = digests
                .iter()
                .rev()
                .filter_map(|(r, m)| m.get(host).map(|d| (*r, d.clone())))
                .collect();
            v.sort_by_key(|(r, _)| (*r != current, std::cmp::Reverse(*r)));
            v
        };
        move |digest: &str| known.iter().find(|(_, d)| d == digest).map(|(r, _)| *r)
    }

    fn remember_digests(&self, revision: u64, doc: &DvsDocument) {
        let mut digests = self.dvs.digests.lock();
        digests.insert(revision, doc.digests());
        while digests.len() > KNOWN_REVISIONS {
            digests.pop_first();
        }
    }

    async fn dvs_record(&self) -> Result<DvsRecord> {
        Ok(typed::get::<DvsRecord>(self.store().as_ref(), DVS_KEY)
            .await?
            .map(|v| v.value)
            .unwrap_or_default())
    }

    // ---- what the hosts say ----------------------------------------------

    /// A heartbeat's switch status: resolves an out-of-sync host, notices
    /// a configuration changed behind the manager's back.
    pub(crate) async fn observe_switch(&self, host: &str, status: &SwitchTxnStatus) -> Result<()> {
        let current = self.dvs_record().await?.revision;
        let resolve = self.revision_resolver(host, current);
        let now = self.now_ms();
        let (_, after) = self
            .update_host(host, true, |h| {
                h.observed(
                    &status.running_digest,
                    status.pending.is_some(),
                    status.alarm.is_some(),
                    &resolve,
                    now,
                )
            })
            .await?;
        if let SyncState::Resynced = after.state {
            if after.since_ms == now {
                info!(host, revision = ?after.revision, digest = %status.running_digest, "switch resynced from the heartbeat");
            }
        }
        Ok(())
    }

    /// `POST /v1/host/switch-sync`: a transaction ended on the host
    /// without a commit (rolled back, restored at start) or it runs its
    /// fallback.
    pub async fn switch_sync(&self, peer: &Peer, msg: HostSwitchSync) -> Result<()> {
        self.member(peer).await?;
        if msg.running_digest.len() != 64
            || !msg.running_digest.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ManagerError::Invalid(
                "running_digest must be 64 hex digits (SwitchDocument::digest)".into(),
            ));
        }
        if msg.document_toml.len() > tandem_dvs::document::MAX_DOCUMENT_BYTES {
            return Err(ManagerError::Invalid("document_toml is over 1 MiB".into()));
        }
        if let Some(t) = &msg.txid {
            if t.is_empty() || t.len() > 128 {
                return Err(ManagerError::Invalid("txid is 1..=128 characters".into()));
            }
        }
        match tandem_switch_core::config::SwitchDocument::from_toml(&msg.document_toml) {
            Ok(d) if d.digest() != msg.running_digest => warn!(
                host = %peer.name,
                "switch sync: the document sent does not have the digest reported; keeping the digest"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(host = %peer.name, "switch sync: the document sent does not parse: {e}")
            }
        }
        let fallback = msg.outcome == TxnOutcome::Fallback;
        let current = self.dvs_record().await?.revision;
        let resolve = self.revision_resolver(&peer.name, current);
        let now = self.now_ms();
        let (_, after) = self
            .update_host(&peer.name, true, |h| {
                h.host_synced(
                    msg.txid.as_deref(),
                    fallback,
                    &msg.running_digest,
                    &resolve,
                    now,
                )
            })
            .await?;
        if fallback {
            warn!(host = %peer.name, txid = ?msg.txid, digest = %msg.running_digest, "ALARM: host could not restore its switch configuration and runs its fallback; failed to update");
        } else {
            info!(host = %peer.name, txid = ?msg.txid, outcome = ?msg.outcome, revision = ?after.revision, digest = %msg.running_digest, state = after.state.word(), "host switch sync");
        }
        Ok(())
    }

    // ---- operators ---------------------------------------------------------

    pub async fn dvs_view(&self) -> Result<DvsView> {
        let rec = self.dvs_record().await?;
        let doc = rec
            .document_toml
            .as_deref()
            .and_then(|t| DvsDocument::from_toml(t).ok());
        let expected = doc.as_ref().map(|d| d.digests()).unwrap_or_default();
        let states = self
            .hosts_loaded()
            .await?
            .as_ref()
            .cloned()
            .unwrap_or_default();
        let mut names: Vec<String> = doc.as_ref().map(|d| d.host_names()).unwrap_or_default();
        names.extend(
            states
                .keys()
                .filter(|h| !expected.contains_key(*h))
                .cloned(),
        );
        let mut hosts = Vec::with_capacity(names.len());
        for name in names {
            let h = states
                .get(&name)
                .cloned()
                .unwrap_or_else(|| HostSwitch::new(&name, 0));
            let expected_digest = expected.get(&name).cloned();
            let detail = match &h.state {
                SyncState::OutOfSync { why } => Some(why.describe()),
                SyncState::Failed { why } => Some(why.clone()),
                _ => h.detail.clone(),
            };
            hosts.push(DvsHostView {
                in_document: expected_digest.is_some(),
                state: h.state.word().to_string(),
                matches_current: expected_digest.is_some() && h.digest == expected_digest,
                revision: h.revision,
                digest: h.digest.clone(),
                expected_digest,
                last_txid: h.last_txid.clone(),
                since: h.since_ms / 1000,
                detail,
                host_api: self.host_api_of(&name).await?,
                host: name,
            });
        }
        let in_progress = self.dvs.in_progress.load(Ordering::Relaxed);
        Ok(DvsView {
            revision: rec.revision,
            document_toml: rec.document_toml,
            updated_at: rec.updated_at,
            updated_by: rec.updated_by,
            rollout_in_progress: (in_progress != 0).then_some(in_progress),
            hosts,
        })
    }

    /// Every revision, newest first, without their documents.
    pub async fn dvs_history(&self) -> Result<Vec<DvsRevision>> {
        let mut all: Vec<DvsRevision> =
            typed::list::<DvsRevision>(self.store().as_ref(), DVS_REVISIONS_PREFIX)
                .await?
                .into_iter()
                .map(|v| v.value)
                .collect();
        all.reverse();
        for r in &mut all {
            r.document_toml.clear();
        }
        Ok(all)
    }

    pub async fn dvs_revision(&self, revision: u64) -> Result<DvsRevision> {
        typed::get::<DvsRevision>(self.store().as_ref(), &dvs_revision_key(revision))
            .await?
            .map(|v| v.value)
            .ok_or_else(|| ManagerError::NotFound(format!("no DVS revision {revision}")))
    }

    pub async fn dvs_apply(
        self: &Arc<Self>,
        req: DvsApplyRequest,
        by: &Peer,
    ) -> Result<DvsApplyReport> {
        self.roll_out(req.document_toml, req.timeout_s, req.canary, by, None)
            .await
    }

    /// Applies an old revision's document again, as a new revision.
    pub async fn dvs_rollback(
        self: &Arc<Self>,
        req: DvsRollbackRequest,
        by: &Peer,
    ) -> Result<DvsApplyReport> {
        let old = self.dvs_revision(req.revision).await?;
        self.roll_out(
            old.document_toml,
            req.timeout_s,
            req.canary,
            by,
            Some(req.revision),
        )
        .await
    }

    async fn roll_out(
        self: &Arc<Self>,
        text: String,
        timeout_s: Option<u32>,
        canary: Option<String>,
        by: &Peer,
        rollback_of: Option<u64>,
    ) -> Result<DvsApplyReport> {
        let started = Instant::now();
        let timeout_s = timeout_s.unwrap_or(TXN_TIMEOUT_DEFAULT_S);
        if !(TXN_TIMEOUT_MIN_S..=TXN_TIMEOUT_MAX_S).contains(&timeout_s) {
            return Err(ManagerError::Invalid(format!(
                "timeout_s {timeout_s} is outside {TXN_TIMEOUT_MIN_S}..={TXN_TIMEOUT_MAX_S}"
            )));
        }
        let doc = DvsDocument::from_toml(&text).map_err(invalid)?;
        let members = self.host_names().await?;
        doc.validate(Some(&members)).map_err(invalid)?;
        let config = self.dvs.host_tls.read().clone().ok_or_else(|| {
            ManagerError::Conflict(
                "this manager has no certificate to reach hosts with (Manager::set_identity)"
                    .into(),
            )
        })?;
        let Ok(_one_at_a_time) = self.dvs.rollout.try_lock() else {
            return Err(ManagerError::Conflict(format!(
                "revision {} is rolling out; one change at a time",
                self.dvs.in_progress.load(Ordering::Relaxed)
            )));
        };
        let digests = doc.digests();
        let unchanged: BTreeSet<String> = {
            let guard = self.hosts_loaded().await?;
            let states = guard.as_ref();
            digests
                .iter()
                .filter(|(h, d)| {
                    states.and_then(|s| s.get(*h)).is_some_and(|s| {
                        matches!(s.state, SyncState::InSync | SyncState::Resynced)
                            && s.digest.as_deref() == Some(d.as_str())
                    })
                })
                .map(|(h, _)| h.clone())
                .collect()
        };
        let plan = RolloutPlan::new(&doc.host_names(), canary.as_deref(), &unchanged)
            .map_err(ManagerError::Invalid)?;

        // The revision is given out and recorded before anything is sent.
        let at = self.now();
        let issued =
            typed::update::<DvsRecord, ManagerError, _>(self.store().as_ref(), DVS_KEY, |cur| {
                let mut r = cur.unwrap_or_default();
                r.last_issued = r.last_issued.max(r.revision) + 1;
                Ok(Change::Put(r))
            })
            .await?
            .ok_or_else(|| ManagerError::Conflict("the DVS record vanished".into()))?
            .value;
        let revision = issued.last_issued;
        let previous = issued.revision;
        let previous_doc = issued
            .document_toml
            .as_deref()
            .and_then(|t| DvsDocument::from_toml(t).ok());
        let mut history = DvsRevision {
            revision,
            author: by.name.clone(),
            at,
            outcome: "in-progress".into(),
            finished_at: None,
            rollback_of,
            hosts: Vec::new(),
            document_toml: text.clone(),
        };
        typed::put(self.store().as_ref(), &dvs_revision_key(revision), &history).await?;
        self.remember_digests(revision, &doc);
        self.dvs.in_progress.store(revision, Ordering::Relaxed);
        info!(revision, previous, by = %by.name, canary = ?plan.canary, wave = plan.wave.len(), unchanged = plan.unchanged.len(), timeout_s, "DVS change rolling out");

        let mut rollout = Rollout::new(plan.clone());
        let mut txids: BTreeMap<String, String> = BTreeMap::new();
        let mut revert_txids: BTreeMap<String, String> = BTreeMap::new();
        let outcome = loop {
            match rollout.next_step() {
                Step::Apply(hosts) => {
                    let targets = hosts
                        .into_iter()
                        .filter_map(|h| {
                            let rendered = doc.render(&h)?;
                            Some((h.clone(), rendered.to_toml(), digests[&h].clone()))
                        })
                        .collect();
                    for (host, txid, result) in self
                        .transact_all(&config, targets, revision, timeout_s)
                        .await
                    {
                        txids.insert(host.clone(), txid);
                        rollout.record(&host, result);
                    }
                }
                Step::Revert(hosts) => {
                    let mut targets = Vec::new();
                    for h in hosts {
                        match previous_doc.as_ref().and_then(|d| d.render(&h)) {
                            Some(r) => targets.push((h, r.to_toml(), r.digest())),
                            None => rollout.record_revert(
                                &h,
                                HostResult::NotApplied(format!(
                                    "{h} is not in revision {previous}: it keeps revision {revision}"
                                )),
                            ),
                        }
                    }
                    for (host, txid, result) in self
                        .transact_all(&config, targets, previous, timeout_s)
                        .await
                    {
                        revert_txids.insert(host.clone(), txid);
                        rollout.record_revert(&host, result);
                    }
                }
                Step::Done(o) => break o,
            }
        };

        if outcome == RolloutOutcome::Completed {
            typed::update::<DvsRecord, ManagerError, _>(self.store().as_ref(), DVS_KEY, |cur| {
                let mut r = cur.unwrap_or_default();
                r.revision = revision;
                r.document_toml = Some(text.clone());
                r.updated_at = Some(self.now());
                r.updated_by = Some(by.name.clone());
                Ok(Change::Put(r))
            })
            .await?;
            // Hosts that already ran this rendering run this revision.
            for h in &plan.unchanged {
                let d = digests[h].clone();
                self.update_host(h, true, |s| {
                    if s.digest.as_deref() == Some(d.as_str()) {
                        s.revision = Some(revision);
                        s.state = SyncState::InSync;
                    }
                })
                .await?;
            }
        }

        let states = self
            .hosts_loaded()
            .await?
            .as_ref()
            .cloned()
            .unwrap_or_default();
        let mut report_hosts = Vec::new();
        let roles = plan
            .canary
            .iter()
            .map(|h| (h, "canary"))
            .chain(plan.wave.iter().map(|h| (h, "wave")))
            .chain(plan.unchanged.iter().map(|h| (h, "unchanged")));
        for (host, role) in roles {
            let (result, detail) = match rollout.result(host) {
                Some(r) => (r.word().to_string(), r.detail().map(String::from)),
                None if role == "unchanged" => ("unchanged".to_string(), None),
                None => (
                    "skipped".to_string(),
                    Some("the rollout stopped first".into()),
                ),
            };
            let revert = rollout.revert_result(host);
            report_hosts.push(DvsHostOutcome {
                host: host.clone(),
                role: role.to_string(),
                result,
                detail,
                txid: txids.get(host).cloned(),
                revert: revert.map(|r| r.word().to_string()),
                revert_detail: revert.and_then(|r| r.detail().map(String::from)),
                state: states
                    .get(host)
                    .map(|s| s.state.word())
                    .unwrap_or("unknown")
                    .to_string(),
            });
        }
        history.outcome = outcome.word().to_string();
        history.finished_at = Some(self.now());
        history.hosts = report_hosts
            .iter()
            .map(|h| DvsRevisionHost {
                host: h.host.clone(),
                result: h.result.clone(),
                revert: h.revert.clone(),
            })
            .collect();
        typed::put(self.store().as_ref(), &dvs_revision_key(revision), &history).await?;
        self.dvs.in_progress.store(0, Ordering::Relaxed);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let current = if outcome == RolloutOutcome::Completed {
            revision
        } else {
            previous
        };
        match outcome {
            RolloutOutcome::Completed => {
                info!(revision, elapsed_ms, "DVS change completed on every host")
            }
            o => {
                warn!(revision, current, elapsed_ms, outcome = o.word(), "DVS change not completed: host(s) not synchronized; the distributed switch stays at revision {current}")
            }
        }
        Ok(DvsApplyReport {
            revision,
            outcome,
            current_revision: current,
            canary: plan.canary.clone(),
            hosts: report_hosts,
            elapsed_ms,
        })
    }

    /// Runs one transaction per target, all at once.
    async fn transact_all(
        self: &Arc<Self>,
        config: &Arc<ClientConfig>,
        targets: Vec<(String, String, String)>,
        revision: u64,
        timeout_s: u32,
    ) -> Vec<(String, String, HostResult)> {
        let mut set = tokio::task::JoinSet::new();
        for (host, document_toml, digest) in targets {
            let me = Arc::clone(self);
            let config = Arc::clone(config);
            set.spawn(async move {
                let (txid, result) = me
                    .transact(&config, &host, document_toml, &digest, revision, timeout_s)
                    .await;
                (host, txid, result)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok(r) => out.push(r),
                // A panicked task: its host is recorded by nothing, and
                // the rollout asks for it again; only a bug gets here.
                Err(e) => warn!("a host transaction task failed: {e}"),
            }
        }
        out
    }

    /// One host's transaction, start to end. Never fails: what went wrong
    /// is the host's result (and its state).
    async fn transact(
        &self,
        config: &Arc<ClientConfig>,
        host: &str,
        document_toml: String,
        digest: &str,
        revision: u64,
        timeout_s: u32,
    ) -> (String, HostResult) {
        let txid = Uuid::new_v4().simple().to_string();
        let result = match self
            .transact_inner(
                config,
                host,
                &txid,
                document_toml,
                digest,
                revision,
                timeout_s,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(host, %txid, "switch transaction: {e}");
                // The store failed around a transaction that may be in
                // flight: say so rather than guess.
                let now = self.now_ms();
                let _ = self
                    .update_host(host, false, |h| {
                        h.return_failed(&txid, ReturnFailure::Unknown(e.to_string()), now);
                        h.commit_failed(&txid, OutOfSyncReason::CommitLost(e.to_string()), now);
                    })
                    .await;
                HostResult::OutOfSync(e.to_string())
            }
        };
        (txid, result)
    }

    #[allow(clippy::too_many_arguments)]
    async fn transact_inner(
        &self,
        config: &Arc<ClientConfig>,
        host: &str,
        txid: &str,
        document_toml: String,
        digest: &str,
        revision: u64,
        timeout_s: u32,
    ) -> Result<HostResult> {
        let timeout = Duration::from_secs(u64::from(timeout_s));
        let start = self.now_ms();
        let (begun, _) = self
            .update_host(host, true, |h| {
                h.begin(txid, revision, digest, start, timeout.as_millis() as u64)
            })
            .await?;
        if let Err(busy) = begun {
            return Ok(HostResult::NotApplied(busy));
        }
        let Some(address) = self.host_api_of(host).await? else {
            let why = format!("{host} has not reported its API address (tandemd --host-api)");
            let (_, after) = self
                .update_host(host, true, |h| {
                    h.return_failed(txid, ReturnFailure::NotApplied(why), start)
                })
                .await?;
            return Ok(result_of(&after, revision));
        };
        let client =
            ClusterClient::to_host(&address, host, Arc::clone(config)).with_timeout(timeout);
        let req = SwitchTxnRequest {
            txid: txid.to_string(),
            document_toml,
            timeout_s: Some(timeout_s),
        };
        let applied: SwitchTxnApplied = match client.post("/v1/switch/txn", &req).await {
            Ok(a) => a,
            Err(e) => {
                let failure = classify(&e);
                let now = self.now_ms();
                let (_, after) = self
                    .update_host(host, true, |h| h.return_failed(txid, failure, now))
                    .await?;
                warn!(
                    host,
                    txid,
                    state = after.state.word(),
                    "switch transaction not returned: {e}"
                );
                return Ok(result_of(&after, revision));
            }
        };
        let now = self.now_ms();
        let (decision, after) = self
            .update_host(host, false, |h| {
                let d = h.returned(&applied.txid, &applied.digest, now);
                if d == AfterReturn::DoNotCommit && h.is_pending() {
                    h.return_failed(
                        txid,
                        ReturnFailure::Unknown(format!(
                            "the host returned transaction {}, not {txid}",
                            applied.txid
                        )),
                        now,
                    );
                }
                d
            })
            .await?;
        if decision == AfterReturn::DoNotCommit {
            self.update_host(host, true, |_| ()).await?;
            warn!(
                host,
                txid,
                state = after.state.word(),
                "switch transaction returned but not committed"
            );
            return Ok(result_of(&after, revision));
        }
        // The commit goes on a new connection, over the host's new
        // configuration, and must be acknowledged before the deadline.
        let deadline = start.saturating_add(timeout.as_millis() as u64);
        let left = Duration::from_millis(
            deadline
                .saturating_sub(now)
                .min(applied.deadline_in_ms)
                .max(1),
        );
        let commit: std::result::Result<SwitchCommitted, ClientError> = client
            .clone()
            .with_timeout(left)
            .post(
                "/v1/switch/commit",
                &SwitchCommitRequest {
                    txid: txid.to_string(),
                },
            )
            .await;
        let now = self.now_ms();
        let (_, after) = match commit {
            Ok(c) => {
                self.update_host(host, true, |h| {
                    h.commit_acked(&c.txid, &c.digest, now);
                    h.deadline_check(now);
                })
                .await?
            }
            Err(e) => {
                let why = match e.kind_str() {
                    Some(k @ ("unknown-txid" | "stale-txid")) => {
                        OutOfSyncReason::CommitRefused(format!("{k}: {e}"))
                    }
                    _ => OutOfSyncReason::CommitLost(e.to_string()),
                };
                warn!(host, txid, "switch commit not acknowledged: {e}");
                self.update_host(host, true, |h| h.commit_failed(txid, why, now))
                    .await?
            }
        };
        Ok(result_of(&after, revision))
    }
}
