//! The manager's view of one host's switch, and how a transaction moves it.
//!
//! Seed 000's VMMS side, per host:
//!
//! ```text
//! in-sync ──begin──▶ pending(awaiting-return) ──returned──▶ pending(awaiting-commit-ok) ──commit acked──▶ in-sync at R+1
//!                      │ not applied (refused, unreachable) ──▶ failed (still at R)
//!                      │ return lost / late / wrong digest ──▶ out-of-sync
//!                                                             │ commit refused / lost / deadline ──▶ out-of-sync
//! out-of-sync ──host-sync or heartbeat digest──▶ resynced at the revision whose rendering it runs (or an unknown configuration)
//! host-sync with outcome fallback ──▶ failed (the host runs its management-only configuration)
//! ```
//!
//! The one rule everything else serves: a host is at the new revision only
//! after the host acknowledged the commit of that very transaction
//! ([`HostSwitch::commit_acked`]). A return without the commit's answer is
//! never "completed": the commit may never have arrived, and then the host
//! rolls back by itself at its deadline.
//!
//! Times are unix milliseconds passed in; nothing here reads a clock.

use serde::{Deserialize, Serialize};

/// Which answer a pending transaction waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxnPhase {
    /// The transaction was sent; the host's return (it saved and applied)
    /// has not come back.
    AwaitingReturn,
    /// The return came; the commit was sent on a new connection and its
    /// acknowledgement has not come back.
    AwaitingCommitOk,
}

/// Why the manager does not know what a host runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "detail")]
pub enum OutOfSyncReason {
    /// No return within the timeout, or the connection broke after the
    /// transaction was sent: it may have been applied. The host rolls
    /// back by itself unless it is committed, and it is not.
    ReturnLost(String),
    /// The return named the transaction but a configuration other than
    /// the one sent: not committed.
    UnexpectedDigest(String),
    /// The commit was sent and no acknowledgement came: the host may have
    /// committed, or may roll back at its deadline.
    CommitLost(String),
    /// The host refused the commit (`unknown-txid`: it already rolled
    /// back; `stale-txid`: another transaction is pending there).
    CommitRefused(String),
}

impl OutOfSyncReason {
    pub fn describe(&self) -> String {
        match self {
            OutOfSyncReason::ReturnLost(d) => format!("return lost: {d}"),
            OutOfSyncReason::UnexpectedDigest(d) => format!("unexpected configuration: {d}"),
            OutOfSyncReason::CommitLost(d) => format!("commit not acknowledged: {d}"),
            OutOfSyncReason::CommitRefused(d) => format!("commit refused: {d}"),
        }
    }
}

/// What the manager knows about a host's switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum SyncState {
    /// Runs the revision in [`HostSwitch::revision`], confirmed by a
    /// committed transaction.
    InSync,
    /// A transaction is in flight.
    Pending {
        txid: String,
        phase: TxnPhase,
        /// The revision and digest the transaction applies.
        target_revision: u64,
        target_digest: String,
        /// After this (unix ms) the host will have rolled back unless
        /// committed; the manager stops waiting then.
        deadline_ms: u64,
    },
    /// The manager does not know what the host runs until the host says.
    OutOfSync { why: OutOfSyncReason },
    /// The host said what it runs (a host-sync message or a heartbeat's
    /// digest) after being out of sync or changed by someone else;
    /// [`HostSwitch::revision`] is the revision whose rendering that is,
    /// if any.
    Resynced,
    /// A transaction was not applied (refused, unreachable: the host runs
    /// what it ran), or the host runs its fallback configuration.
    Failed { why: String },
}

impl SyncState {
    /// The state's word: `in-sync`, `pending`, `out-of-sync`, `resynced`,
    /// `failed`.
    pub fn word(&self) -> &'static str {
        match self {
            SyncState::InSync => "in-sync",
            SyncState::Pending { .. } => "pending",
            SyncState::OutOfSync { .. } => "out-of-sync",
            SyncState::Resynced => "resynced",
            SyncState::Failed { .. } => "failed",
        }
    }
}

