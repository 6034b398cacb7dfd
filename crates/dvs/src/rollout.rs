//! A change across hosts: which hosts go when, when to stop, what to undo.
//!
//! The canary goes first, alone: the operator's `--canary`, else the
//! first host of the document whose configuration changes. If it commits,
//! every other changing host goes at once (one wave, in parallel: a
//! change reaching 32 hosts should take about one transaction's time, not
//! 32). At the first host that does not commit, nothing more is started;
//! the hosts of the wave already in flight finish, and then exactly the
//! hosts that committed are reverted (the driver sends each the previous
//! revision's rendering as a new transaction). Hosts that did not commit
//! need no revert: they never applied, or they roll back by themselves.
//!
//! [`Rollout`] is the bookkeeping: the driver asks [`Rollout::next_step`] what
//! to do, does it, and [`Rollout::record`]s each host's result.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How one host's transaction ended, as far as the rollout is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "result", content = "detail")]
pub enum HostResult {
    /// The host acknowledged the commit.
    Committed,
    /// Not applied: refused, or unreachable before anything was sent. The
    /// host runs what it ran.
    NotApplied(String),
    /// Perhaps applied, not committed: the host rolls back by itself at
    /// its deadline, and is out of sync until it says what it runs.
    OutOfSync(String),
}

impl HostResult {
    pub fn committed(&self) -> bool {
        matches!(self, HostResult::Committed)
    }

    pub fn word(&self) -> &'static str {
        match self {
            HostResult::Committed => "committed",
            HostResult::NotApplied(_) => "not-applied",
            HostResult::OutOfSync(_) => "out-of-sync",
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            HostResult::Committed => None,
            HostResult::NotApplied(d) | HostResult::OutOfSync(d) => Some(d),
        }
    }
}

/// Which hosts a change goes to, in which order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// Goes first, alone. `None` when no host changes.
    pub canary: Option<String>,
    /// Go together once the canary committed.
    pub wave: Vec<String>,
    /// Already run the new configuration: nothing is sent to them.
    pub unchanged: Vec<String>,
}

impl RolloutPlan {
    /// `hosts` in document order; `unchanged` are those known to run the
    /// new rendering already. An explicit `canary` must be one of `hosts`
    /// and goes first even if unchanged (the operator asked for it).
    pub fn new(
        hosts: &[String],
        canary: Option<&str>,
        unchanged: &BTreeSet<String>,
    ) -> Result<RolloutPlan, String> {
        let mut seen = BTreeSet::new();
        for h in hosts {
            if !seen.insert(h.as_str()) {
                return Err(format!("host {h} is listed twice"));
            }
        }
        let canary = match canary {
            Some(c) => {
                if !seen.contains(c) {
                    return Err(format!(
                        "the canary {c} is not a host of the distributed switch"
                    ));
                }
                Some(c.to_string())
            }
            None => hosts.iter().find(|h| !unchanged.contains(*h)).cloned(),
        };
        let wave = hosts
            .iter()
            .filter(|h| Some(*h) != canary.as_ref() && !unchanged.contains(*h))
            .cloned()
            .collect();
        let unchanged = hosts
            .iter()
            .filter(|h| Some(*h) != canary.as_ref() && unchanged.contains(*h))
            .cloned()
            .collect();
        Ok(RolloutPlan {
            canary,
            wave,
            unchanged,
        })
    }

    /// Every host a transaction goes to.
    pub fn targets(&self) -> Vec<String> {
        self.canary.iter().chain(&self.wave).cloned().collect()
    }
}

/// How a whole change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutOutcome {
    /// Every host committed the new revision.
    Completed,
    /// A host did not commit; every host that had committed was reverted
    /// to the previous revision.
    RolledBack,
    /// A host did not commit, and a revert did not commit either: some
    /// hosts need attention (`dvs show`).
    RevertIncomplete,
}

impl RolloutOutcome {
    pub fn word(self) -> &'static str {
        match self {
            RolloutOutcome::Completed => "completed",
            RolloutOutcome::RolledBack => "rolled-back",
            RolloutOutcome::RevertIncomplete => "revert-incomplete",
        }
    }
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these hosts the new revision, in parallel.
    Apply(Vec<String>),
    /// Send these hosts (exactly those that committed) the previous
    /// revision, in parallel.
    Revert(Vec<String>),
    Done(RolloutOutcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Canary,
    Wave,
    Reverting,
}

/// A rollout in progress.
#[derive(Debug, Clone)]
pub struct Rollout {
    plan: RolloutPlan,
    stage: Stage,
    results: BTreeMap<String, HostResult>,
    reverts: BTreeMap<String, HostResult>,
}

impl Rollout {
    pub fn new(plan: RolloutPlan) -> Self {
        Rollout {
            plan,
            stage: Stage::Canary,
            results: BTreeMap::new(),
            reverts: BTreeMap::new(),
        }
    }