/// How sending the transaction failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnFailure {
    /// Certainly not applied: the connection or handshake failed before
    /// the request was sent, or the host answered with an error (busy,
    /// invalid document, bad timeout).
    NotApplied(String),
    /// Perhaps applied: no answer in time, or the connection broke after
    /// the request went out.
    Unknown(String),
}

/// The manager's record of one host's switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSwitch {
    pub host: String,
    pub state: SyncState,
    /// The DVS revision the host runs, as far as the manager knows: set by
    /// an acknowledged commit, or by a host's report whose digest is a
    /// revision's rendering; `None`: never configured by the DVS, or an
    /// unknown configuration.
    #[serde(default)]
    pub revision: Option<u64>,
    /// The digest of what it runs, as last confirmed or reported.
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub last_txid: Option<String>,
    /// Unix ms of the last change of state.
    #[serde(default)]
    pub since_ms: u64,
    /// One line for people about the last change.
    #[serde(default)]
    pub detail: Option<String>,
}

/// What to do with a return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterReturn {
    /// Send the commit, on a new connection.
    Commit,
    /// Do not commit: the host will roll back by itself.
    DoNotCommit,
}

impl HostSwitch {
    pub fn new(host: &str, now_ms: u64) -> Self {
        HostSwitch {
            host: host.to_string(),
            state: SyncState::OutOfSync {
                why: OutOfSyncReason::ReturnLost("never configured by the manager".into()),
            },
            revision: None,
            digest: None,
            last_txid: None,
            since_ms: now_ms,
            detail: None,
        }
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.state, SyncState::Pending { .. })
    }

    /// In sync at `revision`, confirmed by an acknowledged commit.
    pub fn committed_at(&self, revision: u64) -> bool {
        self.state == SyncState::InSync && self.revision == Some(revision)
    }

    fn set(&mut self, state: SyncState, now_ms: u64, detail: Option<String>) {
        self.state = state;
        self.since_ms = now_ms;
        self.detail = detail;
    }

    /// A transaction goes out. Refused while another is pending: one at a
    /// time per host, on the manager's side too.
    pub fn begin(
        &mut self,
        txid: &str,
        target_revision: u64,
        target_digest: &str,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<(), String> {
        if let SyncState::Pending { txid: other, .. } = &self.state {
            return Err(format!(
                "host {} has transaction {other} in flight",
                self.host
            ));
        }
        self.last_txid = Some(txid.to_string());
        self.set(
            SyncState::Pending {
                txid: txid.to_string(),
                phase: TxnPhase::AwaitingReturn,
                target_revision,
                target_digest: target_digest.to_string(),
                deadline_ms: now_ms.saturating_add(timeout_ms),
            },
            now_ms,
            None,
        );
        Ok(())
    }

    /// The host's return. Commit only if it names the pending transaction,
    /// reports the configuration sent, and came before the deadline (after
    /// it the host has rolled back, and a commit would be refused anyway).
    pub fn returned(&mut self, txid: &str, digest: &str, now_ms: u64) -> AfterReturn {
        let SyncState::Pending {
            txid: pending,
            phase: TxnPhase::AwaitingReturn,
            target_revision,
            target_digest,
            deadline_ms,
        } = &self.state
        else {
            return AfterReturn::DoNotCommit;
        };
        if pending != txid {
            return AfterReturn::DoNotCommit;
        }
        if now_ms >= *deadline_ms {
            let why = OutOfSyncReason::ReturnLost(format!("the return of {txid} came too late"));
            self.set(SyncState::OutOfSync { why }, now_ms, None);
            return AfterReturn::DoNotCommit;
        }
        if digest != target_digest {
            let why = OutOfSyncReason::UnexpectedDigest(format!(
                "{txid} returned digest {digest}, not {target_digest}"
            ));
            self.set(SyncState::OutOfSync { why }, now_ms, None);
            return AfterReturn::DoNotCommit;
        }
        self.state = SyncState::Pending {
            txid: txid.to_string(),
            phase: TxnPhase::AwaitingCommitOk,
            target_revision: *target_revision,
            target_digest: target_digest.clone(),
            deadline_ms: *deadline_ms,
        };
        self.since_ms = now_ms;
        AfterReturn::Commit
    }

    /// The transaction did not come back. If it certainly was not applied
    /// the host still runs what it ran (failed, revision unchanged);
    /// otherwise nobody knows until the host says (out of sync; the model
    /// stays at the previous revision, which the host restores by itself).
    pub fn return_failed(&mut self, txid: &str, failure: ReturnFailure, now_ms: u64) {
        if !self.pending_is(txid, TxnPhase::AwaitingReturn) {
            return;
        }
        match failure {
            ReturnFailure::NotApplied(why) => {
                self.set(SyncState::Failed { why: why.clone() }, now_ms, Some(why))
            }
            ReturnFailure::Unknown(why) => self.set(
                SyncState::OutOfSync {
                    why: OutOfSyncReason::ReturnLost(why),
                },
                now_ms,
                None,
            ),
        }
    }

    /// The host acknowledged the commit: the only way to the new revision.
    /// Returns whether it moved.
    pub fn commit_acked(&mut self, txid: &str, digest: &str, now_ms: u64) -> bool {
        let SyncState::Pending {
            txid: pending,
            phase: TxnPhase::AwaitingCommitOk,
            target_revision,
            target_digest,
            ..
        } = &self.state
        else {
            return false;
        };
        if pending != txid {
            return false;
        }
        let revision = *target_revision;
        if digest != target_digest {
            let why = OutOfSyncReason::UnexpectedDigest(format!(
                "{txid} committed digest {digest}, not {target_digest}"
            ));
            self.set(SyncState::OutOfSync { why }, now_ms, None);
            return false;
        }
        self.revision = Some(revision);
        self.digest = Some(digest.to_string());
        self.set(SyncState::InSync, now_ms, None);
        true
    }

    /// The commit was refused or its answer never came.
    pub fn commit_failed(&mut self, txid: &str, why: OutOfSyncReason, now_ms: u64) {
        if self.pending_is(txid, TxnPhase::AwaitingCommitOk) {
            self.set(SyncState::OutOfSync { why }, now_ms, None);
        }
    }

    /// Nothing came back by the deadline, whatever was awaited.
    pub fn deadline_check(&mut self, now_ms: u64) {
        if let SyncState::Pending {
            txid,
            phase,
            deadline_ms,
            ..
        } = &self.state
        {
            if now_ms >= *deadline_ms {
                let why = match phase {
                    TxnPhase::AwaitingReturn => {
                        OutOfSyncReason::ReturnLost(format!("no return of {txid} by its deadline"))
                    }
                    TxnPhase::AwaitingCommitOk => OutOfSyncReason::CommitLost(format!(
                        "no acknowledgement of {txid}'s commit by its deadline"
                    )),
                };
                self.set(SyncState::OutOfSync { why }, now_ms, None);
            }
        }
    }

    fn pending_is(&self, txid: &str, want: TxnPhase) -> bool {
        matches!(&self.state, SyncState::Pending { txid: t, phase, .. } if t == txid && *phase == want)
    }

    /// The host's own report after a transaction ended there (the seed's
    /// "host synchronization"): it runs `running_digest`. `revision_of`
    /// names the DVS revision whose rendering for this host has that
    /// digest. `fallback`: it could not restore and runs its
    /// management-only configuration. A report about another transaction
    /// than the one in flight is left to the rollout.
    pub fn host_synced(
        &mut self,
        txid: Option<&str>,
        fallback: bool,
        running_digest: &str,
        revision_of: &dyn Fn(&str) -> Option<u64>,
        now_ms: u64,
    ) {
        if let SyncState::Pending { txid: pending, .. } = &self.state {
            if txid != Some(pending.as_str()) {
                return;
            }
        }
        self.digest = Some(running_digest.to_string());
        self.revision = revision_of(running_digest);
        if fallback {
            let why = "the host could not restore its saved configuration and runs its fallback (management only)".to_string();
            self.set(SyncState::Failed { why }, now_ms, None);
        } else {
            let detail = Some(match self.revision {
                Some(r) => format!("host reports it runs revision {r}"),
                None => "host reports an unknown configuration".into(),
            });
            self.set(SyncState::Resynced, now_ms, detail);
        }
    }

    /// A heartbeat's switch status: what the host runs, and whether a
    /// transaction is pending there. Resolves out-of-sync (the host
    /// rolled back, or kept the commit) and notices a configuration
    /// changed outside the manager; never touches a transaction in flight.
    pub fn observed(
        &mut self,
        running_digest: &str,
        host_pending: bool,
        alarm: bool,
        revision_of: &dyn Fn(&str) -> Option<u64>,
        now_ms: u64,
    ) {
        if host_pending || self.is_pending() {
            return;
        }
        let same = self.digest.as_deref() == Some(running_digest);
        match &self.state {
            SyncState::InSync | SyncState::Resynced if same => {}
            SyncState::Failed { .. } if same || alarm => {}
            _ => {
                let was = self.state.word();
                self.digest = Some(running_digest.to_string());
                self.revision = revision_of(running_digest);
                let detail = Some(match (was, self.revision) {
                    ("out-of-sync", Some(r)) => format!("heartbeat: the host runs revision {r}"),
                    ("out-of-sync", None) => "heartbeat: the host runs an unknown configuration".into(),
                    (_, Some(r)) => format!("heartbeat: configuration changed outside the manager; it is revision {r}'s"),
                    (_, None) => "heartbeat: configuration changed outside the manager".into(),
                });
                self.set(SyncState::Resynced, now_ms, detail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rev: u64, digest: &str) -> HostSwitch {
        let mut h = HostSwitch::new("host-a", 0);
        h.state = SyncState::InSync;
        h.revision = Some(rev);
        h.digest = Some(digest.into());
        h
    }

    fn revs(d: &str) -> Option<u64> {
        match d {
            "d1" => Some(1),
            "d2" => Some(2),
            _ => None,
        }
    }

    #[test]
    fn success_needs_the_commit_acknowledged() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 1000, 30_000).unwrap();
        assert!(
            h.begin("t2", 3, "d3", 1000, 30_000).is_err(),
            "one at a time"
        );
        assert_eq!(h.returned("t1", "d2", 1500), AfterReturn::Commit);
        assert!(!h.committed_at(2), "a return is not a commit");
        assert!(!h.commit_acked("t0", "d2", 1600), "another txid");
        assert!(h.commit_acked("t1", "d2", 1600));
        assert!(h.committed_at(2));
        assert_eq!(h.digest.as_deref(), Some("d2"));
    }

    #[test]
    fn return_lost_keeps_the_previous_revision_until_the_host_says() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        h.return_failed("t1", ReturnFailure::Unknown("timed out".into()), 5_000);
        assert_eq!(h.state.word(), "out-of-sync");
        assert_eq!(h.revision, Some(1));
        // The host rolled back and says so.
        h.host_synced(Some("t1"), false, "d1", &revs, 6_000);
        assert_eq!(h.state, SyncState::Resynced);
        assert_eq!(h.revision, Some(1));
    }

    #[test]
    fn commit_lost_is_never_completed_and_a_heartbeat_resolves_it() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        assert_eq!(h.returned("t1", "d2", 100), AfterReturn::Commit);
        h.commit_failed("t1", OutOfSyncReason::CommitLost("reset".into()), 200);
        assert!(!h.committed_at(2));
        assert_eq!(h.state.word(), "out-of-sync");
        // A pending host is left alone; the rolled-back one resolves.
        h.observed("d2", true, false, &revs, 300);
        assert_eq!(h.state.word(), "out-of-sync");
        h.observed("d1", false, false, &revs, 6_000);
        assert_eq!(h.state, SyncState::Resynced);
        assert_eq!(h.revision, Some(1));
    }

    #[test]
    fn refusals_leave_the_host_where_it_was() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        h.return_failed("t1", ReturnFailure::NotApplied("busy".into()), 10);
        assert_eq!(h.state.word(), "failed");
        assert_eq!((h.revision, h.digest.as_deref()), (Some(1), Some("d1")));
    }

    #[test]
    fn late_or_wrong_returns_are_not_committed() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        assert_eq!(h.returned("t1", "d2", 5_000), AfterReturn::DoNotCommit);
        assert_eq!(h.state.word(), "out-of-sync");
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        assert_eq!(h.returned("tX", "d2", 10), AfterReturn::DoNotCommit);
        assert_eq!(h.returned("t1", "dX", 10), AfterReturn::DoNotCommit);
        assert_eq!(h.state.word(), "out-of-sync");
    }

    #[test]
    fn deadlines_and_fallback() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        h.deadline_check(4_999);
        assert!(h.is_pending());
        h.deadline_check(5_000);
        assert_eq!(h.state.word(), "out-of-sync");
        h.host_synced(Some("t1"), true, "dF", &revs, 5_100);
        assert_eq!(h.state.word(), "failed");
        assert_eq!(h.revision, None);
        // The alarm keeps it failed through heartbeats.
        h.observed("dF2", false, true, &revs, 5_200);
        assert_eq!(h.state.word(), "failed");
    }

    #[test]
    fn drift_outside_the_manager_is_noticed() {
        let mut h = at(2, "d2");
        h.observed("d2", false, false, &revs, 10);
        assert_eq!(h.state, SyncState::InSync);
        h.observed("local", false, false, &revs, 20);
        assert_eq!(h.state, SyncState::Resynced);
        assert_eq!(h.revision, None);
        assert!(h.detail.as_deref().unwrap_or("").contains("outside"));
    }

    #[test]
    fn a_host_sync_about_another_transaction_leaves_the_pending_one() {
        let mut h = at(1, "d1");
        h.begin("t2", 2, "d2", 0, 5_000).unwrap();
        h.host_synced(Some("t1"), false, "d1", &revs, 10);
        assert!(h.is_pending());
    }

    #[test]
    fn states_serialize_with_their_words() {
        let mut h = at(1, "d1");
        h.begin("t1", 2, "d2", 0, 5_000).unwrap();
        let j = serde_json::to_value(&h).unwrap();
        assert_eq!(j["state"]["state"], "pending");
        assert_eq!(j["state"]["phase"], "awaiting-return");
        let back: HostSwitch = serde_json::from_value(j).unwrap();
        assert_eq!(back, h);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Event {
        Begin(u8),
        Return {
            txid: u8,
            right_digest: bool,
        },
        ReturnFailed {
            txid: u8,
            applied: bool,
        },
        Ack {
            txid: u8,
            right_digest: bool,
        },
        CommitFailed(u8),
        Tick(u64),
        HostSync {
            txid: Option<u8>,
            fallback: bool,
            rev: u64,
        },
        Heartbeat {
            rev: u64,
            pending: bool,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u8..3).prop_map(Event::Begin),
            (0u8..3, any::<bool>())
                .prop_map(|(txid, right_digest)| Event::Return { txid, right_digest }),
            (0u8..3, any::<bool>())
                .prop_map(|(txid, applied)| Event::ReturnFailed { txid, applied }),
            (0u8..3, any::<bool>())
                .prop_map(|(txid, right_digest)| Event::Ack { txid, right_digest }),
            (0u8..3).prop_map(Event::CommitFailed),
            (0u64..20_000).prop_map(Event::Tick),
            (proptest::option::of(0u8..3), any::<bool>(), 0u64..4).prop_map(
                |(txid, fallback, rev)| Event::HostSync {
                    txid,
                    fallback,
                    rev
                }
            ),
            (0u64..4, any::<bool>()).prop_map(|(rev, pending)| Event::Heartbeat { rev, pending }),
        ]
    }

    fn digest(rev: u64) -> String {
        format!("d{rev}")
    }

    fn rev_of(d: &str) -> Option<u64> {
        d.strip_prefix('d').and_then(|r| r.parse().ok())
    }

    proptest! {
        /// In any order of events: the host reaches `InSync` at a revision
        /// a transaction targeted only by an acknowledgement of that
        /// transaction's commit with the right digest, after its return
        /// with the right digest; and never two transactions at once.
        #[test]
        fn in_sync_only_by_an_acknowledged_commit(events in proptest::collection::vec(event(), 1..40)) {
            let mut h = HostSwitch::new("h", 0);
            h.state = SyncState::InSync;
            h.revision = Some(0);
            h.digest = Some(digest(0));
            let mut now = 0u64;
            let mut next_rev = 1u64;
            // txid -> (target revision, returned ok)
            let mut sent: std::collections::BTreeMap<String, (u64, bool)> = Default::default();
            for e in events {
                now += 100;
                let before = h.clone();
                let mut acked_ok = false;
                match e {
                    Event::Begin(t) => {
                        let txid = format!("t{t}-{now}");
                        if h.begin(&txid, next_rev, &digest(next_rev), now, 5_000).is_ok() {
                            prop_assert!(!before.is_pending());
                            sent.insert(txid, (next_rev, false));
                            next_rev += 1;
                        } else {
                            prop_assert!(before.is_pending());
                        }
                    }
                    Event::Return { txid, right_digest } => {
                        if let Some(t) = pick(&h, &sent, txid) {
                            let target = sent[&t].0;
                            let d = if right_digest { digest(target) } else { "dX".into() };
                            if h.returned(&t, &d, now) == AfterReturn::Commit {
                                prop_assert!(right_digest);
                                sent.get_mut(&t).unwrap().1 = true;
                            }
                        }
                    }
                    Event::ReturnFailed { txid, applied } => {
                        if let Some(t) = pick(&h, &sent, txid) {
                            let f = if applied {
                                ReturnFailure::Unknown("x".into())
                            } else {
                                ReturnFailure::NotApplied("x".into())
                            };
                            h.return_failed(&t, f, now);
                        }
                    }
                    Event::Ack { txid, right_digest } => {
                        if let Some(t) = pick(&h, &sent, txid) {
                            let (target, returned) = sent[&t];
                            let d = if right_digest { digest(target) } else { "dX".into() };
                            if h.commit_acked(&t, &d, now) {
                                prop_assert!(returned && right_digest);
                                acked_ok = true;
                            }
                        }
                    }
                    Event::CommitFailed(txid) => {
                        if let Some(t) = pick(&h, &sent, txid) {
                            h.commit_failed(&t, OutOfSyncReason::CommitLost("x".into()), now);
                        }
                    }
                    Event::Tick(dt) => {
                        now += dt;
                        h.deadline_check(now);
                    }
                    Event::HostSync { txid, fallback, rev } => {
                        let t = txid.and_then(|t| pick(&h, &sent, t));
                        h.host_synced(t.as_deref(), fallback, &digest(rev), &rev_of, now);
                    }
                    Event::Heartbeat { rev, pending } => {
                        h.observed(&digest(rev), pending, false, &rev_of, now);
                        // A heartbeat never ends a transaction in flight.
                        prop_assert_eq!(before.is_pending(), h.is_pending());
                    }
                }
                // The invariant: entering InSync at a transaction's target
                // happens only through an acknowledged commit.
                let entered_committed = h.state == SyncState::InSync
                    && (before.state != SyncState::InSync || before.revision != h.revision);
                if entered_committed {
                    prop_assert!(acked_ok, "in sync without an acknowledged commit: {:?} -> {:?}", before, h);
                }
            }
        }
    }

    /// The txid the event names: the one pending if `n` is 0, else an
    /// older one, if any.
    fn pick(
        h: &HostSwitch,
        sent: &std::collections::BTreeMap<String, (u64, bool)>,
        n: u8,
    ) -> Option<String> {
        if let (0, SyncState::Pending { txid, .. }) = (n, &h.state) {
            return Some(txid.clone());
        }
        sent.keys().nth(n as usize).cloned()
    }
}