    pub fn plan(&self) -> &RolloutPlan {
        &self.plan
    }

    /// A host's result for the new revision. Only hosts of the step being
    /// run count; anything else is ignored.
    pub fn record(&mut self, host: &str, result: HostResult) {
        let expected = match self.stage {
            Stage::Canary => self.plan.canary.as_deref() == Some(host),
            Stage::Wave => self.plan.wave.iter().any(|h| h == host),
            Stage::Reverting => false,
        };
        if expected {
            self.results.entry(host.to_string()).or_insert(result);
        }
    }

    /// A committed host's result for its revert.
    pub fn record_revert(&mut self, host: &str, result: HostResult) {
        if self.stage == Stage::Reverting && self.committed().contains(&host.to_string()) {
            self.reverts.entry(host.to_string()).or_insert(result);
        }
    }

    /// Hosts that committed the new revision.
    pub fn committed(&self) -> Vec<String> {
        self.plan
            .targets()
            .into_iter()
            .filter(|h| self.results.get(h).is_some_and(HostResult::committed))
            .collect()
    }

    fn failed(&self) -> bool {
        self.results.values().any(|r| !r.committed())
    }

    pub fn result(&self, host: &str) -> Option<&HostResult> {
        self.results.get(host)
    }

    pub fn revert_result(&self, host: &str) -> Option<&HostResult> {
        self.reverts.get(host)
    }

    /// Hosts of the plan never sent the change (the rollout stopped first).
    pub fn skipped(&self) -> Vec<String> {
        self.plan
            .targets()
            .into_iter()
            .filter(|h| !self.results.contains_key(h))
            .collect()
    }

    /// What to do now. Repeats a step until all its hosts are recorded.
    pub fn next_step(&mut self) -> Step {
        loop {
            match self.stage {
                Stage::Canary => match &self.plan.canary {
                    None => return Step::Done(RolloutOutcome::Completed),
                    Some(c) if !self.results.contains_key(c) => {
                        return Step::Apply(vec![c.clone()])
                    }
                    Some(_) if self.failed() => self.stage = Stage::Reverting,
                    Some(_) => self.stage = Stage::Wave,
                },
                Stage::Wave => {
                    let left: Vec<String> = self
                        .plan
                        .wave
                        .iter()
                        .filter(|h| !self.results.contains_key(*h))
                        .cloned()
                        .collect();
                    if !left.is_empty() {
                        return Step::Apply(left);
                    }
                    if !self.failed() {
                        return Step::Done(RolloutOutcome::Completed);
                    }
                    self.stage = Stage::Reverting;
                }
                Stage::Reverting => {
                    let left: Vec<String> = self
                        .committed()
                        .into_iter()
                        .filter(|h| !self.reverts.contains_key(h))
                        .collect();
                    if !left.is_empty() {
                        return Step::Revert(left);
                    }
                    return Step::Done(if self.reverts.values().all(HostResult::committed) {
                        RolloutOutcome::RolledBack
                    } else {
                        RolloutOutcome::RevertIncomplete
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i}")).collect()
    }

    #[test]
    fn canary_first_then_the_rest_together() {
        let hosts = names(4);
        let plan = RolloutPlan::new(&hosts, None, &BTreeSet::new()).unwrap();
        let mut r = Rollout::new(plan);
        assert_eq!(r.next_step(), Step::Apply(vec!["h0".into()]));
        r.record("h0", HostResult::Committed);
        assert_eq!(r.next_step(), Step::Apply(names(4)[1..].to_vec()));
        for h in &hosts[1..] {
            r.record(h, HostResult::Committed);
        }
        assert_eq!(r.next_step(), Step::Done(RolloutOutcome::Completed));
    }

    #[test]
    fn explicit_canary_and_unchanged_hosts() {
        let hosts = names(4);
        let unchanged: BTreeSet<String> = ["h0".to_string(), "h2".into()].into();
        let plan = RolloutPlan::new(&hosts, None, &unchanged).unwrap();
        assert_eq!(plan.canary.as_deref(), Some("h1"));
        assert_eq!(plan.wave, ["h3"]);
        assert_eq!(plan.unchanged, ["h0", "h2"]);
        let plan = RolloutPlan::new(&hosts, Some("h2"), &unchanged).unwrap();
        assert_eq!(plan.canary.as_deref(), Some("h2"));
        assert_eq!(plan.wave, ["h1", "h3"]);
        assert!(RolloutPlan::new(&hosts, Some("h9"), &unchanged).is_err());
        let all: BTreeSet<String> = hosts.iter().cloned().collect();
        let plan = RolloutPlan::new(&hosts, None, &all).unwrap();
        assert_eq!(
            Rollout::new(plan).next_step(),
            Step::Done(RolloutOutcome::Completed)
        );
    }

    #[test]
    fn a_failed_canary_stops_everything_and_reverts_nothing() {
        let plan = RolloutPlan::new(&names(3), None, &BTreeSet::new()).unwrap();
        let mut r = Rollout::new(plan);
        r.next_step();
        r.record("h0", HostResult::OutOfSync("return lost".into()));
        assert_eq!(r.next_step(), Step::Done(RolloutOutcome::RolledBack));
        assert_eq!(r.skipped(), ["h1", "h2"]);
    }

    #[test]
    fn a_failure_in_the_wave_reverts_exactly_the_committed() {
        let plan = RolloutPlan::new(&names(4), None, &BTreeSet::new()).unwrap();
        let mut r = Rollout::new(plan);
        r.next_step();
        r.record("h0", HostResult::Committed);
        r.next_step();
        r.record("h1", HostResult::Committed);
        r.record("h2", HostResult::NotApplied("busy".into()));
        r.record("h3", HostResult::Committed);
        assert_eq!(
            r.next_step(),
            Step::Revert(vec!["h0".into(), "h1".into(), "h3".into()])
        );
        r.record_revert("h0", HostResult::Committed);
        r.record_revert("h2", HostResult::Committed); // never committed: ignored
        assert_eq!(r.next_step(), Step::Revert(vec!["h1".into(), "h3".into()]));
        r.record_revert("h1", HostResult::Committed);
        r.record_revert("h3", HostResult::OutOfSync("lost".into()));
        assert_eq!(r.next_step(), Step::Done(RolloutOutcome::RevertIncomplete));
    }

    fn result() -> impl Strategy<Value = HostResult> {
        prop_oneof![
            4 => Just(HostResult::Committed),
            1 => Just(HostResult::NotApplied("refused".into())),
            1 => Just(HostResult::OutOfSync("lost".into())),
        ]
    }

    proptest! {
        /// Whatever the hosts answer: the canary goes alone and first; no
        /// host is sent the change twice; the rollout completes exactly
        /// when every target committed; otherwise exactly the committed
        /// hosts are reverted, each once.
        #[test]
        fn rollout_properties(
            n in 1usize..12,
            canary in proptest::option::of(0usize..12),
            unchanged_mask in proptest::collection::vec(any::<bool>(), 12),
            forward in proptest::collection::vec(result(), 12),
            back in proptest::collection::vec(result(), 12),
        ) {
            let hosts = names(n);
            let unchanged: BTreeSet<String> = hosts.iter().enumerate()
                .filter(|(i, _)| unchanged_mask[*i]).map(|(_, h)| h.clone()).collect();
            let canary = canary.filter(|c| *c < n).map(|c| hosts[c].clone());
            let plan = RolloutPlan::new(&hosts, canary.as_deref(), &unchanged).unwrap();
            let targets = plan.targets();
            let idx = |h: &str| hosts.iter().position(|x| x == h).unwrap();
            let mut r = Rollout::new(plan.clone());
            let mut applied: Vec<String> = Vec::new();
            let mut reverted: Vec<String> = Vec::new();
            let mut first = true;
            let outcome = loop {
                match r.next_step() {
                    Step::Apply(hs) => {
                        if first {
                            prop_assert_eq!(hs.len(), 1);
                            prop_assert_eq!(Some(&hs[0]), plan.canary.as_ref());
                            first = false;
                        }
                        for h in hs {
                            prop_assert!(!applied.contains(&h), "{} applied twice", h);
                            r.record(&h, forward[idx(&h)].clone());
                            applied.push(h);
                        }
                    }
                    Step::Revert(hs) => {
                        for h in hs {
                            prop_assert!(!reverted.contains(&h), "{} reverted twice", h);
                            r.record_revert(&h, back[idx(&h)].clone());
                            reverted.push(h);
                        }
                    }
                    Step::Done(o) => break o,
                }
            };
            let committed: BTreeSet<String> = applied.iter()
                .filter(|h| forward[idx(h)].committed()).cloned().collect();
            let all_committed = targets.iter().all(|h| committed.contains(h));
            prop_assert_eq!(outcome == RolloutOutcome::Completed, all_committed);
            if all_committed {
                prop_assert!(reverted.is_empty());
            } else {
                let reverted: BTreeSet<String> = reverted.into_iter().collect();
                prop_assert_eq!(&reverted, &committed);
                let reverts_ok = reverted.iter().all(|h| back[idx(h)].committed());
                prop_assert_eq!(outcome == RolloutOutcome::RolledBack, reverts_ok);
                // Nothing is started after the canary fails.
                if let Some(c) = &plan.canary {
                    if !forward[idx(c)].committed() {
                        prop_assert_eq!(applied.len(), 1);
                    }
                }
            }
            for h in &plan.unchanged {
                prop_assert!(!applied.contains(h));
            }
        }
    }
}
